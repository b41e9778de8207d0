"""Where the encoders' networks run: eager PyTorch, or ONNX Runtime (config ``encoders.runtime``).

On this project's 2-core CPU machines ONNX Runtime runs EfficientNet-Lite0 about 4x and
MiniLM 1.3-2x faster than eager PyTorch, with outputs equal to about 1e-5 (tests check
1e-4). The network is exported from the PyTorch weights once and cached in
``$MULTIRETRIEVAL_CACHE/onnx`` (default ``~/.cache/multiretrieval/onnx``) under a key of
what it was made from: the sha256 of the weight files (memoised by path, size and mtime in
``file-digests.json``), the architecture, the library versions and this module's
``EXPORT_FORMAT``, so nothing is downloaded and a changed model never reuses a stale export.

Beside each export, a JSON sidecar holds what an encoder needs to know without its PyTorch
model (width, input size, normalisation, the tokenizer file): a process that finds both
runs the encoder with ONNX Runtime alone and never imports torch, timm or transformers.
Models that come from the hub (no local weight files) are keyed by their loaded weights, so
they load through PyTorch each time.

Config ``encoders.precision`` (int8 | fp32): on a CPU that runs int8 exactly, the image CNN runs from an int8
version of its export where a calibration table ships for its weights (quantize.py), made from the fp32 export once
and cached beside it under a key of the fp32 export's, the calibration table's sha256 and the onnxruntime version.

Sessions run on the GPU where ONNX Runtime offers CUDA (onnxruntime-gpu), else on the CPU. A GPU runs fp32 (ONNX
Runtime's CUDA provider has no int8 convolutions).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

logger = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx")
PRECISIONS = ("int8", "fp32")
OPSET = 17
# Part of every export key: bump it when the exported graphs or their sidecars change.
# 3: the image CNN's TensorFlow "same" padding is fixed for its input size (no shape arithmetic in the graph).
EXPORT_FORMAT = 3
DIGESTS = "file-digests.json"


def resolve_runtime(runtime: str) -> str:
    """"auto" -> "onnx" when onnxruntime and onnx are installed, else "torch"."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown encoder runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if runtime == "auto":
        have = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
        return "onnx" if have else "torch"
    return runtime


def resolve_precision(precision: str, runtime: str) -> str:
    """The precision the image encoder runs at: "int8" only on ONNX Runtime on a CPU that runs int8 exactly
    (quantize.int8_fast), else "fp32" (an encoder without a calibration table for its weights runs fp32 too)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown encoder precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "fp32" or runtime != "onnx":
        return "fp32"
    from .quantize import int8_fast

    if "CUDAExecutionProvider" in providers() or not int8_fast():
        return "fp32"
    return "int8"


def cache_dir() -> Path:
    return Path(os.environ.get("MULTIRETRIEVAL_CACHE", Path.home() / ".cache" / "multiretrieval"))


_digest_lock = threading.Lock()


def file_digest(path: str | Path) -> str:
    """The sha256 (hex) of a file, memoised in the cache folder by resolved path, size and mtime:
    the 90 MB of a text model are read once, not on every start."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    memo_path = cache_dir() / DIGESTS
    with _digest_lock:
        memo = _read_json(memo_path) or {}
        known = memo.get(str(path))
        if isinstance(known, list) and known[:2] == stamp:
            return known[2]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        memo = _read_json(memo_path) or {}  # another process may have added entries meanwhile
        memo = {p: v for p, v in memo.items() if os.path.exists(p)}  # files gone (temporary ones) are forgotten
        memo[str(path)] = [*stamp, digest]
        try:
            _write_atomically(memo_path, json.dumps(memo, indent=0).encode())
        except OSError as exc:  # a read-only cache costs a re-read next time, nothing else
            logger.debug("cannot memoise the digest of %s: %s", path, exc)
        return digest


def export_key(**facts: Any) -> str:
    """A short key of everything an export is made from (file digests, architecture, library versions)."""
    material = {**facts, "format": EXPORT_FORMAT, "opset": OPSET}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of distributions, read from their metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def weights_hash(module) -> str:
    """A short hash of a module's parameters and buffers (the key of a hub model's export)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def torch_device() -> str:
    """Where the eager PyTorch runtime runs: "cuda" when PyTorch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Export:
    """A cached ONNX export (``<tag>-<key>-opset17.onnx``, its weights in ``.onnx.data``) and its JSON sidecar of facts.

    The sidecar is written last: when it is there, the export and its other files are complete.
    """

    def __init__(self, tag: str, key: str) -> None:
        self.folder, self.key = cache_dir() / "onnx", key
        self.stem = f"{tag.replace('/', '_').replace(':', '_')}-{key}-opset{OPSET}"
        self.path = self.folder / f"{self.stem}.onnx"

    def file(self, suffix: str) -> Path:
        """A file that belongs to this export, e.g. ``file("tokenizer.json")``."""
        return self.folder / f"{self.stem}.{suffix}"

    def facts(self) -> dict[str, Any] | None:
        """The sidecar's facts, or None when the export is not (completely) cached."""
        facts = _read_json(self.file("json"))
        complete = self.path.is_file() and self.path.with_name(f"{self.path.name}.data").is_file()
        return facts if isinstance(facts, dict) and complete else None

    def write(self, module, example_inputs: tuple, input_names: list[str], output_names: list[str], dynamic_axes: dict,
              facts: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """Export ``module`` (eval mode, traced with ``example_inputs``), then ``files`` and the facts.

        The weights go to ``<name>.onnx.data`` beside the graph: ONNX Runtime maps that file instead of parsing and
        copying them, which halves a session's start (MiniLM: 0.3 s -> 0.15 s)."""
        import onnx
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{self.stem}.", dir=self.folder) as tmp:
            traced = Path(tmp) / "traced.onnx"
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
                torch.onnx.export(module, example_inputs, str(traced), input_names=input_names, output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
            model = onnx.load(str(traced))
        self.save(model, facts, files)

    def save(self, model, facts: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        """Write an ONNX model (``onnx.ModelProto``, e.g. a quantised export), then ``files`` and the facts."""
        import onnx

        self.folder.mkdir(parents=True, exist_ok=True)
        data = self.path.with_name(f"{self.path.name}.data")
        with tempfile.TemporaryDirectory(prefix=f".{self.stem}.", dir=self.folder) as tmp:
            staged = Path(tmp) / self.path.name
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            if not staged.with_name(data.name).is_file():  # a model without large tensors: an empty weights file
                staged.with_name(data.name).write_bytes(b"")
            for path in (staged, staged.with_name(data.name)):
                os.chmod(path, 0o644)
            # The weights first, then the graph that names them: a concurrent or killed export never leaves a graph
            # without its weights (an export of the same key writes the same bytes).
            os.replace(staged.with_name(data.name), data)
            os.replace(staged, self.path)
        for suffix, content in (files or {}).items():
            _write_atomically(self.file(suffix), content)
        _write_atomically(self.file("json"), json.dumps(facts, indent=1).encode())
        logger.info("exported %s", self.path)


def session_threads() -> int:
    """ONNX Runtime's intra-op threads: PyTorch's setting when it is loaded, else OMP_NUM_THREADS, else 0 (ONNX
    Runtime's own default: the physical cores, as PyTorch's)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return 0


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bulk_threads(cores: int | None = None) -> int:
    """Intra-op threads of a bulk session (``OnnxModule.bulk``): 1 up to 4 cores, else 2. Bulk work runs several
    batches at once, one per such session run: independent runs keep every core busy without the barriers of one
    run split over many threads (a thread of a split run that the reader threads preempt holds up the others).
    Two threads a run above 4 cores halve the batches in flight: each holds ~0.25 GB of activations (32 images)."""
    return 1 if (cores or usable_cores()) <= 4 else 2


def providers() -> list[str]:
    """ONNX Runtime's execution providers, best first: CUDA when this onnxruntime build has it, then the CPU."""
    import onnxruntime as ort

    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []) + ["CPUExecutionProvider"]


def on_gpu() -> bool:
    """Whether the ONNX sessions run on a GPU."""
    return providers()[0] != "CPUExecutionProvider"


class OnnxModule:
    """An exported network run by an ONNX Runtime session, made on first use.

    Two sessions of one network: ``session`` for queries (one run uses every core: ``session_threads``) and, on a
    CPU, ``bulk_session`` for the indexing pipeline (``bulk_threads``; several runs at once). A GPU has one session.

    Args:
        path: the .onnx file.
        input_names: the graph's inputs, in call order.
        smallest: one-item inputs (for ``release_memory``).
    """

    def __init__(self, path: str | Path, input_names: list[str], smallest: list[np.ndarray]) -> None:
        self.path = Path(path)
        self.input_names = input_names
        self._smallest = smallest
        self._session = self._bulk = None
        self._lock = threading.Lock()

    def _new_session(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_mem_pattern = False  # same speed here, and 0.3 GB less held after a batch of 32 images
        # Idle worker threads sleep instead of spinning: spinning threads of the image and text
        # sessions fought for the 2 cores and doubled an image+text query (32 -> 15 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.path), options, providers=providers())

    @property
    def session(self):
        with self._lock:
            if self._session is None:
                self._session = self._new_session(session_threads())
            return self._session

    @property
    def bulk_session(self):
        """The session bulk runs use: on a CPU its own, with ``bulk_threads`` intra-op threads; else ``session``."""
        if on_gpu():
            return self.session
        with self._lock:
            if self._bulk is None:
                self._bulk = self._new_session(bulk_threads())
            return self._bulk

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Thread-safe; releases the GIL while it runs."""
        return self.session.run(None, dict(zip(self.input_names, inputs)))

    def bulk(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """As calling, on the bulk session: for pipelines that run several batches at once from their own threads."""
        return self.bulk_session.run(None, dict(zip(self.input_names, inputs)))

    def release_memory(self) -> None:
        """Give the memory arenas' free chunks back (about 0.5 GB after batches of 32 images):
        a one-item run with arena shrinkage on."""
        sessions = [s for s in (self._session, self._bulk) if s is not None]
        if not sessions:
            return
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        for session in sessions:
            session.run(None, dict(zip(self.input_names, self._smallest)), options)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
