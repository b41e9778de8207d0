"""Ingestion throughput: the full pipeline against the bare encoder forward and a naive loop.

    python benchmarks/ingest_throughput.py [--catalog data/demo/catalog.csv] [--items 820] [--runs 3]

All on the same real catalog in one process, each measured --runs times (medians quoted):

- bare forward: the default image encoder's network alone on pre-decoded, pre-resized
  tensors in batches of 32, in eager PyTorch (the reference the issue names) and in ONNX
  Runtime (the default runtime);
- naive loop: one item at a time: decode, resize, image forward, text forward, zero-shot
  vectors (what a hand-written script does), in eager PyTorch, and on ONNX Runtime (the
  latter isolates what batching and read-ahead add on one runtime);
- pipeline: ``Retriever.index`` from a fresh shard cache: hashing, threaded decoding,
  batched image and length-sorted text encoding, shard writes, fusion and the FAISS index.

Throughputs are items per second; ratios are pipeline / reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import multiretrieval as mr  # noqa: E402
from multiretrieval.catalog import load_image  # noqa: E402
from multiretrieval.encoders import get_image_encoder  # noqa: E402


def bare_forward(encoder, tensors: list, batch: int = 32) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch):
        encoder.forward(np.stack(tensors[start:start + batch]))
    return len(tensors) / (time.perf_counter() - t0)


def naive_loop(r: mr.Retriever, sources: list, texts: list) -> float:
    t0 = time.perf_counter()
    for source, text in zip(sources, texts):
        image = load_image(source)
        tokens, probs = r.image_encoder.forward(r.image_encoder.preprocess(image)[None])
        r.zero_shot.image_batch([image], tokens[:, 0], probs)
        text_tokens, _ = r.text_encoder.forward([text])
        r.zero_shot.text_batch([text], text_tokens[:, 0])
    return len(sources) / (time.perf_counter() - t0)


def pipeline(catalog: mr.Catalog) -> tuple[float, mr.IndexReport]:
    with tempfile.TemporaryDirectory() as cache:
        r = mr.Retriever()
        t0 = time.perf_counter()
        report = r.index(catalog, show_progress=False, cache=cache)
        return len(catalog) / (time.perf_counter() - t0), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=820)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    catalog = mr.Catalog.from_csv(args.catalog)
    catalog = mr.Catalog(catalog.df.assign(image=catalog.image_sources()).iloc[:args.items])
    sources, texts = catalog.image_sources(), catalog.texts()
    r = mr.Retriever()
    r.zero_shot.text_batch(["warm-up"])  # load and export every model before timing
    r_eager = mr.Retriever(mr.RetrieverConfig().with_overrides({"encoders": {"runtime": "torch"}}))
    r_eager.zero_shot.text_batch(["warm-up"])
    eager = get_image_encoder(r.config.encoders.image, runtime="torch")
    tensors = [eager.preprocess(load_image(s)) for s in sources]
    naive_n = min(len(sources), 200)  # the slow loop on a prefix is enough for a rate

    rates: dict[str, list[float]] = {"bare forward, eager PyTorch": [], "bare forward, ONNX Runtime": [],
                                     "naive loop, eager PyTorch": [], "naive loop, ONNX Runtime": [],
                                     "pipeline (Retriever.index)": []}
    for run in range(args.runs):
        rates["bare forward, eager PyTorch"].append(bare_forward(eager, tensors))
        rates["bare forward, ONNX Runtime"].append(bare_forward(r.image_encoder, tensors))
        rates["naive loop, eager PyTorch"].append(naive_loop(r_eager, sources[:naive_n], texts[:naive_n]))
        rates["naive loop, ONNX Runtime"].append(naive_loop(r, sources[:naive_n], texts[:naive_n]))
        rate, report = pipeline(catalog)
        rates["pipeline (Retriever.index)"].append(rate)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{len(catalog)} items ({args.catalog}), {torch.get_num_threads()} threads, median of {args.runs} runs")
    print(f"{'':34} {'items/s':>9} {'pipeline / this':>16}")
    for name, value in med.items():
        print(f"{name:34} {value:9.1f} {med['pipeline (Retriever.index)'] / value:16.2f}")
    print(f"\nlast pipeline run: {report}")


if __name__ == "__main__":
    main()
