import numpy as np
import pytest

import multiretrieval as mr
from multiretrieval.encoders import get_image_encoder
from multiretrieval.encoders.clip import imagenet_labels
from multiretrieval.encoders.image import ImageEncoder


@pytest.fixture(scope="module")
def encoder():
    return get_image_encoder("efficientnet-lite0")


def test_shape_normalisation_determinism(encoder, catalog):
    images = catalog.image_sources()[:3]
    a = encoder.encode(images, batch_size=2)
    b = encoder.encode(images[::-1], batch_size=3)[::-1]
    assert a.shape == (3, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)  # batch composition does not matter


def test_packaged_imagenet_weights_recognise_products(encoder, catalog):
    """The real weights are loaded: the renders' top ImageNet classes name what they show."""
    import torch

    labels = imagenet_labels()
    sources = dict(zip(catalog.df["title"], catalog.image_sources()))
    from multiretrieval.catalog import load_image

    def top5(title):
        batch = torch.stack([encoder.preprocess(load_image(sources[title]))])
        probs = encoder.forward(batch)[1][0]
        return [labels[i] for i in np.argsort(-probs)[:5]]

    assert {"washer", "dishwasher"} & set(top5("Washing machine"))
    assert {"sports car", "convertible", "car wheel", "minivan", "cab", "beach wagon", "racer", "golfcart"} & set(top5("Smart car"))
    assert {"refrigerator"} & set(top5("Refrigerator"))


def test_grid_tokens(encoder, catalog):
    import torch

    from multiretrieval.catalog import load_image

    batch = torch.stack([encoder.preprocess(load_image(catalog.image_sources()[0]))])
    tokens, probs = encoder.forward(batch, grid=2)
    assert tokens.shape == (1, 5, 1280) and probs.shape == (1, 1000)
    full = encoder.forward(batch, grid=7)[0]  # the whole 7x7 map: its cells average to the pooled vector
    np.testing.assert_allclose(full[0, 1:].mean(0), full[0, 0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(tokens[0, 1], tokens[0, 2])  # regions differ
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-4)


def test_local_weights_file_loads_the_same_model(encoder, catalog, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    local = ImageEncoder.load("efficientnet-lite0", str(path))
    images = catalog.image_sources()[:2]
    np.testing.assert_allclose(local.encode(images), encoder.encode(images), atol=1e-6)


def test_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(mr.ConfigError, match="do not fit the architecture"):
        ImageEncoder.load("efficientnet-lite0", str(path))


def test_missing_weights_file(tmp_path):
    with pytest.raises(mr.ConfigError, match="not found"):
        ImageEncoder.load("efficientnet-lite0", str(tmp_path / "nope.pth"))


def test_unknown_name():
    with pytest.raises(mr.ConfigError, match="unknown image encoder 'vgg-none'"):
        ImageEncoder.load("vgg-none")


def test_hub_model_offline_says_how_to_use_a_local_file():
    with pytest.raises(mr.ModelUnavailableError, match=r"resnet50.*encoders.image_weights"):
        ImageEncoder.load("resnet50")


def test_onnx_runtime_matches_eager_pytorch(catalog, tmp_path, monkeypatch):
    """The default ONNX Runtime path gives the eager PyTorch features and probabilities to 1e-4,
    with grid tokens, and exports into the cache folder it is given."""
    import torch

    from multiretrieval.catalog import load_image

    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    eager, onnx = ImageEncoder.load("efficientnet-lite0", runtime="torch"), ImageEncoder.load("efficientnet-lite0", runtime="onnx")
    assert (eager.runtime, onnx.runtime) == ("torch", "onnx")
    batch = torch.stack([eager.preprocess(load_image(s)) for s in catalog.image_sources()[:4]])
    (t1, p1), (t2, p2) = eager.forward(batch, grid=2), onnx.forward(batch, grid=2)
    assert t1.shape == t2.shape == (4, 5, 1280)
    np.testing.assert_allclose(t1, t2, atol=1e-4)
    np.testing.assert_allclose(p1, p2, atol=1e-4)
    assert list((tmp_path / "onnx").glob("efficientnet-lite0-*.onnx"))


def test_unknown_runtime_is_a_config_error():
    with pytest.raises(mr.ConfigError, match="unknown encoder runtime 'tensorrt'"):
        ImageEncoder.load("efficientnet-lite0", runtime="tensorrt")


def test_onnx_runtime_gives_its_arena_back(catalog):
    import psutil
    import torch

    from multiretrieval.catalog import load_image

    encoder = ImageEncoder.load("efficientnet-lite0", runtime="onnx")
    batch = torch.stack([encoder.preprocess(load_image(s)) for s in catalog.image_sources()] * 4)  # 32 images
    before = encoder.forward(batch[:2])[0]
    encoder.forward(batch)
    grown = psutil.Process().memory_info().rss
    encoder.release_memory()
    assert psutil.Process().memory_info().rss < grown - 100 * 2**20  # the arena's chunks for 32 images are freed
    np.testing.assert_array_equal(encoder.forward(batch[:2])[0], before)  # and it still works
