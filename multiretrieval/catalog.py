"""The catalog and the reader stage: validate rows, decode images, build item texts.

A catalog is a table with a unique ``id`` column and, per item, an ``image`` (a path
relative to ``image_root``, an absolute path or an http(s) URL) and/or text columns
(``title``, ``description`` by default). Every other column is metadata, returned with
search results and usable in ``where=`` filters.
"""

from __future__ import annotations

import io
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from .config import CatalogConfig
from .errors import CatalogError, ImageError

ImageInput = Union[str, Path, bytes, Image.Image]

RESERVED_COLUMNS = ("rank", "score", "_key")  # names search results and the index use
_URL_PREFIXES = ("http://", "https://")


class Catalog:
    """A validated product table.

    Args:
        df: one row per item; needs an ``id`` column (unique, non-empty) and at least one
            of ``image`` or the text columns.
        image_root: folder that relative image paths are resolved against (default: the
            current folder; :meth:`from_csv` passes the CSV's folder).
        text_columns: the columns joined into an item's text (default: title, description).

    Raises:
        CatalogError: naming the rows and the reason, for a missing ``id`` column, no image
            or text column at all, an empty or duplicate id, or a row with neither image nor text.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        image_root: str | Path | None = None,
        text_columns: tuple[str, ...] | list[str] = CatalogConfig.text_columns,
    ) -> None:
        if not isinstance(df, pd.DataFrame):
            raise CatalogError(f"expected a pandas DataFrame, got {type(df).__name__}")
        self.df = _coerce_ids(df.reset_index(drop=True).copy())
        self.image_root = Path(image_root) if image_root is not None else Path.cwd()
        self.text_columns = tuple(c for c in text_columns if c in self.df.columns)
        self._validate()

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """Read a CSV; relative image paths are taken relative to the CSV's folder."""
        path = Path(path)
        if not path.is_file():
            raise CatalogError(f"{path}: catalog file not found")
        try:
            df = pd.read_csv(path, dtype={"id": str, "image": str}, keep_default_na=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{path}: cannot parse CSV: {exc}") from exc
        kwargs.setdefault("image_root", path.parent)
        return cls(df, **kwargs)

    @classmethod
    def from_parquet(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """Read a parquet file; relative image paths are taken relative to its folder."""
        path = Path(path)
        if not path.is_file():
            raise CatalogError(f"{path}: catalog file not found")
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise CatalogError(f"{path}: cannot read parquet: {exc}") from exc
        kwargs.setdefault("image_root", path.parent)
        return cls(df, **kwargs)

    @classmethod
    def read(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """A catalog file: parquet by its suffix (.parquet, .pq), CSV otherwise."""
        reader = cls.from_parquet if Path(path).suffix.lower() in (".parquet", ".pq") else cls.from_csv
        return reader(path, **kwargs)

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        return f"Catalog({len(self)} items, columns={list(self.df.columns)}, image_root='{self.image_root}')"

    @property
    def ids(self) -> list[Any]:
        return self.df["id"].tolist()

    def texts(self) -> list[str | None]:
        """Each item's text: its non-empty text columns joined with ". "; None where it has none."""
        return [_join_text(row) for row in self.df[list(self.text_columns)].itertuples(index=False)]

    def image_sources(self) -> list[str | None]:
        """Each item's image reference resolved against ``image_root``; None where it has none."""
        if "image" not in self.df.columns:
            return [None] * len(self)
        return [None if _is_empty(v) else _resolve(str(v).strip(), self.image_root) for v in self.df["image"]]

    def _validate(self) -> None:
        df = self.df
        if "id" not in df.columns:
            raise CatalogError(f"missing required column 'id' (columns: {list(df.columns)})")
        reserved = [c for c in RESERVED_COLUMNS if c in df.columns]
        if reserved:
            raise CatalogError(f"column name(s) {reserved} are reserved for search results; rename them")
        if "image" not in df.columns and not self.text_columns:
            raise CatalogError(
                f"no 'image' column and none of the text columns {list(CatalogConfig.text_columns)}: "
                f"an item needs an image or a text (columns: {list(df.columns)})"
            )
        empty = [i for i, v in enumerate(df["id"]) if _is_empty(v)]
        if empty:
            raise CatalogError(f"row(s) {_rows(empty)}: empty id")
        dup = df["id"].astype(str).duplicated(keep=False)
        if dup.any():
            first = df.loc[dup, "id"].astype(str).iloc[0]
            rows = [i for i, v in enumerate(df["id"].astype(str)) if v == first]
            raise CatalogError(f"duplicate id {first!r} in rows {_rows(rows)} ({int(dup.sum())} rows share an id)")
        texts = self.texts()
        images = self.image_sources()
        bare = [i for i in range(len(df)) if texts[i] is None and images[i] is None]
        if bare:
            raise CatalogError(f"row(s) {_rows(bare)} (id {plain(df['id'].iloc[bare[0]])!r}...): neither image nor text")


def load_image(source: ImageInput, max_pixels: int = CatalogConfig.max_image_pixels,
               max_bytes: int = CatalogConfig.max_image_bytes) -> Image.Image:
    """Decode an image given as a path, URL, bytes or PIL image into RGB.

    Transparent images are composited on white (product cut-outs). The pixel count is
    checked from the header before decoding, so a decompression bomb costs nothing.

    Raises:
        ImageError: the file is missing, not an image, corrupt, truncated, or too large.
    """
    if isinstance(source, Image.Image):
        image, name = source, "image"
        _check_pixels(image, name, max_pixels)
    else:
        data, name = _read_bytes(source, max_bytes)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                _check_pixels(image, name, max_pixels)
                image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: too many pixels (decompression bomb guard): {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image file PIL can read") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image: {exc}") from exc
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image)
        return background.convert("RGB")
    return image.convert("RGB")


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (decompression bomb guard)")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")


def _read_bytes(source: str | Path | bytes, max_bytes: int) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise ImageError(f"image bytes: {len(source):,} bytes exceeds the limit of {max_bytes:,}")
        return bytes(source), "image bytes"
    if not isinstance(source, (str, Path)):
        raise ImageError(f"unsupported image input of type {type(source).__name__}: give a path, URL, bytes or PIL image")
    name = str(source)
    if name.startswith(_URL_PREFIXES):
        try:
            with urllib.request.urlopen(name, timeout=20) as response:  # noqa: S310 (http(s) only)
                data = response.read(max_bytes + 1)
        except OSError as exc:
            raise ImageError(f"{name}: cannot download: {exc}") from exc
    else:
        path = Path(name)
        if not path.is_file():
            raise ImageError(f"{name}: file not found")
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{name}: {size:,} bytes exceeds the limit of {max_bytes:,}")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise ImageError(f"{name}: more than {max_bytes:,} bytes")
    if not data:
        raise ImageError(f"{name}: empty file")
    return data, name


def _resolve(value: str, root: Path) -> str:
    if value.startswith(_URL_PREFIXES) or Path(value).is_absolute():
        return value
    return str(root / value)


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for messages and JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip())


def _join_text(values: tuple) -> str | None:
    parts = [str(v).strip() for v in values if not _is_empty(v) and not pd.isna(v)]
    return ". ".join(p for p in parts if p) or None


def _rows(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def _coerce_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Integer-looking ids become int64 (so ``42`` and ``"42"`` name the same item); others stay strings."""
    if "id" in df.columns:
        ids = df["id"]
        numeric = pd.to_numeric(ids, errors="coerce")
        if numeric.notna().all() and (numeric == numeric.round()).all():
            df = df.assign(id=numeric.astype("int64"))
    return df


@dataclass(frozen=True)
class SkippedRow:
    """A catalog row that was not indexed, and why."""

    row: int
    id: Any
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} (id {self.id!r}): {self.reason}"
