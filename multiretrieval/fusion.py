"""Fusion: image and text tokens -> one L2-normalised joint embedding.

Two kinds behind one interface (``fuse``, ``save``, ``load_fusion``):

- ``late``: the parameter-free default. The normalised pooled image and text vectors,
  weighted by sqrt(w) and sqrt(1 - w), are concatenated. For unit vectors the inner
  product of two fused embeddings is then w * cos(image) + (1 - w) * cos(text), and a
  query with one modality ranks by that modality's similarity alone.
- ``attention``: modality tokens projected to a common width d and concatenated after a
  learnable pooling token; scaled dot-product attention softmax(Q K^T / sqrt(d_k)) V with
  learnable W_Q, W_K, W_V reads them into the pooling token. A missing modality (or an
  empty text chunk) is masked out of the keys, so image-only, text-only and fused inputs
  land in one space. A skip path carries the late-fusion embedding (with a learned image
  weight), mixed with the attention output at a learned angle: the module generalises late
  fusion instead of replacing the encoders' full vectors with a narrow bottleneck. Its
  weights are random until trained (``training.fit``).

Inputs everywhere: image tokens (n, Ti, di) with mask (n, Ti), text tokens (n, Tt, dt)
with mask (n, Tt); token 0 of each is the pooled vector; a row whose mask is all False
has no such modality.

Three forms of a joint vector, so that scores of every kind of query share one scale:

- ``fuse``: L2-normalised (what ``Retriever.encode`` gives, and what training sees).
- ``item_vectors``: what the joint index stores. Late fusion: [sqrt(w) u_image ; sqrt(1 - w)
  u_text] with a missing part zero and *no* renormalisation (an item with both parts is
  exactly its ``fuse`` vector), so every item weighs each modality alike.
- ``query_vectors``: a query scaled so that its inner product with an item vector is the
  weighted mean of the cosines of the parts the query has, with shares (a, b) summing to 1:
  score = a cos(image) + b cos(text). Shares: (1, 0) for an image-only query, (0, 1) for a
  text-only one, (w, 1 - w) for a fused one unless the query gives its own ``weights``. The
  image part is scaled by a / sqrt(w), the text part by b / sqrt(1 - w). An item's own photo
  as an image-only query therefore scores 1 (its own text as a text query too), whatever w;
  an item lacking a part the query has counts 0 for that part.

The attention fusion's vector is [sqrt(1 - m) late ; sqrt(m) learned] (m the learned mix). Its
late block gets the treatment above; its learned block is a cosine between learned vectors,
which for an item's own photo is less than 1 by an amount training decides. ``calibrate``
measures, on the catalog's items with both parts, the mean learned cosine between an item's
image-only (text-only) embedding and its fused one, and the query's learned block is divided by
it, so an own photo scores (1 - m) + m * c / mean(c): 1 on average over the catalog.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import FusionConfig
from .errors import ConfigError, IndexLoadError
from .utils import l2_normalize

FUSION_FILE = "fusion.json"
WEIGHTS_FILE = "fusion.safetensors"


class LateFusion:
    kind = "late"
    image_grid = 0  # uses the pooled vectors only
    text_chunks = 0

    def __init__(self, image_dim: int, text_dim: int, image_weight: float = 0.5) -> None:
        if not 0.0 <= image_weight <= 1.0:
            raise ConfigError(f"fusion.image_weight must lie in [0, 1], got {image_weight}")
        self.image_dim, self.text_dim, self.image_weight = image_dim, text_dim, image_weight
        self.out_dim = image_dim + text_dim

    def fuse(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray) -> np.ndarray:
        return l2_normalize(self.item_vectors(image_tokens, image_mask, text_tokens, text_mask))

    def item_vectors(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray
                     ) -> np.ndarray:
        """What the joint index stores: [sqrt(w) u_image ; sqrt(1 - w) u_text], a missing part zero, not renormalised."""
        w = self.image_weight
        return _late_block(image_tokens, image_mask, text_tokens, text_mask, np.sqrt(w), np.sqrt(1.0 - w))

    def query_vectors(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray,
                      weights: np.ndarray | None = None, calibration: dict | None = None) -> np.ndarray:
        """Queries on the score scale: against ``item_vectors``, a cos(image) + b cos(text) (see the module's doc).
        ``weights``: (n, 2) image and text weights per query (a NaN row: the default shares)."""
        w = self.image_weight
        shares = modality_shares(image_mask.any(1), text_mask.any(1), w, weights)
        return _late_block(image_tokens, image_mask, text_tokens, text_mask,
                           _over_root(shares[:, :1], w), _over_root(shares[:, 1:], 1.0 - w))

    def calibrate(self, image_tokens, image_mask, text_tokens, text_mask) -> dict:
        """Nothing to measure: late fusion's scale is exact."""
        return {}

    def query_parts(self) -> list[tuple[int, int]]:
        """Column ranges of the image and the text block, which photo-only and words-only queries meet alone
        (what the index tunes its search for: index.VectorIndex.build)."""
        return [(0, self.image_dim), (self.image_dim, self.image_dim + self.text_dim)]

    def contributions(self, query: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split query-item scores into the image part and the text part (they sum to the score)."""
        d = self.image_dim
        return items[:, :d] @ query[:d], items[:, d:] @ query[d:]

    def config(self) -> dict:
        return {"kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim, "image_weight": self.image_weight}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FUSION_FILE).write_text(json.dumps(self.config(), indent=2))


def _unit_part(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pooled token (token 0) L2-normalised, zero where the row has no such modality."""
    return l2_normalize(tokens[:, 0]) * mask.any(1, keepdims=True)


def _late_block(image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray,
                image_scale, text_scale) -> np.ndarray:
    """[image_scale u_image ; text_scale u_text] (scales: numbers or (n, 1) columns), float32: late fusion's vector."""
    return np.concatenate([_unit_part(image_tokens, image_mask) * image_scale,
                           _unit_part(text_tokens, text_mask) * text_scale], axis=1).astype(np.float32)


def _over_root(share: np.ndarray, weight: float) -> np.ndarray:
    """share / sqrt(weight): scales a query part so that it meets the item's sqrt(weight) part at its
    share of the score; 0 where the fusion gives the modality no weight (no item carries that part)."""
    return share / np.sqrt(weight) if weight > 0 else np.zeros_like(share)


def modality_shares(has_image: np.ndarray, has_text: np.ndarray, image_weight: float, weights: np.ndarray | None = None
                    ) -> np.ndarray:
    """(n, 2) image and text shares of each query's score, summing to 1 over the parts it has.

    Default: (1, 0) image only, (0, 1) text only, (w, 1 - w) both. ``weights`` (n, 2): a query's own
    weights (a, b) -> (a, b) / (a + b) over the parts it has; a NaN row keeps the default."""
    has = np.stack([np.asarray(has_image, bool), np.asarray(has_text, bool)], 1)
    base = np.where(has, [image_weight, 1.0 - image_weight], 0.0)
    if weights is not None:
        weights = np.asarray(weights, np.float64).reshape(len(has), 2)
        given = ~np.isnan(weights).any(1)
        base[given] = np.where(has[given], weights[given], 0.0)
    total = base.sum(1, keepdims=True)
    one_part = has.sum(1, keepdims=True) == 1
    shares = np.divide(base, total, out=np.zeros_like(base), where=total > 0)
    return np.where(one_part & (total <= 0), has.astype(np.float64), shares)  # one part with a zero weight: still that part


def compose_text(text_tokens: np.ndarray, text_mask: np.ndarray, anchor_tokens: np.ndarray, anchor_mask: np.ndarray,
                 words_weight: float) -> np.ndarray:
    """"This, but X": the query's pooled text token becomes unit(u_anchor + beta u_words), the words read
    together with the text of the item its photo shows (its nearest item, or ``like``'s), so the query
    points at the item that differs from the anchor by what the words say. Category-level words ("lamp")
    change little of an anchor that already says it; variant words ("blue") move the query to the
    variant whose text carries them. Rows whose anchor has no text keep the words alone. A copy."""
    tokens = text_tokens.copy()
    has = text_mask.any(1) & anchor_mask.any(1)
    composed = l2_normalize(anchor_tokens[has, 0]) + words_weight * l2_normalize(text_tokens[has, 0])
    tokens[has, 0] = l2_normalize(composed)
    return tokens


def _attention_module():
    """The torch module, defined on first use so importing this file does not import torch."""
    import torch
    from torch import nn

    class AttentionFusionModule(nn.Module):
        def __init__(self, image_dim: int, text_dim: int, dim: int, heads: int, out_dim: int) -> None:
            super().__init__()
            if dim % heads:
                raise ConfigError(f"fusion.dim ({dim}) must be divisible by fusion.heads ({heads})")
            self.heads = heads
            self.image_proj = nn.Linear(image_dim, dim)
            self.text_proj = nn.Linear(text_dim, dim)
            self.modality = nn.Parameter(torch.randn(2, dim) * 0.02)  # image / text type embeddings
            self.pool = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.norm = nn.LayerNorm(dim)
            self.w_q = nn.Linear(dim, dim)
            self.w_k = nn.Linear(dim, dim)
            self.w_v = nn.Linear(dim, dim)
            self.w_o = nn.Linear(dim, dim)
            self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, out_dim))
            # Skip path: the late-fusion embedding with a learned image weight w, mixed with the
            # attention output at a learned angle, so the module generalises late fusion:
            # score = cos^2(t) * (w cos_image + (1 - w) cos_text) + sin^2(t) * cos_learned.
            self.image_logit = nn.Parameter(torch.zeros(()))  # w = sigmoid(.) = 0.5 at the start
            self.mix_logit = nn.Parameter(torch.tensor(-1.386))  # sin^2(t) = sigmoid(.) = 0.2 at the start

        def forward(self, image, image_mask, text, text_mask, return_attention: bool = False):
            n = image.shape[0]
            tokens = torch.cat([
                self.pool.expand(n, -1, -1),
                self.image_proj(nn.functional.normalize(image, dim=-1)) + self.modality[0],
                self.text_proj(nn.functional.normalize(text, dim=-1)) + self.modality[1],
            ], 1)
            keep = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=image.device), image_mask, text_mask], 1)
            x = self.norm(tokens)
            b, t, d = x.shape
            dk = d // self.heads
            q = self.w_q(x[:, :1]).view(b, 1, self.heads, dk).transpose(1, 2)  # the pooling token asks
            k = self.w_k(x).view(b, t, self.heads, dk).transpose(1, 2)
            v = self.w_v(x).view(b, t, self.heads, dk).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)) / dk ** 0.5  # (b, heads, 1, t)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
            attention = scores.softmax(-1)
            pooled = (attention @ v).transpose(1, 2).reshape(b, d)
            learned = nn.functional.normalize(self.out(tokens[:, 0] + self.w_o(pooled)), dim=-1)
            w = torch.sigmoid(self.image_logit)
            late = torch.cat([nn.functional.normalize(image[:, 0], dim=-1) * image_mask[:, :1] * w.sqrt(),
                              nn.functional.normalize(text[:, 0], dim=-1) * text_mask[:, :1] * (1 - w).sqrt()], 1)
            mix = torch.sigmoid(self.mix_logit)
            z = torch.cat([nn.functional.normalize(late, dim=-1) * (1 - mix).sqrt(), learned * mix.sqrt()], 1)
            z = nn.functional.normalize(z, dim=-1)
            return (z, attention.mean(1)[:, 0]) if return_attention else z

    return AttentionFusionModule


class AttentionFusion:
    kind = "attention"

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256, heads: int = 4, out_dim: int = 256,
                 image_grid: int = 0, text_chunks: int = 0) -> None:
        self.image_dim, self.text_dim, self.dim, self.heads = image_dim, text_dim, dim, heads
        self.learned_dim, self.image_grid, self.text_chunks = out_dim, image_grid, text_chunks
        self.out_dim = image_dim + text_dim + out_dim  # the late-fusion skip path, then the attention output
        self.module = _attention_module()(image_dim, text_dim, dim, heads, out_dim).eval()

    def fuse(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray,
             batch_size: int = 4096) -> np.ndarray:
        import torch

        out = np.zeros((len(image_tokens), self.out_dim), np.float32)
        with torch.inference_mode():
            for s in range(0, len(out), batch_size):
                sl = slice(s, s + batch_size)
                out[sl] = self.module(*(torch.from_numpy(np.ascontiguousarray(a[sl])) for a in
                                        (image_tokens, image_mask, text_tokens, text_mask))).numpy()
        return out

    query_parts = LateFusion.query_parts  # the late block's columns (the learned block is left out of this approximation)

    def mixing(self) -> tuple[float, float]:
        """(m, w): the learned part's share of a score and the late (skip) part's image weight."""
        import torch

        with torch.no_grad():
            return float(torch.sigmoid(self.module.mix_logit)), float(torch.sigmoid(self.module.image_logit))

    def item_vectors(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray
                     ) -> np.ndarray:
        """What the joint index stores: ``fuse`` with the late block not renormalised (see the module's doc)."""
        z = self.fuse(image_tokens, image_mask, text_tokens, text_mask)
        m, w = self.mixing()
        z[:, :self.image_dim + self.text_dim] = np.sqrt(1.0 - m) * _late_block(image_tokens, image_mask, text_tokens, text_mask,
                                                                               np.sqrt(w), np.sqrt(1.0 - w))
        return z

    def query_vectors(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray,
                      weights: np.ndarray | None = None, calibration: dict | None = None) -> np.ndarray:
        """Queries on the score scale: (1 - m) (a cos(image) + b cos(text)) + m cos(learned) / c against
        ``item_vectors``; ``weights`` set (a, b) of the late part only, ``calibration`` (from ``calibrate``)
        gives c per single-modality kind (1 for fused queries and when not given)."""
        z = self.fuse(image_tokens, image_mask, text_tokens, text_mask)
        m, w = self.mixing()
        has_image, has_text = image_mask.any(1), text_mask.any(1)
        shares = modality_shares(has_image, has_text, w, weights)
        d = self.image_dim + self.text_dim
        z[:, :d] = np.sqrt(1.0 - m) * _late_block(image_tokens, image_mask, text_tokens, text_mask,
                                                  _over_root(shares[:, :1], w), _over_root(shares[:, 1:], 1.0 - w))
        c = calibration or {}
        scale = np.where(has_image & has_text, 1.0, np.where(has_image, c.get("image", 1.0), c.get("text", 1.0)))
        z[:, d:] /= scale[:, None].astype(np.float32)
        return z

    def calibrate(self, image_tokens: np.ndarray, image_mask: np.ndarray, text_tokens: np.ndarray, text_mask: np.ndarray
                  ) -> dict:
        """The mean learned cosine between items' image-only (text-only) embeddings and their fused ones,
        over items that have both parts; a kind whose mean is under 0.1 (an untrained module) keeps 1."""
        m, _ = self.mixing()
        d = self.image_dim + self.text_dim
        both = image_mask.any(1) & text_mask.any(1)
        if not both.any() or m < 1e-6:
            return {}
        args = [a[both] for a in (image_tokens, image_mask, text_tokens, text_mask)]
        fused = self.fuse(*args)[:, d:]
        out = {}
        for kind, masked in (("image", 3), ("text", 1)):
            alone = list(args)
            alone[masked] = np.zeros_like(alone[masked])
            c = float(np.mean(np.sum(self.fuse(*alone)[:, d:] * fused, axis=1)) / m)
            out[kind] = c if c >= 0.1 else 1.0
        return out

    def config(self) -> dict:
        return {"kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim, "dim": self.dim,
                "heads": self.heads, "out_dim": self.learned_dim, "image_grid": self.image_grid, "text_chunks": self.text_chunks}

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, str(folder / WEIGHTS_FILE))
        (folder / FUSION_FILE).write_text(json.dumps(self.config(), indent=2))


FUSION_KINDS = {"late": LateFusion, "attention": AttentionFusion}
Fusion = LateFusion | AttentionFusion


def build_fusion(cfg: FusionConfig, image_dim: int, text_dim: int) -> Fusion:
    """The fusion module a config names: loaded from ``cfg.weights`` when set, else built fresh."""
    if cfg.weights:
        fusion = load_fusion(cfg.weights)
        if (fusion.image_dim, fusion.text_dim) != (image_dim, text_dim):
            raise ConfigError(
                f"fusion weights {cfg.weights} expect image/text dims {fusion.image_dim}/{fusion.text_dim}, "
                f"but the encoders give {image_dim}/{text_dim}"
            )
        return fusion
    if cfg.kind == "late":
        return LateFusion(image_dim, text_dim, cfg.image_weight)
    if cfg.kind == "attention":
        return AttentionFusion(image_dim, text_dim, cfg.dim, cfg.heads, cfg.out_dim, cfg.image_grid, cfg.text_chunks)
    raise ConfigError(f"fusion.kind {cfg.kind!r} is unknown; choose one of {sorted(FUSION_KINDS)}")


def load_fusion(folder: str | Path) -> Fusion:
    """Load a fusion module saved with ``save(folder)``."""
    folder = Path(folder)
    try:
        config = json.loads((folder / FUSION_FILE).read_text())
        kind = config.pop("kind")
        fusion = FUSION_KINDS[kind](**config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexLoadError(f"{folder / FUSION_FILE}: not a saved fusion module: {exc!r}") from exc
    if isinstance(fusion, AttentionFusion):
        from safetensors.torch import load_file

        try:
            fusion.module.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        except Exception as exc:
            raise IndexLoadError(f"{folder / WEIGHTS_FILE}: cannot load fusion weights: {exc}") from exc
    return fusion
