"""Vector search at 1M items: the automatic index and an IVF-PQ option against exact Flat.

    python benchmarks/index_scale.py [--n 1000000] [--ivfpq PCAR128,IVF4096,PQ32]

Data drawn from real embedding statistics: the demo catalog is indexed and its joint
vectors (1664-d with the default encoders and late fusion) give a mean and principal
axes; n points are drawn as Gaussian clusters in that space (cluster centres with the
catalog's spread, points around them at half of it) and L2-normalised. Held-out queries
come from the same clusters. In one run it measures, for exact Flat (faiss.knn on the
raw matrix), the automatic choice (``index.factory: auto``, built and tuned by
``VectorIndex.build`` to the default ``index.target_recall``, recall@10 >= 0.999, on rows
held out while tuning) and the IVF-PQ option (its codes in memory, the candidates re-ranked
exactly from the vectors in a memory-mapped file on disk): build seconds, bytes per vector of the written index,
single-query p50/p99 on one thread (as the server runs FAISS), recall@10 against exact
search, and filtered queries (DuckDB over a parquet catalog -> IDSelector).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

import multiretrieval as mr  # noqa: E402
from multiretrieval.config import IndexConfig  # noqa: E402
from multiretrieval.index import VectorIndex, choose_factory  # noqa: E402
from multiretrieval.utils import l2_normalize  # noqa: E402


def real_statistics(catalog: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (scaled by their standard deviations) of real joint vectors."""
    r = mr.Retriever()
    r.index(catalog, show_progress=False)
    x = r.vectors("joint")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, (s[:, None] / np.sqrt(len(x))) * vt  # rows: axis * std


def draw(n: int, mean: np.ndarray, axes: np.ndarray, centres: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, axes.shape[1]), np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        noise = rng.standard_normal((m, len(axes)), dtype=np.float32) @ axes * 0.5
        out[start:start + m] = l2_normalize(centres[rng.integers(0, len(centres), m)] + noise)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def single_queries(search, queries: np.ndarray) -> tuple[np.ndarray, float, float]:
    search(queries[:1])  # warm-up
    found, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        found.append(search(q[None])[0])
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return np.array(found), float(np.median(ms)), float(np.percentile(ms, 99))


# The searches are made here rather than as lambdas in main(): main() deletes the matrix and the
# automatic index (``del x``, ``del index``) to free their memory before the IVF-PQ part, and a
# lambda there would close over the very names it deletes.
def exact_search(x: np.ndarray, k: int):
    """Single-query exact search over the raw matrix (faiss.knn): the ids of the top k."""
    return lambda q: faiss.knn(q, x, k, faiss.METRIC_INNER_PRODUCT)[1]


def index_search(index: VectorIndex, k: int):
    """Single-query search of a VectorIndex: the ids of the top k."""
    return lambda q: index.search(q, k)[1]


def file_bytes(index: VectorIndex, folder: str) -> int:
    path = os.path.join(folder, "index.faiss")
    index.save(path)
    size = os.path.getsize(path)
    os.remove(path)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--ivfpq", default="PCAR128,IVF4096,PQ32")
    parser.add_argument("--rerank", type=int, default=100, help="IVF-PQ: candidates re-ranked exactly (0: none)")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="memory budget the automatic choice is given")
    parser.add_argument("--work", default=tempfile.gettempdir(), help="folder for the on-disk vectors and index files")
    args = parser.parse_args()
    k, rows = 10, []

    t0 = time.perf_counter()
    mean, axes = real_statistics(args.catalog)
    rng = np.random.default_rng(0)
    centres = mean + rng.standard_normal((max(1, args.n // 50), len(axes)), dtype=np.float32) @ axes
    x = draw(args.n, mean, axes, centres, seed=1)
    queries = draw(args.queries, mean, axes, centres, seed=2)
    d = x.shape[1]
    print(f"{args.n:,} x {d}-d vectors drawn from the statistics of {args.catalog} in {time.perf_counter() - t0:.0f} s", flush=True)

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    truth = faiss.knn(queries, x, k, faiss.METRIC_INNER_PRODUCT)[1]  # exact ground truth (batched)
    faiss.omp_set_num_threads(1)
    _, flat_p50, flat_p99 = single_queries(exact_search(x, k), queries[:20])
    rows.append(("Flat (exact)", 0.0, 4 * d + 8, flat_p50, flat_p99, 1.0, ""))
    print(f"exact: p50 {flat_p50:.1f} ms", flush=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ids = np.arange(args.n, dtype=np.int64)

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        # -- the automatic choice, tuned as the retriever tunes it
        factory = choose_factory(args.n, d, args.budget_gb * 1e9)
        index = VectorIndex(d, factory)
        t0 = time.perf_counter()
        tuned = index.build(ids, x, IndexConfig().target_recall)
        build = time.perf_counter() - t0
        print(f"auto = {factory}: built and tuned in {build:.0f} s: {tuned.get('params')} (recall {tuned.get('recall', 1):.3f} "
              "on 200 rows held out while tuning)", flush=True)
        faiss.omp_set_num_threads(1)
        found, p50, p99 = single_queries(index_search(index, k), queries)
        rows.append((f"auto: {factory}", build, file_bytes(index, work) / args.n, p50, p99, recall(found, truth), str(index.params)))
        filtered = filter_checks(index, x, queries, work, k)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        del index

        # -- the IVF-PQ option: compressed codes in memory, exact re-ranking from disk
        vectors_file = os.path.join(work, "vectors.npy")
        np.save(vectors_file, x)
        on_disk = np.load(vectors_file, mmap_mode="r")
        ivf = VectorIndex(d, args.ivfpq)
        t0 = time.perf_counter()
        ivf.add(ids, x)
        build = time.perf_counter() - t0
        del x

        def ivf_search(q: np.ndarray) -> np.ndarray:
            if not args.rerank:
                return ivf.search(q, k)[1]
            cand = ivf.search(q, args.rerank)[1][0]
            cand = np.sort(cand[cand >= 0])
            best = np.argsort(-(on_disk[cand] @ q[0]))[:k]
            return cand[best][None]

        tune_q = draw(args.queries, mean, axes, centres, seed=3)  # tuning queries, not the measured ones
        nprobe = tune_nprobe(ivf, ivf_search, tune_q, on_disk, k, target=0.9)
        faiss.omp_set_num_threads(1)
        found, p50, p99 = single_queries(ivf_search, queries)
        label = f"IVF-PQ: {args.ivfpq}" + (f" + re-rank {args.rerank} from disk" if args.rerank else "")
        rows.append((label, build, file_bytes(ivf, work) / args.n, p50, p99, recall(found, truth), f"nprobe {nprobe}"))

    print(f"\n{args.n:,} vectors, {d}-d; single queries on 1 thread, {len(queries)} held-out queries; recall@10 vs exact")
    print(f"{'index':58} {'build s':>8} {'B/vector':>9} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9} {'x Flat p50':>10}  params")
    for name, build, bpv, p50, p99, rec, params in rows:
        print(f"{name:58} {build:8.0f} {bpv:9.0f} {p50:8.3f} {p99:8.3f} {rec:9.3f} {flat_p50 / p50:10.0f}  {params}")
    print("\nfiltered queries on the automatic index (DuckDB over a parquet catalog -> IDSelector), 1 thread")
    print(f"{'filter':32} {'matches':>9} {'duckdb ms':>9} {'search p50 ms':>13} {'queries with k results':>22}")
    for row in filtered:
        print(f"{row[0]:32} {row[1]:9,} {row[2]:9.1f} {row[3]:13.2f} {row[4]:>22}")


def tune_nprobe(ivf: VectorIndex, search, tune_q: np.ndarray, vectors: np.ndarray, k: int, target: float) -> int:
    """The smallest nprobe whose recall@10 on separate tuning queries reaches the target."""
    truth = faiss.knn(tune_q, vectors, k, faiss.METRIC_INNER_PRODUCT)[1]
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
        ivf.set_params(nprobe=nprobe)
        if recall(np.array([search(q[None])[0] for q in tune_q]), truth) >= target:
            return nprobe
    return nprobe


def filter_checks(index: VectorIndex, x: np.ndarray, queries: np.ndarray, work: str, k: int) -> list[tuple]:
    import duckdb
    import pandas as pd

    n = len(x)
    rng = np.random.default_rng(4)
    catalog = pd.DataFrame({"id": np.arange(n), "price": rng.uniform(0, 1000, n).round(2), "stock": rng.integers(0, 100_000, n)})
    path = os.path.join(work, "catalog.parquet")
    catalog.to_parquet(path)
    out = []
    for where in ("price < 500", "price < 50", "price < 1", "stock = 7"):
        t0 = time.perf_counter()
        allowed = duckdb.sql(f"SELECT id FROM read_parquet('{path}') WHERE {where}").fetchnumpy()["id"].astype(np.int64)
        ms_duck = (time.perf_counter() - t0) * 1e3
        full, times = 0, []
        for q in queries[:50]:
            t0 = time.perf_counter()
            _, found = index.search(q[None], k, allowed)
            times.append(time.perf_counter() - t0)
            ok = set(found[0][found[0] >= 0]) <= set(allowed.tolist()) if len(allowed) < 100_000 else True
            full += int((found[0] >= 0).sum() == min(k, len(allowed)) and ok)
        out.append((where, len(allowed), ms_duck, float(np.median(times)) * 1e3, f"{full}/50"))
    return out


if __name__ == "__main__":
    main()
