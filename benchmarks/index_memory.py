"""Peak memory while indexing a large catalog (default 100,000 items).

    python benchmarks/index_memory.py [--items 100000]

The demo catalog's real images, repeated with a numbered title per copy so that every
row is new content (nothing comes from the shard cache), indexed through
``Retriever.index`` with a fresh shard cache. Prints the resident memory after the models
are loaded, the peak during indexing (the kernel's high-water mark, ru_maxrss), the
sizes of what the retriever holds at the end, and the throughput.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import psutil  # noqa: E402

import multiretrieval as mr  # noqa: E402
from search_latency import repeated_catalog  # noqa: E402

GIB = 1024 ** 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--cache", help="shard cache to use (default: a fresh temporary folder)")
    args = parser.parse_args()

    catalog = repeated_catalog(args.catalog, args.items)
    r = mr.Retriever()
    r.zero_shot.text_batch(["warm-up"])
    r.zero_shot.image_batch([mr.catalog.load_image(catalog.image_sources()[0])])
    process = psutil.Process()
    loaded = process.memory_info().rss
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:  # resident memory every 0.2 s, to split the peak by stage
        while not done.wait(0.2):
            samples.append((time.perf_counter(), process.memory_info().rss))

    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = r.index(catalog, show_progress=True, cache=args.cache or tmp)
        seconds = time.perf_counter() - t0
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Hashing, the pipeline (reading, encoding and writing overlap) and building the index follow each other.
    s = report.seconds
    bounds = {"hash": (t0, t0 + s["hash"]), "encode": (t0 + s["hash"], t0 + s["hash"] + report.encoding),
              "index": (t0 + report.elapsed - s["index"], t0 + report.elapsed)}
    held = sum(a.nbytes for a in r.features().values())
    index_bytes = {name: ix.faiss_index.ntotal * ix.dim * 4 for name, ix in r.indexes.by_space.items()}
    print(f"\n{report.indexed:,} items indexed in {seconds:.0f} s ({report.indexed / seconds:.1f} items/s)")
    print(str(report).splitlines()[0])
    print(f"{'':38} {'GiB':>7}")
    print(f"{'resident after loading the models':38} {loaded / GIB:7.2f}")
    print(f"{'peak resident while indexing':38} {peak / GIB:7.2f}")
    for stage, (lo, hi) in bounds.items():
        inside = [rss for t, rss in samples if lo <= t <= hi]
        if inside:
            print(f"{'  highest sample in stage ' + stage:38} {max(inside) / GIB:7.2f}")
    print(f"{'  of which encoder features held':38} {held / GIB:7.2f}")
    for name, size in index_bytes.items():
        print(f"{'  of which index ' + name + ' vectors':38} {size / GIB:7.2f}")
    print(f"peak / 4 GiB target: {peak / (4 * GIB):.2f}")


if __name__ == "__main__":
    main()
