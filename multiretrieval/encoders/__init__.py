"""Pretrained encoders, looked up by name in registries.

``get_image_encoder("efficientnet-lite0")`` and ``get_text_encoder("minilm-l6")`` load the
packaged offline defaults; loaded encoders are shared within a process. The image encoder's ``precision``
defaults to fp32 here (training and scripts); a retriever passes its config's ``encoders.precision``.
"""

from __future__ import annotations

import functools

from .hub import hub_offline
from .image import IMAGE_ENCODERS, ImageEncoder
from .text import TEXT_ENCODERS, TextEncoder

__all__ = ["IMAGE_ENCODERS", "TEXT_ENCODERS", "ImageEncoder", "TextEncoder", "get_image_encoder", "get_text_encoder", "hub_offline"]


@functools.lru_cache(maxsize=8)
def get_image_encoder(name: str, weights: str | None = None, runtime: str = "auto", precision: str = "fp32") -> ImageEncoder:
    return ImageEncoder.load(name, weights, runtime, precision)


@functools.lru_cache(maxsize=8)
def get_text_encoder(name: str, weights: str | None = None, max_tokens: int = 128, runtime: str = "auto") -> TextEncoder:
    return TextEncoder.load(name, weights, max_tokens, runtime)
