"""Saving and loading a retriever as a folder.

    manifest.json        versions, config, encoder names and dims, index keys, sha256 of every file
    catalog.parquet      the indexed rows (with the internal _key column)
    features/*.npy       encoder tokens and masks per item (so fusion can be re-applied)
    index/*.faiss        the joint, clip_image and clip_text FAISS indexes
    fusion/              the fusion module (fusion.json, plus safetensors when it has weights)
    index-report.json    what the latest index/add did: counts, seconds, every skipped row and why

A save writes a sibling temporary folder, then swaps it in with renames, so a crash
leaves either the old or the new save, never a mix. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .config import RetrieverConfig
from .errors import ConfigError, IndexLoadError, MultiretrievalError

if TYPE_CHECKING:
    from .retriever import Retriever

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = ("image_tokens", "image_mask", "text_tokens", "text_mask")
INDEXES = ("joint", "clip_image", "clip_text")


def save_retriever(retriever: Retriever, folder: Path) -> Path:
    import faiss
    import torch

    from . import __version__
    from .retriever import KEY

    if not retriever._indexes:
        raise MultiretrievalError("nothing to save: index a catalog first")
    folder = folder.resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-{os.getpid()}-", dir=folder.parent))
    try:
        retriever._items.to_parquet(tmp / "catalog.parquet", index=False)
        (tmp / "features").mkdir()
        for name in FEATURES:
            np.save(tmp / "features" / f"{name}.npy", retriever._features[name], allow_pickle=False)
        (tmp / "index").mkdir()
        for name in INDEXES:
            retriever._indexes[name].save(tmp / "index" / f"{name}.faiss")
        retriever.fusion.save(tmp / "fusion")
        if retriever.last_report is not None:  # every skipped row of the latest index/add, with its reason
            (tmp / "index-report.json").write_text(json.dumps(retriever.last_report.to_dict(), indent=1, default=str))
        manifest = {
            "format": FORMAT_VERSION,
            "package": "multiretrieval",
            "versions": {"multiretrieval": __version__, "torch": torch.__version__, "faiss": faiss.__version__,
                         "numpy": np.__version__, "pandas": pd.__version__},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": retriever.config.to_dict(),
            "encoders": {"image": {"name": retriever.config.encoders.image, "dim": retriever.image_encoder.dim},
                         "text": {"name": retriever.config.encoders.text, "dim": retriever.text_encoder.dim}},
            "fusion": retriever.fusion.config(),
            "zero_shot": {"kind": retriever.config.zero_shot.kind, "dim": retriever.zero_shot.dim,
                          "fingerprint": retriever.zero_shot.fingerprint},
            "index": {name: ix.describe() for name, ix in retriever._indexes.items()},
            "items": len(retriever),
            "next_key": int(retriever._next_key),
            "key_column": KEY,
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _fsync_tree(tmp)
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_copies(folder)
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace ``folder`` with ``tmp``: rename the old one aside, rename the new one in, delete the old."""
    old = None
    if folder.exists():
        if not (folder / MANIFEST).is_file():
            raise IndexLoadError(f"{folder} exists and is not a saved index; refusing to replace it")
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.time_ns()}")
        folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        if old is not None:
            old.rename(folder)  # put the previous save back; a process killed here is recovered by load
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_retriever(cls: type[Retriever], folder: Path, config: RetrieverConfig | None) -> Retriever:
    from .fusion import load_fusion
    from .index import VectorIndex
    from .retriever import KEY

    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    saved_config = RetrieverConfig.from_dict(manifest["config"], source=f"{folder / MANIFEST}")
    if config is not None:
        for part in ("image", "text"):
            want, have = getattr(config.encoders, part), manifest["encoders"][part]["name"]
            if want != have:
                raise ConfigError(f"{folder}: saved with {part} encoder {have!r}, but the config names {want!r}")
        if config.zero_shot.kind != manifest["zero_shot"]["kind"]:
            raise ConfigError(f"{folder}: saved with zero-shot {manifest['zero_shot']['kind']!r}, config names {config.zero_shot.kind!r}")
    retriever = cls(config or saved_config)
    retriever._fusion = load_fusion(folder / "fusion")
    retriever._items = pd.read_parquet(folder / "catalog.parquet")
    retriever._features = {name: np.load(folder / "features" / f"{name}.npy", allow_pickle=False) for name in FEATURES}
    ic = retriever.config.index
    retriever._indexes = {}
    for name in INDEXES:
        saved = manifest["index"][name]
        index = VectorIndex.load(folder / "index" / f"{name}.faiss", saved["factory"], ic.exact_filter_below, saved.get("params"))
        index.recall = saved.get("recall_at_10")
        retriever._indexes[name] = index
    retriever._next_key = int(manifest["next_key"])
    retriever._expected_dims = {part: manifest["encoders"][part]["dim"] for part in ("image", "text")}
    retriever._expected_dims["zero_shot"] = manifest["zero_shot"]["fingerprint"]
    n = len(retriever._items)
    for name, ix in retriever._indexes.items():
        if ix.dim != manifest["index"][name]["dim"] or len(ix) != manifest["index"][name]["count"]:
            raise IndexLoadError(f"{folder}/index/{name}.faiss does not match the manifest (dim or count)")
    if any(len(v) != n for v in retriever._features.values()) or retriever._items[KEY].to_numpy().max(initial=-1) >= retriever._next_key:
        raise IndexLoadError(f"{folder}: catalog and features disagree on the number of items")
    return retriever


def remove_stale_copies(folder: Path) -> None:
    """Delete the hidden siblings (``.NAME.saving-PID-*``, ``.NAME.old-PID-*``) that saves of
    processes no longer running left behind when killed. Only while ``folder`` itself is a
    complete save: otherwise ``_recover`` needs them."""
    if not (folder / MANIFEST).is_file():
        return
    for pattern in (f".{folder.name}.saving-*", f".{folder.name}.old-*"):
        for path in folder.parent.glob(pattern):
            pid = path.name[len(f".{folder.name}."):].split("-")[1]
            if not pid.isdigit() or not _alive(int(pid)):
                logger.info("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _recover(folder: Path) -> None:
    """Finish a save that a crash cut off between its two renames (see ``_swap_in``).

    Then ``folder`` is missing while complete copies sit beside it: the new save (its
    manifest is written last) or the old one. The newest complete copy is renamed back.
    """
    if folder.exists() or not folder.parent.is_dir():
        return
    for pattern in (f".{folder.name}.saving-*", f".{folder.name}.old-*"):
        complete = [p for p in folder.parent.glob(pattern) if (p / MANIFEST).is_file()]
        if complete:
            newest = max(complete, key=lambda p: (p / MANIFEST).stat().st_mtime)
            logger.warning("%s was missing after an interrupted save; recovered it from %s", folder, newest.name)
            newest.rename(folder)
            return


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    _recover(folder)
    remove_stale_copies(folder)
    if not folder.is_dir():
        raise IndexLoadError(f"{folder}: no such index folder")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise IndexLoadError(f"{path}: missing; {folder} is not a saved index") from exc
    except (OSError, ValueError) as exc:
        raise IndexLoadError(f"{path}: unreadable or corrupt: {exc}") from exc
    if manifest.get("package") != "multiretrieval" or manifest.get("format") != FORMAT_VERSION:
        raise IndexLoadError(f"{path}: not a multiretrieval index of format {FORMAT_VERSION}")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    for rel, digest in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise IndexLoadError(f"{path}: missing from the saved index")
        if _sha256(path) != digest:
            raise IndexLoadError(f"{path}: checksum mismatch (the file is truncated or corrupted)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
