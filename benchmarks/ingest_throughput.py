"""Ingestion throughput: the full pipeline against the bare image forward, fp32 and int8.

    python benchmarks/ingest_throughput.py [--catalog data/demo/catalog.csv] [--items 820] [--runs 3] [--naive] [--eager]

All on the same real catalog, each measured --runs times, the rows interleaved within a run (medians quoted):

- bare forward: the image CNN's ONNX export alone (the encoder's own export file, fp32 and int8) in a session of
  2 intra-op threads, on pre-decoded, pre-resized tensors in batches of 32: the reference. ``--eager`` adds eager
  PyTorch;
- pipeline: what a user runs, in a fresh process: ``Retriever()`` (model loading included) then ``index`` of the
  catalog from an empty shard cache, at ``encoders.precision`` int8 and fp32 (the default); the last run's index
  report gives the seconds per stage;
- naive loop (``--naive``): one item at a time: decode, resize, image forward, text forward, zero-shot vectors.

Throughputs are items per second; ratios are against the fp32 bare forward. Then the image network's FLOPs
(counted from the export's graph: 2 x the multiply-adds of its Conv and Gemm nodes) and the share of the CPU's peak
that each bare forward reaches (peak: vector width from lscpu's flags x 2 for FMA x 2 FMA units per core x clock x
cores; AMD Zen 4 runs AVX-512 on 256-bit units; int8 peak: 4 x the fp32 one with VNNI). The machine's load
(``uptime``) is printed with the figures: on a shared machine, read the ratios, not the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import multiretrieval as mr  # noqa: E402
from multiretrieval.catalog import load_image  # noqa: E402
from multiretrieval.encoders import get_image_encoder  # noqa: E402

PIPELINE = """
import json, sys, time, tempfile
import multiretrieval as mr
catalog = mr.Catalog.from_csv(sys.argv[1])
catalog = mr.Catalog(catalog.df.assign(image=catalog.image_sources()).iloc[:int(sys.argv[2])])
with tempfile.TemporaryDirectory() as cache:
    t0 = time.perf_counter()
    r = mr.Retriever(mr.RetrieverConfig().with_overrides({"encoders": {"precision": sys.argv[3]}}))
    report = r.index(catalog, show_progress=False, cache=cache)
    seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "report": report.to_dict(), "text": str(report).splitlines()[:2],
                  "precision": r.image_encoder.precision}))
"""


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bare_forward(sess, tensors: np.ndarray, batch: int = 32) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch):
        sess.run(None, {"images": tensors[start:start + batch]})
    return len(tensors) / (time.perf_counter() - t0)


def eager_forward(encoder, tensors: np.ndarray, batch: int = 32) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch):
        encoder.forward(tensors[start:start + batch])
    return len(tensors) / (time.perf_counter() - t0)


def pipeline(catalog_path: str, items: int, precision: str) -> tuple[float, dict]:
    """A fresh process: Retriever() and index; items per second from the Retriever's creation (models load in it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PIPELINE, catalog_path, str(items), precision], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise SystemExit(f"the pipeline process failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return items / result["seconds"], result


def naive_loop(r: mr.Retriever, sources: list, texts: list) -> float:
    t0 = time.perf_counter()
    for source, text in zip(sources, texts):
        image = load_image(source)
        tokens, probs = r.image_encoder.forward(r.image_encoder.preprocess(image)[None])
        r.zero_shot.image_batch([image], tokens[:, 0], probs)
        text_tokens, _ = r.text_encoder.forward([text])
        r.zero_shot.text_batch([text], text_tokens[:, 0])
    return len(sources) / (time.perf_counter() - t0)


def graph_flops(path: Path, image_size: int) -> float:
    """FLOPs of one image through the graph: 2 x the multiply-adds of its Conv and Gemm nodes. Output shapes come from
    running it once (its pads are computed by nodes, which shape inference cannot read)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for node in nodes:
        model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": np.zeros((1, 3, image_size, image_size), np.float32)})))
    macs = 0
    for node in nodes:
        weight = inits[node.input[1]]  # Conv: (out ch, in ch / groups, kh, kw); Gemm: (out, in)
        out = outs[node.output[0]].shape
        macs += int(np.prod(out)) * int(np.prod(weight[1:])) if node.op_type == "Conv" else int(np.prod(weight))
    return 2.0 * macs


def cpu_peak() -> dict:
    """Peak fp32 and int8 operations per second of this machine's CPUs, from lscpu (see the module docstring)."""
    info = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = set(info.get("Flags", "").split())
    cores = os.cpu_count() or 1
    mhz = float(info.get("CPU max MHz") or info.get("CPU MHz") or 0) or next(
        (float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")), 0.0)
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    if width == 512 and info.get("Vendor ID") == "AuthenticAMD" and info.get("CPU family") == "25":
        width = 256  # Zen 4 splits AVX-512 over 256-bit units
    fp32 = width // 32 * 2 * 2 * mhz * 1e6 * cores  # lanes x FMA x 2 units x clock x cores
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return {"cores": cores, "MHz": mhz, "vector bits": width, "fp32": fp32, "int8": fp32 * (4 if vnni else 2), "vnni": vnni,
            "model": info.get("Model name")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=820)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--naive", action="store_true", help="add the one-item-at-a-time loop (slow)")
    parser.add_argument("--eager", action="store_true", help="add the bare forward in eager PyTorch")
    args = parser.parse_args()

    catalog = mr.Catalog.from_csv(args.catalog)
    catalog = mr.Catalog(catalog.df.assign(image=catalog.image_sources()).iloc[:args.items])
    sources, texts = catalog.image_sources(), catalog.texts()
    fp32 = get_image_encoder("efficientnet-lite0", runtime="onnx", precision="fp32")
    int8 = get_image_encoder("efficientnet-lite0", runtime="onnx", precision="int8")
    pipeline(args.catalog, 32, "int8")  # writes every export and cache a user's first run would, before timing
    tensors = np.stack([fp32.preprocess(load_image(s)) for s in sources])
    sessions = {"fp32": session(fp32._onnx.path), "int8": session(int8._onnx.path)}
    eager = get_image_encoder("efficientnet-lite0", runtime="torch") if args.eager else None
    r = mr.Retriever() if args.naive else None
    naive_n = min(len(sources), 200)  # the slow loop on a prefix is enough for a rate

    rates: dict[str, list[float]] = {}
    reports = {}
    for run in range(args.runs):
        for precision in ("fp32", "int8"):
            rates.setdefault(f"bare forward, ONNX {precision} ({int8.precision if precision == 'int8' else 'fp32'})", []).append(
                bare_forward(sessions[precision], tensors))
        if eager is not None:
            rates.setdefault("bare forward, eager PyTorch fp32", []).append(eager_forward(eager, tensors))
        for precision in ("fp32", "int8"):
            rate, reports[precision] = pipeline(args.catalog, args.items, precision)
            rates.setdefault(f"pipeline {precision} (fresh Retriever + index)", []).append(rate)
        if r is not None:
            rates.setdefault("naive loop, ONNX (default precision)", []).append(naive_loop(r, sources[:naive_n], texts[:naive_n]))
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    reference = next(v for k, v in med.items() if k.startswith("bare forward, ONNX fp32"))
    load = os.getloadavg()
    print(f"\n{len(catalog)} items ({args.catalog}), {os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
          f"median of {args.runs} runs; the image encoder in the int8 pipeline ran {reports['int8']['precision']}")
    print(f"| {'':44} | items/s | / fp32 bare forward |\n|{'-' * 46}|---|---|")
    for name, value in med.items():
        print(f"| {name:44} | {value:7.1f} | {value / reference:6.2f} |")
    for precision in ("fp32", "int8"):
        print(f"\nlast pipeline run, {precision}:\n" + "\n".join(reports[precision]["text"]))

    flops = graph_flops(fp32._onnx.path, fp32.image_size)
    peak = cpu_peak()
    print(f"\nimage network: {flops / 1e9:.3f} GFLOPs per image ({flops / 2e9:.3f} G multiply-adds); CPU: {peak['model']}, "
          f"{peak['cores']} cores at {peak['MHz']:.0f} MHz, {peak['vector bits']}-bit FMA x 2 units: peak "
          f"{peak['fp32'] / 1e9:.0f} GFLOP/s fp32, {peak['int8'] / 1e9:.0f} GOP/s int8 ({'VNNI' if peak['vnni'] else 'no VNNI'})")
    for name, value in med.items():
        if name.startswith("bare forward, ONNX"):
            achieved = flops * value
            kind = "int8" if "int8 (int8)" in name else "fp32"
            print(f"{name}: {achieved / 1e9:.0f} G/s = {achieved / peak[kind]:.0%} of the {kind} peak")


if __name__ == "__main__":
    main()
