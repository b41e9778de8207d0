"""Pretrained encoders, looked up by name in registries.

``get_image_encoder("efficientnet-lite0")`` and ``get_text_encoder("minilm-l6")`` load the
packaged offline defaults; loaded encoders are shared within a process.
"""

from __future__ import annotations

import functools
import os

from ..errors import ConfigError, ModelUnavailableError
from .image import IMAGE_ENCODERS, ImageEncoder
from .text import TEXT_ENCODERS, TextEncoder

__all__ = ["IMAGE_ENCODERS", "TEXT_ENCODERS", "ImageEncoder", "TextEncoder", "get_image_encoder", "get_text_encoder"]


@functools.lru_cache(maxsize=8)
def get_image_encoder(name: str, weights: str | None = None, runtime: str = "auto") -> ImageEncoder:
    return ImageEncoder.load(name, weights, runtime)


@functools.lru_cache(maxsize=8)
def get_text_encoder(name: str, weights: str | None = None, max_tokens: int = 128, runtime: str = "auto") -> TextEncoder:
    return TextEncoder.load(name, weights, max_tokens, runtime)


def hub_offline() -> bool:
    """True when the user has said the Hugging Face hub is out of reach (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def unknown_encoder(kind: str, name: str, known: dict) -> ConfigError:
    prefix = "timm:" if kind == "image" else "hf:"
    return ConfigError(
        f"unknown {kind} encoder {name!r}: known names are {sorted(known)}, "
        f"or '{prefix}<model name>' for any model on the Hugging Face hub"
    )


def unavailable(kind: str, name: str, setting: str, exc: BaseException | None = None) -> ModelUnavailableError:
    reason = "the hub is marked offline: HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 to download" if exc is None else f"{type(exc).__name__}: {exc}"
    return ModelUnavailableError(
        f"{kind} encoder {name!r}: weights are not installed and cannot be downloaded ({reason}). "
        f"Download them on a machine with network access and point `encoders.{setting}` "
        f"(CLI: --{setting.replace('_', '-')}) at the local file or folder."
    )
