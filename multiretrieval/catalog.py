"""The catalog and the reader stage: validate rows, decode images, build item texts.

A catalog is a table with a unique ``id`` column and, per item, an image (a path relative
to ``image_root``, an absolute path or an http(s) URL) and/or text columns (``title``,
``description`` by default). Every other column is metadata, returned with search results and
usable in ``where=`` filters.

The image column is the one named by ``image_column=`` (``catalog.image_column``), else the one
whose name says so (``image``, ``image_url``, ``photo``, ``Image Src``, ...: IMAGE_COLUMN_NAMES),
else the one whose values are paths or URLs of image files; it is renamed ``image`` (the name
results, the service and the stored rows use), and ``Catalog.image_column`` keeps the name it had.

Sources: a CSV (``,`` ``;`` tab or ``|`` separated), Excel (with openpyxl/xlrd), parquet, JSON or
JSON Lines file (relative image paths are taken relative to the file's folder), a DataFrame, or a
folder of images (:meth:`Catalog.from_folder`: id = the image's path relative to the folder,
optional sidecar metadata).
"""

from __future__ import annotations

import difflib
import functools
import io
import json
import logging
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import CatalogConfig
from .downloads import download
from .errors import CatalogError, ImageError, ImageLimitError, did_you_mean

ImageInput = Union[str, Path, bytes, Image.Image]

logger = logging.getLogger(__name__)
# Names search results add to the catalog columns; names starting with "_" are the index's own.
RESERVED_COLUMNS = ("rank", "score", "matched", "vector_score", "keyword_score", "hybrid_score", "image_score", "text_score",
                    "word_match")
_URL_PREFIXES = ("http://", "https://")
# Image files a folder catalog picks up (HEIC/HEIF decode when pillow-heif is installed).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".avif", ".heic", ".heif")
SIDECAR_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json")  # metadata beside the images, joined by file name
SIDECAR_KEYS = ("file_name", "file", "filename", "path")  # the sidecar column naming the image
# Names an image column goes by in shop exports, compared lower-cased with spaces, dots and hyphens as "_"
# ("Image URL", "image-link", "Image Src" (Shopify), "image_link" (Google Merchant feeds)).
IMAGE_COLUMN_NAMES = ("image", "image_url", "image_path", "image_link", "image_src", "image_file", "imageurl", "img",
                      "img_url", "img_src", "img_path", "photo", "photo_url", "photo_path", "picture", "picture_url",
                      "thumbnail", "thumbnail_url", "main_image", "main_image_url")
CSV_DELIMITERS = (",", ";", "\t", "|")  # tried on a CSV's head: the one giving a consistent table wins
EXCEL_SUFFIXES = (".xlsx", ".xlsm", ".xls")


class Catalog:
    """A validated product table.

    Args:
        df: one row per item; needs an ``id`` column (unique, non-empty; ``ID`` or ``Id`` is renamed ``id``) and at
            least one of an image column or the text columns.
        image_root: folder that relative image paths are resolved against (default: the
            current folder; :meth:`from_csv` passes the CSV's folder).
        text_columns: the columns joined into an item's text (default: title, description).
        bad_rows: ``"raise"`` (default) or ``"skip"``: leave out the rows with an empty id, a
            repeated id (its first row stays) or neither image nor text, each listed in
            ``dropped`` with its reason (``index``, ``add`` and ``upsert`` read files this way and
            report them).
        image_column: the column of image paths or URLs (``catalog.image_column``). Default: found
            (``image_found`` says how): a column named ``image`` (as always), else the one column
            named like an image (IMAGE_COLUMN_NAMES, any case: ``image_url``, ``photo``, ``Image
            Src``, ...), else the one column whose values are paths or URLs of image files (.jpg,
            .png, ...; a text column never), else none (every item is indexed by its text). The
            column is renamed ``image`` in ``df``, what results show; ``image_column`` keeps its name.

    Raises:
        CatalogError: naming the rows and the reason, for a missing ``id`` column, no image
            or text column at all, an ``image_column`` the table lacks, two columns that both look
            like the image column, and (``bad_rows="raise"``) an empty or duplicate id, or a row
            with neither image nor text.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        image_root: str | Path | None = None,
        text_columns: tuple[str, ...] | list[str] = CatalogConfig.text_columns,
        bad_rows: str = "raise",
        image_column: str | None = CatalogConfig.image_column,
    ) -> None:
        if not isinstance(df, pd.DataFrame):
            raise CatalogError(f"expected a pandas DataFrame, got {type(df).__name__}")
        if bad_rows not in ("raise", "skip"):
            raise ValueError(f"bad_rows must be 'raise' or 'skip', got {bad_rows!r}")
        df = df.reset_index(drop=True)
        named_id = [c for c in df.columns if isinstance(c, str) and c.strip().lower() == "id"]
        if "id" not in df.columns and len(named_id) == 1:  # "ID", "Id": exports capitalise their headers
            df = df.rename(columns={named_id[0]: "id"})
        self.image_column, self.image_found = find_image_column(df, text_columns, image_column)
        if self.image_column is not None and self.image_column != "image":
            df = df.rename(columns={self.image_column: "image"})
        self.row_numbers = np.arange(len(df))  # each item's row in the table read: what reports name
        self.dropped: list[SkippedRow] = []  # bad_rows="skip": the rows left out, and why
        if bad_rows == "skip" and "id" in df.columns:  # before the ids are coerced: a gap makes integer ids floats
            empty = np.array([_is_empty(v) for v in df["id"]], bool)
            self.dropped = [SkippedRow(int(i), None, "empty id") for i in np.flatnonzero(empty)]
            df, self.row_numbers = df[~empty].reset_index(drop=True), self.row_numbers[~empty]
        self.df = _coerce_ids(df.copy(), self.row_numbers)
        self.image_root = Path(image_root).resolve() if image_root is not None else Path.cwd()
        self.sources: list[str | None] | None = None  # rows read back from an index: their images as resolved then
        self.text_columns = tuple(c for c in text_columns if c in self.df.columns)
        self._validate(bad_rows)
        if self.image_found != "folder" and logger.isEnabledFor(logging.INFO):
            logger.info("%s", self.images_note())

    def images_note(self) -> str | None:
        """Where this catalog's images come from, in one line (None for a folder: its files)."""
        how = {"given": "as named", "name": "found by its name",
               "content": "found by its values: paths or URLs of image files"}.get(self.image_found)
        if self.image_found == "folder":
            return None
        if self.image_column is None:
            urls = _url_columns(self.df)
            hint = f" (column {urls[0]!r} holds web addresses: if they are images, name it)" if urls else ""
            return f"no image column: every item is indexed by its text; name it with --image-column / catalog.image_column{hint}"
        return f"images from column {self.image_column!r} ({how})"

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """Read a CSV (comma, semicolon, tab or bar separated: told from its first lines); relative image paths are
        taken relative to the CSV's folder."""
        path = _existing_file(path)
        kind = file_kind(path)
        if kind != "text":
            raise CatalogError(f"{path}: {_KIND_WORDS[kind]}, not a CSV: read it with Catalog.read (which reads "
                               f"{'Excel workbooks' if kind in ('xlsx', 'xls') else 'parquet'} too)")
        named = kwargs.get("image_column")
        df = read_csv_cells(path, ("id", "image", *([named] if named else []),
                                   *kwargs.get("text_columns", CatalogConfig.text_columns)))
        kwargs.setdefault("image_root", path.resolve().parent)
        return cls(df, **kwargs)

    @classmethod
    def from_excel(cls, path: str | Path, sheet: str | int | None = None, **kwargs: Any) -> Catalog:
        """Read a sheet of an Excel workbook (.xlsx, .xlsm with openpyxl; .xls with xlrd: optional packages, and the
        error says which to install); ``sheet``: a name or a position (default: the first, logged when there are
        more). Relative image paths are taken relative to the workbook's folder."""
        path = _existing_file(path)
        named = kwargs.get("image_column")
        df = read_excel_cells(path, ("id", "image", *([named] if named else []),
                                     *kwargs.get("text_columns", CatalogConfig.text_columns)), sheet)
        kwargs.setdefault("image_root", path.resolve().parent)
        return cls(df, **kwargs)

    @classmethod
    def from_parquet(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """Read a parquet file; relative image paths are taken relative to its folder."""
        path = _existing_file(path)
        try:
            df = pd.read_parquet(path)
            if "id" in df.columns and df["id"].dtype.kind == "f":  # integer ids with a gap: read them again as written
                import pyarrow.parquet as pq

                df["id"] = pd.Series(pq.read_table(path, columns=["id"]).column("id").to_pylist(), dtype=object)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise CatalogError(f"{path}: cannot read parquet: {exc}") from exc
        kwargs.setdefault("image_root", path.resolve().parent)
        return cls(df, **kwargs)

    @classmethod
    def from_jsonl(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """Read JSON Lines (one object per line) or a JSON array of objects (``.json``);
        relative image paths are taken relative to the file's folder."""
        path = _existing_file(path)
        df = _read_json_records(path)
        kwargs.setdefault("image_root", path.resolve().parent)
        return cls(df, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, recursive: bool = True, title_from_filename: bool = False,
                    **kwargs: Any) -> Catalog:
        """Every image file under a folder, one item each; id = its path relative to the folder.

        Args:
            folder: the folder of images (JPEG, PNG, WebP, GIF (first frame), TIFF, BMP, AVIF,
                and HEIC/HEIF when pillow-heif is installed). Hidden files and folders are left out.
            recursive: also the images in subfolders (ids like ``lamps/desk.jpg``).
            title_from_filename: a ``title`` from the file name ("desk_lamp-02.jpg" -> "desk lamp 02").
            kwargs: passed to the constructor (``text_columns``; not ``image_column``: the images are the files).

        Metadata can sit beside the images in ``metadata.csv``, ``metadata.jsonl`` or
        ``metadata.json`` (in the folder or, when recursive, any subfolder), one row per image,
        joined by the column ``file_name`` (or ``file``, ``filename``, ``path``): the image's path
        relative to that metadata file, or its bare name when that is unique. Its other columns
        (title, description, price, ...) become catalog columns; a title there wins over one from
        the file name. A row naming no image is logged as a warning.

        Raises:
            CatalogError: the folder does not exist or holds no image, or a metadata file is
                malformed (naming the file, the row and the reason).
        """
        if kwargs.pop("image_column", None) not in (None, "image"):
            raise CatalogError(f"{folder}: a folder's images are its files; image_column names a column of a catalog file")
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise CatalogError(f"{folder}: not a folder" if root.exists() else not_found(folder, folder=True))
        root = root.resolve()
        images, sidecars = _walk_folder(root, recursive)
        if not images:
            raise CatalogError(f"{root}: no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) "
                               f"{'under' if recursive else 'in'} this folder")
        ids = [p.relative_to(root).as_posix() for p in images]
        df = pd.DataFrame({"id": pd.Series(ids, dtype=object), "image": [str(p) for p in images]})
        if title_from_filename:
            df["title"] = [title_from_file_name(p.name) for p in images]
        for sidecar in sidecars:
            df = _join_sidecar(df, root, sidecar, kwargs.get("text_columns", CatalogConfig.text_columns))
        kwargs.setdefault("image_root", root)
        catalog = cls(df, image_column="image", **kwargs)
        catalog.image_found = "folder"
        return catalog

    @classmethod
    def of(cls, source: Catalog | pd.DataFrame | str | Path, text_columns: tuple[str, ...] | list[str],
           bad_rows: str = "raise", image_column: str | None = None) -> Catalog:
        """A catalog as given, or read from a DataFrame or a file, with these text columns and image column (``bad_rows``,
        ``image_column``: as for the constructor; a folder's images are its files)."""
        if isinstance(source, Catalog):
            return source
        if isinstance(source, pd.DataFrame):
            return cls(source, text_columns=text_columns, bad_rows=bad_rows, image_column=image_column)
        return cls.read(source, text_columns=text_columns, bad_rows=bad_rows, image_column=image_column)

    @classmethod
    def read(cls, path: str | Path, **kwargs: Any) -> Catalog:
        """A catalog from a path: a folder of images (:meth:`from_folder`; ``image_column`` does not apply), or a file
        by what it holds (an Excel workbook or a parquet file is known by its first bytes, whatever its name), else by
        its suffix: Excel (.xlsx, .xlsm, .xls), parquet (.parquet, .pq), JSON Lines (.jsonl, .ndjson), JSON (.json),
        CSV otherwise."""
        given = path
        path = Path(path).expanduser()
        suffix = path.suffix.lower()
        if path.is_dir():
            kwargs.pop("image_column", None)
            return cls.from_folder(path, **kwargs)
        if not path.exists():
            raise CatalogError(not_found(given))
        if not path.is_file():  # a FIFO or a device would block its first read
            raise CatalogError(f"{path}: not a regular file")
        if suffix in IMAGE_EXTENSIONS:
            raise CatalogError(f"{path}: an image, not a catalog: give the folder it is in ({path.parent}), or a CSV "
                               "that lists it")
        kind = file_kind(path)
        if kind in ("xlsx", "xls"):
            if suffix not in EXCEL_SUFFIXES:
                logger.warning("%s: an Excel workbook, whatever its name says: read as one", path)
            return cls.from_excel(path, **kwargs)
        if kind == "zip":
            raise CatalogError(f"{path}: a zip archive, not a catalog: unzip it, or export the table as CSV")
        if kind == "parquet" or suffix in (".parquet", ".pq"):
            return cls.from_parquet(path, **kwargs)
        if suffix in EXCEL_SUFFIXES:  # named like a workbook, but not one
            raise CatalogError(f"{path}: named {suffix} but not an Excel workbook (its first bytes say otherwise)")
        if suffix in (".jsonl", ".ndjson", ".json"):
            return cls.from_jsonl(path, **kwargs)
        return cls.from_csv(path, **kwargs)

    def subset(self, rows: list[int] | np.ndarray) -> Catalog:
        """The catalog of these rows (positions), with the same image root and text columns; its items keep their
        ``row_numbers``."""
        rows = np.asarray(rows, dtype=np.int64)
        part = Catalog.__new__(Catalog)  # rows of a valid catalog are valid: not coerced again ("8" of "x", "8" stays text)
        part.df = self.df.iloc[rows].reset_index(drop=True)
        part.image_root, part.text_columns = self.image_root, self.text_columns
        part.image_column, part.image_found = self.image_column, self.image_found
        part.row_numbers, part.dropped = self.row_numbers[rows], []
        part.sources = None if self.sources is None else [self.sources[r] for r in rows]
        return part

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
        """Each item's image reference resolved against ``image_root`` (or as ``sources`` gives it); None where it has none."""
        if self.sources is not None:
            return list(self.sources)
        if "image" not in self.df.columns:
            return [None] * len(self)
        return [None if _is_empty(v) else _resolve(str(v).strip(), self.image_root) for v in self.df["image"]]

    def _validate(self, bad_rows: str) -> None:
        df = self.df
        if "id" not in df.columns:
            near = did_you_mean("id", [c for c in df.columns if isinstance(c, str)])
            raise CatalogError(f"missing required column 'id' (columns: {list(df.columns)}){near}")
        reserved = [c for c in df.columns if c in RESERVED_COLUMNS]
        if reserved:
            raise CatalogError(f"column name(s) {reserved} are reserved: search results add columns of these names; rename them")
        internal = [c for c in df.columns if not isinstance(c, str) or c.startswith("_")]
        if internal:
            raise CatalogError(f"column name(s) {internal} are reserved: names starting with '_' are the index's own columns "
                               "(column names must be strings); rename them")
        if "image" not in df.columns and not self.text_columns:
            raise CatalogError(
                f"no image column and none of the text columns {list(CatalogConfig.text_columns)}: "
                f"an item needs an image or a text (columns: {list(df.columns)}); name the image column with "
                "image_column= (--image-column, catalog.image_column) or the text columns with catalog.text_columns"
            )
        empty = [i for i, v in enumerate(df["id"]) if _is_empty(v)]
        keys = df["id"].astype(str)
        dup = keys.duplicated(keep=False) & ~keys.index.isin(empty)
        texts = self.texts()
        images = self.image_sources()
        bare = [i for i in range(len(df)) if texts[i] is None and images[i] is None]
        if bad_rows == "skip":  # (empty ids are gone already)
            reasons = {i: "neither image nor text" for i in bare}
            first: dict[str, int] = {}  # per repeated id, its first row that is indexed
            for i in np.flatnonzero(dup):
                if i not in reasons and first.setdefault(keys.iloc[i], i) != i:
                    reasons[i] = f"id also on row {self.row_numbers[first[keys.iloc[i]]]}, which is the one indexed"
            if reasons:
                self.dropped = sorted(self.dropped + [SkippedRow(int(self.row_numbers[i]), plain(df["id"].iloc[i]), reasons[i])
                                                      for i in reasons], key=lambda d: d.row)
                keep = np.array([i not in reasons for i in range(len(df))], dtype=bool)
                self.df, self.row_numbers = df[keep].reset_index(drop=True), self.row_numbers[keep]
            return
        if empty:
            raise CatalogError(f"row(s) {_rows(empty)}: empty id")
        if dup.any():
            first = keys[dup].iloc[0]
            rows = [i for i, v in enumerate(keys) if v == first]
            raise CatalogError(f"duplicate id {first!r} in rows {_rows(rows)} ({int(dup.sum())} rows share an id)")
        if bare:
            raise CatalogError(f"row(s) {_rows(bare)} (id {plain(df['id'].iloc[bare[0]])!r}...): neither image nor text")


def image_column_name(name: Any) -> bool:
    """Whether a column's name says it holds the images ("image_url", "Image URL", "Photo", ...)."""
    return isinstance(name, str) and re.sub(r"[\s.\-]+", "_", name.strip().lower()) in IMAGE_COLUMN_NAMES


def find_image_column(df: pd.DataFrame, text_columns: tuple[str, ...] | list[str] = (), named: str | None = None
                      ) -> tuple[str | None, str | None]:
    """The image column of a table and how it was found: ("image_url", "given" | "name" | "content"), or (None, None).

    ``named`` (given by the caller) must be a column. Otherwise a column called ``image`` wins (as it always has), then
    the one column with an image's name (:func:`image_column_name`), then the one column whose sampled values are
    nearly all paths or URLs of image files; the id and text columns are never taken. Two candidates of one rank are
    a CatalogError naming both, as is a named column that is missing."""
    columns = [c for c in df.columns if isinstance(c, str)]
    if named:
        if named in columns:
            chosen = named
        else:
            by_name = [c for c in columns if c.strip().lower() == named.strip().lower()]
            if len(by_name) != 1:
                raise CatalogError(f"image_column {named!r} is not a column{did_you_mean(named, columns)} (columns: {columns})")
            chosen = by_name[0]
        if chosen == "id":
            raise CatalogError("image_column 'id': the id column cannot be the image column")
        if chosen != "image" and "image" in columns:
            raise CatalogError(f"image_column {chosen!r}, but the table has a column 'image' too, the name the image column "
                               "is stored and shown under: rename or drop that column")
        return chosen, "given"
    if "image" in columns:
        return "image", "name"
    by_name = [c for c in columns if image_column_name(c)]
    if len(by_name) > 1:
        raise CatalogError(f"columns {by_name} all look like the image column: name the one that holds the images with "
                           "image_column= (--image-column, catalog.image_column)")
    if by_name:
        return by_name[0], "name"
    skip = {"id", *text_columns}
    by_content = [c for c in columns if c not in skip and _share(df[c], _image_reference) >= 0.9]
    if len(by_content) > 1:
        raise CatalogError(f"columns {by_content} all hold paths or URLs of image files: name the one that holds the "
                           "items' images with image_column= (--image-column, catalog.image_column)")
    return (by_content[0], "content") if by_content else (None, None)


def _sample(values: pd.Series, n: int = 100) -> list[str] | None:
    """Up to ``n`` non-empty values spread over a column, as text; None for a column that is not of text."""
    if values.dtype.kind not in "OSU" and not pd.api.types.is_string_dtype(values.dtype):
        return None
    picks = np.unique(np.linspace(0, len(values) - 1, min(len(values), 5 * n)).astype(int)) if len(values) else []
    given = [v for v in values.iloc[picks].tolist() if not _is_empty(v)][:n] if len(picks) else []
    if not given or not all(isinstance(v, str) for v in given):
        return None
    return [v.strip() for v in given]


def _share(values: pd.Series, test) -> float:
    sample = _sample(values)
    return sum(map(test, sample)) / len(sample) if sample else 0.0


def _image_reference(value: str) -> bool:
    """A path or an http(s) URL of an image file (by its extension): one reference, no prose around it."""
    if len(value) > 2048 or "\n" in value or "\t" in value:
        return False
    if is_url(value):
        if any(c.isspace() for c in value):
            return False
        value = urlsplit(value).path
    return value.lower().endswith(IMAGE_EXTENSIONS)


def _url_columns(df: pd.DataFrame) -> list[str]:
    """Columns whose values are web addresses (perhaps images without an extension: named in the no-image note)."""
    return [c for c in df.columns if isinstance(c, str) and c != "id"
            and _share(df[c], lambda v: is_url(v) and not any(ch.isspace() for ch in v)) >= 0.9]


def not_found(given: str | Path, folder: bool = False) -> str:
    """"PATH: folder not found" (a path that ends with a slash or has no suffix, or ``folder``) or "PATH: catalog file
    not found", with the names in its parent folder that come close, or the nearest parent that is missing."""
    text = os.fspath(given)
    path = Path(text).expanduser()
    what = "folder" if folder or text.endswith(("/", os.sep)) or not path.suffix else "catalog file"
    message = f"{text}: {what} not found"
    parent = path.parent
    if not parent.is_dir():
        missing = parent
        while not missing.parent.is_dir() and missing.parent != missing:
            missing = missing.parent
        return f"{message} (there is no folder {missing})"
    try:
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return message
    stems: dict[str, list[str]] = {}  # compared without suffixes: "products.csv" is near "products.xlsx", not "notes.csv"
    for name in names:
        stems.setdefault(Path(name).stem.lower(), []).append(name)
    near = [n for stem in difflib.get_close_matches(Path(path.name).stem.lower(), list(stems), n=3, cutoff=0.6)
            for n in sorted(stems[stem])]
    if not near:
        return message
    shown = [os.path.join(os.path.dirname(text.rstrip("/" + os.sep)), n) for n in near[:3]]
    return f"{message}; did you mean {' or '.join(shown)}?"


def _existing_file(path: str | Path) -> Path:
    given, path = path, Path(path).expanduser()
    if not path.is_file():
        raise CatalogError(f"{path}: not a file" if path.exists() else not_found(given))
    return path


# A catalog file's first bytes: what it holds, whatever its name says.
_MAGIC = ((b"PK\x03\x04", "zip"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "xls"), (b"PAR1", "parquet"))
_KIND_WORDS = {"xlsx": "an Excel workbook (.xlsx)", "xls": "an Excel 97-2003 workbook (.xls)", "zip": "a zip archive",
               "parquet": "a parquet file"}


def file_kind(path: Path) -> str:
    """"xlsx", "xls", "parquet", "zip" (another zip archive) or "text", from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    kind = next((k for magic, k in _MAGIC if head.startswith(magic)), "text")
    if kind == "zip":
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                kind = "xlsx" if any(n.startswith("xl/") for n in z.namelist()) else "zip"
        except zipfile.BadZipFile:
            pass
    return kind


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
        register_optional_formats()
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


# The longest side an image is padded to a square from: that square is at most 2048² pixels (16 MB in memory).
MAX_CANVAS_SIDE = 2048


def shrink_to(image: Image.Image, max_side: int = MAX_CANVAS_SIDE) -> Image.Image:
    """The image shrunk (aspect kept, each side at least 1 px) so that its longer side is at most ``max_side``;
    the image itself when it already is. Call it before padding to a square or resizing: the pixel guard bounds
    width x height, not the longer side, and a 100000x1 PNG of 370 bytes padded to a square is 10^10 pixels.
    (``reducing_gap``: an integer box reduction first, else the resampling weights alone take 32 bytes per
    pixel of the longer side.)"""
    w, h = image.size
    if max(w, h) <= max_side:
        return image
    scale = max_side / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)


@functools.cache
def register_optional_formats() -> bool:
    """Let PIL open HEIC/HEIF through pillow-heif when it is installed; True if it is.
    (AVIF, WebP, TIFF, BMP and GIF need nothing more than Pillow.)"""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


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


def _resolve(value: str, root: Path) -> str:
    """An image reference as an absolute path (``~`` expanded) or a URL."""
    if is_url(value):
        return value
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else root / path)  # "cat/../imgs/a.png": still found once cat moves


def title_from_file_name(name: str) -> str:
    """A readable title from an image's file name: "desk_lamp-02.jpg" -> "desk lamp 02"."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return re.sub(r"\s+", " ", re.sub(r"[_\-.]+", " ", stem)).strip() or stem


def _walk_folder(root: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    """The image files and the sidecar metadata files under ``root``, sorted; hidden ones left out."""
    images, sidecars = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if name.lower() in SIDECAR_NAMES:
                sidecars.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                images.append(path)
    return sorted(images), sorted(sidecars)


# pandas' words for a missing value: missing in a column of numbers, kept as words in a column of text.
MISSING_WORDS = frozenset({"", "NA", "N/A", "n/a", "NaN", "nan", "-NaN", "-nan", "null", "NULL", "None", "<NA>", "#N/A",
                           "#N/A N/A", "#NA", "-1.#IND", "1.#IND", "-1.#QNAN", "1.#QNAN"})
_TRUE = frozenset({"True", "TRUE", "true"})
_FLAGS = _TRUE | {"False", "FALSE", "false"}
_LEADING_ZERO = re.compile(r"\s*[+-]?0[0-9]")  # "007", "0042": a code whose zeros count, not a number
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_DECIMAL_COMMA = re.compile(r"\s*[+-]?([0-9]{1,3}(\.[0-9]{3})+|[0-9]+)(,[0-9]+)?\s*")  # "39,90", "1.299,00"


def read_csv_cells(path: Path, literal: tuple[str, ...]) -> pd.DataFrame:
    """A CSV's table with each cell as the file writes it, where pandas' guesses would lose it: the ``literal`` columns
    (id, image, texts) and the columns named like an image column are text, "NA" and "None" included (an id "NA" is an
    id, not a gap); another column becomes numbers (or booleans) when every value is one, its missing-value words then
    missing, unless a value has a leading zero ("007", a code) or an integer does not fit int64. An empty cell is
    missing everywhere. The separator (comma, semicolon, tab, bar) is told from the file's first lines; in a file not
    separated by commas, a column of numbers with decimal commas ("39,90", "1.299,00") is numbers too."""
    delimiter = sniff_delimiter(path)
    try:
        with warnings.catch_warnings():  # index_col=False: a first row longer than the header is not read as an index
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False, na_values=[""], index_col=False)
    except pd.errors.ParserWarning:
        raise CatalogError(f"{path}: {_long_row(path, delimiter)}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{path}: not UTF-8 text ({_bad_byte(path)}): save it as \"CSV UTF-8\" (or give an Excel "
                           "workbook as it is)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CatalogError(f"{path}: cannot parse CSV: {exc}") from exc
    for column in df.columns:
        if column in literal or image_column_name(column) or column.strip().lower() == "id":
            continue
        values = df[column]
        given = values.notna() & ~values.isin(MISSING_WORDS)
        kept = values[given]
        if not len(kept):  # nothing but gaps
            df[column] = np.nan
            continue
        if kept.isin(_FLAGS).all():
            flags = values.map(lambda v: v in _TRUE if v in _FLAGS else np.nan)
            df[column] = flags.astype(bool) if given.all() else flags
            continue
        numbers = pd.to_numeric(kept, errors="coerce")
        if (delimiter != "," and numbers.isna().any() and kept.str.contains(",", regex=False).any()
                and kept.str.fullmatch(_DECIMAL_COMMA).all()):  # a ;-separated export writes decimal commas
            numbers = pd.to_numeric(kept.str.replace(".", "", regex=False).str.replace(",", ".", regex=False), errors="coerce")
        exact = numbers.dtype.kind == "i" or not kept.str.fullmatch(_INTEGER_TEXT).all()  # else an int beyond int64
        if numbers.notna().all() and exact and not kept.str.match(_LEADING_ZERO).any():
            df[column] = numbers.reindex(values.index)  # gaps where a value was missing
    return df


def _bad_byte(path: Path) -> str:
    """Where a file stops being UTF-8: "byte 0xe9 on line 2"."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return f"byte 0x{data[exc.start]:02x} on line {line}"
    return "a byte that is not UTF-8"


def sniff_delimiter(path: Path, head_bytes: int = 1 << 16) -> str:
    """The separator of a CSV, from its first ``head_bytes``: of comma, semicolon, tab and bar, the one that splits the
    header into more than one column, preferring one that gives an ``id`` column, then rows as wide as the header,
    then more columns. A comma when none splits the header (a one-column file)."""
    import csv

    try:
        with open(path, "rb") as f:
            head = f.read(head_bytes)
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    text = head.decode("utf-8-sig", errors="replace")
    if len(head) == head_bytes and "\n" in text:  # the last line may be cut
        text = text[: text.rindex("\n") + 1]
    best, best_key = ",", None
    for delimiter in CSV_DELIMITERS:
        try:
            rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        width = len(rows[0])
        even = sum(len(r) == width for r in rows[1:]) / (len(rows) - 1) if len(rows) > 1 else 1.0
        key = ("id" in {c.strip().lower() for c in rows[0]}, even, width)
        if best_key is None or key > best_key:
            best, best_key = delimiter, key
    return best


def read_excel_cells(path: Path, literal: tuple[str, ...], sheet: str | int | None = None) -> pd.DataFrame:
    """A sheet of an Excel workbook as a table (the first sheet unless ``sheet`` names one): the ``literal`` columns and
    those named like an image column as text, numbers and dates as the workbook types them, an empty cell missing."""
    kind = file_kind(path)
    engine = {"xls": "xlrd"}.get(kind, "openpyxl")
    try:
        __import__(engine)
    except ImportError:
        raise CatalogError(f"{path}: {_KIND_WORDS.get(kind, 'an Excel workbook')}; reading it needs the package {engine}: "
                           f"pip install {engine} (or save the sheet as \"CSV UTF-8\")") from None
    try:
        with pd.ExcelFile(path, engine=engine) as book:
            names = book.sheet_names
            if sheet is None and len(names) > 1:
                logger.warning("%s: reading its first sheet %r of %d (%s); sheet= names another", path, names[0], len(names),
                               ", ".join(map(repr, names)))
            df = pd.read_excel(book, sheet_name=0 if sheet is None else sheet, keep_default_na=False, na_values=[""])
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise CatalogError(f"{path}: cannot read the workbook: {exc}") from exc
    df = df.dropna(how="all").reset_index(drop=True)  # rows a sheet's formatting left behind
    df.columns = [str(c) if not isinstance(c, str) else c for c in df.columns]
    for column in df.columns:
        if column in literal or image_column_name(column):
            if column == "id" and df[column].dtype.kind in "if":
                continue  # integer ids, typed as numbers by the workbook
            df[column] = pd.Series([None if _is_empty(v) else _cell_text(v) for v in df[column]], dtype=object, index=df.index)
    return df


def _cell_text(value: Any) -> str:
    """A workbook cell as text: 7.0 (how a sheet may store 7) as "7"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _long_row(path: Path, delimiter: str = ",") -> str:
    """Which row of a CSV has more fields than its header, in words."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        records = (fields for fields in csv.reader(f, delimiter=delimiter) if fields)
        header = next(records)
        for row, fields in enumerate(records):
            if len(fields) > len(header):
                sign = {",": "comma", ";": "semicolon", "\t": "tab", "|": "bar"}[delimiter]
                return (f"row {row} has {len(fields)} fields, the header {len(header)} ({', '.join(header)}): "
                        f"a value with a {sign} needs quotes")
    return "a row has more fields than the header"


def _read_json_records(path: Path) -> pd.DataFrame:
    """Objects from JSON Lines (or a JSON array, or an object keyed by file name for sidecars), types kept."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CatalogError(f"{path}: not valid JSON: {exc}") from exc
        if isinstance(data, dict):  # {"lamp.jpg": {"title": ...}, ...}
            data = [{"file_name": k, **v} if isinstance(v, dict) else None for k, v in data.items()]
        records = data if isinstance(data, list) else None
        if records is None:
            raise CatalogError(f"{path}: expected a JSON array of objects")
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise CatalogError(f"{path} line {line_no}: not valid JSON: {exc}") from exc
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise CatalogError(f"{path}: record {bad[0]} is not a JSON object")
    if not records:
        return pd.DataFrame()
    df = pd.DataFrame.from_records(records)
    if "id" in df.columns:  # as written: a column of integer ids with a gap would be floats, rounded past 2**53
        df["id"] = pd.Series([r.get("id") for r in records], dtype=object)
    return df


def _join_sidecar(df: pd.DataFrame, root: Path, sidecar: Path, text_columns: tuple[str, ...]) -> pd.DataFrame:
    """Catalog rows of a folder with the columns of one sidecar metadata file joined in by file name."""
    if sidecar.suffix.lower() == ".csv":
        meta = read_csv_cells(sidecar, (*SIDECAR_KEYS, *text_columns))
    else:
        meta = _read_json_records(sidecar)
    key = next((k for k in SIDECAR_KEYS if k in meta.columns), None)
    if key is None:
        raise CatalogError(f"{sidecar}: no column naming the image file (one of {list(SIDECAR_KEYS)})")
    clash = [c for c in ("id", "image") if c in meta.columns]
    if clash:
        raise CatalogError(f"{sidecar}: column(s) {clash} cannot be set by metadata: a folder catalog's id is the image's "
                           "path and its image the file itself; rename them")
    base = sidecar.parent.relative_to(root).as_posix()
    prefix = "" if base == "." else base + "/"
    under = [i for i in df["id"] if i.startswith(prefix)]
    known = set(under)
    by_name: dict[str, list[str]] = {}
    for i in under:
        by_name.setdefault(i.rsplit("/", 1)[-1], []).append(i)
    targets, unmatched = [], []
    for row, value in enumerate(meta[key]):
        name = re.sub(r"^(\./)+", "", str(value).strip().replace("\\", "/")) if not _is_empty(value) else ""
        target = prefix + name if prefix + name in known else (by_name[name][0] if len(by_name.get(name, ())) == 1 else None)
        targets.append(target)
        if target is None:
            unmatched.append(f"row {row} ({value!r})")
    if unmatched:
        logger.warning("%s: %d row(s) name no image under %s: %s", sidecar, len(unmatched), sidecar.parent, ", ".join(unmatched[:10]))
    meta = meta.drop(columns=[key]).assign(id=targets)
    meta = meta[meta["id"].notna()]
    dup = meta["id"].duplicated(keep=False)
    if dup.any():
        raise CatalogError(f"{sidecar}: rows {_rows(list(meta.index[dup]))} describe the same image "
                           f"{meta.loc[dup, 'id'].iloc[0]!r}")
    merged = df.merge(meta, on="id", how="left", suffixes=("", "__sidecar"))
    for column in [c for c in merged.columns if c.endswith("__sidecar")]:  # a sidecar value wins where it has one
        own = column[: -len("__sidecar")]
        merged[own] = merged[column].where(merged[column].notna(), merged[own])
        merged = merged.drop(columns=[column])
    return merged


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


_PLAIN_INT = re.compile(r"0|-?[1-9][0-9]*")  # "-0", like "007", is text: int("-0") would make it the item 0
_INT64 = (-(2**63), 2**63 - 1)


def _coerce_ids(df: pd.DataFrame, row_numbers: np.ndarray) -> pd.DataFrame:
    """Ids keep their type and value exactly, or the row is refused.

    Integers (and integral floats, as pandas makes of an int column with a gap) become
    int64 and must fit it; strings stay strings, except that when every id is the plain
    text of an int64 (a CSV column of integers), they become int64, so ``42`` and ``"42"``
    name the same item ("007" or a 20-digit number keep their text). Other values
    (1.5, inf, True, None) are refused: CatalogError naming the row (``row_numbers``: each row's number in the table read).
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
        kinds.add(_id_kind(value, int(row_numbers[row])))
    if kinds and all(_is_empty(v) or not isinstance(v, str) or _plain_int64(v) for v in values):
        return df.assign(id=[v if _is_empty(v) else int(v) for v in values])
    if kinds == {"int", "str"}:
        row = next(i for i, v in enumerate(values) if isinstance(v, str) and not _plain_int64(v))
        raise CatalogError(f"row {row_numbers[row]}: id {values[row]!r} is a string but other ids are integers; use one kind of id")
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
            if abs(value) < 2**53:  # 2**53 itself may be 2**53 + 1 rounded
                return "int"
            raise CatalogError(f"row {row}: id {int(value)} came as a float (a column of integer ids with a gap), from 2**53 on, "
                               "where a float no longer holds every integer: the id may be another's rounded. Give such "
                               "ids as strings, or leave no id empty")
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
        if column == "id" or column not in existing.columns or column.startswith("_"):
            continue
        first = existing[column].first_valid_index()
        if first is None:
            continue  # a column with no value yet has no type to keep: the new values give it one
        want = existing[column].dtype
        if want == object and isinstance(existing[column].loc[first], (bool, np.bool_)):
            want = np.dtype(bool)  # booleans that some rows lack (NaN) make an object column: still booleans
        values = new[column]
        if pd.api.types.is_bool_dtype(want):
            bad = [i for i, v in enumerate(values) if not _is_empty(v) and not isinstance(v, (bool, np.bool_))]
            cast = pd.Series([None if _is_empty(v) else v for v in values], dtype=object, index=values.index)  # "" is no value
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
        return f"row {self.row}: {self.reason}" if self.id is None else f"row {self.row} (id {self.id!r}): {self.reason}"
