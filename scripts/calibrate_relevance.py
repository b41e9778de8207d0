"""Measure the "no close match" floors of min_score="auto" (reproduces multiretrieval/weights/relevance-floors.json).

    apt-get download sweethome3d-furniture openclipart-png tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/calibrate_relevance.py /tmp/mrdata

Training data sets only (DESIGN.md): sweethome3d-furniture, openclipart-png and the TRAINING split of
tuxpaint-stamps-default, without the top-level categories the benchmarks hold out (benchmarks.heldout_category).
Each data set's remaining top-level categories are split in two (seeded): a catalog of --items items of one half is
indexed with the default config, and queried with
  nonsense: random words (1-3 words of the text encoder's vocabulary that no catalog text holds, and strings of
            random letters such as "zzqx blorf") and unrelated photos (items of the other half: categories the
            catalog lacks); fused: an unrelated photo with random words;
  real:     an item's title, category or one tag (text; its title for zero-shot text), its render made a shopper's
            photo (image; zero-shot image), that photo with a fragment of its text (fused): the item is relevant.
For each kind of query (relevance.KINDS) the floor is the --nonsense quantile of the nonsense queries' best scores
(the score of their first result), lowered where needed so that --keep of the real queries whose item is in their
first 10 results keep it: min(quantile(nonsense best, 0.99), quantile(relevant item's score, 0.02)).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from multiretrieval import Catalog, Retriever  # noqa: E402
from multiretrieval.benchmarks import heldout_category, load_items, nonsense_words, shopper_photo  # noqa: E402
from multiretrieval.catalog import load_image  # noqa: E402
from multiretrieval.config import RetrieverConfig  # noqa: E402
from multiretrieval.datasets import split_of  # noqa: E402
from multiretrieval.relevance import FLOORS_FILE, FLOORS_FORMAT, KINDS, floor_config  # noqa: E402
from multiretrieval.utils import stable_hash  # noqa: E402

K = 10


def training_items(root: Path, work: Path) -> pd.DataFrame:
    items = load_items(root, work / "sweethome3d-images", heldout=heldout_category)
    return items[~items["heldout"] & ((items["dataset"] != "tuxpaint") | (items["id"].map(split_of) == "train"))]


def split_categories(part: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog half, absent half) of a data set's items by top-level category, about half the items each."""
    tops = sorted(part["top"].unique(), key=lambda t: stable_hash(f"{seed}:{t}"))
    sizes = part["top"].value_counts()
    inside, total = [], 0
    for t in tops:
        if total < len(part) / 2:
            inside.append(t)
            total += sizes[t]
    where = part["top"].isin(inside)
    return part[where], part[~where]


def batched(r: Retriever, queries: list[dict]) -> list[pd.DataFrame]:
    size = r.config.search.max_batch
    return [frame for s in range(0, len(queries), size) for frame in r.search_batch(queries[s:s + size])]


def best_scores(frames: list[pd.DataFrame]) -> list[float]:
    return [float(f["score"].iloc[0]) for f in frames if len(f)]


def relevant_scores(frames: list[pd.DataFrame], targets: list[str]) -> tuple[list[float], int]:
    """The relevant item's score, for the queries that find it in their first K results; and how many queries."""
    out = []
    for f, t in zip(frames, targets):
        hit = f[f["id"].astype(str) == t]
        if len(hit):
            out.append(float(hit["score"].iloc[0]))
    return out, len(frames)


def fragment(row, rng: np.random.Generator) -> str:
    parts = [row.title, row.category.split(" / ")[-1]] + [t.strip() for t in str(row.tags).split(",") if t.strip()]
    return parts[int(rng.integers(0, len(parts)))]


def measure(name: str, part: pd.DataFrame, config: RetrieverConfig, args, rng: np.random.Generator) -> dict[str, dict]:
    inside, absent = split_categories(part, args.seed)
    catalog = inside.iloc[rng.permutation(len(inside))[:args.items]]
    absent = absent.iloc[rng.permutation(len(absent))[:args.queries]]
    frame = pd.DataFrame({"id": catalog["key"].to_numpy(), "image": catalog["image"].to_numpy(),
                          "title": catalog["title"].to_numpy(),
                          "description": [f"{c}. {t}" if t else c for c, t in zip(catalog["category"], catalog["tags"])]})
    r = Retriever(config)
    r.index(Catalog(frame))
    words = nonsense_words(rng, catalog["text"], args.queries)
    unrelated = [load_image(p) for p in absent["image"]]
    real = catalog.iloc[rng.permutation(len(catalog))[:args.queries]]
    targets = real["key"].tolist()
    photos = [shopper_photo(load_image(p), np.random.default_rng([args.seed, stable_hash(k)])) for p, k in zip(real["image"], targets)]
    fragments = [fragment(row, rng) for row in real.itertuples()]
    nonsense = {"text": [{"text": w, "k": K} for w in words],
                "image": [{"image": im, "mode": "image", "k": K} for im in unrelated],
                "fused": [{"image": im, "text": w, "k": K} for im, w in zip(unrelated, words)],
                "zero-shot:text": [{"text": w, "mode": "zero-shot", "k": K} for w in words],
                "zero-shot:image": [{"image": im, "mode": "zero-shot", "k": K} for im in unrelated]}
    relevant = {"text": [{"text": t, "k": K} for t in fragments],
                "image": [{"image": im, "mode": "image", "k": K} for im in photos],
                "fused": [{"image": im, "text": t, "k": K} for im, t in zip(photos, fragments)],
                "zero-shot:text": [{"text": t, "mode": "zero-shot", "k": K} for t in real["title"]],
                "zero-shot:image": [{"image": im, "mode": "zero-shot", "k": K} for im in photos]}
    out = {}
    for kind in KINDS:
        started = time.time()
        found, asked = relevant_scores(batched(r, relevant[kind]), targets)
        out[kind] = {"nonsense_best": best_scores(batched(r, nonsense[kind])), "relevant": found, "real_queries": asked}
        print(f"{name:12s} {kind:16s} nonsense {len(out[kind]['nonsense_best'])}, real {len(found)}/{asked} found "
              f"({time.time() - started:.0f} s)", flush=True)
    out["catalog"] = {"items": len(catalog), "categories": sorted(inside["top"].unique()),
                      "absent": sorted(part.loc[~part["top"].isin(inside["top"]), "top"].unique())}
    return out


def summarise(per_set: dict[str, dict], config: RetrieverConfig, args) -> dict:
    floors = []
    for kind in KINDS:
        nonsense = np.concatenate([per_set[s][kind]["nonsense_best"] for s in per_set])
        relevant = np.concatenate([per_set[s][kind]["relevant"] for s in per_set])
        high, low = float(np.quantile(nonsense, args.nonsense)), float(np.quantile(relevant, 1 - args.keep))
        floor = round(min(high, low), 3)
        floors.append({"kind": kind, "config": floor_config(config, kind), "floor": floor,
                       "nonsense_quantile": round(high, 4), "relevant_quantile": round(low, 4),
                       "training": {"nonsense_answered_with_nothing": round(float((nonsense < floor).mean()), 4),
                                    "relevant_kept": round(float((relevant >= floor).mean()), 4),
                                    "nonsense_queries": len(nonsense), "real_queries_found": len(relevant)}})
    return {"format": FLOORS_FORMAT,
            "what": "min_score='auto': per kind of query, the score under which a result is no closer than a nonsense "
                    "query's best (scripts/calibrate_relevance.py; docs/queries.md)",
            "rule": f"min(quantile(nonsense best, {args.nonsense}), quantile(relevant item's score, {round(1 - args.keep, 4)}))",
            "data": {s: {**per_set[s]["catalog"], "queries": args.queries} for s in per_set},
            "seed": args.seed, "k": K, "floors": floors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder the Debian packages were unpacked into with dpkg -x")
    parser.add_argument("--items", type=int, default=300, help="catalog items per data set")
    parser.add_argument("--queries", type=int, default=120, help="queries of each kind per data set")
    parser.add_argument("--nonsense", type=float, default=0.99, help="quantile of the nonsense queries' best scores")
    parser.add_argument("--keep", type=float, default=0.98, help="share of the real queries' relevant items kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(FLOORS_FILE))
    args = parser.parse_args()
    config = RetrieverConfig()
    with tempfile.TemporaryDirectory() as work:
        items = training_items(Path(args.root), Path(work))
        per_set = {name: measure(name, part, config, args, np.random.default_rng([args.seed, stable_hash(name)]))
                   for name, part in sorted(items.groupby("dataset"))}
    table = summarise(per_set, config, args)
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    for f in table["floors"]:
        print(f"{f['kind']:16s} floor {f['floor']:.3f}  (nonsense q {f['nonsense_quantile']:.3f}, relevant q "
              f"{f['relevant_quantile']:.3f}; training: nonsense answered with nothing {f['training']['nonsense_answered_with_nothing']:.1%}, "
              f"relevant kept {f['training']['relevant_kept']:.1%})")


if __name__ == "__main__":
    main()
