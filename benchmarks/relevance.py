"""How the calibrated "no close match" floors (min_score="auto") do on the evaluate benchmarks, per kind of query.

    python scripts/build_benchmarks.py /tmp/mrdata --out bench      # once
    python benchmarks/relevance.py bench [--queries 200]

Real queries (their relevant item is known): sweethome3d (a shopper's photo, a fragment of the item's metadata, both:
image, text, fused), exact_names (text), tuxpaint (a stamp's description against the stamps' images: zero-shot text;
the stamp as a small grey photo against the descriptions: zero-shot image). "kept": of the queries whose relevant item
is among their first 10 results without a floor, the share that keep it with min_score="auto".
Nonsense queries: random words (benchmarks.nonsense_words, another seed than the calibration's) on each catalog, and
photos of the other benchmark (tuxpaint's photo-like stamps against the furniture, sweethome3d's shopper photos
against the stamps); fused: such a photo with random words. "nothing": the share answered with no result.
Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from multiretrieval import Catalog, Retriever  # noqa: E402
from multiretrieval.benchmarks import nonsense_words  # noqa: E402
from multiretrieval.catalog import load_image  # noqa: E402
from multiretrieval.config import RetrieverConfig  # noqa: E402
from multiretrieval.relevance import KINDS, relevance_floor  # noqa: E402

K = 10
SEED = 7  # the calibration uses seed 0


def run(r: Retriever, queries: list[dict]) -> list[pd.DataFrame]:
    size = r.config.search.max_batch
    return [f for s in range(0, len(queries), size) for f in r.search_batch([{**q, "k": K} for q in queries[s:s + size]])]


def relevant_scores(frames: list[pd.DataFrame], targets: list) -> list[float]:
    out = []
    for f, t in zip(frames, targets):
        hit = f[f["id"].astype(str) == str(t)]
        if len(hit):
            out.append(float(hit["score"].iloc[0]))
    return out


def best(frames: list[pd.DataFrame]) -> list[float]:
    return [float(f["score"].iloc[0]) if len(f) else -np.inf for f in frames]


def sample(df: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    return df.iloc[rng.permutation(len(df))[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", help="the folder scripts/build_benchmarks.py wrote")
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind per benchmark")
    args = parser.parse_args()
    bench, rng = Path(args.bench), np.random.default_rng(SEED)
    config = RetrieverConfig()
    relevant: dict[str, list[float]] = {k: [] for k in KINDS}
    asked: dict[str, int] = {k: 0 for k in KINDS}
    nonsense: dict[str, list[float]] = {k: [] for k in KINDS}

    def real(kind: str, frames: list[pd.DataFrame], targets: list) -> None:
        relevant[kind] += relevant_scores(frames, targets)
        asked[kind] += len(frames)

    sh = bench / "sweethome3d"
    tux = bench / "tuxpaint"
    sh_queries = sample(pd.read_csv(sh / "queries.csv"), args.queries, rng)
    sh_photos = [load_image(sh / p) for p in sh_queries["image"]]
    tux_photo_rows = sample(pd.read_csv(tux / "photo_like.csv"), args.queries, rng)
    tux_photos = [load_image(tux / p) for p in tux_photo_rows["image"]]

    catalog = Catalog.from_csv(sh / "catalog.csv", text_columns=("title", "description"))
    r = Retriever(config)
    r.index(catalog, show_progress=False)
    targets = sh_queries["target"].tolist()
    real("text", run(r, [{"text": t} for t in sh_queries["text"]]), targets)
    real("image", run(r, [{"image": im, "mode": "image"} for im in sh_photos]), targets)
    real("fused", run(r, [{"image": im, "text": t} for im, t in zip(sh_photos, sh_queries["text"])]), targets)
    words = nonsense_words(rng, catalog.df["title"].astype(str) + " " + catalog.df["description"].astype(str), args.queries)
    nonsense["text"] += best(run(r, [{"text": w} for w in words]))
    nonsense["image"] += best(run(r, [{"image": im, "mode": "image"} for im in tux_photos]))
    nonsense["fused"] += best(run(r, [{"image": im, "text": w} for im, w in zip(tux_photos, words)]))
    nonsense["zero-shot:text"] += best(run(r, [{"text": w, "mode": "zero-shot"} for w in words]))
    nonsense["zero-shot:image"] += best(run(r, [{"image": im, "mode": "zero-shot"} for im in tux_photos]))

    names = bench / "exact_names"
    if (names / "queries.csv").is_file():
        queries = sample(pd.read_csv(names / "queries.csv"), args.queries, rng)
        r = Retriever(config)
        r.index(Catalog.from_csv(names / "catalog.csv", text_columns=("title",)), show_progress=False)
        real("text", run(r, [{"text": t} for t in queries["text"]]), queries["target"].tolist())

    stamps = Catalog.from_csv(tux / "catalog.csv", text_columns=("title",))
    r = Retriever(config)
    r.index(stamps, show_progress=False)
    queries = sample(stamps.df, args.queries, rng)
    real("zero-shot:text", run(r, [{"text": t, "mode": "zero-shot"} for t in queries["title"]]), queries["id"].tolist())
    real("zero-shot:image", run(r, [{"image": im, "mode": "zero-shot"} for im in tux_photos]), tux_photo_rows["id"].tolist())
    words = nonsense_words(rng, stamps.df["title"], args.queries)
    nonsense["text"] += best(run(r, [{"text": w} for w in words]))
    nonsense["image"] += best(run(r, [{"image": im, "mode": "image"} for im in sh_photos]))
    nonsense["fused"] += best(run(r, [{"image": im, "text": w} for im, w in zip(sh_photos, words)]))
    nonsense["zero-shot:text"] += best(run(r, [{"text": w, "mode": "zero-shot"} for w in words]))
    nonsense["zero-shot:image"] += best(run(r, [{"image": im, "mode": "zero-shot"} for im in sh_photos]))

    table = {}
    print(f"{'kind':16s} {'floor':>6s} {'nonsense: nothing':>18s} {'real: relevant kept':>20s} {'real found in top 10':>21s}")
    for kind in KINDS:
        floor = relevance_floor(config, kind)
        rel, non = np.array(relevant[kind]), np.array(nonsense[kind])
        table[kind] = {"floor": floor, "nonsense_queries": len(non), "nonsense_answered_with_nothing": round(float((non < floor).mean()), 4),
                       "real_queries": asked[kind], "real_found_in_top_10": len(rel),
                       "relevant_kept": round(float((rel >= floor).mean()), 4)}
        t = table[kind]
        print(f"{kind:16s} {floor:6.3f} {t['nonsense_answered_with_nothing']:18.1%} {t['relevant_kept']:20.1%} "
              f"{t['real_found_in_top_10']:>13d} of {t['real_queries']}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
