"""The evaluation harness: benchmark catalogs built from Debian packages, and the measures.

    python scripts/build_benchmarks.py /tmp/mrdata --out bench     # once
    multiretrieval evaluate bench --out reports/eval              # report.md, results.json, recall_at_k.png

Benchmarks (none of their queries is ever trained on):
- tuxpaint: the evaluation split of tuxpaint-stamps-default, indexed WITHOUT texts; each
  description is a zero-shot text query for its stamp (recall@1/5/10), each stamp is
  classified zero-shot among the category names (accuracy), and each stamp's image is a query
  against the stamps' descriptions (image -> text, recall@1/5/10). Every zero-shot space runs, on
  the stamps as drawn and on ``photo_like.csv`` when the benchmark has it (the same stamps as small,
  grey, low-contrast, off-centre JPEG photos on plain backgrounds: benchmarks.photo_like).
- unseen (issue 14): LiT projections trained by the shipped recipe without any item of the held-out
  categories (benchmarks.heldout_category), then the tuxpaint measures on the held-out categories of
  openclipart (titles are file names) and tuxpaint, as drawn and photo-like: concepts the projections
  never saw. Training and its feature cache take a few minutes on a first run.
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
- composed/<data set> and fused/<data set> (issue 11; built by benchmarks.build_composed / build_fused
  from sweethome3d, openclipart and tuxpaint, queries only from held-out categories, see split.json in
  each folder): image-only, text-only and fused recall@1/5/10 per query group under late fusion, the
  pretrained attention fusion ``fusion.weights`` names ("not shipped" when none) and the attention fusion
  trained on the benchmark catalog's own items with ``Retriever.train()``. Composed: fused R@1, its ratio
  to late fusion's and the target (>= 2x late and >= 0.35) as pass/fail; fused: fused R@1 against the
  better of image-only and text-only, per kind of text. ``evaluate(..., only=["composed"])`` runs a subset.
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
from .query.ranking import named_first, named_items
from .query.scores import joint_query_vectors, photo_neighbours

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


def selected(name: str, only: list[str] | tuple[str, ...] | None) -> bool:
    """Whether benchmark ``name`` ("tuxpaint", "composed/sweethome3d", ...) is among ``only`` (None: all); a
    selector names a benchmark or a group of them ("composed", "fused")."""
    return only is None or any(name == s or name.startswith(s.rstrip("/") + "/") for s in only)


def evaluate(bench: str | Path, out: str | Path, config: RetrieverConfig | None = None, train: bool = True,
             show_progress: bool | None = None, only: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every benchmark under ``bench`` (or those ``only`` names: tuxpaint, unseen, sweethome3d, exact_names, regions, composed,
    fused, composed/<data set>, fused/<data set>); write report.md, results.json and recall_at_k.png to ``out``."""
    bench, out = Path(bench), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or RetrieverConfig()
    started = time.time()
    results: dict[str, Any] = {"config": config.to_dict()}
    if (bench / "tuxpaint" / "catalog.csv").is_file() and selected("tuxpaint", only):
        results["tuxpaint_zero_shot"] = _tuxpaint(bench / "tuxpaint", config, show_progress)
    if (bench / "unseen" / "train.csv").is_file() and selected("unseen", only):
        results["unseen_zero_shot"] = _unseen(bench / "unseen", config, out, show_progress)
    if (bench / "sweethome3d" / "catalog.csv").is_file() and selected("sweethome3d", only):
        results.update(_sweethome3d(bench / "sweethome3d", config, out, train, show_progress))
    if (bench / "exact_names" / "catalog.csv").is_file() and selected("exact_names", only):
        results["exact_names"] = exact_names(bench / "exact_names", config, show_progress)
    if (bench / "regions" / "scenes.csv").is_file() and selected("regions", only):
        results["regions"] = regions_benchmark(bench / "regions", config, show_progress)
    for kind in ("composed", "fused"):
        for folder in sorted(p.parent for p in (bench / kind).glob("*/catalog.csv")):
            name = f"{kind}/{folder.name}"
            if selected(name, only):
                logger.info("benchmark %s", name)
                results.setdefault(kind, {})[folder.name] = score_benchmark(folder, config, train, show_progress)
    results["seconds"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text(report_markdown(results))
    plot_recall(results, out / "recall_at_k.png")
    return results


def _unseen(folder: Path, config: RetrieverConfig, out: Path, show_progress) -> dict[str, Any]:
    """LiT projections trained with the shipped recipe on train.csv (no item of a held-out category), then the
    zero-shot benchmark (``_tuxpaint``) on each data set's held-out categories, lit+conse at the config's ConSE
    weight (the default config's is the recipe's, training.LIT_CONSE_WEIGHT, chosen by cross-validation that leaves
    these categories out). Features are cached in the benchmark folder."""
    from .training import LIT_DATA_WEIGHTS, LIT_EPOCHS, encode_catalog, features_file, fit_zero_shot

    train = pd.read_csv(folder / "train.csv", dtype={"id": str}, keep_default_na=False)
    tower = config.encoders.image
    pairs = {name: encode_catalog(Catalog(part.drop(columns="dataset").reset_index(drop=True)),
                                  features_file(folder / "features", name, tower), show_progress=show_progress, image_encoder=tower)
             for name, part in train.groupby("dataset")}
    weights = out / "unseen-lit.safetensors"
    report = fit_zero_shot(pairs, weights, epochs=LIT_EPOCHS, data_weights=LIT_DATA_WEIGHTS, image_encoder=tower,
                           show_progress=show_progress)
    trained = dataclasses.replace(config, zero_shot=dataclasses.replace(config.zero_shot, weights=str(weights)))
    results = {"training": {"pairs": {k: v["train"] for k, v in report["data"].items()}, "epochs": report["epochs_run"],
                            "conse_weight": config.zero_shot.conse_weight}}
    for sub in sorted(p.parent for p in folder.glob("*/catalog.csv")):
        results[sub.name] = _tuxpaint(sub, trained, show_progress)
    return results


def _tuxpaint(folder: Path, config: RetrieverConfig, show_progress) -> dict[str, Any]:
    """The zero-shot benchmark on the stamps as drawn (``kind`` keys, as before) and, when the benchmark
    has photo_like.csv, on the same stamps as photos (under "photo_like")."""
    out = _zero_shot(folder / "catalog.csv", config, show_progress)
    if (folder / "photo_like.csv").is_file():
        out["photo_like"] = _zero_shot(folder / "photo_like.csv", config, show_progress)
    return out


def _zero_shot(path: Path, config: RetrieverConfig, show_progress) -> dict[str, Any]:
    from .retriever import Retriever
    from .training import CLASSIC_CONSE

    full = Catalog.from_csv(path)
    images_only = Catalog(full.df[["id", "image", "category"]], image_root=full.image_root, text_columns=())
    categories = sorted(full.df["category"].unique())
    prompts = [f"a picture of {c.replace('naturalforces', 'natural forces')}" for c in categories]
    truth = np.array([categories.index(c) for c in full.df["category"]])
    out = {"items": len(full), "categories": len(categories)}
    for kind in ZERO_SHOT_KINDS:
        space = dataclasses.replace(config.zero_shot, kind=kind, **(CLASSIC_CONSE if kind == "conse" else {}))  # the baseline
        r = Retriever(dataclasses.replace(config, zero_shot=space))
        r.index(images_only, show_progress=show_progress)
        item_vecs = r.vectors("clip_image")
        position = {str(i): p for p, i in enumerate(r.items["id"].astype(str))}
        targets = np.array([position[str(i)] for i in full.df["id"]])
        queries = r.encode(texts=full.df["title"].tolist(), space="clip")
        ranks = ranks_of_targets(queries, item_vecs, targets)
        class_vecs = r.encode(texts=prompts, space="clip")
        predicted = (item_vecs[targets] @ class_vecs.T).argmax(1)
        # image -> text: row i's image against every row's description, its own the target
        image_to_text = ranks_of_targets(item_vecs[targets], queries, np.arange(len(full)))
        out[kind] = {**recall(ranks), "category_accuracy": float((predicted == truth).mean()),
                     "image_to_text": recall(image_to_text), "fingerprint": r.zero_shot.fingerprint}
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
    valid = [[position[t]] for t in queries["target"]]
    photo_files, photo_of = np.unique(queries["image"].to_numpy(), return_inverse=True)
    texts, text_of = np.unique(queries["text"].to_numpy(), return_inverse=True)
    features = _QueryFeatures(r.embedder, [load_image(folder / p) for p in photo_files], texts.tolist(), photo_of, text_of)

    def measure(retriever) -> dict[str, dict[str, float]]:  # as search ranks (composition, word filter)
        every = _measure(retriever, features, valid, {"all": np.ones(len(queries), bool)})["all"]
        return {mode: {k: v for k, v in every[mode].items() if k in ("R@1", "R@10")} for mode in QUERY_MODES}

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


# ---------------------------------------------------------------- composed and fused benchmarks (benchmarks.py builds them)

FUSIONS = ("late", "composed", "pretrained", "fine-tuned")
QUERY_MODES = ("image-only", "text-only", "fused")
COMPOSED_TARGET = {"ratio_to_late": 2.0, "min_R@1": 0.35}  # issue 11: fused R@1 >= 2x late fusion's and >= 0.35
NOT_SHIPPED = "not shipped"


def best_scores(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(n queries, n items) scores of (n, readings, d) query vectors: each item's best reading (query.scores.joint_query_vectors)."""
    return np.einsum("nrd,md->nrm", queries, items).max(1)


def ranks_of_any(sims: np.ndarray, valid: list[list[int]]) -> np.ndarray:
    """0-based rank of each query's best-scoring valid target: the items that are not valid and score at
    least as high (ties count against the target)."""
    out = np.zeros(len(sims), np.int64)
    for i, v in enumerate(valid):
        wrong = np.ones(sims.shape[1], bool)
        wrong[v] = False
        out[i] = int((sims[i, wrong] >= sims[i, v].max()).sum())
    return out


def query_groups(queries: pd.DataFrame) -> dict[str, np.ndarray]:
    """Row masks of the queries' groups: each kind; edits the composed-training recipe may see or never sees; all."""
    kinds = queries["kind"].astype(str)
    groups = {k: (kinds == k).to_numpy() for k in dict.fromkeys(kinds)}
    if "seen_edit" in queries and (kinds == "edit").any():
        seen = queries["seen_edit"].astype(str).str.lower().eq("true").to_numpy()
        groups["edit, seen edit"] = groups["edit"] & seen
        groups["edit, unseen edit"] = groups["edit"] & ~seen
    groups["all"] = np.ones(len(queries), bool)
    return {g: m for g, m in groups.items() if m.any()}


class _QueryFeatures:
    """A benchmark's query photos and texts encoded once (the encoders are frozen), fused by each fusion."""

    def __init__(self, embedder, photos: list, texts: list[str], photo_of: np.ndarray, text_of: np.ndarray) -> None:
        self.photos, self.texts, self.photo_of, self.text_of = photos, texts, photo_of, text_of
        self._tokens: dict[tuple[int, int], tuple] = {}
        self._tokens_for(embedder)

    def _tokens_for(self, embedder) -> tuple:
        fusion = embedder.fusion
        layout = (fusion.image_grid, fusion.text_chunks)
        if layout not in self._tokens:
            bs = embedder.config.encoders.batch_size
            image = np.concatenate([embedder.image_encoder.forward_images(self.photos[s:s + bs], layout[0])[0]
                                    for s in range(0, len(self.photos), bs)])
            parts = [embedder.text_encoder.forward(self.texts[s:s + bs], layout[1]) for s in range(0, len(self.texts), bs)]
            self._tokens[layout] = (image, np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts]))
        return self._tokens[layout]

    def embed(self, retriever) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
        """Image-only, text-only and fused query vectors under ``retriever``'s fusion, as its search ranks by them,
        and per query the keys of the items its words name (query.ranking.named_items; None: no filter)."""
        embedder = retriever.embedder
        image, text, text_mask = self._tokens_for(embedder)
        out, named = {}, [None] * len(self.photo_of)
        for mode in QUERY_MODES:
            f = embedder.feature_buffers(len(self.photo_of))
            if mode != "text-only":
                f["image_tokens"][:], f["image_mask"][:] = image[self.photo_of], True
            if mode != "image-only":
                f["text_tokens"][:], f["text_mask"][:] = text[self.text_of], text_mask[self.text_of]
            near = photo_neighbours(f, embedder, retriever.collection) if mode == "fused" else None
            out[mode] = joint_query_vectors(f, None, embedder, retriever.collection, near=near)
            if near is not None and embedder.config.fusion.word_filter:
                named = [named_items(self.texts[t], n, retriever.collection) for t, n in zip(self.text_of, near[1])]
        return out, named


def _measure(retriever, features: _QueryFeatures, valid: list[list[int]], groups: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    ranks = {mode: ranks_of_any(sims, valid) for mode, sims in _scores(retriever, features).items()}
    return {g: {"n": int(mask.sum()), **{mode: recall(r[mask]) for mode, r in ranks.items()}} for g, mask in groups.items()}


def _scores(retriever, features: _QueryFeatures) -> dict[str, np.ndarray]:
    """(queries, items) scores of each kind of query, ordered as search orders them: each item by its best reading,
    a fused query's items its words name first, in its photo's order (query.ranking.named_first)."""
    items = retriever.vectors("joint")
    vectors, named = features.embed(retriever)
    out = {}
    for mode, q in vectors.items():
        sims = best_scores(q, items)
        if mode == "fused":
            position = retriever.collection.store.rows_of
            photo = vectors["image-only"][:, 0] @ items.T
            for i, keys in enumerate(named):
                if keys is not None:
                    sims[i] = named_first(sims[i], photo[i], np.isin(np.arange(sims.shape[1]), position(keys)))
        out[mode] = sims
    return out


def score_benchmark(folder: str | Path, config: RetrieverConfig | None = None, train: bool = True,
                    show_progress: bool | None = None) -> dict[str, Any]:
    """Score one composed or fused benchmark folder (benchmarks.build_composed / build_fused).

    Image-only, text-only and fused recall@1/5/10 per query group under (i) late fusion without composition
    or word filter (``fusion.compose`` and ``fusion.word_filter`` off: the baseline), (ii) "composed": late
    fusion with the config's composition and word filter (the shipped default, no catalog training; skipped
    when the config turns composition off), (iii) the pretrained
    attention fusion the config's ``fusion.weights`` names, not trained on this catalog ("not shipped" when
    it names none), (iv) the attention fusion trained on this catalog with ``Retriever.train()`` (its own
    items' images and texts; never a query photo or text), composed as the config says.
    """
    import tempfile

    from .catalog import load_image
    from .retriever import Retriever

    folder = Path(folder)
    started = time.time()
    config = config or RetrieverConfig()
    text_columns = ("title", "description")
    late_config = dataclasses.replace(config, catalog=dataclasses.replace(config.catalog, text_columns=text_columns),
                                      fusion=dataclasses.replace(config.fusion, kind="late", weights=None, compose=False, word_filter=False))
    composing = dataclasses.replace(late_config, fusion=dataclasses.replace(late_config.fusion, compose=config.fusion.compose,
                                                                            word_filter=config.fusion.word_filter))
    catalog = Catalog.from_csv(folder / "catalog.csv", text_columns=text_columns)
    queries = pd.read_csv(folder / "queries.csv", dtype=str, keep_default_na=False)
    split = json.loads((folder / "split.json").read_text()) if (folder / "split.json").is_file() else {}
    out: dict[str, Any] = {"kind": folder.parent.name, "dataset": folder.name, "catalog": len(catalog), "queries": len(queries),
                           "split": split.get("split", ""), "heldout_categories": split.get("heldout_categories", [])}
    with tempfile.TemporaryDirectory(prefix="multiretrieval-eval-") as tmp:
        r = Retriever(late_config)
        r.index(catalog, show_progress=show_progress, cache=Path(tmp) / "shards")
        position = {str(i): p for p, i in enumerate(r.items["id"].astype(str))}
        missing = sorted({t for ts in queries["targets"] for t in ts.split(";")} - set(position))
        if missing:
            raise ValueError(f"{folder}: query targets not indexed: {missing[:5]}")
        valid = [[position[t] for t in ts.split(";")] for ts in queries["targets"]]
        photo_files, photo_of = np.unique(queries["image"].to_numpy(), return_inverse=True)
        texts, text_of = np.unique(queries["text"].to_numpy(), return_inverse=True)
        features = _QueryFeatures(r.embedder, [load_image(folder / p) for p in photo_files], texts.tolist(), photo_of, text_of)
        groups = query_groups(queries)
        out["late"] = _measure(r, features, valid, groups)
        r.config = composing
        if config.fusion.compose:
            out["composed"] = _measure(r, features, valid, groups)
        if config.fusion.weights:
            pre = Retriever(dataclasses.replace(late_config, fusion=config.fusion))
            pre.index(catalog, show_progress=show_progress, cache=Path(tmp) / "shards")  # the encoded shards are reused
            out["pretrained"] = _measure(pre, features, valid, groups)
            out["pretrained_weights"] = str(config.fusion.weights)
        else:
            out["pretrained"] = NOT_SHIPPED
        if train:
            t0 = time.time()
            report = r.train(out=Path(tmp) / "trained", show_progress=show_progress)
            out["fine-tuned"] = _measure(r, features, valid, groups)
            out["training"] = {"epochs": len(report["history"]), "best_val_fused_R@1": report["best_val_fused_R@1"],
                               "items": report["items"], "seconds": round(time.time() - t0, 1),
                               "from": "random initialisation (Retriever.train)"}
    out["summary"] = _summary(out)
    out["seconds"] = round(time.time() - started, 1)
    return out


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """Composed: fused R@1 per fusion, its ratio to late fusion's, and the target as pass/fail. Fused: per
    query kind, fused R@1 against the better of image-only and text-only."""
    measured = {f: result[f] for f in FUSIONS if isinstance(result.get(f), dict)}
    late = measured["late"]["all"]["fused"]["R@1"]
    if result["kind"] == "composed":
        out = {}
        for fusion, m in measured.items():
            r1 = m["all"]["fused"]["R@1"]
            ratio = r1 / late if late else None
            out[fusion] = {"fused R@1": r1, "ratio to late": ratio,
                           "target met": bool(ratio is not None and ratio >= COMPOSED_TARGET["ratio_to_late"]
                                              and r1 >= COMPOSED_TARGET["min_R@1"])}
        return out
    out = {}
    for fusion, m in measured.items():
        for group, g in m.items():
            best = max(g["image-only"]["R@1"], g["text-only"]["R@1"])
            out.setdefault(fusion, {})[group] = {"fused R@1": g["fused"]["R@1"], "best single R@1": best,
                                                 "fused - best single": g["fused"]["R@1"] - best,
                                                 "fused >= best single": g["fused"]["R@1"] >= best}
    return out


# ---------------------------------------------------------------- report

REGION_VARIANTS = {"whole image": "none", "+ 13 regions: the 2 x 2 and 3 x 3 grids' cells": "grid13",
                   "+ 6 regions: the salient components, then 2 x 2 grid cells": "salient6"}  # name -> index.image_regions


def regions_benchmark(folder: str | Path, config: RetrieverConfig | None = None, show_progress=None) -> dict[str, Any]:
    """The regions benchmark (benchmarks.build_regions): (a) scene cropped around one item -> that item, against the whole
    scene, through ``search(crop=...)``; (b) an item's own photo -> the scenes that contain it, through ``search`` over
    the scenes indexed with each ``index.image_regions`` of REGION_VARIANTS (a scene scores its whole photo or its best
    region). R@1 and R@10; for (b) also the vectors per scene, the bytes of region arrays per scene and the seconds
    spent encoding regions per scene."""
    from .catalog import load_image
    from .retriever import Retriever

    folder = Path(folder)
    config = config or RetrieverConfig()
    items = pd.read_csv(folder / "catalog.csv")
    scenes = pd.read_csv(folder / "scenes.csv")
    queries = pd.read_csv(folder / "queries.csv")
    r = Retriever(config)
    r.index(Catalog(items[["id", "image"]], image_root=folder, text_columns=()), show_progress=show_progress)
    photos = {row.scene: load_image(folder / row.image) for row in scenes.itertuples()}

    def ranks(index: Retriever, specs: list[dict], relevant: list[set]) -> np.ndarray:
        found = []
        for start in range(0, len(specs), config.search.max_batch):
            found += index.search_batch(specs[start:start + config.search.max_batch])
        return np.array([next((1 + at for at, i in enumerate(f["id"]) if i in wanted), np.inf) for wanted, f in zip(relevant, found)])

    crop = {"queries": len(queries)}
    for name, with_crop in (("whole scene", False), ("crop around the item", True)):
        specs = [{"image": photos[q.scene], "mode": "image", "k": 10, **({"crop": json.loads(q.crop)} if with_crop else {})}
                 for q in queries.itertuples()]
        found = ranks(r, specs, [{t} for t in queries["target"]])
        crop[name] = {"R@1": float(np.mean(found <= 1)), "R@10": float(np.mean(found <= 10))}

    contains = [set(json.loads(s)) for s in scenes["items"]]
    wanted = sorted(set().union(*contains))
    paths = dict(zip(items["id"], items["image"]))
    specs = [{"image": load_image(folder / paths[i]), "mode": "image", "k": 10} for i in wanted]
    relevant = [{int(n) for n, c in zip(scenes["scene"], contains) if i in c} for i in wanted]
    scene_catalog = Catalog(scenes[["scene", "image"]].rename(columns={"scene": "id"}), image_root=folder, text_columns=())
    out: dict[str, Any] = {"queries": len(wanted)}
    for variant, recipe in REGION_VARIANTS.items():
        index = Retriever(dataclasses.replace(config, index=dataclasses.replace(config.index, image_regions=recipe)))
        report = index.index(scene_catalog, show_progress=show_progress)
        found = ranks(index, specs, relevant)
        features = index.collection.store.features
        region_bytes = sum(features[k].nbytes for k in ("region_vectors", "region_mask") if k in features)
        out[variant] = {"R@1": float(np.mean(found <= 1)), "R@10": float(np.mean(found <= 10)),
                        "vectors": 1 + float(features["region_mask"].sum(1).mean()) if "region_mask" in features else 1.0,
                        "region_bytes": region_bytes / len(scenes), "region_seconds": report.seconds.get("regions", 0.0) / len(scenes)}
    return {"items": len(items), "scenes_count": len(scenes), "crop": crop, "scenes": out}


def report_markdown(results: dict[str, Any]) -> str:
    lines = ["# multiretrieval evaluation", ""]
    tux = results.get("tuxpaint_zero_shot")
    if tux:
        lines += [f"## Zero-shot (tuxpaint evaluation split, {tux['items']} stamps, indexed without texts)", "",
                  "Description -> image (R@1 / R@5 / R@10), category accuracy, and image -> description (each stamp's image "
                  "against the stamps' descriptions). Photo-like: the same stamps as small, grey, low-contrast, off-centre "
                  "JPEG photos on plain backgrounds.", ""] + _zero_shot_table({"tuxpaint eval": tux}) + [""]
    unseen = results.get("unseen_zero_shot")
    if unseen:
        t = unseen["training"]
        lines += ["## Zero-shot on unseen concepts (held-out categories: benchmarks.heldout_category)", "",
                  f"LiT projections trained by the shipped recipe on the training sets without any item of a held-out category "
                  f"({', '.join(f'{k} {v:,}' for k, v in t['pairs'].items())} pairs; {t['epochs']} epochs; ConSE weight "
                  f"{t['conse_weight']:g}), then queried on those categories' items: titles -> images, category names, images -> titles.", ""]
        lines += _zero_shot_table({k: v for k, v in unseen.items() if k != "training"}) + [""]
    fused = results.get("sweethome3d_fused")
    if fused:
        lines += [f"## Photo + text fragment -> item (sweethome3d, {fused['queries']} queries)", "",
                  "| fusion | query | R@1 | R@10 |", "|---|---|---|---|"]
        # "late": the config's fusion untrained (by default late fusion with composition and the word filter)
        for fusion, label in (("late", "untrained (the config's)"), ("trained", "trained (Retriever.train)")):
            for query, m in fused.get(fusion, {}).items():
                lines.append(f"| {label} | {query} | {m['R@1']:.3f} | {m['R@10']:.3f} |")
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
    lines += _regions_markdown(results.get("regions"))
    lines += _composed_and_fused_markdown(results)
    lines.append(f"Run time: {results.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def _regions_markdown(regions: dict[str, Any] | None) -> list[str]:
    if not regions:
        return []
    crop, scenes = regions["crop"], regions["scenes"]
    lines = [f"## A part of a photo (regions: {regions['items']} sweethome3d items, {regions['scenes_count']} scenes of 2-6 of them)", "",
             (f"(a) Scene -> one of its items ({crop['queries']} queries, image mode): the scene cropped around the item "
              "(jittered) against the whole scene."), "", "| query | R@1 | R@10 |", "|---|---|---|"]
    lines += [f"| {name} | {m['R@1']:.3f} | {m['R@10']:.3f} |" for name, m in crop.items() if name != "queries"]
    lines += ["", (f"(b) An item's own photo -> the scenes that contain it ({scenes['queries']} queries, image mode), the scenes "
                   "indexed with each index.image_regions (a scene scores its whole photo or its best region)."), "",
              "| scene vectors | R@1 | R@10 | vectors per scene | region KB per scene | region encoding s per scene |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {m['R@1']:.3f} | {m['R@10']:.3f} | {m['vectors']:.1f} | {m.get('region_bytes', 0) / 1000:.1f} | "
              f"{m.get('region_seconds', 0):.3f} |" for name, m in scenes.items() if name != "queries"]
    return lines + [""]


def _r(m: dict[str, float]) -> str:
    return f"{m['R@1']:.3f} / {m['R@5']:.3f} / {m['R@10']:.3f}"


def _zero_shot_table(parts: dict[str, dict[str, Any]]) -> list[str]:
    """Rows of every zero-shot space on each benchmark, as drawn and photo-like, with multiples of ConSE."""
    lines = ["| benchmark | images | zero-shot space | text -> image R@1 / R@5 / R@10 | R@10 / ConSE's | category accuracy "
             "| image -> text R@1 / R@5 / R@10 | R@10 / ConSE's |", "|---|---|---|---|---|---|---|---|"]
    for name, result in parts.items():
        for label, part in (("as drawn", result), ("photo-like", result.get("photo_like"))):
            for kind in ZERO_SHOT_KINDS if part else ():
                m = part[kind]
                i2t = m.get("image_to_text")
                lines.append(f"| {name} ({part['items']}) | {label} | {kind} | {_r(m)} | {_ratio(m['R@10'], part['conse']['R@10'])} "
                             f"| {m['category_accuracy']:.3f} | "
                             + (f"{_r(i2t)} | {_ratio(i2t['R@10'], part['conse']['image_to_text']['R@10'])} |" if i2t else "- | - |"))
    return lines


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline else "-"


def _composed_and_fused_markdown(results: dict[str, Any]) -> list[str]:
    """The composed and fused sections of the report: how each split was made, a summary, then every group."""
    lines: list[str] = []
    target = COMPOSED_TARGET
    titles = {"composed": 'Composed queries ("this, but X"): a shopper photo of one variant + the words of another -> that variant',
              "fused": "Fused queries: a shopper photo of an item + a short text about it (category, tag, vague) -> that item"}
    for kind in ("composed", "fused"):
        block = results.get(kind)
        if not block:
            continue
        lines += [f"## {titles[kind]}", "",
                  ("Fusions: **late** (plain late fusion, image weight 0.5, no composition: the baseline), **composed** (the "
                   "default: late fusion with the words read together with the text of the item nearest the photo, "
                   "`fusion.compose`), **pretrained** (the attention fusion that `fusion.weights` "
                   "names, not trained on the benchmark catalog; \"not shipped\" while the package ships none), **fine-tuned** "
                   "(the attention fusion trained with `Retriever.train()` on the benchmark catalog's own images and texts)."), ""]
        for ds, res in block.items():
            lines += [f"- **{kind}/{ds}** ({res['catalog']} catalog items, {res['queries']} queries): {res['split']}"]
        lines.append("")
        if kind == "composed":
            lines += [f"Target: fused R@1 >= {target['ratio_to_late']:g}x late fusion's and >= {target['min_R@1']:g}.", "",
                      "| benchmark | fusion | image-only R@1 | text-only R@1 | fused R@1 | fused / late | target |",
                      "|---|---|---|---|---|---|---|"]
            for ds, res in block.items():
                for fusion in FUSIONS:
                    m = res.get(fusion)
                    if isinstance(m, str):
                        lines.append(f"| {kind}/{ds} | {fusion} | {m} | | | | |")
                    elif m:
                        s = res["summary"][fusion]
                        ratio = "-" if s["ratio to late"] is None else f"{s['ratio to late']:.2f}x"
                        lines.append(f"| {kind}/{ds} | {fusion} | {m['all']['image-only']['R@1']:.3f} | {m['all']['text-only']['R@1']:.3f} | "
                                     f"**{s['fused R@1']:.3f}** | {ratio} | {'pass' if s['target met'] else 'FAIL'} |")
        else:
            lines += ["| benchmark | query text | fusion | image-only R@1 | text-only R@1 | fused R@1 | fused - best single | fused >= best single |",
                      "|---|---|---|---|---|---|---|---|"]
            for ds, res in block.items():
                for fusion in FUSIONS:
                    m = res.get(fusion)
                    if isinstance(m, str):
                        lines.append(f"| {kind}/{ds} | all | {fusion} | {m} | | | | |")
                        continue
                    for group, s in (res["summary"].get(fusion) or {}).items():
                        lines.append(f"| {kind}/{ds} | {group} | {fusion} | {m[group]['image-only']['R@1']:.3f} | "
                                     f"{m[group]['text-only']['R@1']:.3f} | **{s['fused R@1']:.3f}** | {s['fused - best single']:+.3f} | "
                                     f"{'yes' if s['fused >= best single'] else 'NO'} |")
        lines += ["", f"Every query group, R@1 / R@5 / R@10 ({kind}):", "",
                  "| benchmark | group | n | fusion | image-only | text-only | fused |", "|---|---|---|---|---|---|---|"]
        for ds, res in block.items():
            for group in res["late"]:
                for fusion in FUSIONS:
                    m = res.get(fusion)
                    if isinstance(m, dict):
                        g = m[group]
                        lines.append(f"| {kind}/{ds} | {group} | {g['n']} | {fusion} | {_r(g['image-only'])} | {_r(g['text-only'])} | "
                                     f"{_r(g['fused'])} |")
        lines += ["", "Seconds per benchmark (index, encode, train, score): "
                  + ", ".join(f"{kind}/{ds} {res['seconds']:.0f}" for ds, res in block.items()), ""]
    return lines


def plot_recall(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{kind}/{ds}", res) for kind in ("composed", "fused") for ds, res in results.get(kind, {}).items()]
    fig, axes = plt.subplots(1, 3 if bars else 2, figsize=(16 if bars else 11, 4))
    tux = results.get("tuxpaint_zero_shot")
    if tux:
        for label, part, style in (("", tux, "-"), ("photo-like: ", tux.get("photo_like"), "--")):
            for n, kind in enumerate(ZERO_SHOT_KINDS if part else ()):
                axes[0].plot([1, 5, 10], [part[kind][f"R@{k}"] for k in (1, 5, 10)], style, marker="o", color=f"C{n}",
                             label=label + kind)
        axes[0].set_title("zero-shot description -> image (tuxpaint eval)")
    fused = results.get("sweethome3d_fused")
    if fused:
        for fusion in ("late", "trained"):
            for query, m in fused.get(fusion, {}).items():
                axes[1].plot([1, 10], [m["R@1"], m["R@10"]], marker="o", label=f"{fusion}: {query}")
        axes[1].set_title("photo + fragment -> item (sweethome3d)")
    if bars:
        ax = axes[2]
        x = np.arange(len(bars))
        for j, fusion in enumerate(f for f in FUSIONS if any(isinstance(res.get(f), dict) for _, res in bars)):
            ax.bar(x + 0.27 * (j - 1), [res[fusion]["all"]["fused"]["R@1"] if isinstance(res.get(fusion), dict) else 0 for _, res in bars],
                   0.27, label=fusion)
        ax.set_xticks(x, [name for name, _ in bars], rotation=30, ha="right", fontsize=7)
        ax.set_title("fused R@1, composed and fused benchmarks")
    for ax in axes[:2]:
        ax.set_xlabel("K")
    for ax in axes:
        ax.set_ylabel("recall@K" if ax is not axes[-1] or not bars else "R@1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
