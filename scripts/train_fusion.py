"""Cross-validate a pretrained attention fusion against the default late fusion, on the training data sets only.

    apt-get download sweethome3d-furniture openclipart-png tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/train_fusion.py /tmp/mrdata --cross-validate

The evidence for `fusion.kind` in configs/default.yaml. The items of the three data sets whose top-level category
the benchmarks hold out (``benchmarks.heldout_category``) are dropped first: nothing here reads a benchmark query,
nor trains on a benchmark concept. The other top-level categories fall into 3 folds (sha256 of "<data set>:<category>").
For each fold:

- the attention fusion is trained with ``training.fit`` (the `multiretrieval train` recipe, the config's
  ``training:`` section) on the items of the other two folds of all three data sets, as a shipped pretrained fusion
  would be;
- the fold's items become composed and fused benchmarks exactly as `multiretrieval evaluate` builds its own
  (``benchmarks.build_fused`` / ``build_composed``: shopper photos + category, tag, vague words; + a family member's
  or a synthetic edit's words), scored by ``evaluation.score_benchmark`` under late fusion (the baseline), the default
  (late fusion with composition and the word filter) and the pretrained attention fusion with the same composition
  and word filter.

Prints R@1 (image-only / text-only / fused under each fusion) per benchmark and query kind, mean over the folds, and
the mean fused R@1 of each fusion; each fold's mean as it finishes. The training views, the fold fusions and the fold
benchmarks are kept in ``--work`` (a rerun reuses them); the whole run takes about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402

from multiretrieval.benchmarks import build_composed, build_fused, item_description, load_items, near_duplicates  # noqa: E402
from multiretrieval.catalog import Catalog  # noqa: E402
from multiretrieval.config import RetrieverConfig  # noqa: E402
from multiretrieval.evaluation import score_benchmark  # noqa: E402
from multiretrieval.training import encode_views, fit  # noqa: E402
from multiretrieval.utils import stable_hash  # noqa: E402

FOLDS = 3


def fold_of(dataset: str, top: str) -> int:
    return stable_hash(f"{dataset}:{top}") % FOLDS


def trainable_items(root: Path, cache: Path) -> pd.DataFrame:
    """The three data sets' items outside the benchmarks' held-out categories, with their fold."""
    items = load_items(root, cache / "sweethome3d-images")
    items = items[~items["heldout"]].reset_index(drop=True)
    return items.assign(fold=[fold_of(d, t) for d, t in zip(items["dataset"], items["top"])])


def training_catalog(items: pd.DataFrame) -> Catalog:
    """The items as one catalog, indexed by title and description as the benchmark catalogs are."""
    return Catalog(pd.DataFrame({"id": items["key"], "image": items["image"], "title": items["title"].astype(str).str.strip().str.rstrip("."),
                                 "description": [item_description(r) for r in items.itertuples(index=False)]}))


def cross_validate(items: pd.DataFrame, config: RetrieverConfig, work: Path, show_progress: bool) -> None:
    catalog = training_catalog(items)
    views = encode_views(catalog.image_sources(), catalog.texts(), config, work / "views.npz", show_progress)
    rows = []
    for f in range(FOLDS):
        kept = (items["fold"] != f).to_numpy()
        fusion_dir = work / f"fold{f}" / "fusion"
        if not (fusion_dir / "fusion.json").is_file() or not (fusion_dir / "training.json").is_file():
            fit(Catalog(catalog.df[kept].reset_index(drop=True)), fusion_dir, config, show_progress, resume=True,
                views={k: v[kept] for k, v in views.items()})
        held = items.assign(heldout=~kept)
        bench = work / f"fold{f}" / "bench"
        if not (bench / "done").is_file():
            excluded = near_duplicates(held, show_progress=show_progress)
            build_fused(held, bench, excluded, show_progress=show_progress)
            build_composed(held, bench, excluded, show_progress=show_progress)
            (bench / "done").write_text("")
        pretrained = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, kind="attention", weights=str(fusion_dir)))
        for kind in ("fused", "composed"):
            for ds in ("sweethome3d", "openclipart", "tuxpaint"):
                result = score_benchmark(bench / kind / ds, pretrained, train=False, show_progress=show_progress)
                for fusion in ("late", "composed", "pretrained"):
                    for group, m in result[fusion].items():
                        if group in ("all", "edit, seen edit", "edit, unseen edit"):
                            continue
                        rows.append({"fold": f, "benchmark": f"{kind}/{ds}", "queries": group, "fusion": fusion, "n": m["n"],
                                     **{f"{mode} R@1": m[mode]["R@1"] for mode in ("image-only", "text-only", "fused")}})
        table = pd.DataFrame(rows)
        print(f"fold {f}: mean fused R@1 over benchmark x query kind",
              table[table["fold"] == f].groupby("fusion")["fused R@1"].mean().round(3).to_dict(), flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(work / "cross_validation.csv", index=False)
    mean = table.groupby(["benchmark", "queries", "fusion"], sort=False)[["n", "image-only R@1", "text-only R@1", "fused R@1"]].mean()
    print(f"R@1, mean over {FOLDS} folds of top-level categories; image-only / text-only / fused under each fusion")
    print("| benchmark | queries | queries per fold | late | default (late + composition + word filter) | pretrained attention (+ the same) |")
    print("|---|---|---|---|---|---|")
    for (bench, group), part in mean.groupby(level=[0, 1], sort=False):
        cells = [" / ".join(f"{part.loc[(bench, group, f), c]:.3f}" for c in ("image-only R@1", "text-only R@1")) +
                 f" / **{part.loc[(bench, group, f), 'fused R@1']:.3f}**" for f in ("late", "composed", "pretrained")]
        print(f"| {bench} | {group} | {part['n'].iloc[0]:.0f} | " + " | ".join(cells) + " |")
    print("mean fused R@1 over benchmark x query kind:", table.groupby("fusion")["fused R@1"].mean().round(3).to_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder the three Debian packages were unpacked into with dpkg -x")
    parser.add_argument("--cross-validate", action="store_true", help="print the cross-validation table (the only action)")
    parser.add_argument("--work", type=Path, default=None, help="cached views, fold fusions and fold benchmarks (default: a temporary folder)")
    args = parser.parse_args()
    if not args.cross_validate:  # no pretrained fusion ships (docs/results.md, "Why the attention fusion is not the default")
        parser.error("nothing to do: pass --cross-validate")
    config = RetrieverConfig()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cross_validate(trainable_items(args.root, work), config, work, show_progress=True)


if __name__ == "__main__":
    main()
