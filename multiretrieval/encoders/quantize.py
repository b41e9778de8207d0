"""The image CNN's int8 export (config ``encoders.precision``), made with ONNX Runtime's quantisation tools.

Static int8, QOperator format (QLinearConv/QLinearAdd): weights int8 per output channel, activations uint8 with
ranges measured beforehand. A user's machine has no representative images to measure them on, so they ship:
``weights/int8-<encoder>.json``, measured by ``scripts/calibrate_int8.py`` on images of the training data sets only
(percentile ranges), with the nodes that stay fp32 and the figures the table reached against fp32 on other images
of those sets. The stem and blocks 0 and 1.0 of EfficientNet-Lite0 stay fp32 (the 112 x 112 px maps, where int8
moved the vectors most: with them in int8 the mean cosine to fp32 was 0.988, min 0.86; without, 0.998, min 0.99),
and so does the classifier head (GlobalAveragePool, Gemm, Softmax: its cost is nothing, and ConSE reads its
probabilities). A table applies to the weight file it was measured with (its sha256) and to the export format it
names; other weights run fp32.

int8 runs where the CPU multiplies int8 without saturating: x86 with VNNI (AVX512-VNNI, AVX-VNNI, AMX) and ARM64.
Elsewhere ONNX Runtime's u8s8 kernels saturate, and its remedy (7-bit weights) moved the vectors four times as far
(mean cosine 0.992 instead of 0.998), so those CPUs, and GPUs, run fp32.

The text encoder stays fp32: ONNX Runtime's dynamic int8 (activations quantised by each batch's range) gave the same
text a vector that depends on the batch it is encoded in (cosine 0.994 between a text alone and in a batch), and
static int8 moved MiniLM's vectors twice as far as the CNN's (mean cosine 0.994) for 1.4x on a few percent of the
indexing work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_OPS = ("Conv", "Add", "Pad", "Clip")  # quantised image nodes (a Clip after a QLinearConv folds into its range)
TABLE_FORMAT = 1
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_fast(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether this CPU runs ONNX Runtime's int8 kernels exactly: ARM64, or x86 with an int8 dot-product
    instruction (read from /proc/cpuinfo; other systems are taken to lack it)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in _INT8_FLAGS)


def calibration_file(encoder: str) -> Path:
    """Where the activation ranges of an image encoder's int8 export ship."""
    return WEIGHTS_DIR / f"int8-{encoder.replace(':', '-').replace('/', '-')}.json"


def load_calibration(encoder: str, weights_digest: str, export_format: int) -> dict[str, Any] | None:
    """The shipped calibration table of ``encoder`` if it was measured on these weights (sha256) and this export
    format; None (the encoder runs in fp32) otherwise."""
    path = calibration_file(encoder)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("int8 calibration table %s is unreadable (%s): the image encoder runs in fp32", path, exc)
        return None
    if table.get("format") != TABLE_FORMAT or table.get("weights_sha256") != weights_digest \
            or table.get("export_format") != export_format:
        logger.info("int8 calibration table %s was measured on other weights or another export: %s runs in fp32", path, encoder)
        return None
    table["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return table


def quantize_image(fp32_path: str | Path, table: dict[str, Any]):
    """The static int8 model (onnx.ModelProto) of an image export, with the table's ranges and fp32 nodes.
    Raises ValueError when the table lacks a range the quantised nodes need (it belongs to another graph)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, load_model_with_shape_infer

    model = load_model_with_shape_infer(Path(fp32_path))
    keep = set(table["fp32_nodes"])
    nodes = {n.name for n in model.graph.node}
    needed = {t for n in model.graph.node if n.op_type in IMAGE_OPS and n.name not in keep
              for t in (*n.input[:1], *n.output) if t}
    missing = sorted(needed - set(table["ranges"]))
    if missing or not keep <= nodes:
        raise ValueError(f"the calibration table does not fit this graph (no range for {missing[:3]}, "
                         f"unknown fp32 nodes {sorted(keep - nodes)[:3]})")
    ranges = TensorsData(CalibrationMethod.MinMax, {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                                                    for name, (lo, hi) in table["ranges"].items()})
    quantizer = ONNXQuantizer(model, True, False, QuantizationMode.QLinearOps, True, QuantType.QInt8, QuantType.QUInt8,
                              ranges, [], sorted(keep), list(IMAGE_OPS), {"ActivationSymmetric": False, "WeightSymmetric": True})
    quantizer.quantize_model()
    return quantizer.model.model


def calibrate_image(fp32_path: str | Path, batches: Iterable[np.ndarray], method: str = "percentile",
                    keep_fp32: Iterable[str] = ()) -> dict[str, list[float]]:
    """Activation ranges {tensor: [low, high]} of an image export over preprocessed batches (n, 3, size, size),
    by ONNX Runtime's calibrators ("minmax", "percentile": 99.999, "entropy"); histograms are merged batch by batch."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}

    class Batch(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.x = x

        def get_next(self):
            x, self.x = self.x, None
            return None if x is None else {"images": np.ascontiguousarray(x, np.float32)}

    with tempfile.TemporaryDirectory(prefix="multiretrieval-calibrate-") as tmp:
        calibrator = create_calibrator(Path(fp32_path), list(IMAGE_OPS), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=methods[method])
        for batch in batches:
            calibrator.collect_data(Batch(batch))
        data = calibrator.compute_data()
    return {name: [float(np.asarray(v.range_value[0]).ravel()[0]), float(np.asarray(v.range_value[1]).ravel()[0])]
            for name, v in data.data.items()}
