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
    labels = imagenet_labels()
    sources = dict(zip(catalog.df["title"], catalog.image_sources()))
    from multiretrieval.catalog import load_image

    def top5(title):
        batch = np.stack([encoder.preprocess(load_image(sources[title]))])
        probs = encoder.forward(batch)[1][0]
        return [labels[i] for i in np.argsort(-probs)[:5]]

    assert {"washer", "dishwasher"} & set(top5("Washing machine"))
    assert {"sports car", "convertible", "car wheel", "minivan", "cab", "beach wagon", "racer", "golfcart"} & set(top5("Smart car"))
    assert {"refrigerator"} & set(top5("Refrigerator"))


def test_grid_tokens(encoder, catalog):
    from multiretrieval.catalog import load_image

    batch = np.stack([encoder.preprocess(load_image(catalog.image_sources()[0]))])
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
    from multiretrieval.catalog import load_image

    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    eager, onnx = ImageEncoder.load("efficientnet-lite0", runtime="torch"), ImageEncoder.load("efficientnet-lite0", runtime="onnx")
    assert (eager.runtime, onnx.runtime) == ("torch", "onnx")
    batch = np.stack([eager.preprocess(load_image(s)) for s in catalog.image_sources()[:4]])
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

    from multiretrieval.catalog import load_image

    encoder = ImageEncoder.load("efficientnet-lite0", runtime="onnx")
    batch = np.stack([encoder.preprocess(load_image(s)) for s in catalog.image_sources()] * 4)  # 32 images
    before = encoder.forward(batch[:2])[0]
    encoder.forward(batch)
    grown = psutil.Process().memory_info().rss
    encoder.release_memory()
    assert psutil.Process().memory_info().rss < grown - 100 * 2**20  # the arena's chunks for 32 images are freed
    np.testing.assert_array_equal(encoder.forward(batch[:2])[0], before)  # and it still works


def _torch_preprocess(image, size, mean, std):
    """The PyTorch preprocessing the encoder used before it moved to numpy."""
    import torch
    from PIL import Image

    from multiretrieval.catalog import shrink_to

    image = shrink_to(image)
    w, h = image.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return ((x - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)).numpy()


def test_preprocessing_gives_the_pytorch_tensors(encoder, catalog):
    """PIL + numpy preprocessing equals the PyTorch one bit for bit: the fixture photos, odd shapes (padded), and
    ImageNet's mean and std (not lite0's 0.5) for the divisions' rounding."""
    import io

    from PIL import Image

    from multiretrieval.catalog import load_image
    from tests.conftest import png_bytes

    images = [load_image(s) for s in catalog.image_sources()]
    images += [Image.open(io.BytesIO(png_bytes(size, color))).convert("RGB") for size, color in
               (((64, 48), (200, 30, 30)), ((31, 97), (10, 200, 90)), ((300, 7), (1, 2, 3)))]
    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    other = ImageEncoder("resnet-like", {"dim": 2048, "image_size": 224, "key": "k", **imagenet})
    for image in images:
        for enc, mean, std in ((encoder, [0.5] * 3, [0.5] * 3), (other, imagenet["mean"], imagenet["std"])):
            np.testing.assert_array_equal(enc.preprocess(image), _torch_preprocess(image, enc.image_size, mean, std))


@pytest.mark.parametrize(("h", "w", "grid"), [(7, 7, 2), (7, 7, 3), (7, 7, 7), (10, 6, 4), (5, 9, 3)])
def test_grid_tokens_are_pytorchs_adaptive_pooling(h, w, grid):
    import torch

    from multiretrieval.encoders.image import _grid_pool

    fmap = np.random.default_rng(h * w + grid).normal(size=(2, 16, h, w)).astype(np.float32)
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(fmap), grid).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(_grid_pool(fmap, grid), expected, atol=1e-6)


def _refuse(*args, **kwargs):
    raise AssertionError("timm built a model")


def test_a_cached_export_runs_without_timm(catalog, tmp_path, monkeypatch):
    """With its export cached, the encoder builds no timm model and gives the exporting encoder's outputs; its width,
    input size and normalisation come from the export's record; the timm model still loads when asked for."""
    from multiretrieval.catalog import load_image

    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    exporting = ImageEncoder.load("efficientnet-lite0", runtime="onnx")
    pils = [load_image(s) for s in catalog.image_sources()[:3]]
    with monkeypatch.context() as m:
        m.setattr("multiretrieval.encoders.image._build_model", _refuse)
        fast = ImageEncoder.load("efficientnet-lite0", runtime="onnx")
        assert (fast.dim, fast.image_size, fast.key) == (exporting.dim, exporting.image_size, exporting.key)
        for a, b in zip(exporting.forward_images(pils, grid=2), fast.forward_images(pils, grid=2)):
            np.testing.assert_array_equal(a, b)
    assert fast.model.num_features == 1280


def test_changed_weights_are_exported_again(encoder, catalog, tmp_path, monkeypatch):
    """The export is keyed by the weights file's content: rewritten with other weights, the same path gets a new export."""
    import torch
    from safetensors.torch import save_file

    from multiretrieval.catalog import load_image

    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "lite0.safetensors"
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, str(path))
    first = ImageEncoder.load("efficientnet-lite0", str(path), runtime="onnx")
    pils = [load_image(catalog.image_sources()[0])]
    before = first.forward_images(pils)[0]
    state["classifier.bias"] = state["classifier.bias"] + 1.0
    state["conv_head.weight"] = state["conv_head.weight"] * torch.tensor(1.5)
    save_file(state, str(path))
    second = ImageEncoder.load("efficientnet-lite0", str(path), runtime="onnx")
    assert second.key != first.key
    assert len(list((tmp_path / "cache" / "onnx").glob("efficientnet-lite0-*.onnx"))) == 2
    assert not np.allclose(second.forward_images(pils)[0], before)


def test_preprocess_is_the_normalisation_bit_for_bit(encoder, catalog):
    """The per-channel look-up gives (pixel / 255 - mean) / std exactly as float32 arithmetic does."""
    from PIL import Image

    from multiretrieval.catalog import load_image

    for image in [load_image(s) for s in catalog.image_sources()[:3]] + [Image.new("RGB", (300, 100), (10, 250, 3))]:
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        pixels = np.asarray(square.resize((224, 224), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        expected = (pixels - np.float32(0.5)) / np.float32(0.5)
        got = encoder.preprocess(image)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
