"""The models: image and text encoders, the fusion module and the zero-shot space, from one config.

An :class:`Embedder` turns images and texts into what the rest of the package stores and
searches: token features (the encoders' outputs, the fusion module's inputs), joint vectors
(fused) and zero-shot vectors. It knows nothing of items, indexes or files beyond its own
weights (the fusion module). Models load on first use; the encoders are shared within a
process (see :mod:`multiretrieval.encoders`).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .config import RetrieverConfig
from .errors import ConfigError

FEATURES = ("image_tokens", "image_mask", "text_tokens", "text_mask")  # token 0 of each = the pooled vector
ZERO_SHOT = ("clip_image", "clip_text")  # the zero-shot space's image and text vectors
REGIONS = ("region_vectors", "region_mask")  # index.image_regions: (n, R, dim) unit image vectors of crops, (n, R) real
# The joint index's item vectors (fusion.item_vectors). 1: each modality weighted alike, not renormalised,
# so all queries score on one scale. Indexes saved without it renormalised items that lack a modality;
# their joint vectors are fused again from the stored features when they load (Retriever.load).
SCORE_SCALE = 1


class Embedder:
    """Encoders + fusion + zero-shot space, built from a :class:`RetrieverConfig`.

    Args:
        config: which models (default: the packaged offline ones).
        expect: what a saved index was built with (``Embedder.expectations(manifest)``):
            encoder widths and the zero-shot fingerprint. A model that differs is refused
            with a ConfigError when it loads, instead of giving vectors of another space.
    """

    def __init__(self, config: RetrieverConfig | None = None, expect: dict[str, Any] | None = None) -> None:
        self.config = config or RetrieverConfig()
        self._expect = expect or {}
        self._lock = threading.RLock()  # concurrent first uses build each model once
        self._image = self._text = self._fusion = self._zero_shot = None

    # ---------------------------------------------------------------- the models, on first use

    @property
    def image_encoder(self):
        with self._lock:
            if self._image is None:
                from .encoders import get_image_encoder

                enc = self.config.encoders
                self._image = self._checked("image", get_image_encoder(enc.image, enc.image_weights, enc.runtime, enc.precision))
            return self._image

    @property
    def text_encoder(self):
        with self._lock:
            if self._text is None:
                from .encoders import get_text_encoder

                enc = self.config.encoders
                self._text = self._checked("text", get_text_encoder(enc.text, enc.text_weights, enc.max_text_tokens, enc.runtime))
            return self._text

    @property
    def fusion(self):
        with self._lock:
            if self._fusion is None:
                from .fusion import build_fusion

                self._fusion = build_fusion(self.config.fusion, *self.dims())
            return self._fusion

    def dims(self) -> tuple[int, int]:
        """The image and text encoders' widths: a saved index's (``expect``; the encoders are checked against them when
        they load), else the loaded encoders'. A query or an update of a saved index loads only the models it runs."""
        if "image" in self._expect and "text" in self._expect:
            return int(self._expect["image"]), int(self._expect["text"])
        return self.image_encoder.dim, self.text_encoder.dim

    @property
    def zero_shot(self):
        with self._lock:
            if self._zero_shot is None:
                from .encoders.clip import build_zero_shot

                space = build_zero_shot(self.config.zero_shot, self.image_encoder, self.text_encoder)
                expected = self._expect.get("zero_shot")
                if expected is not None and space.fingerprint != expected:
                    raise ConfigError(f"the zero-shot space is now {space.fingerprint}, but the index was built with {expected}: "
                                      "re-index, or configure the space it was built with")
                self._zero_shot = space
            return self._zero_shot

    def _checked(self, part: str, encoder):
        expected = self._expect.get(part)
        if expected is not None and encoder.dim != expected:
            raise ConfigError(f"the {part} encoder {encoder.name!r} gives {encoder.dim}-d vectors, but the index was built with {expected}-d")
        return encoder

    def use_encoders(self, image=None, text=None) -> None:
        """Replace the encoders with wrappers of the same interface (the service routes their
        forward calls through micro-batchers). Call before the zero-shot space is first used."""
        with self._lock:
            self._image = image or self._image
            self._text = text or self._text

    def use_fusion(self, fusion, weights: str | Path | None) -> None:
        """Switch to another fusion module (a trained one), recorded in ``config.fusion``."""
        with self._lock:
            kind = dataclasses.replace(self.config.fusion, kind=fusion.kind, weights=None if weights is None else str(weights))
            self.config = dataclasses.replace(self.config, fusion=kind)
            self._fusion = fusion

    # ---------------------------------------------------------------- arrays

    def feature_buffers(self, n: int) -> dict[str, np.ndarray]:
        """Zeroed token arrays and all-False masks for n items, in the fusion module's token layout."""
        fusion, (di, dt) = self.fusion, self.dims()
        ti, tt = 1 + fusion.image_grid ** 2, 1 + fusion.text_chunks
        return {"image_tokens": np.zeros((n, ti, di), np.float32), "image_mask": np.zeros((n, ti), bool),
                "text_tokens": np.zeros((n, tt, dt), np.float32), "text_mask": np.zeros((n, tt), bool)}

    def empty_arrays(self, n: int) -> dict[str, np.ndarray]:
        """What the ingestion stores per item: token features plus the zero-shot vectors, zeroed."""
        dim = self.zero_shot.dim
        return {**self.feature_buffers(n), **{name: np.zeros((n, dim), np.float32) for name in ZERO_SHOT}}

    def count_tokens(self, text: str) -> int:
        """The word pieces of a query text under the text encoder's tokenizer (for ``search.max_text_tokens``)."""
        return self.text_encoder.count_tokens(text)

    def fuse(self, features: dict[str, np.ndarray], rows: Any = slice(None)) -> np.ndarray:
        """L2-normalised joint vectors of token features (all rows, or the given ones), as ``embed`` gives."""
        return self.fusion.fuse(*(features[name][rows] for name in FEATURES))

    def item_vectors(self, features: dict[str, np.ndarray], rows: Any = slice(None)) -> np.ndarray:
        """The joint vectors an index stores for items (fusion.py: each modality weighted alike, not renormalised)."""
        return self.fusion.item_vectors(*(features[name][rows] for name in FEATURES))

    def query_vectors(self, features: dict[str, np.ndarray], weights: np.ndarray | None = None,
                      calibration: dict | None = None) -> np.ndarray:
        """Joint query vectors on the score scale: against ``item_vectors``, the weighted mean of the cosines of
        the parts each query has (fusion.py). ``weights``: (n, 2) image/text weights, NaN rows for the default."""
        return self.fusion.query_vectors(*(features[name] for name in FEATURES), weights=weights, calibration=calibration)

    def calibration(self, features: dict[str, np.ndarray]) -> dict:
        """The fusion's score calibration measured on these items' features ({} for late fusion: exact)."""
        return self.fusion.calibrate(*(features[name] for name in FEATURES))

    def features(self, images: list | None = None, texts: list[str] | None = None, batch_size: int | None = None
                 ) -> dict[str, np.ndarray]:
        """Token features of decoded RGB images and/or texts (pairs when both are given)."""
        bs = batch_size or self.config.encoders.batch_size
        fusion = self.fusion
        n = len(images if images is not None else texts)
        f = self.feature_buffers(n)
        for s in range(0, n, bs):
            if images is not None:
                f["image_tokens"][s:s + bs] = self.image_encoder.forward_images(images[s:s + bs], fusion.image_grid)[0]
                f["image_mask"][s:s + bs] = True
            if texts is not None:
                f["text_tokens"][s:s + bs], f["text_mask"][s:s + bs] = self.text_encoder.forward(texts[s:s + bs], fusion.text_chunks)
        return f

    def embed(self, images: list | None = None, texts: list[str] | None = None, space: str = "joint",
              batch_size: int | None = None) -> np.ndarray:
        """Decoded RGB images and/or texts -> L2-normalised vectors (n, d).

        ``space="joint"``: the fused space (pairs when both are given); ``"clip"``: the
        zero-shot space (images or texts, not pairs).
        """
        bs = batch_size or self.config.encoders.batch_size
        if space == "clip":
            if texts is not None:
                return self.zero_shot.text_batch(texts)
            return np.concatenate([self.zero_shot.image_batch(images[s:s + bs]) for s in range(0, len(images), bs)])
        return self.fuse(self.features(images, texts, bs))

    # ---------------------------------------------------------------- identity and files

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes an item's stored arrays (the runtime does not: ~1e-5; the image encoder's precision
        does: int8 moves its vectors by ~2e-3 of cosine)."""
        cfg = self.config
        enc = cfg.encoders
        out = {"image": [enc.image, enc.image_weights], "text": [enc.text, enc.text_weights, enc.max_text_tokens],
               "image_grid": self.fusion.image_grid, "text_chunks": self.fusion.text_chunks,
               "zero_shot": self.zero_shot.fingerprint,
               "limits": [cfg.catalog.max_image_pixels, cfg.catalog.max_image_bytes],
               "text_when_image_fails": cfg.catalog.text_when_image_fails, "format": 2}  # 2: shards record warnings and retries
        if self.image_encoder.precision != "fp32":  # fp32 shards keep the fingerprint they had before precisions existed
            out["precision"] = [self.image_encoder.precision, self.image_encoder.key]  # the key names the int8 recipe
        return out

    @property
    def regions(self) -> str:
        """The region recipe item photos are indexed with (``index.image_regions``; "none": whole photos only)."""
        return self.config.index.image_regions

    def region_arrays(self, images: list) -> dict[str, np.ndarray]:
        """REGIONS of decoded RGB item photos under ``regions`` (regions.region_arrays)."""
        from .regions import region_arrays

        return region_arrays(images, self.image_encoder, self.regions)

    def region_fingerprint(self) -> dict[str, Any]:
        """What changes an item's region arrays: the photo's encoding and the recipe (a shard store of their own, so
        that turning regions on encodes only them where the whole-photo arrays are cached)."""
        from .regions import REGION_DTYPE, REGION_RECIPES

        return {**self.fingerprint(), "image_regions": [self.regions, REGION_RECIPES[self.regions]],
                "region_dtype": np.dtype(REGION_DTYPE).name}

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the models: encoder names and widths, fusion, zero-shot space."""
        cfg = self.config
        image_dim, text_dim = self.dims()
        return {"encoders": {"image": {"name": cfg.encoders.image, "dim": image_dim},
                             "text": {"name": cfg.encoders.text, "dim": text_dim}},
                "fusion": self.fusion.config(), "score_scale": SCORE_SCALE, "zero_shot": {"kind": cfg.zero_shot.kind, **self._zero_shot_record()}}

    def _zero_shot_record(self) -> dict[str, Any]:
        """The zero-shot space's width and fingerprint: a saved index's while the space is not loaded (nothing was
        encoded with it since: an update that changed no vector loads no model), else the loaded space's."""
        with self._lock:
            if self._zero_shot is None and {"zero_shot", "zero_shot_dim"} <= self._expect.keys():
                return {"dim": int(self._expect["zero_shot_dim"]), "fingerprint": self._expect["zero_shot"]}
        return {"dim": self.zero_shot.dim, "fingerprint": self.zero_shot.fingerprint}

    @staticmethod
    def expectations(manifest: dict[str, Any]) -> dict[str, Any]:
        """What a saved index's manifest says its models were (for ``expect``)."""
        return {"image": manifest["encoders"]["image"]["dim"], "text": manifest["encoders"]["text"]["dim"],
                "zero_shot": manifest["zero_shot"]["fingerprint"], "zero_shot_dim": manifest["zero_shot"]["dim"]}

    @staticmethod
    def check_config(config: RetrieverConfig, manifest: dict[str, Any], where: str) -> None:
        """Refuse a config that names other encoders or another zero-shot kind than a saved index."""
        for part in ("image", "text"):
            want, have = getattr(config.encoders, part), manifest["encoders"][part]["name"]
            if want != have:
                raise ConfigError(f"{where}: saved with {part} encoder {have!r}, but the config names {want!r}")
        if config.zero_shot.kind != manifest["zero_shot"]["kind"]:
            raise ConfigError(f"{where}: saved with zero-shot {manifest['zero_shot']['kind']!r}, config names {config.zero_shot.kind!r}")

    def save(self, folder: str | Path) -> None:
        """Write the fusion module (the only weights of its own) to ``folder``."""
        self.fusion.save(folder)

    def load(self, folder: str | Path) -> None:
        """Use the fusion module saved in ``folder``."""
        from .fusion import load_fusion

        with self._lock:
            self._fusion = load_fusion(folder)
