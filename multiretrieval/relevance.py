"""The "no close match" floor: ``min_score="auto"``.

A query whose best result scores no better than a nonsense query's best result has no close match. The floor
of each kind of query is that: measured on the training data sets (DESIGN.md) by
``scripts/calibrate_relevance.py`` from the best scores of random-word queries and of photos of categories a
catalog lacks, checked against the relevant items of real queries, and shipped in
``weights/relevance-floors.json``. Each floor holds for the models it was measured with (``floor_config``):
another encoder, a trained fusion or another zero-shot space has none, and ``min_score="auto"`` then keeps
every result (a warning says so once).

Kinds (``query_kind``): "text", "image" and "fused" (joint-space scores, one scale) and "zero-shot:text" (a text
against item images), "zero-shot:image" (a photo against item texts), on the zero-shot space's own scale.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
FLOORS_FILE = Path(__file__).parent / "weights" / "relevance-floors.json"
FLOORS_FORMAT = 1
KINDS = ("text", "image", "fused", "zero-shot:text", "zero-shot:image")


def query_kind(mode: str, has_text: bool) -> str | None:
    """The floor's kind for a resolved query mode (query.checks.Query.mode); None for a given vector (no floor)."""
    if mode == "zero-shot":
        return "zero-shot:text" if has_text else "zero-shot:image"
    return mode if mode in ("text", "image", "fused") else None


def floor_config(config, kind: str) -> dict[str, Any]:
    """The settings a kind's scores depend on: a floor holds for a config whose record is the same."""
    if kind not in KINDS:
        raise ValueError(f"unknown query kind {kind!r}; one of {list(KINDS)}")
    enc, fusion, zs = config.encoders, config.fusion, config.zero_shot
    text = {"text": enc.text, "text_weights": enc.text_weights}
    image = {"image": enc.image, "image_weights": enc.image_weights}
    joint = {"fusion": fusion.kind, "fusion_weights": fusion.weights}
    if kind == "text":
        return {**text, **joint}
    if kind == "image":
        return {**image, **joint}
    if kind == "fused":
        return {**image, **text, **joint, "image_weight": fusion.image_weight, "compose": fusion.compose,
                "compose_words": fusion.compose_words, "compose_image_share": fusion.compose_image_share,
                "word_filter": fusion.word_filter}
    return {**image, **text, "zero_shot": zs.kind, "top_k": zs.top_k, "temperature": zs.temperature,
            "label_template": zs.label_template, "zero_shot_weights": zs.weights, "conse_weight": zs.conse_weight,
            "model": zs.model, "pretrained": zs.pretrained}


@functools.cache
def _entries(path: str) -> tuple[dict[str, Any], ...]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FLOORS_FORMAT:
        raise ValueError(f"{path}: floors format {data.get('format')!r}, this version reads {FLOORS_FORMAT}")
    return tuple(data["floors"])


@functools.cache
def _warn_once(kind: str) -> None:
    logger.warning('min_score="auto": no calibrated floor for %s queries with these models (%s); every result is kept. '
                   "scripts/calibrate_relevance.py measures one", kind, FLOORS_FILE.name)


def relevance_floor(config, kind: str, path: str | Path = FLOORS_FILE) -> float | None:
    """The calibrated "no close match" floor of a kind of query under ``config``'s models, or None where none was
    measured for them."""
    wanted = floor_config(config, kind)
    for entry in _entries(str(path)):
        if entry["kind"] == kind and entry["config"] == wanted:
            return float(entry["floor"])
    _warn_once(kind)
    return None
