"""Retrieval quality on the demo catalog, measured through the public API.

    python benchmarks/demo_quality.py [--catalog data/demo/catalog.csv]

Prints a table:
- image self-retrieval: each item's own image as the query; share returned at rank 1;
- name -> item: each distinct title as a text query; share with an item of that title in the top 5;
- zero-shot: product-kind queries against the catalog indexed WITHOUT titles (images only);
  hit@5 = an item of that kind in the top 5 (kind judged from the titles, joined afterwards).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import multiretrieval as mr  # noqa: E402

# query -> words, any of which in a result's title makes it an item of that kind
ZERO_SHOT_KINDS = {
    "a washing machine": ("washing machine", "washer"),
    "a car": ("car", "sedan", "peugeot", "beetle", "seat leon", "coupe", "smart"),
    "a lamp": ("lamp", "light"),
    "a bed": ("bed",),
    "a toilet": ("toilet",),
    "a refrigerator": ("fridge", "refrigerator"),
    "a piano": ("piano",),
    "a bicycle": ("bicycle", "bike"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    args = parser.parse_args()
    catalog = mr.Catalog.from_csv(args.catalog)
    df = catalog.df

    r = mr.Retriever()
    t0 = time.perf_counter()
    r.index(catalog, show_progress=True)
    index_s = time.perf_counter() - t0

    hits = sum(r.search(image=src, k=1)["id"].iloc[0] == item for item, src in zip(df["id"], catalog.image_sources()))
    image_rank1 = hits / len(df)

    names = sorted(set(df["title"]))
    name_hits = sum(name in set(r.search(text=name, k=5)["title"]) for name in names)
    name_top5 = name_hits / len(names)

    blind = mr.Retriever()
    blind.index(mr.Catalog(df.drop(columns=["title"]), image_root=catalog.image_root, text_columns=()), show_progress=True)
    titles = df.set_index("id")["title"].str.lower()
    zs_rows = []
    for query, words in ZERO_SHOT_KINDS.items():
        if not any(any(w in t for w in words) for t in titles):
            continue
        found = titles.loc[blind.search(text=query, mode="zero-shot", k=5)["id"]].tolist()
        zs_rows.append((query, any(any(w in t for w in words) for t in found), found))

    print(f"\ncatalog: {args.catalog} ({len(df)} items, {len(names)} distinct titles); indexing took {index_s:.1f} s\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| image query: own item at rank 1 | {image_rank1:.1%} ({hits}/{len(df)}) | >= 95% |")
    print(f"| name as text query: an item of that name in top 5 | {name_top5:.1%} ({name_hits}/{len(names)}) | >= 80% |")
    zs_hits = sum(hit for _, hit, _ in zs_rows)
    print(f"| zero-shot kinds with a hit in top 5 (untitled index) | {zs_hits}/{len(zs_rows)} | >= 5 kinds |")
    print("\n| zero-shot query | hit@5 | top-5 titles (joined after search) |")
    print("|---|---|---|")
    for query, hit, found in zs_rows:
        print(f"| {query} | {'yes' if hit else 'no'} | {', '.join(found)} |")


if __name__ == "__main__":
    main()
