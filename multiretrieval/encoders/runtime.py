"""Where the encoders' networks run: eager PyTorch, or ONNX Runtime (config ``encoders.runtime``).

On this project's 2-core CPU machines ONNX Runtime runs EfficientNet-Lite0 about 4x and
MiniLM 1.3-2x faster than eager PyTorch, with outputs equal to about 1e-5 (tests check
1e-4). The network is exported from the loaded PyTorch weights once and cached in
``$MULTIRETRIEVAL_CACHE/onnx`` (default ``~/.cache/multiretrieval/onnx``) under a hash of
the weights, so nothing is downloaded and a changed model never reuses a stale export.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import ConfigError

logger = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx")
OPSET = 17


def resolve_runtime(runtime: str) -> str:
    """"auto" -> "onnx" when onnxruntime and onnx are installed, else "torch"."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown encoder runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if runtime == "auto":
        have = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
        return "onnx" if have else "torch"
    return runtime


def cache_dir() -> Path:
    return Path(os.environ.get("MULTIRETRIEVAL_CACHE", Path.home() / ".cache" / "multiretrieval"))


def weights_hash(module) -> str:
    """A short hash of a module's parameters and buffers (what the exported graph bakes in)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class OnnxModule:
    """A torch module exported to ONNX and run by an ONNX Runtime session on the CPU.

    Args:
        module: the eval-mode module; called with ``example_inputs`` to trace it.
        tag: a readable prefix for the cached file name.
        dynamic_axes: as for ``torch.onnx.export`` (batch and sequence axes).
    """

    def __init__(self, module, example_inputs: tuple, input_names: list[str], output_names: list[str],
                 dynamic_axes: dict, tag: str) -> None:
        import onnxruntime as ort
        import torch

        path = cache_dir() / "onnx" / f"{tag}-{weights_hash(module)}-torch{torch.__version__.split('+')[0]}-opset{OPSET}.onnx"
        if not path.is_file():
            _export(module, example_inputs, input_names, output_names, dynamic_axes, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_mem_pattern = False  # same speed here, and 0.3 GB less held after a batch of 32 images
        # Idle worker threads sleep instead of spinning: spinning threads of the image and text
        # sessions fought for the 2 cores and doubled an image+text query (32 -> 15 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.input_names = input_names
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._smallest = [np.zeros((1, *x.shape[1:]), x.numpy().dtype) for x in example_inputs]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Thread-safe; releases the GIL while it runs."""
        return self.session.run(None, dict(zip(self.input_names, inputs)))

    def release_memory(self) -> None:
        """Give the memory arena's free chunks back (about 0.5 GB after batches of 32 images):
        a one-item run with arena shrinkage on."""
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session.run(None, dict(zip(self.input_names, self._smallest)), options)


def _export(module, example_inputs, input_names, output_names, dynamic_axes, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module, example_inputs, tmp, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)  # atomic: a concurrent or killed export never leaves a half file
        logger.info("exported %s", path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
