import json

import numpy as np
import pandas as pd

from multiretrieval.benchmarks import photo_like, write_photo_like
from multiretrieval.evaluation import EXACT_NAME_METHODS, build_exact_names, evaluate, ranks_of_targets, recall, shopper_photo


def test_ranks_and_recall():
    items = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0]], np.float32)
    ranks = ranks_of_targets(queries, items, np.array([0, 1, 3]))
    assert ranks.tolist() == [0, 1, 3]
    assert recall(ranks, ks=(1, 2)) == {"R@1": 1 / 3, "R@2": 2 / 3}


def test_a_photo_like_view_is_a_small_grey_low_contrast_jpeg_and_seeded(catalog):
    from multiretrieval.catalog import load_image

    image = load_image(catalog.image_sources()[0])
    a, b = (photo_like(image, np.random.default_rng(3)) for _ in range(2))
    pixels = np.asarray(a).astype(int)
    assert 48 <= a.width == a.height <= 80 and np.array_equal(pixels, np.asarray(b))  # small, square, seeded
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()  # grey
    assert pixels.max() - pixels.min() < 200  # low contrast
    assert not np.array_equal(pixels, np.asarray(photo_like(image, np.random.default_rng(4))))


def test_evaluate_end_to_end_on_a_tiny_bench(catalog, tmp_path):
    """The harness on the fixture items standing in for both benchmarks (the real ones come from Debian packages)."""
    from multiretrieval.catalog import load_image
    from multiretrieval.config import RetrieverConfig

    bench = tmp_path / "bench"
    df = catalog.df.assign(image=catalog.image_sources())
    (bench / "tuxpaint").mkdir(parents=True)
    df[["id", "image", "title", "category"]].to_csv(bench / "tuxpaint" / "catalog.csv", index=False)
    assert write_photo_like(df[["id", "image", "title", "category"]], bench / "tuxpaint") == 8
    sh = bench / "sweethome3d"
    (sh / "queries").mkdir(parents=True)
    df.assign(description=df["category"])[["id", "image", "title", "description", "category"]].to_csv(sh / "catalog.csv", index=False)
    rows = []
    for i, row in enumerate(df.itertuples(index=False)):
        shopper_photo(load_image(row.image), np.random.default_rng(i)).save(sh / "queries" / f"{row.id}.png")
        rows.append({"target": row.id, "image": f"queries/{row.id}.png", "text": row.category})
    pd.DataFrame(rows).to_csv(sh / "queries.csv", index=False)
    assert build_exact_names(df, bench / "exact_names") == 8
    names = pd.read_csv(bench / "exact_names" / "catalog.csv").set_index("id")
    for q in pd.read_csv(bench / "exact_names" / "queries.csv").itertuples():
        brand, code = names.loc[q.target, "title"].split()[0], names.loc[q.target, "title"].split()[-1]
        assert q.text.startswith(brand) if q.kind == "brand" else q.text.split()[0].replace("-", "").lower() in code.replace("-", "").lower()

    cfg = RetrieverConfig().with_overrides({"training": {"epochs": 2, "val_share": 0.3, "batch_size": 4}})
    results = evaluate(bench, tmp_path / "out", cfg, train=True, show_progress=False)
    tux = results["tuxpaint_zero_shot"]
    assert set(tux) >= {"conse", "lit", "lit+conse"}
    assert tux["lit"]["R@10"] == 1.0  # 8 items: the target is always in the top 10
    assert set(tux["photo_like"]) >= {"conse", "lit", "lit+conse"} and tux["photo_like"]["items"] == 8
    for part in (tux, tux["photo_like"]):
        for kind in ("conse", "lit", "lit+conse"):
            assert set(part[kind]["image_to_text"]) == {"R@1", "R@5", "R@10"} and part[kind]["image_to_text"]["R@10"] == 1.0
    assert tux["lit"]["image_to_text"]["R@1"] >= 0.5  # 8 distinct stamps: most images find their own description
    fused = results["sweethome3d_fused"]
    assert set(fused["late"]) == {"image-only", "text-only", "fused"} and "trained" in fused
    assert fused["late"]["image-only"]["R@1"] >= 0.75  # a shopper's photo of one of 8 distinct products
    assert results["sweethome3d_same_name"]["late"] == {"P@10": None, "queries": 0}  # the 8 fixture names are all distinct
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sweethome3d_fused"]["late"] == fused["late"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| as drawn | lit |" in report and "| photo-like | lit |" in report and "| trained (Retriever.train) | fused |" in report
    assert (tmp_path / "out" / "recall_at_k.png").stat().st_size > 10_000
    exact = results["exact_names"]
    assert exact["queries"] == 8 and set(EXACT_NAME_METHODS) <= set(exact)
    assert exact["hybrid: reciprocal-rank fusion (default)"]["R@1 model code"] == 1.0  # an exact model code is found first
    assert "## Exact names in text queries" in report


def test_the_unseen_concepts_benchmark_trains_lit_without_them_and_scores_them(catalog, tmp_path):
    """`evaluate --only unseen`: LiT projections trained by the shipped recipe on train.csv alone (here the fixture
    items, copied to make more pairs than a quarter batch of 512, so it takes steps), then every zero-shot space on
    the held-out categories' catalog."""
    from multiretrieval.config import RetrieverConfig

    df = catalog.df.assign(image=catalog.image_sources())
    unseen = tmp_path / "bench" / "unseen"
    (unseen / "tuxpaint").mkdir(parents=True)
    copies = [df.assign(id=df["id"].astype(str) + f"-{c}", dataset="tuxpaint-train" if c % 2 else "sweethome3d") for c in range(20)]
    train = pd.concat(copies, ignore_index=True).assign(description=lambda d: d["category"])
    train[["dataset", "id", "image", "title", "description"]].to_csv(unseen / "train.csv", index=False)
    held = df[["id", "image", "title", "category"]]
    held.to_csv(unseen / "tuxpaint" / "catalog.csv", index=False)
    write_photo_like(held, unseen / "tuxpaint")

    results = evaluate(tmp_path / "bench", tmp_path / "out", RetrieverConfig(), show_progress=False, only=["unseen"])
    assert set(results) >= {"unseen_zero_shot"} and "tuxpaint_zero_shot" not in results
    res = results["unseen_zero_shot"]
    assert 128 < res["training"]["pairs"]["tuxpaint-train"] + res["training"]["pairs"]["sweethome3d"] < 160  # some held out
    assert (tmp_path / "out" / "unseen-lit.safetensors").is_file()  # the projections it trained, not the shipped ones
    from multiretrieval.encoders.clip import PACKAGED_LIT

    assert (tmp_path / "out" / "unseen-lit.safetensors").read_bytes() != PACKAGED_LIT.read_bytes()
    for part in (res["tuxpaint"], res["tuxpaint"]["photo_like"]):
        assert set(part) >= {"conse", "lit", "lit+conse"} and part["items"] == 8
        assert all(0 <= part[k]["R@1"] <= part[k]["R@10"] == 1.0 for k in ("conse", "lit", "lit+conse"))  # 8 items: always in the top 10
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Zero-shot on unseen concepts" in report and "| tuxpaint (8) | photo-like | lit+conse |" in report
