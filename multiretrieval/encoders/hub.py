"""The Hugging Face hub: whether it may be used, and the errors that name the setting to use instead."""

from __future__ import annotations

import os

from ..errors import ConfigError, ModelUnavailableError


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
