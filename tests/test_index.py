import numpy as np
import pytest

import multiretrieval as mr
from multiretrieval.index import VectorIndex
from multiretrieval.utils import l2_normalize


def clustered(n, d=32, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return l2_normalize(centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d)))


def test_add_search_remove():
    x = clustered(200)
    index = VectorIndex(32, "Flat")
    index.add(np.arange(1000, 1200), x)
    scores, ids = index.search(x[:5], 3)
    assert ids[:, 0].tolist() == list(range(1000, 1005))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.remove(np.array([1000, 1001])) == 2 and len(index) == 198
    assert 1000 not in index.search(x[:1], 5)[1]


def test_filtered_search_returns_only_allowed_ids_both_paths():
    x = clustered(500)
    allowed = np.arange(0, 500, 7)
    for threshold in (0, 10_000):  # FAISS IDSelector path, exact path
        index = VectorIndex(32, "Flat", exact_filter_below=threshold)
        index.add(np.arange(500), x)
        scores, ids = index.search(x[:3], 10, allowed)
        assert set(ids.ravel()) <= set(allowed) and (ids >= 0).all()
        exact = np.sort(x[allowed] @ x[:3].T, axis=0)[::-1][:10].T
        np.testing.assert_allclose(scores, exact, atol=1e-5)


def test_approximate_index_recall_against_exact():
    x = clustered(5000, seed=1)
    queries = clustered(100, seed=2)
    flat, hnsw = VectorIndex(32, "Flat"), VectorIndex(32, "HNSW32")
    for index in (flat, hnsw):
        index.add(np.arange(5000), x)
    hnsw.set_params(efSearch=256)
    truth, found = flat.search(queries, 10)[1], hnsw.search(queries, 10)[1]
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
    assert recall >= 0.9


def test_trained_index_factory():
    x = clustered(2000)
    index = VectorIndex(32, "IVF16,Flat")
    index.add(np.arange(2000), x)
    assert len(index) == 2000


def test_wrong_dimension_and_bad_factory():
    index = VectorIndex(32)
    with pytest.raises(mr.QueryError, match="no search parameter 'efSearch'"):
        index.set_params(efSearch=10)
    with pytest.raises(mr.QueryError, match=r"shape \(n, 32\)"):
        index.search(np.zeros((1, 31), np.float32), 3)
    with pytest.raises(mr.QueryError, match="NaN"):
        index.add(np.arange(1), np.full((1, 32), np.nan, np.float32))
    with pytest.raises(mr.QueryError, match="invalid FAISS index_factory"):
        VectorIndex(32, "NotAnIndex42")


def test_save_load_and_broken_file(tmp_path):
    x = clustered(50)
    index = VectorIndex(32)
    index.add(np.arange(50), x)
    index.save(tmp_path / "i.faiss")
    again = VectorIndex.load(tmp_path / "i.faiss", "Flat")
    np.testing.assert_array_equal(again.search(x[:4], 4)[1], index.search(x[:4], 4)[1])
    (tmp_path / "bad.faiss").write_bytes(b"garbage" * 10)
    with pytest.raises(mr.IndexLoadError, match="not a readable FAISS index"):
        VectorIndex.load(tmp_path / "bad.faiss", "Flat")
