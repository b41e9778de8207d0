"""Small helpers shared by the stages: progress bars and normalisation."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, show: bool | None = None, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap ``items`` in a tqdm bar. ``show=None`` shows it only when stderr is a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int, desc: str, show: bool | None = None, unit: str = "it"):
    """A tqdm bar to ``update(n)`` by hand (a no-op object when not shown); use as a context manager."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
