"""The ingestion pipeline: content-hash cache, shards, kill-and-resume, the index report, Ray."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import multiretrieval as mr
from multiretrieval.pipeline import ShardStore, content_hash

SMALL = {"encoders": {"batch_size": 2}, "ingest": {"shard_size": 2}}


def variants(catalog, copies: int) -> pd.DataFrame:
    """``copies`` items per fixture image, each with its own text (so its own content hash)."""
    df = catalog.df.assign(image=catalog.image_sources())
    return pd.concat([df.assign(id=[f"{i}-{c}" for i in df["id"]], title=df["title"] + f" (variant {c})") for c in range(copies)],
                     ignore_index=True)


def test_unchanged_items_come_from_the_cache(catalog, tmp_path):
    cfg = mr.RetrieverConfig().with_overrides(SMALL)
    first = mr.Retriever(cfg)
    report = first.index(catalog, show_progress=False, cache=tmp_path / "cache")
    assert (report.encoded, report.cached) == (8, 0)

    changed = catalog.df.assign(image=catalog.image_sources())
    changed.loc[0, "title"] = "A washing machine, now in red"
    again = mr.Retriever(cfg)
    report = again.index(mr.Catalog(changed), show_progress=False, cache=tmp_path / "cache")
    assert (report.encoded, report.cached, report.indexed) == (1, 7, 8)
    a, b = first.features(), again.features()
    np.testing.assert_array_equal(a["image_tokens"], b["image_tokens"])  # images unchanged: the cached arrays
    np.testing.assert_array_equal(a["text_tokens"][1:], b["text_tokens"][1:])
    assert not np.allclose(a["text_tokens"][0], b["text_tokens"][0])


def test_content_hash_follows_the_bytes_and_the_text(fixtures, tmp_path):
    src = fixtures / "images" / "smart-car.png"
    copy = tmp_path / "copy.png"
    copy.write_bytes(src.read_bytes())
    assert content_hash(str(src), "car", 10**8) == content_hash(str(copy), "car", 10**8)  # same bytes, other path
    assert content_hash(str(src), "car", 10**8) != content_hash(str(src), "cars", 10**8)
    copy.write_bytes(src.read_bytes() + b"\0")
    assert content_hash(str(src), "car", 10**8) != content_hash(str(copy), "car", 10**8)
    assert content_hash(str(tmp_path / "missing.png"), "car", 10**8) != content_hash(str(src), "car", 10**8)


def test_a_broken_shard_is_refused_with_its_name(catalog, tmp_path):
    mr.Retriever(mr.RetrieverConfig().with_overrides(SMALL)).index(catalog, show_progress=False, cache=tmp_path)
    shard = sorted(tmp_path.glob("*/shard-*"))[0]
    (shard / "items.parquet").write_bytes(b"garbage")
    with pytest.raises(mr.IndexLoadError, match=f"{shard.name}: unreadable shard"):
        ShardStore.open(tmp_path, json.loads((shard.parent / "fingerprint.json").read_text()))


def test_index_report_file_lists_every_skipped_row(catalog, tmp_path):
    df = catalog.df.assign(image=catalog.image_sources(), id=catalog.df["id"].astype(str))
    bad = pd.DataFrame({"id": ["b1", "b2"], "image": [str(tmp_path / "missing.png")] * 2, "title": [None, "gone"]})
    r = mr.Retriever()
    r.index(mr.Catalog(pd.concat([df, bad], ignore_index=True)), show_progress=False)
    report = json.loads((r.save(tmp_path / "index") / "index-report.json").read_text())
    assert report["indexed"] == 9 and report["text_only"] == 1
    assert report["skipped"] == [{"row": 8, "id": "b1", "reason": f"{tmp_path / 'missing.png'}: file not found"}]
    assert report["warnings"] == [{"row": 9, "id": "b2", "reason": f"indexed by its text only: {tmp_path / 'missing.png'}: file not found"}]


def test_a_killed_index_run_resumes_from_its_last_shard_and_ends_identical(catalog, tmp_path):
    """SIGKILL the CLI midway; the re-run encodes only what no complete shard holds, and the
    saved index equals an uninterrupted run's, vector for vector."""
    catalog_file = tmp_path / "catalog.parquet"
    variants(catalog, 4).to_parquet(catalog_file)  # 32 items, 16 shards of 2
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps(SMALL))  # JSON is YAML
    cmd = [sys.executable, "-m", "multiretrieval.cli", "index", str(catalog_file), "--config", str(config), "--no-progress"]

    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "resumed"), "--cache", str(tmp_path / "cache")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("cache/*/shard-*"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(tmp_path.glob("cache/*/shard-*")))
    assert 3 <= done < 16, f"the kill came too late to test resuming ({done} of 16 shards)"
    assert not (tmp_path / "resumed").exists()

    out = subprocess.run(cmd + ["--out", str(tmp_path / "resumed"), "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, check=True).stdout
    assert f"encoded {32 - 2 * done}, from cache {2 * done}" in out
    subprocess.run(cmd + ["--out", str(tmp_path / "straight"), "--cache", str(tmp_path / "cache2")], capture_output=True, check=True)

    resumed, straight = mr.Retriever.load(tmp_path / "resumed"), mr.Retriever.load(tmp_path / "straight")
    assert list(resumed.items["id"]) == list(straight.items["id"])
    for name, value in straight.features().items():
        np.testing.assert_array_equal(resumed.features()[name], value)
    for space in ("joint", "clip_image", "clip_text"):
        np.testing.assert_array_equal(resumed.vectors(space), straight.vectors(space))


def test_ray_engine_writes_the_same_shards(catalog, tmp_path):
    """The encoder stage on a local Ray instance (two actors) gives the local engine's index."""
    ray = pytest.importorskip("ray")
    cfg = mr.RetrieverConfig().with_overrides(SMALL)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = mr.Retriever(cfg)
        report = on_ray.index(catalog, show_progress=False, cache=tmp_path / "ray", engine="ray")
    finally:
        ray.shutdown()
    assert report.indexed == 8 and report.encoded == 8
    assert len(list((tmp_path / "ray").glob("*/shard-*"))) == 4
    local = mr.Retriever(cfg)
    local.index(catalog, show_progress=False)
    for name, value in local.features().items():
        np.testing.assert_allclose(on_ray.features()[name], value, atol=1e-6)
    assert list(on_ray.search(text="a washing machine", k=3)["id"]) == list(local.search(text="a washing machine", k=3)["id"])


def test_a_catalog_whose_every_row_fails_indexes_nothing_and_says_why(tmp_path):
    r = mr.Retriever()
    report = r.index(pd.DataFrame({"id": [1, 2], "image": [str(tmp_path / "a.png"), str(tmp_path / "b.png")]}), show_progress=False)
    assert report.indexed == 0 and len(r) == 0
    assert [s.id for s in report.skipped] == [1, 2] and all("file not found" in s.reason for s in report.skipped)


def test_the_index_report_gives_seconds_for_every_stage(catalog, tmp_path):
    r = mr.Retriever(mr.RetrieverConfig().with_overrides(SMALL))
    report = r.index(catalog, show_progress=False, cache=tmp_path)
    assert list(report.seconds) == ["hash", "load", "read", "image", "text", "zero_shot", "write", "index"]
    assert all(report.seconds[stage] > 0 for stage in ("hash", "read", "image", "text", "zero_shot", "write", "index"))
    assert report.elapsed >= report.seconds["hash"] + report.seconds["index"] + report.seconds["load"]
    assert report.items_per_second == pytest.approx(len(catalog) / report.elapsed)
    assert list(report.to_dict()["seconds"]) == list(report.seconds)
    text = str(report)
    for stage in ("hash", "load", "read", "image", "text", "zero-shot", "write", "index"):
        assert f"{stage} " in text


def test_the_thread_plan_fills_the_cores():
    from multiretrieval.pipeline import Threads, plan_threads

    assert plan_threads(cores=2) == Threads(read=2, image=2)  # one-thread image runs, one per core
    assert plan_threads(cores=16) == Threads(read=5, image=8)  # two-thread runs above 4 cores
    assert plan_threads(workers=3, cores=16).read == 3
    assert plan_threads(runtime="torch", cores=16) == Threads(read=5, image=1)  # PyTorch splits one batch itself
    assert plan_threads(gpu=True, cores=16) == Threads(read=15, image=2)  # the GPU encodes; decoding is the work


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_batches_encoded_at_once_give_the_vectors_of_one_batch_at_a_time(catalog, precision):
    """Four image batches run concurrently beside the text thread: each item's vectors are those its batch gets alone."""
    cfg = mr.RetrieverConfig().with_overrides({**SMALL, "encoders": {"batch_size": 2, "precision": precision}})
    r = mr.Retriever(cfg)
    r.index(catalog, show_progress=False)
    features = r.features()
    from multiretrieval.catalog import load_image

    images = [r.image_encoder.preprocess(load_image(s)) for s in catalog.image_sources()]
    alone = np.concatenate([r.image_encoder.forward(np.stack(images[s:s + 2]))[0] for s in range(0, len(images), 2)])
    np.testing.assert_allclose(features["image_tokens"], alone, atol=1e-5)
    if precision == "fp32":  # int8 text quantises each batch's activations by its own range: compared in test_quantize
        texts = catalog.texts()
        np.testing.assert_allclose(features["text_tokens"][:, 0], np.concatenate([r.text_encoder.forward([t])[0][:, 0] for t in texts]),
                                   atol=1e-5)


def test_where_onnx_runtime_offers_a_gpu_the_pipeline_plans_for_it(indexed, monkeypatch):
    """No config change: the sessions take CUDA first (runtime.providers), and the pipeline then encodes two image
    batches at once (one copies while the other runs) with a reader per core but one."""
    from multiretrieval.encoders import runtime
    from multiretrieval.pipeline import ShardEncoder, Threads, cpu_budget, plan_threads

    assert ShardEncoder(indexed.embedder).threads == plan_threads(cores=cpu_budget())  # the CPU's plan
    monkeypatch.setattr(runtime, "providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ShardEncoder(indexed.embedder).threads == Threads(read=max(2, cpu_budget() - 1), image=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a Ray actor's share
    assert cpu_budget() == 1
