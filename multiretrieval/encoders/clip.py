"""The zero-shot cross-modal space: images and texts embedded where they can be compared.

First version: ConSE (Norouzi et al. 2014). An image's embedding in text space is the
probability-weighted mean of the text embeddings of its top-k ImageNet labels; texts are
embedded by the text encoder itself. No training at all.
"""

from __future__ import annotations

import numpy as np

from ..utils import l2_normalize
from .text import TextEncoder


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names (shipped with torchvision; nothing is downloaded)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class ConSE:
    """Maps ImageNet class probabilities into the text encoder's space."""

    kind = "conse"
    _label_cache: dict[tuple[int, str], np.ndarray] = {}  # per (text model, template): shared by retrievers

    def __init__(self, text_encoder: TextEncoder, top_k: int = 10, label_template: str = "{}") -> None:
        self.text_encoder = text_encoder
        self.top_k = top_k
        self.label_template = label_template
        self.dim = text_encoder.dim

    @property
    def label_embeddings(self) -> np.ndarray:
        key = (id(self.text_encoder.model), self.label_template)
        if key not in self._label_cache:
            labels = [self.label_template.format(label) for label in imagenet_labels()]
            self._label_cache[key] = self.text_encoder.encode(labels, batch_size=128, show_progress=False)
        return self._label_cache[key]

    def embed_image_probs(self, probs: np.ndarray) -> np.ndarray:
        """ImageNet probabilities (n, 1000) -> text-space embeddings (n, dim), L2-normalised."""
        probs = np.asarray(probs, np.float32)
        k = min(self.top_k, probs.shape[1])
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        weights = np.take_along_axis(probs, top, axis=1)
        return l2_normalize(np.einsum("nk,nkd->nd", weights, self.label_embeddings[top]))

    def embed_texts(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.text_encoder.encode(texts, batch_size=batch_size, show_progress=False)
