"""A batch of queries through each encoder once, and each query's vectors on the score scale.

``EncoderPasses`` runs the text encoder once over every distinct text of the batch (joint-space texts and words,
the zero-shot texts of zero-shot and auto-mode queries, the ``not_text`` concepts: a text several queries hold is
one row) and the image encoder once over every photo (joint and zero-shot alike: the zero-shot space reads the
pooled features and class probabilities of that pass); then the zero-shot space's heads run once over the queries'
texts, once over the concepts and once over the photos. The fusion runs once per kind of joint query (image, text,
fused), once over the concepts, and once per ``like`` query (its item's stored features).

    embed_queries(queries, embedder, items, allowed) -> [Embedded]   per query: the index, its readings, its photo alone

Each encoder gives a text or a photo the same vector whatever else its batch holds (they are checked to), so a
query scores alike alone and in a batch; the zero-shot heads and the fusion are matrix products over their batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import QueryError
from ..utils import l2_normalize
from .checks import Query
from .scores import Photo, fusion_calibration, joint_query_vectors, nearest_with_text, not_text_vectors, photo_neighbours

if TYPE_CHECKING:
    from ..collection import Collection


@dataclass(frozen=True)
class Embedded:
    """A query ready to rank: the index it searches ("joint", "clip_image" for a zero-shot text, "clip_text" for a
    zero-shot photo), its (readings, d) vectors on the score scale (a not_text already subtracted), a fused query's
    photo alone (the word filter's input), an auto-mode text's zero-shot vector (1, d), for the items without text, and
    an image query's unit image vector (1, dim) where the items carry region vectors (ranking.with_regions)."""

    space: str
    vector: np.ndarray
    photo: Photo | None = None
    pictures: np.ndarray | None = None
    image: np.ndarray | None = None


class EncoderPasses:
    """The texts and photos of a batch, each through its encoder once (the encoders load only when they have work)."""

    def __init__(self, embedder, texts: list[str], images: list) -> None:
        self.embedder, self.images = embedder, images
        self.row = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        self.text_tokens = self.text_mask = self.image_tokens = self.image_probs = None
        bs, distinct = embedder.config.encoders.batch_size, list(self.row)
        if distinct:
            chunks = embedder.fusion.text_chunks
            parts = [embedder.text_encoder.forward(distinct[s:s + bs], chunks) for s in range(0, len(distinct), bs)]
            self.text_tokens, self.text_mask = (np.concatenate(part) for part in zip(*parts))
        if images:
            grid = embedder.fusion.image_grid
            parts = [embedder.image_encoder.forward_images(images[s:s + bs], grid) for s in range(0, len(images), bs)]
            self.image_tokens, self.image_probs = (np.concatenate(part) for part in zip(*parts))

    def rows(self, texts: list[str]) -> list[int]:
        return [self.row[t] for t in texts]

    def features(self, images: list[int] | None, texts: list[str] | None) -> dict[str, np.ndarray]:
        """Token features of photos (their positions) and/or texts, pairs when both are given, as ``Embedder.features``."""
        f = self.embedder.feature_buffers(len(images if images is not None else texts))
        if images is not None:
            f["image_tokens"][:], f["image_mask"][:] = self.image_tokens[images], True
        if texts is not None:
            rows = self.rows(texts)
            f["text_tokens"][:], f["text_mask"][:] = self.text_tokens[rows], self.text_mask[rows]
        return f

    def zero_shot_texts(self, texts: list[str]) -> np.ndarray:
        """Zero-shot text vectors (n, d) from the pass's pooled text features."""
        return self.embedder.zero_shot.text_batch(texts, self.text_tokens[self.rows(texts), 0])

    def zero_shot_images(self, images: list[int]) -> np.ndarray:
        """Zero-shot image vectors (n, d) from the pass's pooled features and class probabilities."""
        bs, space = self.embedder.config.encoders.batch_size, self.embedder.zero_shot
        chunks = [images[s:s + bs] for s in range(0, len(images), bs)]
        return np.concatenate([space.image_batch([self.images[i] for i in c], self.image_tokens[c, 0], self.image_probs[c])
                               for c in chunks])


def embed_queries(queries: list[Query], embedder, items: Collection, allowed: list[np.ndarray | None] | None = None
                  ) -> list[Embedded]:
    """Every query's vectors: one pass per encoder over the batch, then the fusion per kind of query. ``allowed``:
    per query, the keys its filter lets through (None: all), among which a fused query's photo finds its neighbours."""
    return _Batch(queries, embedder, items, allowed or [None] * len(queries)).embedded()


class _Batch:
    """One batch's embedding, step by step: the stored items ``like`` names, the encoder passes, the fusion per kind."""

    def __init__(self, queries: list[Query], embedder, items: Collection, allowed: list[np.ndarray | None]) -> None:
        self.queries, self.embedder, self.items, self.allowed = queries, embedder, items, allowed
        self.space: list[str] = ["joint"] * len(queries)
        self.vectors: list[np.ndarray | None] = [None] * len(queries)
        self.photos: dict[int, Photo] = {}
        self.pictures: dict[int, np.ndarray] = {}
        self.unit_images: dict[int, np.ndarray] = {}
        self.auto = [i for i, q in enumerate(queries) if q.auto] if len(items.store.with_modality("image only")) else []

    def embedded(self) -> list[Embedded]:
        q = self.queries
        stored = {i: self._like_features(q[i]) for i in range(len(q)) if q[i].vector is None and q[i].like is not None}
        photos = [i for i in range(len(q)) if q[i].image is not None]
        self.passes = EncoderPasses(self.embedder, [t for x in q if x.vector is None for t in (x.text, x.not_text) if t is not None],
                                    [q[i].image for i in photos])
        self.photo_row = {i: n for n, i in enumerate(photos)}
        for i, features in stored.items():
            self._like(i, features)
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, x in enumerate(q):
            if x.vector is not None:
                self.vectors[i] = x.vector
            elif x.like is None and x.mode != "zero-shot":
                groups.setdefault((x.image is not None, x.text is not None), []).append(i)
        for (has_image, has_text), idx in groups.items():
            self._joint(idx, has_image, has_text)
        self._zero_shot()
        self._subtract_concepts()
        return [Embedded(self.space[i], self.vectors[i], self.photos.get(i), self.pictures.get(i), self.unit_images.get(i))
                for i in range(len(q))]

    def _photo(self, i: int, vector: np.ndarray, near: np.ndarray) -> Photo:
        """A fused query's photo alone; its neighbours among what the query's filter lets through, where the word
        filter reads them."""
        filtered = self.allowed[i] is not None and self.embedder.config.fusion.word_filter and self.queries[i].weights is None
        return Photo(vector, nearest_with_text(vector, self.items, self.allowed[i])[0] if filtered else near)

    def _like_features(self, query: Query) -> dict[str, np.ndarray]:
        """The stored features of the item ``like`` names, as the query reads them (refused before any encoding)."""
        store = self.items.store
        row = store.rows_of(store.keys_for([query.like]))
        features = {name: array[row].copy() for name, array in store.features.items()}
        if query.text is not None:
            if not features["image_mask"].any():
                raise QueryError(f"item {query.like!r} has no image to combine with the words")
        elif query.mode in ("image", "text"):
            features["text_mask" if query.mode == "image" else "image_mask"][:] = False
            if not features[f"{query.mode}_mask"].any():
                other = "text" if query.mode == "image" else "image"
                raise QueryError(f"item {query.like!r} has no {query.mode}: ask for items like it by its {other}")
        return features

    def _like(self, i: int, features: dict[str, np.ndarray]) -> None:
        """More like an item: its stored features, both parts or one of them, or its photo with the query's words
        (and then its photo alone, for the word filter)."""
        query, embedder, items = self.queries[i], self.embedder, self.items
        weights = None if query.weights is None else np.array([query.weights], np.float64)
        if query.text is None:
            self.vectors[i] = embedder.query_vectors(features, weights, fusion_calibration(embedder, items))
            return
        if embedder.config.fusion.word_filter:
            vectors, near = photo_neighbours(features, embedder, items)
            self.photos[i] = self._photo(i, vectors, near[0])
        anchor = {name: features[name].copy() for name in ("text_tokens", "text_mask")}
        words = self.passes.features(None, [query.text])
        features["text_tokens"][:], features["text_mask"][:] = words["text_tokens"], words["text_mask"]
        self.vectors[i] = joint_query_vectors(features, weights, embedder, items, anchor)[0]

    def _joint(self, idx: list[int], has_image: bool, has_text: bool) -> None:
        """One kind of joint-space query (image, text or fused), fused together; a fused query's photo alone too."""
        q, embedder, items = self.queries, self.embedder, self.items
        fusion = embedder.config.fusion
        features = self.passes.features([self.photo_row[i] for i in idx] if has_image else None,
                                        [q[i].text for i in idx] if has_text else None)
        weights = np.array([q[i].weights or (np.nan, np.nan) for i in idx], np.float64)
        near = photo_neighbours(features, embedder, items) if has_image and has_text and (fusion.compose or fusion.word_filter) else None
        vectors = joint_query_vectors(features, weights, embedder, items, near=near)
        if has_image and not has_text and items.store.regions != "none":
            self.unit_images.update((i, l2_normalize(features["image_tokens"][j:j + 1, 0])) for j, i in enumerate(idx))
        for j, i in enumerate(idx):
            self.vectors[i] = vectors[j]
            if near is not None:
                self.photos[i] = self._photo(i, near[0][j:j + 1], near[1][j])

    def _zero_shot(self) -> None:
        """Zero-shot queries (a text against item images, a photo against item texts) and the zero-shot side of
        auto-mode texts (the images of items without text): each head once."""
        q = self.queries
        texts = sorted({i for i, x in enumerate(q) if x.mode == "zero-shot" and x.text is not None} | set(self.auto))
        if texts:
            vectors = self.passes.zero_shot_texts([q[i].text for i in texts])
            for j, i in enumerate(texts):
                if q[i].mode == "zero-shot":
                    self.space[i], self.vectors[i] = "clip_image", vectors[j:j + 1]
                else:
                    self.pictures[i] = vectors[j:j + 1]
        photos = [i for i, x in enumerate(q) if x.mode == "zero-shot" and x.image is not None]
        if photos:
            vectors = self.passes.zero_shot_images([self.photo_row[i] for i in photos])
            for j, i in enumerate(photos):
                self.space[i], self.vectors[i] = "clip_text", vectors[j:j + 1]

    def _subtract_concepts(self) -> None:
        """Each ``not_text`` subtracted, in the space the query searches (and, for a fused query, from its photo
        alone, which ranks the items its words name; for an auto-mode text, from its zero-shot side too)."""
        q, embedder, items = self.queries, self.embedder, self.items
        joint = [i for i, x in enumerate(q) if x.not_text is not None and self.space[i] == "joint"]
        if joint:
            concepts = not_text_vectors(embedder, items, joint_features=self.passes.features(None, [q[i].not_text for i in joint]))
            for j, i in enumerate(joint):
                self.vectors[i] = (self.vectors[i] - concepts[j:j + 1]).astype(np.float32)
                if i in self.photos:  # the photo alone ranks the items its words name: the concept goes from it too
                    self.photos[i] = Photo((self.photos[i].vector - concepts[j:j + 1]).astype(np.float32), self.photos[i].near)
        zero_shot = [i for i, x in enumerate(q) if x.not_text is not None and (self.space[i] != "joint" or i in self.pictures)]
        if zero_shot:
            concepts = not_text_vectors(embedder, items, zero_shot=self.passes.zero_shot_texts([q[i].not_text for i in zero_shot]))
            for j, i in enumerate(zero_shot):
                if i in self.pictures:
                    self.pictures[i] = self.pictures[i] - concepts[j:j + 1]
                else:
                    self.vectors[i] = (self.vectors[i] - concepts[j:j + 1]).astype(np.float32)
