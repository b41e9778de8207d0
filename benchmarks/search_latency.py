"""Query latency and indexing throughput on a catalog of N items (the demo repeated with new ids).

    python benchmarks/search_latency.py --items 10000

Indexes the catalog once (real encoding of every row), then times single queries through
the public API: text, image, fused, zero-shot and filtered text. Prints medians and p90
per kind, and indexing throughput with its per-stage split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import multiretrieval as mr  # noqa: E402


def repeated_catalog(path: str, n: int) -> mr.Catalog:
    """The catalog repeated to n rows; each copy's titles get a suffix, so every row is new
    content (identical rows would come from the pipeline's content-hash cache)."""
    base = mr.Catalog.from_csv(path)
    df = base.df.assign(image=base.image_sources())
    reps = -(-n // len(df))
    big = pd.concat([df.assign(title=df["title"] + ("" if c == 0 else f" #{c}")) for c in range(reps)], ignore_index=True).iloc[:n].copy()
    big["id"] = np.arange(1, n + 1)
    return mr.Catalog(big)


def timed(fn, queries) -> list[float]:
    fn(queries[0])  # warm-up
    out = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()

    catalog = repeated_catalog(args.catalog, args.items)
    r = mr.Retriever()
    r.zero_shot.text_batch(["warm-up"])  # load every model before timing
    report = r.index(catalog, show_progress=True)

    df = catalog.df
    rng = np.random.default_rng(0)
    rows = rng.choice(len(df), args.queries, replace=False)
    titles = [df["title"].iloc[i] for i in rows]
    images = [df["image"].iloc[i] for i in rows]
    results = {
        "text": timed(lambda t: r.search(text=t, k=10), titles),
        "image": timed(lambda p: r.search(image=p, k=10), images),
        "fused (image + text)": timed(lambda i: r.search(image=images[i], text=titles[i], k=10), list(range(len(rows)))),
        "zero-shot text -> images": timed(lambda t: r.search(text=t, mode="zero-shot", k=10), titles),
        "text + where (category)": timed(lambda t: r.search(text=t, k=10, where="category = 'Kitchen'"), titles),
    }

    print(f"\n{len(r)} items, index {r.indexes['joint'].factory}, joint dim {r.fusion.out_dim}, {os.cpu_count()} CPUs, "
          f"{args.queries} queries per kind\n")
    print("| query kind | median ms | p90 ms |")
    print("|---|---|---|")
    for kind, ms in results.items():
        print(f"| {kind} | {statistics.median(ms):.1f} | {np.percentile(ms, 90):.1f} |")
    s = report.seconds
    print("\n| indexing | value |")
    print("|---|---|")
    print(f"| items indexed | {report.indexed} |")
    print(f"| throughput | {report.items_per_second:.1f} items/s |")
    print(f"| {' / '.join(s)} s | {' / '.join(f'{v:.1f}' for v in s.values())} |")


if __name__ == "__main__":
    main()
