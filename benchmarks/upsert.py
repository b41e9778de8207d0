"""A nightly upsert against a full re-index, on a large catalog (default 100,000 items, HNSW).

    python benchmarks/upsert.py [--items 100000] [--changed 0.01] [--new 0.01] [--removed 0.01] [--queries 100]

1. The demo catalog repeated to N items with numbered titles (every row is new content), indexed
   from scratch with a fresh shard cache into the index kind the automatic choice takes above
   100k items, ``PCA256,HNSW32,Refine(Flat)`` (at exactly 100k it would still pick Flat), then saved.
2. Tomorrow's catalog: 1% of the rows get a new title (their content changes), 1% new rows,
   1% of the rows gone.
3. ``Retriever.upsert(tomorrow, prune=True)`` on the loaded index, then saved (what
   ``multiretrieval index tomorrow.csv --out idx --update --prune`` does), timed against step 1.
4. A fresh index of tomorrow's catalog (its rows come from the shard cache, so it is not a
   timing). The two must hold the same items with the same vectors (checked id by id, every
   space), and give the same top-10 ids for ``--queries`` text queries (titles of random rows,
   changed rows among them): with the tuned search parameters (two HNSW graphs built in other
   orders differ within their tuned recall, so some near-ties swap) and with exhaustive ones
   (efSearch and k_factor raised until both are exact), hybrid and vector-only.
Prints the tables; every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import multiretrieval as mr  # noqa: E402
from search_latency import repeated_catalog  # noqa: E402

LARGE_AUTO = "PCA256,HNSW32,Refine(Flat)"  # index.choose_factory above 100k items, within the default memory budget


def tomorrow(today: pd.DataFrame, changed: float, new: float, removed: float, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Today's rows with some titles changed, some rows new and some gone (disjoint, seeded)."""
    rng = np.random.default_rng(seed)
    n = len(today)
    picks = rng.permutation(n)
    n_changed, n_removed, n_new = int(n * changed), int(n * removed), int(n * new)
    change, drop = picks[:n_changed], picks[n_changed:n_changed + n_removed]
    out = today.copy()
    out.loc[out.index[change], "title"] = out["title"].iloc[change] + " (new model)"
    extra = today.iloc[rng.choice(n, n_new, replace=False)].copy()
    extra["id"] = np.arange(today["id"].max() + 1, today["id"].max() + 1 + n_new)
    extra["title"] = extra["title"] + " (new in the shop)"
    out = pd.concat([out.drop(index=out.index[drop]), extra], ignore_index=True)
    return out, {"changed": n_changed, "new": n_new, "removed": n_removed, "changed_ids": today["id"].iloc[change].tolist()}


def exact_top(r: mr.Retriever, texts: list[str], k: int = 10) -> list[pd.DataFrame]:
    """Exact top-k (id, score) of the joint space (text queries against items with text), from the stored vectors."""
    ids = r.items["id"].to_numpy()
    has_text = r.features()["text_mask"][:, 0]
    sims = r.encode(texts=texts) @ r.vectors("joint").T
    sims[:, ~has_text] = -np.inf
    tops = [np.argsort(-s, kind="stable")[:k] for s in sims]
    return [pd.DataFrame({"id": ids[t], "score": s[t]}) for t, s in zip(tops, sims)]


def same_vectors(a: mr.Retriever, b: mr.Retriever, chunk: int = 20_000) -> float:
    """The largest difference between the two retrievers' stored vectors, id by id, over every space."""
    ids = sorted(a.items["id"].tolist())
    if ids != sorted(b.items["id"].tolist()):
        raise AssertionError("the upserted and the fresh index hold different ids")
    worst = 0.0
    for space in ("joint", "clip_image", "clip_text"):
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            worst = max(worst, float(np.abs(a.vectors(space, part) - b.vectors(space, part)).max()))
    return worst


def exhaustive(r: mr.Retriever) -> None:
    """Search parameters at which the approximate index answers as exact search does (for the comparison only)."""
    for space in ("joint", "clip_image", "clip_text"):
        index = r.indexes[space]
        grid = index.tunable()
        index.set_params(**{name: max(values) * 4 for name, values in grid.items()})


def overlap(a: list[pd.DataFrame], b: list[pd.DataFrame]) -> tuple[int, float, int]:
    """Queries whose top-10 ids are the same, the mean share of ids in common, and queries whose
    top-10 scores are the same (equal up to which of several equally scored items comes first)."""
    same = sum(set(x["id"]) == set(y["id"]) for x, y in zip(a, b))
    mean = float(np.mean([len(set(x["id"]) & set(y["id"])) / max(len(x), 1) for x, y in zip(a, b)]))
    scores = sum(len(x) == len(y) and np.allclose(x["score"], y["score"], atol=1e-5) for x, y in zip(a, b))
    return same, mean, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factory", default=LARGE_AUTO)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--new", type=float, default=0.01)
    parser.add_argument("--removed", type=float, default=0.01)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--workdir", help="where the indexes and the shard cache go (default: a temporary folder)")
    args = parser.parse_args()

    today = repeated_catalog(args.catalog, args.items).df
    config = mr.RetrieverConfig().with_overrides({"index": {"factory": args.factory}})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cache, index_dir = work / "cache", work / "idx"

        full = mr.Retriever(config)
        t0 = time.perf_counter()
        report = full.index(mr.Catalog(today), show_progress=True, cache=cache)
        t_index = time.perf_counter() - t0
        full.save(index_dir)
        t_index_save = time.perf_counter() - t0
        print(f"full index: {report}".splitlines()[0], flush=True)
        del full

        new_frame, plan = tomorrow(today, args.changed, args.new, args.removed)
        t0 = time.perf_counter()
        r = mr.Retriever.load(index_dir)
        t_load = time.perf_counter() - t0
        up = r.upsert(mr.Catalog(new_frame), prune=True, show_progress=True, cache=cache)
        t_upsert = time.perf_counter() - t0 - t_load
        r.save(index_dir)
        t_upsert_all = time.perf_counter() - t0
        print(f"upsert: {up}".splitlines()[0], flush=True)

        fresh = mr.Retriever(config)
        t0 = time.perf_counter()
        fresh.index(mr.Catalog(new_frame), show_progress=True, cache=cache)
        t_fresh = time.perf_counter() - t0

        changed = new_frame[new_frame["title"].str.endswith("(new model)")]
        n_changed_queries = min(len(changed), args.queries // 4)
        picks = pd.concat([changed.sample(n_changed_queries, random_state=1), new_frame.sample(args.queries, random_state=2)])
        texts = picks["title"].head(args.queries).tolist()  # e.g. "Desk lamp #57 (new model)"
        worst = same_vectors(r, fresh)
        rows = []
        truth = exact_top(fresh, texts)
        for params in ("tuned", "exhaustive"):
            if params == "exhaustive":
                exhaustive(r)
                exhaustive(fresh)
            for label, kwargs in (("hybrid (default)", {}), ("vector only", {"hybrid": "off"})):
                a = [r.search(text=t, k=10, **kwargs)[["id", "score"]] for t in texts]
                b = [fresh.search(text=t, k=10, **kwargs)[["id", "score"]] for t in texts]
                rows.append((f"{params} parameters, {label}: upserted vs fresh", *overlap(a, b)))
                if kwargs:
                    rows += [(f"{params} parameters, vector only: upserted vs exact search", *overlap(a, truth)),
                             (f"{params} parameters, vector only: fresh vs exact search", *overlap(b, truth))]

    n = args.items
    print(f"\n{n:,} items, index {args.factory}; tomorrow: {plan['changed']:,} changed, {plan['new']:,} new, "
          f"{plan['removed']:,} removed; {os.cpu_count()} CPUs\n")
    print("| step | seconds | share of the full index |")
    print("|---|---|---|")
    print(f"| full index (`Retriever.index`, every row encoded) | {t_index:,.1f} | 100% |")
    print(f"| full index + save | {t_index_save:,.1f} | {t_index_save / t_index:.1%} |")
    print(f"| upsert (`Retriever.upsert`, prune) | {t_upsert:,.1f} | **{t_upsert / t_index:.1%}** |")
    print(f"| load + upsert + save (`index --update --prune`) | {t_upsert_all:,.1f} | **{t_upsert_all / t_index_save:.1%}** of index + save |")
    print(f"| (fresh index of tomorrow's catalog, from the shard cache: not a timing) | {t_fresh:,.1f} | |")
    print(f"\nupsert: encoded {up.encoded:,} rows (changed + new = {plan['changed'] + plan['new']:,}), "
          f"changes {up.changes}, seconds {dict((k, round(v, 1)) for k, v in up.seconds.items())}")
    print(f"\nthe upserted and the fresh index hold the same {len(new_frame):,} ids; largest difference of their stored "
          f"vectors, id by id over the three spaces: {worst:.2e}")
    print(f"\n{len(texts)} text queries (titles of random rows of tomorrow's catalog, {n_changed_queries} of them changed rows):\n")
    print("| comparison | same top-10 ids | mean top-10 overlap | same top-10 scores |")
    print("|---|---|---|---|")
    for label, same, mean, scores in rows:
        print(f"| {label} | {same}/{len(texts)} | {mean:.3f} | {scores}/{len(texts)} |")


if __name__ == "__main__":
    main()
