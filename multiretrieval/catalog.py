"""The catalog and the reader stage: validate rows, decode images, build item texts.

A catalog is a table with a unique ``id`` column and, per item, an ``image`` (a path
relative to ``image_root``, an absolute path or an http(s) URL) and/or text columns
(``title``, ``description`` by default). Every other column is metadata, returned with
search results and usable in ``where=`` filters.
"""

from __future__ import annotations

import io
import os
import re
import stat
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CatalogConfig
from .errors import CatalogError, ImageError, ImageLimitError

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
        self.image_root = Path(image_root).resolve() if image_root is not None else Path.cwd()
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
        kwargs.setdefault("image_root", path.resolve().parent)
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
        kwargs.setdefault("image_root", path.resolve().parent)
        return cls(df, **kwargs)

    @classmethod
    def of(cls, source: Catalog | pd.DataFrame | str | Path, text_columns: tuple[str, ...] | list[str]) -> Catalog:
        """A catalog as given, or read from a DataFrame or a file, with these text columns."""
        if isinstance(source, Catalog):
            return source
        if isinstance(source, pd.DataFrame):
            return cls(source, text_columns=text_columns)
        return cls.read(source, text_columns=text_columns)

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
               max_bytes: int = CatalogConfig.max_image_bytes, timeout: float = CatalogConfig.download_timeout_s) -> Image.Image:
    """Decode an image given as a path, URL, bytes or PIL image into RGB.

    EXIF orientation is applied (phone photos come out upright), 16-bit images are scaled
    to 8 bits (not clipped to white), and transparent images are composited on white
    (product cut-outs). The pixel count is checked from the header before decoding, so a
    decompression bomb costs nothing. A path must name a regular file (never a FIFO or a
    device), and a URL must arrive whole within ``timeout`` seconds.

    Raises:
        ImageError: the file is missing, not a regular file, not an image, corrupt,
            truncated, too large, or its download failed or timed out.
    """
    if isinstance(source, Image.Image):
        image, name = source, "image"
        _check_pixels(image, name, max_pixels)
    else:
        data, name = read_image_bytes(source, max_bytes, timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                _check_pixels(image, name, max_pixels)
                image.load()
                image = ImageOps.exif_transpose(image)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLimitError(f"{name}: too many pixels (decompression bomb guard): {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image file PIL can read") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image: {exc}") from exc
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale to 8 bits, do not clip
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0)
        scale = 1 / 257 if image.mode.startswith("I;16") or top > 255 else (255.0 if image.mode == "F" and top <= 1 else 1.0)
        image = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image)
        return background.convert("RGB")
    return image.convert("RGB")


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w * h > max_pixels:
        raise ImageLimitError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (decompression bomb guard)")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")


def read_image_bytes(source: str | Path | bytes, max_bytes: int, timeout: float = CatalogConfig.download_timeout_s
                     ) -> tuple[bytes, str]:
    """The bytes of an image given as bytes, a URL or a path, and a name for messages."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > max_bytes:
            raise ImageLimitError(f"image bytes: {len(source):,} bytes exceeds the limit of {max_bytes:,}")
        return bytes(source), "image bytes"
    if not isinstance(source, (str, Path)):
        raise ImageError(f"unsupported image input of type {type(source).__name__}: give a path, URL, bytes or PIL image")
    name = str(source)
    data = download(name, max_bytes, timeout) if is_url(name) else read_regular_file(name, max_bytes)
    if not data:
        raise ImageError(f"{name}: empty file")
    return data, name


def text_problem(text: str) -> str | None:
    """Why a text cannot be encoded (a lone surrogate is not Unicode text), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"text is not valid Unicode: lone surrogate {text[exc.start]!r} at character {exc.start}"
    return None


def is_url(value: str) -> bool:
    return value.startswith(_URL_PREFIXES)


def open_regular_file(path: str | Path, max_bytes: int) -> int:
    """An open file descriptor of a regular file of at most ``max_bytes``.

    Opened without blocking and checked on the open descriptor (not on the path, which
    could change in between): a FIFO would block the reader forever and /dev/zero never ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise ImageError(f"{path}: not a regular file ({kind})")
    if info.st_size > max_bytes:
        os.close(fd)
        raise ImageLimitError(f"{path}: {info.st_size:,} bytes exceeds the limit of {max_bytes:,}")
    return fd


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    fd = open_regular_file(path, max_bytes)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageLimitError(f"{path}: more than {max_bytes:,} bytes")
    return data


def download(url: str, max_bytes: int, timeout: float) -> bytes:
    """GET a URL, whole within about ``timeout`` seconds.

    The socket timeout bounds each read; the deadline, checked between reads, bounds the
    whole download, so a server that trickles a byte at a time is cut off too.
    """
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = response.read1(1 << 16)  # returns as soon as any bytes arrive
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageLimitError(f"{url}: more than {max_bytes:,} bytes")
    except ImageError:
        raise
    except TimeoutError as exc:
        raise ImageError(f"{url}: download timed out after {timeout:g} s") from exc
    except OSError as exc:  # URLError, HTTPError, connection errors
        reason = getattr(exc, "reason", None)
        if isinstance(reason, TimeoutError) or "timed out" in str(exc):
            raise ImageError(f"{url}: download timed out after {timeout:g} s") from exc
        raise ImageError(f"{url}: cannot download: {exc}") from exc
    return b"".join(chunks)


def _resolve(value: str, root: Path) -> str:
    if is_url(value) or Path(value).is_absolute():
        return value
    return str(root / value)


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for messages and JSON)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_empty(value: Any) -> bool:
    return (value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value))
            or (isinstance(value, str) and not value.strip()))


def _join_text(values: tuple) -> str | None:
    parts = [str(v).strip() for v in values if not _is_empty(v) and not pd.isna(v)]
    return ". ".join(p for p in parts if p) or None


def _rows(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


_PLAIN_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_INT64 = (-(2**63), 2**63 - 1)


def _coerce_ids(df: pd.DataFrame) -> pd.DataFrame:
    """Ids keep their type and value exactly, or the row is refused.

    Integers (and integral floats, as pandas makes of an int column with a gap) become
    int64 and must fit it; strings stay strings, except that when every id is the plain
    text of an int64 (a CSV column of integers), they become int64, so ``42`` and ``"42"``
    name the same item ("007" or a 20-digit number keep their text). Other values
    (1.5, inf, True, None) are refused: CatalogError naming the row.
    """
    if "id" not in df.columns:
        return df
    ids = df["id"]
    if pd.api.types.is_integer_dtype(ids.dtype) and ids.dtype != np.uint64 and not ids.isna().any():  # a nullable column may hold NA
        return df.assign(id=ids.astype("int64"))
    values = ids.tolist()
    kinds = set()
    for row, value in enumerate(values):
        if _is_empty(value):
            continue  # reported by _validate
        kinds.add(_id_kind(value, row))
    if kinds and all(_is_empty(v) or not isinstance(v, str) or _plain_int64(v) for v in values):
        return df.assign(id=[v if _is_empty(v) else int(v) for v in values])
    if kinds == {"int", "str"}:
        row = next(i for i, v in enumerate(values) if isinstance(v, str) and not _plain_int64(v))
        raise CatalogError(f"row {row}: id {values[row]!r} is a string but other ids are integers; use one kind of id")
    return df.assign(id=pd.Series(values, dtype=object, index=df.index)) if kinds == {"str"} else df


def _plain_int64(text: str) -> bool:
    return bool(_PLAIN_INT.fullmatch(text)) and _INT64[0] <= int(text) <= _INT64[1]


def _id_kind(value: Any, row: int) -> str:
    if isinstance(value, str):
        return "str"
    if isinstance(value, (bool, np.bool_)):
        raise CatalogError(f"row {row}: id {value!r} is a boolean; ids are integers or strings")
    if isinstance(value, (int, np.integer)):
        if not _INT64[0] <= int(value) <= _INT64[1]:
            raise CatalogError(f"row {row}: id {value} does not fit a 64-bit integer; give such ids as strings")
        return "int"
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value) and float(value).is_integer() and _INT64[0] <= value <= _INT64[1]:
            return "int"
        raise CatalogError(f"row {row}: id {value!r} is not an integer; ids are integers or strings")
    raise CatalogError(f"row {row}: id {value!r} of type {type(value).__name__}; ids are integers or strings")


def conform_ids(ids: pd.Series, existing: pd.Series) -> pd.Series:
    """New ids made the kind of an index's existing ids, losslessly, or refused naming the row.

    Into string ids an integer goes as its text; into integer ids only the text of an
    integer goes (a catalog read from CSV gives that already).
    """
    if pd.api.types.is_integer_dtype(existing.dtype):
        if pd.api.types.is_integer_dtype(ids.dtype):
            return ids
        for row, value in enumerate(ids):
            if not (isinstance(value, str) and _plain_int64(value)):
                raise CatalogError(f"row {row}: id {value!r} is not an integer, but this index has integer ids")
        return ids.astype("int64")
    return pd.Series([str(v) for v in ids], dtype=object, index=ids.index)


def conform_rows(new: pd.DataFrame, existing: pd.DataFrame) -> pd.DataFrame:
    """New catalog rows with each shared column cast to the type it has among indexed rows.

    A value that does not fit (a price of "cheap" where prices are numbers) is refused
    with a CatalogError naming the row, the column and the value: mixed types would make
    the item table unsavable and the filters ambiguous.
    """
    out = new.copy()
    for column in new.columns:
        if column == "id" or column not in existing.columns or column.startswith("_") or existing[column].isna().all():
            continue  # a column with no value yet has no type to keep: the new values give it one
        want = existing[column].dtype
        values = new[column]
        if pd.api.types.is_bool_dtype(want):
            bad = [i for i, v in enumerate(values) if not _is_empty(v) and not isinstance(v, (bool, np.bool_))]
            cast = values
        elif pd.api.types.is_numeric_dtype(want):
            cast = pd.to_numeric(values, errors="coerce")
            bad = [i for i, (v, c) in enumerate(zip(values, cast)) if not _is_empty(v) and pd.isna(c)]
        elif pd.api.types.is_datetime64_any_dtype(want):
            cast = pd.to_datetime(values, errors="coerce")
            bad = [i for i, (v, c) in enumerate(zip(values, cast)) if not _is_empty(v) and pd.isna(c)]
        else:  # text columns take any scalar as its text
            cast = pd.Series([None if _is_empty(v) else str(v) for v in values], dtype=object, index=values.index)
            bad = [i for i, v in enumerate(values) if isinstance(v, (list, dict, tuple, set))]
        if bad:
            raise CatalogError(f"row {bad[0]}: column {column!r} holds {values.iloc[bad[0]]!r}, but its indexed values are "
                               f"of type {want}; give a value of that type or leave it empty")
        out[column] = cast
    return out


@dataclass(frozen=True)
class SkippedRow:
    """A catalog row that was not indexed, and why."""

    row: int
    id: Any
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} (id {self.id!r}): {self.reason}"
