"""Measure the activation ranges of the image CNN's int8 export (reproduces multiretrieval/weights/int8-*.json).

    apt-get download sweethome3d-furniture openclipart-png tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/calibrate_int8.py /tmp/mrdata

Images: the training data sets only (DESIGN.md): sweethome3d-furniture, openclipart-png and the TRAINING split of
tuxpaint-stamps-default, without the top-level categories the benchmarks hold out (benchmarks.heldout_category):
--per-set images of each (fewer, in proportion, where a set is short), drawn with a fixed seed, for the calibration, and
--check more of each, disjoint, on which
the int8 export is compared with fp32 (the figures are written into the table under "check").

Ranges: ONNX Runtime's percentile calibrator (99.999th percentile of each activation's histogram; --method minmax or
entropy). Nodes whose names start with a --fp32 prefix stay fp32: by default the stem and blocks 0 and 1.0 of
EfficientNet-Lite0 (112 x 112 px maps), where int8 moved the vectors most (--sensitivity prints each node's share:
the mean 1 - cosine to fp32 of the pooled features when that node alone is quantised).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from multiretrieval.benchmarks import heldout_category, load_items  # noqa: E402
from multiretrieval.catalog import load_image  # noqa: E402
from multiretrieval.datasets import split_of  # noqa: E402
from multiretrieval.encoders import get_image_encoder, get_text_encoder  # noqa: E402
from multiretrieval.encoders.clip import ConSE, LiT  # noqa: E402
from multiretrieval.encoders.quantize import IMAGE_OPS, TABLE_FORMAT, calibrate_image, calibration_file, quantize_image  # noqa: E402
from multiretrieval.encoders.runtime import EXPORT_FORMAT, Export, file_digest  # noqa: E402
from multiretrieval.errors import ImageError  # noqa: E402

DEFAULT_FP32 = ["/conv_stem/", "/bn1/", "/blocks/blocks.0/", "/blocks/blocks.1/blocks.1.0/"]


def sample_images(root: Path, work: Path, per_set: int, check: int, seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """(calibration paths, check paths) per data set: training items outside the held-out categories."""
    items = load_items(root, work / "sweethome3d-images", heldout=heldout_category)
    items = items[~items["heldout"] & ((items["dataset"] != "tuxpaint") | (items["id"].map(split_of) == "train"))]
    rng = np.random.default_rng(seed)
    out = {}
    for name, part in items.groupby("dataset"):
        paths = list(part["image"].iloc[rng.permutation(len(part))])
        n = min(per_set, len(paths) * per_set // (per_set + check))  # a small set is shared in the same proportion
        out[name] = (paths[:n], paths[n:n + check])
    return out


def preprocess(encoder, paths: list[str]) -> np.ndarray:
    arrays = []
    for path in paths:
        try:
            arrays.append(encoder.preprocess(load_image(path)))
        except ImageError as exc:  # the decompression-bomb guard: indexing would skip it too
            print(f"skipped {path}: {exc}")
    return np.stack(arrays)


def run(session, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    outs = [session.run(None, {"images": np.ascontiguousarray(x[s:s + batch])}) for s in range(0, len(x), batch)]
    return np.concatenate([o[0].mean(axis=(2, 3)) for o in outs]), np.concatenate([o[1] for o in outs])


def session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def fidelity(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], spaces) -> dict[str, dict[str, float]]:
    """Per-item cosine to fp32 (mean, 1st percentile, minimum) of the pooled features, the LiT and ConSE zero-shot
    vectors, and the share of each item's 10 nearest neighbours (pooled features) that fp32 and int8 agree on."""
    lit, conse = spaces

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def stats(c):
        return {"mean": round(float(c.mean()), 5), "p1": round(float(np.percentile(c, 1)), 5), "min": round(float(c.min()), 5)}

    def neighbours(p):
        s = unit(p) @ unit(p).T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, 1)[:, :10]

    out = {"pooled": stats((unit(ref[0]) * unit(got[0])).sum(1)),
           "lit": stats((lit.image_batch(None, ref[0]) * lit.image_batch(None, got[0])).sum(1)),
           "conse": stats((conse.embed_image_probs(ref[1]) * conse.embed_image_probs(got[1])).sum(1))}
    a, b = neighbours(ref[0]), neighbours(got[0])
    out["neighbours@10"] = round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])), 4)
    out["top1_class"] = round(float((ref[1].argmax(1) == got[1].argmax(1)).mean()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder the three Debian packages were unpacked into")
    parser.add_argument("--image-encoder", default="efficientnet-lite0")
    parser.add_argument("--per-set", type=int, default=400, help="calibration images per data set")
    parser.add_argument("--check", type=int, default=200, help="further images per data set to compare int8 with fp32 on")
    parser.add_argument("--method", default="percentile", choices=["percentile", "entropy", "minmax"])
    parser.add_argument("--fp32", nargs="*", default=DEFAULT_FP32, help="node name prefixes that stay fp32")
    parser.add_argument("--sensitivity", action="store_true", help="print each node's cost when quantised alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/multiretrieval-calibrate"))
    parser.add_argument("--out", type=Path, help="default: where the package looks for it (quantize.calibration_file)")
    args = parser.parse_args()

    import onnx

    encoder = get_image_encoder(args.image_encoder, runtime="onnx")  # fp32: writes the export if missing
    export_path = encoder._onnx.path
    from multiretrieval.encoders.image import IMAGE_ENCODERS

    weights = IMAGE_ENCODERS[args.image_encoder].packaged_weights()
    images = sample_images(args.root, args.work, args.per_set, args.check, args.seed)
    print({name: (len(c), len(k)) for name, (c, k) in images.items()})

    started = time.time()

    def batches():
        for name, (paths, _) in images.items():
            for s in range(0, len(paths), 16):
                yield preprocess(encoder, paths[s:s + 16])

    ranges = calibrate_image(export_path, batches(), args.method)
    graph = onnx.load(str(export_path), load_external_data=False)
    fp32_nodes = [n.name for n in graph.graph.node if n.op_type in IMAGE_OPS and any(n.name.startswith(p) for p in args.fp32)]
    table = {"format": TABLE_FORMAT, "encoder": args.image_encoder, "weights_sha256": file_digest(weights),
             "export_format": EXPORT_FORMAT, "export": Export(args.image_encoder, encoder.key).path.name,
             "recipe": f"static int8 QOperator, per-channel int8 weights, uint8 activations, {args.method} ranges, "
                       f"fp32: {' '.join(args.fp32)}",
             "method": args.method, "images": {name: len(c) for name, (c, _) in images.items()}, "seed": args.seed,
             "fp32_prefixes": args.fp32, "fp32_nodes": fp32_nodes, "ranges": ranges}
    print(f"calibrated in {time.time() - started:.0f} s")

    check = preprocess(encoder, [p for _, (_, k) in images.items() for p in k])
    spaces = (LiT(encoder, get_text_encoder("minilm-l6", runtime="onnx")),
              ConSE(encoder, get_text_encoder("minilm-l6", runtime="onnx")))
    ref = run(session(str(export_path)), check)
    table["check"] = {"images": len(check), **fidelity(ref, run(session(quantize_image(export_path, table)), check), spaces)}
    print(json.dumps(table["check"], indent=1))

    if args.sensitivity:
        quantisable = [n.name for n in graph.graph.node if n.op_type in IMAGE_OPS]
        costs = {}
        for name in quantisable:
            alone = {**table, "fp32_nodes": [n for n in quantisable if n != name]}
            pooled = run(session(quantize_image(export_path, alone)), check[::4])[0]
            r = ref[0][::4]
            cos = (pooled * r).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(r, axis=1)
            costs[name] = (float(1 - cos.mean()), float(1 - cos.min()))
        print("| node | mean 1 - cos | max 1 - cos |\n|---|---|---|")
        for name, (mean, worst) in sorted(costs.items(), key=lambda kv: -kv[1][0]):
            print(f"| {name} | {mean:.5f} | {worst:.5f} |")

    out = args.out or calibration_file(args.image_encoder)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
