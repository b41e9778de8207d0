"""The evaluation harness: benchmark catalogs built from Debian packages, and the measures.

    python scripts/build_benchmarks.py /tmp/mrdata --out bench     # once
    multiretrieval evaluate bench --out reports/eval              # report.md, results.json, recall_at_k.png

Benchmarks (none of their queries is ever trained on):
- tuxpaint: the evaluation split of tuxpaint-stamps-default, indexed WITHOUT texts; each
  description is a zero-shot text query for its stamp (recall@1/5/10), and each stamp is
  classified zero-shot among the category names (accuracy). Every zero-shot space runs.
- sweethome3d fused: each item's render made into a shopper's phone photo (other background,
  crop, turn, mirror, colour shift, blur, small, JPEG; seeded, unlike any training view), plus
  one fragment of its metadata (its category or one tag), is a query for that item: recall@1 and @10 for image-only, text-only and fused
  queries, under late fusion and under the attention fusion trained on the catalog's own pairs.
- image -> image: each sweethome3d render as a query; precision@10 of items with the same name.
- exact names: the sweethome3d items, each given a synthetic brand (shared by ~10 items of
  different categories) and a unique model code ("KX-2210") in its title, the only text
  indexed; one query per item holding an exact name plus words of its category or tags that
  its title lacks: "<model code, spelt one of three ways> <descriptive words>" or "<brand>
  <descriptive words>". Recall@1/@10 of vector-only, BM25-only and hybrid text search.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .benchmarks import BENCH_SEED, build_benchmarks, build_exact_names, shopper_photo  # noqa: F401 (re-exported)
from .catalog import Catalog
from .config import RetrieverConfig

logger = logging.getLogger(__name__)
ZERO_SHOT_KINDS = ("conse", "lit", "lit+conse")
# exact names: how each method is asked through Retriever.search
EXACT_NAME_METHODS = {"vector only": {"hybrid": "off"}, "BM25 only": {"keyword_weight": 1.0},
                      "hybrid: reciprocal-rank fusion (default)": {}, "hybrid: weighted sum": {"hybrid": "weighted"}}


# ---------------------------------------------------------------- measures

def ranks_of_targets(queries: np.ndarray, items: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each query's target among all items (ties count against the target)."""
    sims = queries @ items.T
    return (sims >= sims[np.arange(len(targets)), targets][:, None]).sum(1) - 1


def recall(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}


def evaluate(bench: str | Path, out: str | Path, config: RetrieverConfig | None = None, train: bool = True,
             show_progress: bool | None = None) -> dict[str, Any]:
    """Run every benchmark under ``bench``; write report.md, results.json and recall_at_k.png to ``out``."""
    bench, out = Path(bench), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or RetrieverConfig()
    started = time.time()
    results: dict[str, Any] = {"config": config.to_dict()}
    if (bench / "tuxpaint" / "catalog.csv").is_file():
        results["tuxpaint_zero_shot"] = _tuxpaint(bench / "tuxpaint", config, show_progress)
    if (bench / "sweethome3d" / "catalog.csv").is_file():
        results.update(_sweethome3d(bench / "sweethome3d", config, out, train, show_progress))
    if (bench / "exact_names" / "catalog.csv").is_file():
        results["exact_names"] = exact_names(bench / "exact_names", config, show_progress)
    results["seconds"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text(report_markdown(results))
    plot_recall(results, out / "recall_at_k.png")
    return results


def _tuxpaint(folder: Path, config: RetrieverConfig, show_progress) -> dict[str, Any]:
    from .retriever import Retriever

    full = Catalog.from_csv(folder / "catalog.csv")
    images_only = Catalog(full.df[["id", "image", "category"]], image_root=full.image_root, text_columns=())
    categories = sorted(full.df["category"].unique())
    prompts = [f"a picture of {c.replace('naturalforces', 'natural forces')}" for c in categories]
    truth = np.array([categories.index(c) for c in full.df["category"]])
    out = {"items": len(full), "categories": len(categories)}
    for kind in ZERO_SHOT_KINDS:
        r = Retriever(dataclasses.replace(config, zero_shot=dataclasses.replace(config.zero_shot, kind=kind)))
        r.index(images_only, show_progress=show_progress)
        item_vecs = r.vectors("clip_image")
        position = {str(i): p for p, i in enumerate(r.items["id"].astype(str))}
        targets = np.array([position[str(i)] for i in full.df["id"]])
        queries = r.encode(texts=full.df["title"].tolist(), space="clip")
        ranks = ranks_of_targets(queries, item_vecs, targets)
        class_vecs = r.encode(texts=prompts, space="clip")
        predicted = (item_vecs[targets] @ class_vecs.T).argmax(1)
        out[kind] = {**recall(ranks), "category_accuracy": float((predicted == truth).mean()),
                     "fingerprint": r.zero_shot.fingerprint}
    return out


def _sweethome3d(folder: Path, config: RetrieverConfig, out: Path, train: bool, show_progress) -> dict[str, Any]:
    from .catalog import load_image
    from .retriever import Retriever

    catalog = Catalog.from_csv(folder / "catalog.csv", text_columns=("title", "description"))
    queries = pd.read_csv(folder / "queries.csv")
    r = Retriever(dataclasses.replace(config, catalog=dataclasses.replace(config.catalog, text_columns=("title", "description"))))
    r.index(catalog, show_progress=show_progress)
    ids = r.items["id"].to_numpy()
    position = {i: p for p, i in enumerate(ids)}
    targets = np.array([position[t] for t in queries["target"]])
    photos = [load_image(folder / p) for p in queries["image"]]
    texts = queries["text"].tolist()

    def measure(retriever) -> dict[str, dict[str, float]]:
        items = retriever.vectors("joint")
        encoded = {"image-only": retriever.encode(images=photos), "text-only": retriever.encode(texts=texts),
                   "fused": retriever.encode(images=photos, texts=texts)}
        return {name: recall(ranks_of_targets(q, items, targets), ks=(1, 10)) for name, q in encoded.items()}

    fused = {"queries": len(queries), "late": measure(r)}
    same_name = {"late": _same_name_precision(r, ids, catalog)}
    if train:
        report = r.train(out=out / "trained-fusion", show_progress=show_progress)
        fused["trained"] = measure(r)
        fused["training"] = {"epochs": len(report["history"]), "best_val_fused_R@1": report["best_val_fused_R@1"]}
        same_name["trained"] = _same_name_precision(r, ids, catalog)
    return {"sweethome3d_fused": fused, "sweethome3d_same_name": same_name}


def exact_names(folder: str | Path, config: RetrieverConfig, show_progress=None) -> dict[str, Any]:
    """Recall@1/@10 of each text-search method on the exact-name benchmark, overall and per kind of query."""
    from .retriever import Retriever

    folder = Path(folder)
    queries = pd.read_csv(folder / "queries.csv")
    r = Retriever(dataclasses.replace(config, catalog=dataclasses.replace(config.catalog, text_columns=("title",))))
    r.index(Catalog.from_csv(folder / "catalog.csv", text_columns=("title",)), show_progress=show_progress)
    out: dict[str, Any] = {"items": len(r), "queries": len(queries), "kinds": queries["kind"].value_counts().to_dict()}
    for method, kwargs in EXACT_NAME_METHODS.items():
        ranks = []
        for text, target in zip(queries["text"], queries["target"]):
            found = r.search(text=text, k=10, **kwargs)["id"].tolist()
            ranks.append(found.index(target) if target in found else 10)
        ranks = np.array(ranks)
        out[method] = {**recall(ranks, ks=(1, 10)),
                       **{f"R@1 {kind}": float((ranks[queries["kind"].to_numpy() == kind] < 1).mean()) for kind in out["kinds"]}}
    return out


def _same_name_precision(r, ids: np.ndarray, catalog: Catalog) -> dict[str, float]:
    """Image-only queries with each render: precision@10 of same-name items among the other results.

    Precision is over min(10, same-name items - 1) places, for items whose name is shared.
    """
    items = r.vectors("joint")
    titles = r.items["title"].to_numpy()
    queries = r.encode(images=r.image_sources().tolist())
    sims = queries @ items.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]
    counts = pd.Series(titles).value_counts()
    shared = np.array([counts[t] >= 2 for t in titles])
    precision = [(titles[top[i]] == titles[i]).sum() / min(10, counts[titles[i]] - 1) for i in np.flatnonzero(shared)]
    return {"P@10": float(np.mean(precision)) if precision else None, "queries": int(shared.sum())}


# ---------------------------------------------------------------- report

def report_markdown(results: dict[str, Any]) -> str:
    lines = ["# multiretrieval evaluation", ""]
    tux = results.get("tuxpaint_zero_shot")
    if tux:
        lines += [f"## Zero-shot description -> image (tuxpaint evaluation split, {tux['items']} stamps, indexed without texts)", "",
                  "| zero-shot space | R@1 | R@5 | R@10 | R@10 / ConSE's | category accuracy |", "|---|---|---|---|---|---|"]
        baseline = tux["conse"]["R@10"]
        for kind in ZERO_SHOT_KINDS:
            m = tux[kind]
            ratio = f"{m['R@10'] / baseline:.2f}x" if baseline else "-"
            lines.append(f"| {kind} | {m['R@1']:.3f} | {m['R@5']:.3f} | {m['R@10']:.3f} | {ratio} | {m['category_accuracy']:.3f} |")
        lines.append("")
    fused = results.get("sweethome3d_fused")
    if fused:
        lines += [f"## Photo + text fragment -> item (sweethome3d, {fused['queries']} queries)", "",
                  "| fusion | query | R@1 | R@10 |", "|---|---|---|---|"]
        for fusion in ("late", "trained"):
            for query, m in fused.get(fusion, {}).items():
                lines.append(f"| {fusion} | {query} | {m['R@1']:.3f} | {m['R@10']:.3f} |")
        lines.append("")
    same = results.get("sweethome3d_same_name")
    if same:
        lines += ["## Image -> image, same-name precision@10 (sweethome3d)", "", "| fusion | P@10 | queries |", "|---|---|---|"]
        lines += [f"| {k} | {'-' if v['P@10'] is None else format(v['P@10'], '.3f')} | {v['queries']} |" for k, v in same.items()]
        lines.append("")
    names = results.get("exact_names")
    if names:
        kinds = list(names["kinds"])
        lines += [f"## Exact names in text queries (sweethome3d with synthetic brands and model codes, {names['queries']} queries)", "",
                  "| text search | R@1 | R@10 | " + " | ".join(f"R@1, {k} queries" for k in kinds) + " |",
                  "|---|---|---|" + "---|" * len(kinds)]
        for method in EXACT_NAME_METHODS:
            m = names[method]
            lines.append(f"| {method} | {m['R@1']:.3f} | {m['R@10']:.3f} | " + " | ".join(f"{m[f'R@1 {k}']:.3f}" for k in kinds) + " |")
        lines.append("")
    lines.append(f"Run time: {results.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def plot_recall(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tux = results.get("tuxpaint_zero_shot")
    if tux:
        for kind in ZERO_SHOT_KINDS:
            axes[0].plot([1, 5, 10], [tux[kind][f"R@{k}"] for k in (1, 5, 10)], marker="o", label=kind)
        axes[0].set_title("zero-shot description -> image (tuxpaint eval)")
    fused = results.get("sweethome3d_fused")
    if fused:
        for fusion in ("late", "trained"):
            for query, m in fused.get(fusion, {}).items():
                axes[1].plot([1, 10], [m["R@1"], m["R@10"]], marker="o", label=f"{fusion}: {query}")
        axes[1].set_title("photo + fragment -> item (sweethome3d)")
    for ax in axes:
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
