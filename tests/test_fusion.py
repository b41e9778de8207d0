import numpy as np
import pytest

import multiretrieval as mr
from multiretrieval.config import FusionConfig
from multiretrieval.fusion import AttentionFusion, LateFusion, build_fusion, load_fusion

RNG = np.random.default_rng(0)


def inputs(n=4, ti=1, tt=1, di=12, dt=8):
    return (RNG.normal(size=(n, ti, di)).astype(np.float32), np.ones((n, ti), bool),
            RNG.normal(size=(n, tt, dt)).astype(np.float32), np.ones((n, tt), bool))


def test_late_fusion_scores_are_weighted_modality_similarities():
    fusion = LateFusion(12, 8, image_weight=0.3)
    im, imask, tx, tmask = inputs()
    z = fusion.fuse(im, imask, tx, tmask)
    assert z.shape == (4, 20)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    cos = lambda a, b: (a @ b) / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    expected = 0.3 * cos(im[0, 0], im[1, 0]) + 0.7 * cos(tx[0, 0], tx[1, 0])
    assert z[0] @ z[1] == pytest.approx(expected, abs=1e-5)
    image_part, text_part = fusion.contributions(z[0], z[1:2])
    assert image_part[0] + text_part[0] == pytest.approx(z[0] @ z[1], abs=1e-5)


def test_late_fusion_masks_a_missing_modality():
    fusion = LateFusion(12, 8)
    im, imask, tx, tmask = inputs()
    image_only = fusion.fuse(im, imask, tx, np.zeros_like(tmask))
    assert np.all(image_only[:, 12:] == 0)
    fused = fusion.fuse(im, imask, tx, tmask)
    # An image-only query ranks items by image similarity alone.
    cos = (im[:, 0] / np.linalg.norm(im[:, 0], axis=1, keepdims=True)) @ (im[0, 0] / np.linalg.norm(im[0, 0]))
    assert np.argsort(-(fused @ image_only[0])).tolist() == np.argsort(-cos).tolist()


@pytest.mark.parametrize("has_image,has_text", [(True, False), (False, True), (True, True)])
def test_attention_fusion_runs_for_every_input_kind(has_image, has_text):
    fusion = AttentionFusion(12, 8, dim=16, heads=2, out_dim=10, image_grid=2, text_chunks=3)
    im, imask, tx, tmask = inputs(ti=5, tt=4)
    imask[:], tmask[:] = has_image, has_text
    z = fusion.fuse(im, imask, tx, tmask)
    assert fusion.out_dim == 12 + 8 + 10 and z.shape == (4, fusion.out_dim)  # late-fusion skip path + learned part
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_attention_fusion_ignores_masked_tokens():
    fusion = AttentionFusion(12, 8, dim=16, heads=2, out_dim=10)
    im, imask, tx, tmask = inputs()
    tmask[:] = False
    a = fusion.fuse(im, imask, tx, tmask)
    b = fusion.fuse(im, imask, tx * 100 + 5, tmask)
    np.testing.assert_allclose(a, b, atol=1e-6)
    tmask[:] = True
    assert not np.allclose(a, fusion.fuse(im, imask, tx, tmask))


def test_attention_fusion_generalises_late_fusion():
    """With the learned part mixed out, the module scores exactly as late fusion does."""
    import torch

    fusion = AttentionFusion(12, 8, dim=16, heads=2, out_dim=10)
    with torch.no_grad():
        fusion.module.mix_logit.fill_(-30.0)  # sin^2(t) ~ 0
    args = inputs()
    z, late = fusion.fuse(*args), LateFusion(12, 8, 0.5).fuse(*args)
    np.testing.assert_allclose(z[:, :20] @ z[:, :20].T, late @ late.T, atol=1e-5)


def test_attention_weights_are_a_distribution_over_unmasked_tokens():
    import torch

    fusion = AttentionFusion(12, 8, dim=16, heads=2, out_dim=10)
    im, imask, tx, tmask = inputs()
    tmask[1] = False
    _, attention = fusion.module(*(torch.from_numpy(a) for a in (im, imask, tx, tmask)), return_attention=True)
    attention = attention.detach().numpy()
    np.testing.assert_allclose(attention.sum(1), 1.0, atol=1e-5)
    assert attention[1, 2] == 0  # row 1's text token is masked


def test_save_load_round_trip(tmp_path):
    fusion = AttentionFusion(12, 8, dim=16, heads=2, out_dim=10, image_grid=0, text_chunks=0)
    args = inputs()
    fusion.save(tmp_path / "f")
    again = load_fusion(tmp_path / "f")
    np.testing.assert_allclose(again.fuse(*args), fusion.fuse(*args), atol=1e-7)
    late = LateFusion(12, 8, 0.25)
    late.save(tmp_path / "l")
    assert load_fusion(tmp_path / "l").config() == late.config()


def test_build_fusion_checks_kind_and_dimensions(tmp_path):
    with pytest.raises(mr.ConfigError, match="fusion.kind 'mystery' is unknown"):
        build_fusion(FusionConfig(kind="mystery"), 12, 8)
    AttentionFusion(12, 8, dim=16, heads=2).save(tmp_path / "f")
    with pytest.raises(mr.ConfigError, match="expect image/text dims 12/8"):
        build_fusion(FusionConfig(kind="attention", weights=str(tmp_path / "f")), 1280, 384)


def test_broken_fusion_folder(tmp_path):
    (tmp_path / "fusion.json").write_text("{not json")
    with pytest.raises(mr.IndexLoadError, match="not a saved fusion module"):
        load_fusion(tmp_path)
