import json

import numpy as np
import pandas as pd

from multiretrieval.evaluation import EXACT_NAME_METHODS, build_exact_names, evaluate, ranks_of_targets, recall, shopper_photo


def test_ranks_and_recall():
    items = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0]], np.float32)
    ranks = ranks_of_targets(queries, items, np.array([0, 1, 3]))
    assert ranks.tolist() == [0, 1, 3]
    assert recall(ranks, ks=(1, 2)) == {"R@1": 1 / 3, "R@2": 2 / 3}


def test_evaluate_end_to_end_on_a_tiny_bench(catalog, tmp_path):
    """The harness on the fixture items standing in for both benchmarks (the real ones come from Debian packages)."""
    from multiretrieval.catalog import load_image
    from multiretrieval.config import RetrieverConfig

    bench = tmp_path / "bench"
    df = catalog.df.assign(image=catalog.image_sources())
    (bench / "tuxpaint").mkdir(parents=True)
    df[["id", "image", "title", "category"]].to_csv(bench / "tuxpaint" / "catalog.csv", index=False)
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
    fused = results["sweethome3d_fused"]
    assert set(fused["late"]) == {"image-only", "text-only", "fused"} and "trained" in fused
    assert fused["late"]["image-only"]["R@1"] >= 0.75  # a shopper's photo of one of 8 distinct products
    assert results["sweethome3d_same_name"]["late"] == {"P@10": None, "queries": 0}  # the 8 fixture names are all distinct
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sweethome3d_fused"]["late"] == fused["late"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| lit |" in report and "| trained (Retriever.train) | fused |" in report
    assert (tmp_path / "out" / "recall_at_k.png").stat().st_size > 10_000
    exact = results["exact_names"]
    assert exact["queries"] == 8 and set(EXACT_NAME_METHODS) <= set(exact)
    assert exact["hybrid: reciprocal-rank fusion (default)"]["R@1 model code"] == 1.0  # an exact model code is found first
    assert "## Exact names in text queries" in report
