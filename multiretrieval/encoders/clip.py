"""The zero-shot cross-modal space: images and texts embedded where they can be compared.

Kinds (config ``zero_shot.kind``), one interface: ``image_batch(pils, pooled, probs)`` and
``text_batch(texts, pooled)`` -> L2-normalised (n, dim). ``pooled``/``probs`` are the
retriever's own encoder outputs when it has them (None: the space computes them).

- ``conse``: ConSE (Norouzi et al. 2014). An image's embedding in text space is the
  probability-weighted mean of the text embeddings of its top-k ImageNet labels; texts are
  embedded by the text encoder itself. No training.
- ``lit``: a CLIP-style dual encoder built with open_clip from the two packaged towers
  (timm EfficientNet-Lite0, Hugging Face MiniLM), towers locked, projections trained
  contrastively (LiT). Its towers are the retriever's own encoders, so its projections
  apply to the features the retriever already computed; ``build_lit_model`` builds the
  full open_clip model (training, checks, export).
- ``lit+conse``: both, scores mixed as (1 - w) * cos_lit + w * cos_conse.
- ``openclip``: a real OpenCLIP checkpoint, by name from the hub or from a local file,
  loaded unchanged with its own towers and preprocessing.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..config import ZeroShotConfig
from ..errors import ConfigError, ModelUnavailableError
from ..utils import l2_normalize
from .runtime import file_digest

def packaged_lit(image_encoder: str = "efficientnet-lite0") -> Path:
    """Where the LiT projections for an image tower ship (scripts/train_zero_shot.py --image-encoder writes them)."""
    return Path(__file__).resolve().parent.parent / "weights" / f"lit-{image_encoder.replace(':', '-')}-minilm-l6.safetensors"


PACKAGED_LIT = packaged_lit()
LIT_KEYS = ("visual.head.proj.weight", "text.proj.weight", "logit_scale")  # open_clip state_dict names


IMAGENET_LABELS = Path(__file__).resolve().parent.parent / "resources" / "imagenet-1k-labels.txt"


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet-1k class names, in class order (torchvision's names, shipped as a data file)."""
    return IMAGENET_LABELS.read_text(encoding="utf-8").splitlines()


class ConSE:
    """Maps ImageNet class probabilities into the text encoder's space."""

    kind = "conse"
    _label_cache: dict[tuple, np.ndarray] = {}  # per text model and template: shared by retrievers
    _label_lock = threading.Lock()  # the pipeline's image threads ask at once: computed (or read) once

    def __init__(self, image_encoder, text_encoder, top_k: int = 10, label_template: str = "{}",
                 temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"zero_shot.temperature must be above 0, got {temperature}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.top_k = top_k
        self.label_template = label_template
        self.temperature = temperature
        self.dim = text_encoder.dim
        tempered = f", temperature={temperature:g}" if temperature != 1 else ""  # 1: the fingerprint of indexes made before
        self.fingerprint = f"conse(top_k={top_k}, template={label_template!r}{tempered}, text={text_encoder.name})"

    @property
    def label_embeddings(self) -> np.ndarray:
        """The labels' text embeddings (1000, dim), kept in memory and on disk (``$MULTIRETRIEVAL_CACHE/conse``): a
        thousand texts through the text encoder would cost every start a second or more."""
        enc = self.text_encoder
        key = (enc.key, enc.runtime, enc.max_tokens, self.label_template)
        with self._label_lock:
            if key not in self._label_cache:
                self._label_cache[key] = _label_embeddings(enc, self.label_template)
            return self._label_cache[key]

    def embed_image_probs(self, probs: np.ndarray) -> np.ndarray:
        """ImageNet probabilities (n, 1000) -> text-space embeddings (n, dim), L2-normalised: the top_k labels' text
        embeddings weighted by their probabilities at the temperature (p ** (1 / T), the softmax of logits / T up to a
        factor that the normalisation takes out)."""
        probs = np.asarray(probs, np.float32)
        k = min(self.top_k, probs.shape[1])
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        weights = np.take_along_axis(probs, top, axis=1)
        if self.temperature != 1:
            top_p = weights.max(1, keepdims=True)  # divided out first: a small T must not underflow to zero
            weights = np.power(weights / np.where(top_p > 0, top_p, 1), 1.0 / self.temperature, dtype=np.float32)
        return l2_normalize(np.einsum("nk,nkd->nd", weights, self.label_embeddings[top]))

    def image_batch(self, pils, pooled=None, probs=None) -> np.ndarray:
        if probs is None:
            probs = self.image_encoder.forward_images(pils)[1]
        return self.embed_image_probs(probs)

    def linear_map(self) -> np.ndarray:
        """ConSE made linear: pooled image features (image dim) -> text space (dim), through the
        ImageNet classifier's logits weighting every label's (centred) text embedding.

        The LiT image projection starts from it, so training begins with what the labels' names
        already say about each concept instead of from nothing.
        """
        classifier = self.image_encoder.model.get_classifier().weight.detach().numpy()  # (1000, image dim)
        labels = self.label_embeddings
        return (classifier.T @ (labels - labels.mean(0))).astype(np.float32)

    def text_batch(self, texts, pooled=None) -> np.ndarray:
        if pooled is None:
            pooled = self.text_encoder.forward(texts)[0][:, 0]
        return l2_normalize(pooled)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.text_batch(texts)


class LiT:
    """The packaged towers with trained projections (see ``build_lit_model``)."""

    kind = "lit"

    def __init__(self, image_encoder, text_encoder, weights: str | Path | None = None) -> None:
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        path = Path(weights) if weights else packaged_lit(image_encoder.name)
        if not weights and not path.is_file():  # projections read one tower's features: never another's
            raise ModelUnavailableError(
                f"no LiT zero-shot projections ship for the image encoder {image_encoder.name!r} (only for efficientnet-lite0). "
                f"Train them: python scripts/train_zero_shot.py DATA --image-encoder {image_encoder.name} --out FILE, and set "
                "zero_shot.weights: FILE; or set zero_shot.kind: conse")
        state = load_lit_weights(path)
        self.image_proj = state["visual.head.proj.weight"].T.copy()  # (image dim, embed dim)
        self.text_proj = state["text.proj.weight"].T.copy()
        if self.image_proj.shape[0] != image_encoder.dim or self.text_proj.shape[0] != text_encoder.dim:
            raise ConfigError(f"zero-shot weights {path} project {self.image_proj.shape[0]}/{self.text_proj.shape[0]}-d "
                              f"features, but the encoders give {image_encoder.dim}/{text_encoder.dim}")
        self.dim = self.image_proj.shape[1]
        self.fingerprint = f"lit(sha256={file_digest(path)[:16]})"

    def image_batch(self, pils, pooled=None, probs=None) -> np.ndarray:
        if pooled is None:
            pooled = self.image_encoder.forward_images(pils)[0][:, 0]
        return l2_normalize(np.asarray(pooled, np.float32) @ self.image_proj)

    def text_batch(self, texts, pooled=None) -> np.ndarray:
        if pooled is None:
            pooled = self.text_encoder.forward(texts)[0][:, 0]
        return l2_normalize(np.asarray(pooled, np.float32) @ self.text_proj)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.text_batch(texts)


class Mixed:
    """Two spaces side by side: a score is (1 - w) * cos in the first + w * cos in the second."""

    def __init__(self, first, second, second_weight: float) -> None:
        if not 0.0 <= second_weight <= 1.0:
            raise ConfigError(f"zero_shot.conse_weight must lie in [0, 1], got {second_weight}")
        self.first, self.second = first, second
        self.kind = f"{first.kind}+{second.kind}"
        self.dim = first.dim + second.dim
        self.fingerprint = f"{first.fingerprint}+{second.fingerprint}@{second_weight}"
        self._a, self._b = np.sqrt(1.0 - second_weight), np.sqrt(second_weight)

    def image_batch(self, pils, pooled=None, probs=None) -> np.ndarray:
        return np.concatenate([self._a * self.first.image_batch(pils, pooled, probs),
                               self._b * self.second.image_batch(pils, pooled, probs)], 1)

    def text_batch(self, texts, pooled=None) -> np.ndarray:
        return np.concatenate([self._a * self.first.text_batch(texts, pooled), self._b * self.second.text_batch(texts, pooled)], 1)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.text_batch(texts)


class OpenCLIP:
    """A real OpenCLIP model with its own towers, loaded unchanged."""

    kind = "openclip"

    def __init__(self, model_name: str, pretrained: str | None) -> None:
        import open_clip

        from .hub import hub_offline

        local = pretrained is not None and Path(pretrained).is_file()
        if not local and hub_offline():
            raise ModelUnavailableError(
                f"OpenCLIP model {model_name!r} with weights {pretrained!r}: not a local file, and the hub is marked offline "
                "(HF_HUB_OFFLINE=1). Download the checkpoint elsewhere and set zero_shot.pretrained to its path.")
        try:
            self.model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
            self.preprocess = bounded_preprocess(preprocess)
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "not found" in str(exc).lower():
                raise ConfigError(f"OpenCLIP model {model_name!r}: {exc}") from exc
            raise ModelUnavailableError(f"OpenCLIP model {model_name!r} ({pretrained}): cannot load: {exc}") from exc
        except Exception as exc:  # hub and network errors come in many types
            raise ModelUnavailableError(f"OpenCLIP model {model_name!r} ({pretrained}): cannot load: {exc}") from exc
        self.model.eval()
        self.fingerprint = f"openclip({model_name}, {pretrained})"
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.dim = int(self.model.text_projection.shape[1] if getattr(self.model, "text_projection", None) is not None
                       else self.model.encode_text(self.tokenizer(["x"])).shape[1])

    def image_batch(self, pils, pooled=None, probs=None) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.stack([self.preprocess(p) for p in pils])
            return l2_normalize(self.model.encode_image(x).float().numpy())

    def text_batch(self, texts, pooled=None) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return l2_normalize(self.model.encode_text(self.tokenizer(list(texts))).float().numpy())

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.text_batch(texts)


MAX_STRIP_RATIO = 4  # how much longer than the centre crop's own shape an image stays before a shorter-side resize


def bounded_preprocess(transform):
    """open_clip's eval transform with bounded memory. Its default ("shortest") resizes the shorter side to
    the model's size and keeps the centre: a 100000x1 image would first become a 22,400,000 x 224 strip.
    Where the transform is such a resize followed by a centre crop, the image is cut to its centre, at most
    ``MAX_STRIP_RATIO`` times the crop's proportions, before it runs: what is cut off is what the crop drops
    (the result differs by a fraction of a pixel at most). Other transforms ("longest", "squash") are bounded."""
    from open_clip.transform import ResizeKeepRatio
    from torchvision.transforms import CenterCrop, Resize

    steps = list(getattr(transform, "transforms", ()))
    shorter_side = steps and (isinstance(steps[0], Resize) and (isinstance(steps[0].size, int) or len(steps[0].size) == 1)
                              or isinstance(steps[0], ResizeKeepRatio) and steps[0].longest == 0)
    if not shorter_side or len(steps) < 2 or type(steps[1]) is not CenterCrop:
        return transform
    crop_h, crop_w = steps[1].size

    def preprocess(image):
        w, h = image.size
        keep_w = _centre_span(w, h * MAX_STRIP_RATIO * crop_w / crop_h)
        keep_h = _centre_span(h, w * MAX_STRIP_RATIO * crop_h / crop_w)
        if (keep_w, keep_h) != (w, h):
            left, top = (w - keep_w) // 2, (h - keep_h) // 2
            image = image.crop((left, top, left + keep_w, top + keep_h))
        return transform(image)

    return preprocess


def _centre_span(side: int, most: float) -> int:
    """How many of ``side`` pixels to keep, at least ``most``: as many more as keeps the same centre."""
    keep = math.ceil(most)
    return side if keep >= side else keep + (side - keep) % 2


def build_zero_shot(cfg: ZeroShotConfig, image_encoder, text_encoder):
    """The zero-shot space a config names."""
    if cfg.kind == "conse":
        return ConSE(image_encoder, text_encoder, cfg.top_k, cfg.label_template, cfg.temperature)
    if cfg.kind == "lit":
        return LiT(image_encoder, text_encoder, cfg.weights)
    if cfg.kind == "lit+conse":
        return Mixed(LiT(image_encoder, text_encoder, cfg.weights),
                     ConSE(image_encoder, text_encoder, cfg.top_k, cfg.label_template, cfg.temperature), cfg.conse_weight)
    if cfg.kind == "openclip":
        if not cfg.model:
            raise ConfigError("zero_shot.kind 'openclip' needs zero_shot.model (e.g. ViT-B-32) and zero_shot.pretrained")
        return OpenCLIP(cfg.model, cfg.pretrained)
    raise ConfigError(f"zero_shot.kind {cfg.kind!r} is unknown; choose conse, lit, lit+conse or openclip")


def _label_embeddings(text_encoder, template: str) -> np.ndarray:
    """ConSE's label embeddings from the disk cache, made and stored there when missing. The file's name is a key of
    the text encoder's weights and runtime, its token limit, the template and the labels."""
    import hashlib
    import os

    from .runtime import cache_dir

    labels = [template.format(label) for label in imagenet_labels()]
    material = [text_encoder.key, text_encoder.runtime, text_encoder.max_tokens, labels]
    path = cache_dir() / "conse" / f"{hashlib.sha256(json.dumps(material).encode()).hexdigest()[:20]}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(labels), text_encoder.dim) and cached.dtype == np.float32:
            return cached
    except (OSError, ValueError):
        pass
    embeddings = text_encoder.encode(labels, batch_size=128, show_progress=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, embeddings, allow_pickle=False)
        os.replace(tmp, path)  # atomic: a concurrent start reads the whole file or none
    except OSError as exc:  # a read-only cache: computed again next time
        import logging

        logging.getLogger(__name__).debug("cannot cache ConSE label embeddings in %s: %s", path, exc)
    return embeddings


def load_lit_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise ModelUnavailableError(f"zero-shot projection weights {path} not found; train them with scripts/train_zero_shot.py")
    state = load_file(str(path))
    missing = [k for k in LIT_KEYS if k not in state]
    if missing:
        raise ConfigError(f"{path}: not LiT projection weights (missing {missing})")
    return state


def lit_model_config(text_model_path: str, image_dim_name: str = "tf_efficientnet_lite0", embed_dim: int = 384,
                     head_dropout: float = 0.0, image_size: int = 224) -> dict:
    """The open_clip model config of the LiT model: timm image tower + Hugging Face text tower.

    ``head_dropout``: dropout on the pooled image features before the projection (training only).
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": image_dim_name, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "timm_drop": head_dropout, "image_size": image_size},
        "text_cfg": {"hf_model_name": text_model_path, "hf_tokenizer_name": text_model_path, "hf_proj_type": "linear",
                     "hf_pooler_type": "mean_pooler", "context_length": 64},
        "custom_text": True,
    }


def build_lit_model(image_encoder, text_model_path: str, weights: str | Path | None = None, embed_dim: int = 384,
                    head_dropout: float = 0.0):
    """The LiT model as a real open_clip ``CustomTextCLIP``, towers loaded from the packaged weights and locked.

    ``image_encoder``: the retriever's ImageEncoder (its trunk weights are copied in). With
    ``weights``, the trained projections and logit scale are loaded too.
    """
    import open_clip
    import torch

    name = f"mr-lit-{image_encoder.name.replace(':', '-')}-minilm-l6"
    timm_name = image_encoder.model.pretrained_cfg["architecture"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(lit_model_config(text_model_path, timm_name, embed_dim, head_dropout, image_encoder.image_size)))
        open_clip.add_model_config(path)
        model = open_clip.create_model(name, pretrained=None)
    trunk_state = {k: v for k, v in image_encoder.model.state_dict().items() if not k.startswith("classifier.")}
    model.visual.trunk.load_state_dict(trunk_state)  # open_clip removed the ImageNet classifier
    # freeze_bn_stats=True would swap timm's BatchNormAct2d (batch norm + its ReLU6) for a plain
    # FrozenBatchNorm2d and drop the activations; the locked tower stays in eval mode instead.
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if weights is not None:
        state = load_lit_weights(Path(weights))
        missing = model.load_state_dict({k: torch.from_numpy(state[k]) for k in LIT_KEYS}, strict=False)
        assert not set(LIT_KEYS) & set(missing.missing_keys)  # noqa: S101
    return model.eval()
