"""A nightly upsert against a full re-index, on a large catalog (default 100,000 items, HNSW).

    python benchmarks/upsert.py [--items 100000] [--changed 0.01] [--new 0.01] [--removed 0.01] [--queries 100]
                                [--repeated] [--workdir DIR]

1. A catalog of N distinct products made from the demo's 820: copy c of an item gets its own image
   (the render with its hue turned, cropped, mirrored on odd copies; JPEG files written under the
   work folder) and its own title ("Desk lamp, teal walnut": a colour and a material word per copy),
   so no two rows are near-duplicates. (``--repeated``: the demo images repeated with numbered
   titles, 122 near-identical copies of each item, the catalog of the first measurement.) Indexed
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
   (efSearch and k_factor raised until both are exact), hybrid and vector-only; "up to ties" lets
   equally scored items (products that share a title) swap at the 10th place. A third index of
   tomorrow's catalog built with its rows in another order is the noise floor: two builds of one
   HNSW graph differ within their tuned recall.
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
from multiretrieval.query.ranking import tie_values  # noqa: E402
from search_latency import repeated_catalog  # noqa: E402

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "orange", "purple", "pink", "teal", "brown")
MATERIALS = ("oak", "walnut", "pine", "steel", "brass", "glass", "marble", "leather", "linen", "velvet", "bamboo", "ceramic")
LARGE_AUTO = "PCA256,HNSW32,Refine(Flat)"  # index.choose_factory above 100k items, within the default memory budget


def _variant_image(job: tuple[str, int, str]) -> None:
    """Copy ``c`` of a render: hue turned by c x 37/256, a c-dependent crop, mirrored when c is odd, on white."""
    from PIL import Image, ImageOps

    source, c, out = job
    with Image.open(source) as im:
        im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, "white")
    im = Image.alpha_composite(white, im).convert("RGB")
    im.thumbnail((256, 256))
    hsv = np.array(im.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + c * 37) % 256
    im = Image.fromarray(hsv, "HSV").convert("RGB")
    w, h = im.size
    m = (c % 5) * 0.03
    im = im.crop((int(w * m), int(h * m), w - int(w * m), h - int(h * m)))
    (ImageOps.mirror(im) if c % 2 else im).save(out, quality=85)


def distinct_catalog(path: str, n: int, folder: Path) -> mr.Catalog:
    """N products from the demo catalog, every copy with its own image and title (see the module's doc)."""
    from multiprocessing import Pool

    base = mr.Catalog.from_csv(path)
    df = base.df.assign(image=base.image_sources())
    reps = -(-n // len(df))
    if reps > len(COLOURS) * len(MATERIALS):
        raise SystemExit(f"at most {len(COLOURS) * len(MATERIALS) * len(df):,} distinct items")
    copies = []
    for c in range(reps):
        words = f"{COLOURS[c % len(COLOURS)]} {MATERIALS[c // len(COLOURS)]}"
        copy = df.assign(title=df["title"] + ", " + words, image=[str(folder / f"{c}" / f"{i}.jpg") for i in range(len(df))])
        copies.append((c, df["image"].tolist(), copy))
    jobs = []
    for c, sources, copy in copies:
        (folder / f"{c}").mkdir(parents=True, exist_ok=True)
        jobs += [(src, c, out) for src, out in zip(sources, copy["image"]) if not Path(out).is_file()]
    t0 = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(_variant_image, jobs[:n], chunksize=64)
    print(f"wrote {len(jobs[:n]):,} product images in {time.perf_counter() - t0:.0f} s", flush=True)
    big = pd.concat([copy for _, _, copy in copies], ignore_index=True).iloc[:n].copy()
    big["id"] = np.arange(1, n + 1)
    return mr.Catalog(big)


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
    """Exact top-k (id, score) of the joint space (text queries against items with text), from the stored
    vectors; equal scores in id order, as search answers them."""
    ids = r.items["id"].to_numpy()
    has_text = r.features()["text_mask"][:, 0]
    sims = r.query_vectors(texts=texts)[:, 0] @ r.vectors("joint").T  # one reading per text query
    sims[:, ~has_text] = -np.inf
    tops = [np.lexsort((ids.astype(str), -tie_values(s)))[:k] for s in sims]
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


def search_latency(r: mr.Retriever, texts: list[str]) -> dict[str, float]:
    """Median milliseconds, at the tuned parameters: the joint index's search for a text query's vector (a page,
    and a hybrid read search.hybrid_depth deep), and a whole text query, hybrid and vector only."""
    vectors = r.query_vectors(texts=texts)[:, 0]
    index, depth = r.indexes["joint"], r.config.search.hybrid_depth + 10

    def median_ms(run, items) -> float:
        times = []
        for item in items:
            t0 = time.perf_counter()
            run(item)
            times.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(times))

    return {"index search, 10 results": median_ms(lambda v: index.search(v[None], 10), vectors),
            f"index search, {depth} results (a hybrid read)": median_ms(lambda v: index.search(v[None], depth), vectors),
            "text query, hybrid (default)": median_ms(lambda t: r.search(text=t, k=10), texts),
            "text query, vector only": median_ms(lambda t: r.search(text=t, k=10, hybrid="off"), texts)}


def overlap(a: list[pd.DataFrame], b: list[pd.DataFrame]) -> tuple[int, float, int]:
    """Queries whose top-10 ids are the same; the mean share of ids in common; queries whose top 10 are
    the same up to ties (the same scores, and the same ids above the 10th score: items that share a title
    share a text vector, and which of several equally scored items makes the cut is arbitrary)."""
    same = sum(set(x["id"]) == set(y["id"]) for x, y in zip(a, b))
    mean = float(np.mean([len(set(x["id"]) & set(y["id"])) / max(len(x), 1) for x, y in zip(a, b)]))

    def up_to_ties(x: pd.DataFrame, y: pd.DataFrame) -> bool:
        if len(x) != len(y) or not np.allclose(x["score"], y["score"], atol=1e-5):
            return False
        cut = min(x["score"].min(), y["score"].min()) + 1e-5
        return set(x["id"][x["score"] > cut]) == set(y["id"][y["score"] > cut])

    return same, mean, sum(up_to_ties(x, y) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factory", default=LARGE_AUTO)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--new", type=float, default=0.01)
    parser.add_argument("--removed", type=float, default=0.01)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeated", action="store_true", help="the demo repeated with numbered titles (near-duplicates)")
    parser.add_argument("--workdir", help="where the images, the indexes and the shard cache go (default: a temporary folder)")
    args = parser.parse_args()

    config = mr.RetrieverConfig().with_overrides({"index": {"factory": args.factory}})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        today = (repeated_catalog(args.catalog, args.items) if args.repeated else
                 distinct_catalog(args.catalog, args.items, work / "images")).df
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
        other = mr.Retriever(config)  # the noise floor: the same catalog, its rows in another order
        other.index(mr.Catalog(new_frame.sample(frac=1.0, random_state=3)), show_progress=True, cache=cache)

        tuned = {space: [(dict(x.params), round(x.recall or 0, 4), x.deep) for x in (r.indexes[space], fresh.indexes[space])]
                 for space in ("joint", "clip_image", "clip_text")}  # before the exhaustive comparison overrides them
        changed = new_frame[new_frame["title"].str.endswith("(new model)")]
        n_changed_queries = min(len(changed), args.queries // 4)
        picks = pd.concat([changed.sample(n_changed_queries, random_state=1), new_frame.sample(args.queries, random_state=2)])
        texts = picks["title"].head(args.queries).tolist()  # e.g. "Desk lamp, teal walnut (new model)"
        latency = search_latency(r, texts)
        worst = same_vectors(r, fresh)
        rows = []
        truth = exact_top(fresh, texts)
        for params in ("tuned", "exhaustive"):
            if params == "exhaustive":
                for retriever in (r, fresh, other):
                    exhaustive(retriever)
            for label, kwargs in (("hybrid (default)", {}), ("vector only", {"hybrid": "off"})):
                a = [r.search(text=t, k=10, **kwargs)[["id", "score"]] for t in texts]
                b = [fresh.search(text=t, k=10, **kwargs)[["id", "score"]] for t in texts]
                c = [other.search(text=t, k=10, **kwargs)[["id", "score"]] for t in texts]
                rows.append((f"{params} parameters, {label}: upserted vs fresh", *overlap(a, b)))
                rows.append((f"{params} parameters, {label}: fresh vs fresh built in another row order", *overlap(c, b)))
                if kwargs:
                    rows += [(f"{params} parameters, vector only: upserted vs exact search", *overlap(a, truth)),
                             (f"{params} parameters, vector only: fresh vs exact search", *overlap(b, truth))]

    n = args.items
    kind = "the demo repeated (near-duplicates)" if args.repeated else "distinct products"
    print(f"\n{n:,} items ({kind}), index {args.factory}; tomorrow: {plan['changed']:,} changed, {plan['new']:,} new, "
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
    print("\nsearch parameters tuned at build (index.target_recall "
          f"{config.index.target_recall}), upserted index / fresh index:")
    for space, pair in tuned.items():
        print(f"  {space}: {pair[0]} / {pair[1]}")
    print(f"\nmedian ms per query on the upserted index at those parameters ({len(texts)} queries, one at a time):")
    for label, ms in latency.items():
        print(f"  {label}: {ms:.2f}")
    print(f"\n{len(texts)} text queries (titles of random rows of tomorrow's catalog, {n_changed_queries} of them changed rows):\n")
    print("| comparison | same top-10 ids | mean top-10 overlap | same top 10 up to ties |")
    print("|---|---|---|---|")
    for label, same, mean, scores in rows:
        print(f"| {label} | {same}/{len(texts)} | {mean:.3f} | {scores}/{len(texts)} |")


if __name__ == "__main__":
    main()
