import json

import numpy as np
import pytest

import multiretrieval as mr
from multiretrieval.training import _flatten_optimizer, _unflatten_optimizer, augment_image, fit, text_fragments

SMALL = {"training": {"epochs": 3, "val_share": 0.3, "batch_size": 4, "image_views": 2, "text_views": 3}}


@pytest.fixture(scope="module")
def views(catalog):
    from multiretrieval.training import encode_views

    return encode_views(catalog.image_sources(), catalog.texts(), mr.RetrieverConfig().with_overrides(SMALL), cache=None)


def test_views_are_encoded_once_with_the_expected_shapes(views):
    assert views["ok"].all()
    assert views["aug"].shape == (8, 2, 1, 1280) and views["frag"].shape == (8, 3, 1, 384)
    assert not np.allclose(views["aug"][:, 0], views["image"])  # augmented views differ from the originals


def test_fit_writes_a_loadable_module_and_a_report(catalog, views, tmp_path):
    report = fit(catalog, tmp_path / "f", mr.RetrieverConfig().with_overrides(SMALL), resume=False, views=views)
    assert report["train_items"] + report["val_items"] == 8 and len(report["history"]) == 3
    assert {"loss", "val_image_R@1", "val_text_R@1", "val_fused_R@1"} <= set(report["history"][0])
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    from multiretrieval.fusion import load_fusion

    assert load_fusion(tmp_path / "f").kind == "attention"
    assert json.loads((tmp_path / "f" / "training.json").read_text())["best_val_fused_R@1"] == report["best_val_fused_R@1"]


def test_same_seed_same_result(catalog, views, tmp_path):
    cfg = mr.RetrieverConfig().with_overrides(SMALL)
    a = fit(catalog, tmp_path / "a", cfg, resume=False, views=views)
    b = fit(catalog, tmp_path / "b", cfg, resume=False, views=views)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (tmp_path / "a" / "fusion.safetensors").read_bytes() == (tmp_path / "b" / "fusion.safetensors").read_bytes()


def test_an_interrupted_run_resumes_from_its_last_checkpoint(catalog, views, tmp_path):
    cfg = mr.RetrieverConfig().with_overrides(SMALL)
    whole = fit(catalog, tmp_path / "whole", cfg.with_overrides({"training": {"epochs": 4, "patience": 99}}), resume=False, views=views)
    fit(catalog, tmp_path / "cut", cfg.with_overrides({"training": {"epochs": 2, "patience": 99}}), resume=False, views=views)
    resumed = fit(catalog, tmp_path / "cut", cfg.with_overrides({"training": {"epochs": 4, "patience": 99}}), views=views)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in whole["history"]], rtol=1e-5)


def test_optimizer_state_round_trips_without_pickle():
    import torch

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    tensors, layout = _flatten_optimizer(opt.state_dict())
    json.dumps(layout)
    again = _unflatten_optimizer(tensors, layout)
    assert torch.equal(again["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_views_are_deterministic():
    from PIL import Image

    image = Image.effect_noise((64, 64), 40).convert("RGB")
    a = augment_image(image, np.random.default_rng([0, 1]))
    b = augment_image(image, np.random.default_rng([0, 1]))
    assert a.tobytes() == b.tobytes()
    frags = text_fragments("Armchair. Office. Seat, leather", 3, np.random.default_rng(0))
    assert len(frags) == 3 and all(f in "Armchair. Office. Seat, leather" for f in frags)


def test_retriever_train_switches_to_the_trained_fusion_and_saves_it(retriever_copy, tmp_path):
    import dataclasses

    r = retriever_copy
    r.config = dataclasses.replace(r.config, training=dataclasses.replace(r.config.training, epochs=2, val_share=0.3, batch_size=4))
    r.train(out=tmp_path / "trained")
    assert r.fusion.kind == "attention" and r.config.fusion.kind == "attention"
    res = r.search(text="a lamp", k=8)
    assert len(res) == 8 and res["score"].is_monotonic_decreasing
    r.save(tmp_path / "idx")
    again = mr.Retriever.load(tmp_path / "idx")
    assert again.fusion.kind == "attention"
    assert again.search(text="a lamp", k=8)["id"].tolist() == res["id"].tolist()


def test_feature_cache_is_reused_and_holds_no_pickle(catalog, tmp_path):
    from multiretrieval.training import encode_catalog

    first = encode_catalog(catalog, tmp_path / "c.npz", show_progress=False)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:  # raises if anything needs pickle
        assert data["id"].dtype.kind == "U"
    again = encode_catalog(catalog, tmp_path / "c.npz", show_progress=False)
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["id"].tolist() == [str(i) for i in catalog.ids]


def test_fit_zero_shot_is_repeatable_and_its_weights_load_as_the_lit_space(catalog, tmp_path):
    import json

    import pytest

    from multiretrieval.encoders import get_image_encoder, get_text_encoder
    from multiretrieval.encoders.clip import LiT
    from multiretrieval.training import encode_catalog, fit_zero_shot

    features = encode_catalog(catalog, tmp_path / "c.npz", show_progress=False)
    pairs = {"a": features, "b": {k: v[::-1].copy() for k, v in features.items()}}
    pairs["b"]["id"] = np.array([f"b{i}" for i in pairs["b"]["id"]])
    runs = [fit_zero_shot(pairs, tmp_path / f"run{i}.safetensors", epochs=3, batch_size=8, val_share=0.3,
                          data_weights={"b": 3.0}, show_progress=False) for i in (1, 2)]
    assert (tmp_path / "run1.safetensors").read_bytes() == (tmp_path / "run2.safetensors").read_bytes()
    report = json.loads((tmp_path / "run1.json").read_text())
    assert report["settings"]["data_weights"] == {"b": 3.0} and report["settings"]["init"] == "conse"
    assert set(report["validation"]["lit"]["by_data_set"]) == {"a", "b"}
    assert len(report["history"]) == 3 and str(report["validation"]["best_conse_weight"]) in report["validation"]["by_conse_weight"]
    lit = LiT(get_image_encoder("efficientnet-lite0"), get_text_encoder("minilm-l6"), tmp_path / "run1.safetensors")
    assert lit.text_batch(["a chair"]).shape == (1, 384)
    with pytest.raises(ValueError, match="not in pairs"):
        fit_zero_shot(pairs, tmp_path / "x.safetensors", data_weights={"tuxpaint": 2.0}, show_progress=False)


def test_style_views_are_seeded_and_a_fit_can_train_on_them_with_the_text_projection_locked(catalog, tmp_path):
    """The candidates scripts/train_zero_shot.py --cross-validate-recipes compares with the recipe (docs/results.md, "How the zero-shot recipe was chosen")."""
    from multiretrieval.encoders.clip import load_lit_weights
    from multiretrieval.training import encode_catalog, encode_style_views, fit_zero_shot

    features = encode_catalog(catalog, tmp_path / "c.npz", show_progress=False)
    style = encode_style_views(catalog, features, views=2, cache=tmp_path / "s.npz", show_progress=False)
    assert style.shape == (len(features["id"]), 2, features["image"].shape[1])
    assert np.array_equal(style, encode_style_views(catalog, features, views=2, show_progress=False))  # seeded per id
    cos = np.sum(style[:, 0] * features["image"], 1) / np.linalg.norm(style[:, 0], axis=1) / np.linalg.norm(features["image"], axis=1)
    assert (cos < 0.99).all() and (cos > 0.3).all()  # another style of the same picture
    pairs = {"a": {**features, "style": style}}
    with pytest.raises(ValueError, match="style"):
        fit_zero_shot({"a": features}, tmp_path / "x.safetensors", style_views=True, show_progress=False)
    report = fit_zero_shot(pairs, tmp_path / "w.safetensors", epochs=2, batch_size=8, val_share=0.3, style_views=True,
                           train_text=False, show_progress=False)
    assert report["settings"]["style_views"] is True and report["settings"]["train_text"] is False
    text_proj = load_lit_weights(tmp_path / "w.safetensors")["text.proj.weight"]
    assert np.allclose(text_proj, text_proj[0, 0] * np.eye(len(text_proj)))  # still its identity start


def test_the_conse_settings_the_script_compares_are_recomputed_from_the_cached_features(catalog, tmp_path, monkeypatch):
    """scripts/train_zero_shot.py --cross-validate-conse: ConSE image vectors at another top_k and temperature come
    from the cached pooled features; at top-10, T=1 they are the cache's own (what the pipeline's forward pass gave)."""
    from pathlib import Path

    from multiretrieval.training import encode_catalog

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "scripts"))
    import train_zero_shot as script

    features = encode_catalog(catalog, tmp_path / "c.npz", show_progress=False)
    np.testing.assert_allclose(script.conse_images(features, 10), features["conse_image"], atol=1e-4)
    flatter = script.conse_images(features, 50, 2.0)
    assert not np.allclose(flatter, features["conse_image"], atol=1e-2)
    assert script.with_conse({"a": features}, 10, 1.0, "efficientnet-lite0")["a"] is features
    sims = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6]])  # class names x items: items 0, 1 right, item 2 wrong
    assert script._accuracy(sims, np.array([0, 1, 0])) == 2 / 3 and script._accuracy(sims, np.array([0, -1, 1])) == 1.0
