"""A query, a service start and an update with nothing to encode, each in a fresh process over a saved index whose
ONNX exports are cached (by this session's indexing): they load only what they run, never the PyTorch model stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_STACK = ("torch", "timm", "open_clip", "transformers", "torchvision")
REPORT = """
import json, sys
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))), file=sys.stderr)
""" % (MODEL_STACK + ("onnxruntime", "tokenizers"),)


def run_fresh(code: str) -> tuple[str, list[str]]:
    """Run ``code`` in a new interpreter; (its stdout, the heavy top-level packages it had imported at the end)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code + REPORT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(indexed, tmp_path_factory) -> Path:
    """The fixture index, saved; its encoders' exports are in the cache a fresh process reads (an earlier test may
    have made the shared encoders under another cache folder)."""
    from multiretrieval.encoders.image import ImageEncoder
    from multiretrieval.encoders.text import TextEncoder

    encoders = indexed.config.encoders
    ImageEncoder.load(encoders.image, encoders.image_weights)
    TextEncoder.load(encoders.text, encoders.text_weights, encoders.max_text_tokens)
    folder = tmp_path_factory.mktemp("cold") / "idx"
    indexed.save(folder)
    return folder


def json_values(text: str) -> list:
    """The JSON documents printed one after another."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        value, at = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        values.append(value)
    return values


def test_text_and_image_searches_load_no_pytorch_model(saved, indexed, fixtures):
    photo = fixtures / "images" / "bed1.png"
    out, loaded = run_fresh(f"""
from multiretrieval.cli import main
assert main(["search", {str(saved)!r}, "--text", "a red armchair", "--k", "3", "--format", "json"]) == 0
assert main(["search", {str(saved)!r}, "--image", {str(photo)!r}, "--k", "3", "--format", "json"]) == 0
""")
    assert not set(loaded) & set(MODEL_STACK), f"a query on a saved index imported {loaded}"
    assert {"onnxruntime", "tokenizers"} <= set(loaded)  # the query did run the encoders
    text, image = json_values(out)
    assert [r["id"] for r in text] == indexed.search(text="a red armchair", k=3)["id"].tolist()
    assert [r["id"] for r in image] == indexed.search(image=photo, k=3)["id"].tolist()


def test_a_service_starts_without_the_pytorch_model_stack(saved, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "idx")
    _, loaded = run_fresh(f"""
from multiretrieval.server.service import Service
service = Service({str(tmp_path / "idx")!r})
assert len(service.retriever.search(text="lamp", k=2)) == 2
service.close()
""")
    assert not set(loaded) & set(MODEL_STACK), f"the service's start imported {loaded}"
    assert {"onnxruntime", "tokenizers"} <= set(loaded)  # warmed up on ONNX Runtime


def test_an_update_with_nothing_to_encode_loads_no_model(saved, fixtures, tmp_path):
    import shutil

    shutil.copytree(saved, tmp_path / "idx")
    before = json.loads((saved / "manifest.json").read_text())
    out, loaded = run_fresh(f"""
from multiretrieval.cli import main
assert main(["index", {str(fixtures / "catalog.csv")!r}, "--out", {str(tmp_path / "idx")!r}, "--update", "--no-progress"]) == 0
""")
    assert "unchanged 8" in out and "saved to" in out
    assert loaded == [], f"an update that encoded nothing imported {loaded}"
    after = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert {k: after[k] for k in ("encoders", "fusion", "zero_shot")} == {k: before[k] for k in ("encoders", "fusion", "zero_shot")}
