"""Saving a folder of components atomically, with a manifest of versions and checksums.

    manifest.json        format, versions, what each component recorded, sha256 of every file
    <component>/         one subfolder per component, written by that component's own ``save``
    <name>.json          small records beside them (e.g. index-report.json)

A retriever is saved as ``items/`` (ItemStore), ``index/`` (IndexSet) and ``fusion/``
(Embedder); format 1 (before components) kept the items at the top level and still loads.
A save writes a sibling temporary folder, then swaps it in with renames, so a crash leaves
either the old or the new save, never a mix. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import IndexBusyError, IndexLoadError, StorageError

logger = logging.getLogger(__name__)
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
SAVE_WAIT_S = 600.0  # how long a save waits for another save into the same folder to end


def write_folder(folder: Path, parts: dict[str, Callable[[Path], None]], records: dict[str, Any],
                 extra_files: dict[str, str] | None = None, lock: FolderLock | None = None) -> Path:
    """Write ``folder`` atomically: each part's writer fills its own subfolder, ``extra_files``
    (name -> text) go beside them, and the manifest holds ``records`` plus versions and the
    sha256 of every file.

    Under the folder's lock (see FolderLock): ``lock``, one the caller holds on ``folder`` (a service's
    checkpoint, ``multiretrieval index``), or else taken here for the save, waiting for another save into
    the folder to end and refusing a folder that a service or an ``index`` holds (IndexBusyError). A write
    that fails (a full disk) raises StorageError and leaves the previous save as it was, and no temporary copy."""
    folder = folder.resolve()
    if lock is not None:
        if lock.folder != folder or not lock.held:
            raise ValueError(f"the lock given is not held on {folder} ({lock.path}, held: {lock.held})")
        return _write_folder(folder, parts, records, extra_files)
    with FolderLock(folder, "save").acquire(wait_s=SAVE_WAIT_S):
        return _write_folder(folder, parts, records, extra_files)


def _write_folder(folder: Path, parts: dict[str, Callable[[Path], None]], records: dict[str, Any],
                  extra_files: dict[str, str] | None) -> Path:
    from importlib.metadata import PackageNotFoundError, version

    import faiss
    import numpy as np
    import pandas as pd

    from . import __version__

    try:
        torch_version = version("torch")  # read, not imported: a save that encoded nothing loads no model
    except PackageNotFoundError:
        torch_version = None

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-{os.getpid()}-", dir=folder.parent))
    except OSError as exc:
        raise write_failure(exc, f"the index {folder}", folder.parent) from exc
    try:
        for name, write in parts.items():
            (tmp / name).mkdir()
            write(tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        manifest = {
            "format": FORMAT_VERSION,
            "package": "multiretrieval",
            "versions": {"multiretrieval": __version__, "torch": torch_version, "faiss": faiss.__version__,
                         "numpy": np.__version__, "pandas": pd.__version__},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "components": {name: name for name in parts},
            **records,
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _fsync_tree(tmp)
        _swap_in(tmp, folder)
    except BaseException as exc:
        # Judged before the temporary copy goes: removing it frees the space whose lack may be the cause.
        failure = write_failure(exc, f"the index {folder}", folder.parent, partial=tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from exc
        raise
    remove_stale_copies(folder)
    return folder


def write_failure(exc: BaseException, what: str, where: Path, partial: Path | None = None) -> StorageError | None:
    """``exc``, raised while writing ``what`` at ``where``, as a StorageError that says so and why ("no space left
    on device"), naming the file last written in ``partial`` (a temporary folder being filled), the one that failed;
    None when ``exc`` is not a failed write.

    Libraries report a full disk each their own way: an OSError with errno ENOSPC (Python, pyarrow), a
    RuntimeError naming it (faiss), an OSError without errno ("49152 requested and 36832 written": numpy),
    which is taken for a full disk when the filesystem has no block left."""
    import errno

    if isinstance(exc, StorageError):
        return exc
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        text = str(exc).lower()
        code = next((c for c in (errno.ENOSPC, errno.EDQUOT) if os.strerror(c).lower() in text), None)
    if code is None and isinstance(exc, OSError) and _no_space(where):
        code = errno.ENOSPC
    if code is None and not isinstance(exc, OSError):
        return None  # a library's own error, not a failed write
    why = os.strerror(code).lower() if code is not None else str(exc)
    file = _newest_file(partial) if partial is not None else None
    at = f" (writing {file.relative_to(partial)} in {where})" if file is not None else f" (in {where})"
    return StorageError(f"cannot write {what}: {why}{at}", code)


def _no_space(path: Path) -> bool:
    """Whether the filesystem of ``path`` (or of its nearest existing folder) has no block left."""
    for folder in (path, *path.parents):
        try:
            return os.statvfs(folder).f_bavail == 0
        except FileNotFoundError:
            continue
        except (OSError, AttributeError):  # no statvfs (Windows)
            return False
    return False


def _newest_file(root: Path) -> Path | None:
    """The file last written under ``root`` (the one a failed write was on), if any."""
    try:
        files = [p for p in root.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def journal_path(folder: Path) -> Path:
    """The write log a service keeps beside an index folder it serves (``INDEX_DIR.journal``): the writes it
    acknowledged and has not saved into the folder yet."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".journal")


def uploads_path(folder: Path) -> Path:
    """The folder beside an index folder that keeps the photos given to its items as files of bytes
    (``INDEX_DIR.uploads``: the service's uploads, ``Retriever.update(image=bytes)``): a save replaces the index
    folder itself, so they cannot live inside it."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".uploads")


class FolderLock:
    """One writer per index folder, between processes and threads: an exclusive lock (flock) on ``INDEX_DIR.lock``.

    Every writer takes it: a service while it serves the folder (its checkpoints save over it), ``multiretrieval
    index`` while it writes it, ``Retriever.save`` while it saves (``write_folder``). A second holder comes away
    with IndexBusyError naming the holder (its pid and role; "this process" for another holder in the same
    process, as a service's own lock is a separate one from a save's); ``acquire(wait_s)`` first waits up to
    ``wait_s`` seconds for a holder that is a save, which ends soon, never for a service or an index. The lock
    file holds "PID ROLE", a note for whoever is refused. The kernel drops the lock when its process ends,
    however it ends; the file stays, harmless. Where flock does not exist (Windows), or the lock file cannot be
    written (a read-only index, which no one can write either), nothing is locked.
    """

    ROLES = {"serve": "a running service (multiretrieval serve) serves it, and its next checkpoint would save over "
                      "this write. Stop it first, or send the changes to the service (PUT /items/ID)",
             "index": "multiretrieval index is writing it. Wait for it to end",
             "save": "a save (Retriever.save) into it is still running"}

    def __init__(self, folder: str | Path, role: str = "index") -> None:
        if role not in self.ROLES:
            raise ValueError(f"role must be one of {', '.join(self.ROLES)}, got {role!r}")
        self.folder = Path(folder).resolve()  # one lock file for every path that names the folder
        self.path = self.folder.with_name(self.folder.name + ".lock")
        self.role = role
        self.held = False
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> FolderLock:
        try:
            import fcntl
        except ImportError:
            self.held = True
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # read-only: no writer can change the folder anyway
            logger.warning("cannot write the lock file %s (%s): going on without one", self.path, exc.strerror)
            self.held = True
            return self
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid, role = _holder(fd)
                if role in (None, "save") and time.monotonic() < deadline:  # a save (or a holder not yet noted) ends soon
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise IndexBusyError(self._busy(pid, role, wait_s)) from None
        note = f"{os.getpid()} {self.role}\n".encode()
        try:  # a note for whoever is refused: written over the old one, then cut to length (never empty meanwhile)
            os.pwrite(fd, note, 0)
            os.ftruncate(fd, len(note))
        except OSError as exc:  # a full disk: the lock holds all the same (and the write it guards will say why it fails)
            logger.debug("cannot note the holder in %s (%s)", self.path, exc.strerror)
        self._fd, self.held = fd, True
        return self

    def _busy(self, pid: str | None, role: str | None, wait_s: float) -> str:
        who = "this process" if pid == str(os.getpid()) else f"another process{f' (pid {pid})' if pid else ''}"
        if role in self.ROLES:
            what = self.ROLES[role] + (f" after {wait_s:g} s" if role == "save" and wait_s else "")
        else:
            what = ("a running service (multiretrieval serve), an index into it, or a save. Stop it first, "
                    "or send the changes to the service (PUT /items/ID)")
        return f"{self.folder} is in use by {who}: {what}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
        self.held = False

    def __enter__(self) -> FolderLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> tuple[str | None, str | None]:
    """(pid, role) of a lock's holder from its note; None where unknown (an older note: the pid alone)."""
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace")
    except OSError:
        return None, None
    line, complete, _ = text.partition("\n")
    words = line.split()
    if not complete:  # no note yet (None: wait for it), or an older version's, the pid alone (a role unknown: "")
        return (words[0] if words and words[0].isdigit() else None), ("" if words else None)
    return (words[0] if words else None), (words[1] if len(words) > 1 else None)


def read_folder(folder: Path) -> dict[str, Any]:
    """The manifest of a saved folder, after recovering an interrupted save and checking every file's sha256."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    return manifest


def component_folder(folder: Path, manifest: dict[str, Any], name: str) -> Path | None:
    """Where a component's files are: its subfolder (format 1 kept the items at the top); None for a
    component the save does not hold (one added to the package since)."""
    if manifest["format"] == 1:
        return folder if name == "items" else folder / name if name in ("index", "fusion") else None
    return folder / manifest["components"][name] if name in manifest["components"] else None


def component_record(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """What a component recorded in the manifest when saved (its ``describe()``)."""
    if manifest["format"] == 1 and name == "items":
        return {"count": manifest["items"], "next_key": manifest["next_key"], "key_column": manifest["key_column"]}
    return manifest[name]


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
    if manifest.get("package") != "multiretrieval" or manifest.get("format") not in READABLE_FORMATS:
        raise IndexLoadError(f"{path}: not a multiretrieval index of format {' or '.join(map(str, READABLE_FORMATS))}")
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


def write_durably(path: Path, data: bytes, what: str = "the file") -> None:
    """Write a file and fsync it and its folder: it survives a crash once this returns. StorageError when it cannot
    (naming ``what``): then neither the file nor a temporary copy is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # two requests may bring one photo
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            fsync_folder(path.parent.parent)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_folder(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {what} {path}: {error_reason(exc)}", exc.errno) from exc


def remove_temporary_files(folder: Path) -> None:
    """Delete the temporary files of ``write_durably`` in ``folder`` that a killed process left (``.NAME.PID-THREAD.tmp``)."""
    for path in folder.glob(".*.tmp") if folder.is_dir() else []:
        logger.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)


def error_reason(exc: OSError) -> str:
    """An OSError's reason in words ("no space left on device")."""
    return (exc.strerror or str(exc)).lower() if exc.errno is not None else str(exc)


def fsync_folder(folder: Path) -> None:
    """Make the names in a folder durable (a file created, replaced or removed there)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
