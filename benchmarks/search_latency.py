"""Query latency on a catalog of N items made from the demo's 820, built without encoding N rows.

    python benchmarks/search_latency.py --items 100000 [--queries 100] [--text-features encode|reuse]
                                        [--factory F] [--workdir DIR] [--index-dir DIR] [--kinds] [--json]
    python benchmarks/search_latency.py --items 1000000 --keywords-only

The catalog: copy c of demo item i is a product of its own, id c * 820 + i + 1, title "<title>, <colour>
<material> <finish>" (12 words each: 1,728 distinct copies of an item; each word is on 1/12 of the catalog,
as common words are), and the demo item's image. Building it costs one encoding of the 820 images: the
demo catalog is encoded once into a shard cache, and every copy's encoded arrays are written into the
same cache under the copy's content hash (its image bytes and its title), so ``Retriever.index`` of the
large catalog takes them from the cache and builds the vector indexes and the keyword index as for any
catalog. The copies' image features are their demo item's (the same image); their text features are the
copy's own title encoded (``--text-features encode``, the default: ~150 titles/s on 2 cores, kept in the
cache for later runs) or the demo item's (``reuse``: copies of an item then share a joint vector).
``--keywords-only`` builds only the keyword index (from the same titles; what 1M items afford).

Timed, one query at a time, queries the titles of random rows (seeded), warm-up first:

- keyword side: what a hybrid text query asks of the keyword index (ranking.rank_text): the BM25 top
  ``search.hybrid_depth + 10``, then which of the fused keys carry the query's model codes (``having``) and
  have a keyword text (``holds``);
- vector side: the query text's embedding, and the joint index read ``search.hybrid_depth + 10`` deep
  over the items with a text (apart), and 20 deep as a vector-only query of 10 results reads it;
- whole text queries through ``Retriever.search``: hybrid (the default) and vector only (hybrid="off");
- ``--kinds``: also image, fused, zero-shot and filtered text queries.

Prints a table of p50/p90 (and the p50 of the CPU time of the timing thread, which a shared machine inflates less)
and ratios; ``--json``: one JSON object of the figures on the last line. Run it at two commits for a before/after
(``--index-dir`` makes both time the same vector index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import multiretrieval as mr  # noqa: E402

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "orange", "purple", "pink", "teal", "brown")
MATERIALS = ("oak", "walnut", "pine", "steel", "brass", "glass", "marble", "leather", "linen", "velvet", "bamboo", "ceramic")
FINISHES = ("matte", "glossy", "brushed", "polished", "rustic", "modern", "classic", "vintage", "slim", "compact", "large", "tall")
PAGE = 20  # how deep a vector-only text query reads the joint index for a page of 10 (search.answer: k + TIE_DEPTH)
LARGE_AUTO = "PCA256,HNSW32,Refine(Flat)"  # what index.choose_factory takes above 100k items (benchmarks/upsert.py)


def repeated_catalog(path: str, n: int) -> mr.Catalog:
    """The catalog repeated to n rows; each copy's titles get a suffix, so every row is new
    content (identical rows would come from the pipeline's content-hash cache)."""
    base = mr.Catalog.from_csv(path)
    df = base.df.assign(image=base.image_sources())
    reps = -(-n // len(df))
    big = pd.concat([df.assign(title=df["title"] + ("" if c == 0 else f" #{c}")) for c in range(reps)], ignore_index=True).iloc[:n].copy()
    big["id"] = np.arange(1, n + 1)
    return mr.Catalog(big)


def variant_catalog(base: pd.DataFrame, n: int) -> tuple[pd.DataFrame, np.ndarray]:
    """N products from the demo's rows (see the module's doc) and, per row, the demo row it copies."""
    reps = -(-n // len(base))
    words = len(COLOURS) * len(MATERIALS) * len(FINISHES)
    if reps > words:
        raise SystemExit(f"at most {words * len(base):,} items")
    c = np.arange(reps)
    # Every word varies from copy to copy (the finish too: (x // 144 + x) % 12 keeps the 1,728 triples distinct).
    suffix = [f", {COLOURS[x % 12]} {MATERIALS[x // 12 % 12]} {FINISHES[(x // 144 + x) % 12]}" for x in c]
    source = np.tile(np.arange(len(base)), reps)[:n]
    copy = np.repeat(c, len(base))[:n]
    big = base.iloc[source].reset_index(drop=True)
    big["title"] = big["title"].astype(str).to_numpy(object) + np.array(suffix, object)[copy]
    big["id"] = np.arange(1, n + 1)
    return big, source


def fill_cache(r: mr.Retriever, base: mr.Catalog, big: mr.Catalog, source: np.ndarray, cache: Path, text_features: str) -> None:
    """Encode the demo catalog once, then write every large-catalog row's arrays into the shard cache under its
    content hash: the demo row's image arrays, and text arrays encoded from its title (or the demo row's)."""
    from multiretrieval.ingest import hash_catalog, ingest
    from multiretrieval.pipeline import Outcomes, ShardStore

    embedder, cfg = r.embedder, r.config
    encoded, report = ingest(base, embedder, show_progress=True, cache=cache)
    if report.skipped or len(encoded.rows) != len(base):
        raise SystemExit(f"the demo catalog did not encode whole: {report}")
    hashes = hash_catalog(big, cfg)
    store = ShardStore.open(cache, embedder.fingerprint())
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}
    todo = sorted(first[h] for h in dict.fromkeys(hashes) if h not in store)
    texts = big.texts()
    t0 = time.perf_counter()
    size = cfg.ingest.shard_size
    for start in range(0, len(todo), size):
        rows = np.array(todo[start:start + size])
        arrays = {name: value[source[rows]].copy() for name, value in encoded.arrays.items()}
        if text_features == "encode":
            for at in range(0, len(rows), 256):
                part = [texts[i] for i in rows[at:at + 256]]
                tokens, mask = embedder.text_encoder.forward(part, embedder.fusion.text_chunks)
                arrays["text_tokens"][at:at + 256], arrays["text_mask"][at:at + 256] = tokens, mask
                arrays["clip_text"][at:at + 256] = embedder.zero_shot.text_batch(part, tokens[:, 0])
        store.write([hashes[i] for i in rows], Outcomes.empty(len(rows)), arrays)
        done = min(start + size, len(todo))
        print(f"\rcache: {done:,}/{len(todo):,} rows written ({done / max(time.perf_counter() - t0, 1e-9):.0f}/s)", end="", flush=True)
    if todo:
        print()


def percentiles(times: tuple[list[float], list[float]]) -> dict[str, float]:
    """p50 and p90 of the wall-clock milliseconds, and the p50 of this thread's CPU milliseconds (what a busy
    machine changes least; ONNX Runtime's own threads, which embed the query, are not in it)."""
    wall, cpu = times
    return {"p50": round(statistics.median(wall), 3), "p90": round(float(np.percentile(wall, 90)), 3),
            "cpu_p50": round(statistics.median(cpu), 3)}


def timed(fn, inputs) -> tuple[list[float], list[float]]:
    fn(inputs[0])  # warm-up
    wall, cpu = [], []
    for x in inputs:
        t, c = time.perf_counter(), time.thread_time()
        fn(x)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return wall, cpu


def keyword_side(keywords, depth: int, other_keys: dict[str, np.ndarray]):
    """What rank_text asks of the keyword index for one query: the BM25 ranking read ``depth`` deep, the model
    codes among the fused keys, and which of them have a keyword text (``other_keys``: the vector ranking's keys)."""
    from multiretrieval.keywords import identifiers

    def run(text: str) -> None:
        keys, _ = keywords.search(text, depth)
        fused = np.unique(np.concatenate([keys, other_keys.get(text, np.zeros(0, np.int64))]))
        keywords.having(identifiers(text), fused)
        keywords.holds(fused)

    return run


def keyword_figures(keywords, texts: list[str], depth: int, other_keys: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {"keyword side (search + having + holds)": percentiles(timed(keyword_side(keywords, depth, other_keys), texts)),
            "keyword search alone": percentiles(timed(lambda t: keywords.search(t, depth), texts))}


def large_retriever(args, config, base: mr.Catalog, big: mr.Catalog, source: np.ndarray, figures: dict) -> mr.Retriever:
    """The large catalog's retriever: loaded from ``--index-dir`` if a run saved it there, else built from the shard
    cache (filled first) and saved there."""
    if args.index_dir and (Path(args.index_dir) / "manifest.json").is_file():
        t0 = time.perf_counter()
        r = mr.Retriever.load(args.index_dir)
        figures["load_s"] = figures["build_s"] = round(time.perf_counter() - t0, 1)
        if len(r) != args.items:
            raise SystemExit(f"{args.index_dir} holds {len(r):,} items, not {args.items:,}")
        return r
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.workdir or tmp) / "cache"
        r = mr.Retriever(config)
        t0 = time.perf_counter()
        fill_cache(r, base, big, source, cache, args.text_features)
        figures["cache_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        report = r.index(big, show_progress=True, cache=cache)
        figures["build_s"] = round(time.perf_counter() - t0, 1)
        print(str(report).splitlines()[0], flush=True)
    figures["text_features"] = args.text_features
    if args.index_dir:
        r.save(args.index_dir)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default="data/demo/catalog.csv")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--factory", help=f"the index kind (default: {LARGE_AUTO} from 100k items, auto below)")
    parser.add_argument("--text-features", choices=("encode", "reuse"), default="encode")
    parser.add_argument("--keywords-only", action="store_true", help="build and time only the keyword index")
    parser.add_argument("--kinds", action="store_true", help="also time image, fused, zero-shot and filtered text queries")
    parser.add_argument("--workdir", help="where the shard cache goes, kept for later runs (default: a temporary folder)")
    parser.add_argument("--index-dir", help="load the large index from here if a run saved it (at this or another commit: "
                                            "both then time one vector index), else build it and save it here")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = parser.parse_args()

    base = mr.Catalog.from_csv(args.catalog)
    base = mr.Catalog(base.df.assign(image=base.image_sources()))
    frame, source = variant_catalog(base.df, args.items)
    big = mr.Catalog(frame)
    rng = np.random.default_rng(0)
    texts = [big.df["title"].iloc[i] for i in rng.choice(len(big), args.queries, replace=False)]
    factory = args.factory or (LARGE_AUTO if args.items >= 100_000 else "auto")
    config = mr.RetrieverConfig().with_overrides({"index": {"factory": factory}})
    depth = config.search.hybrid_depth + 10  # rank_text reads each ranking this deep (TIE_DEPTH past the depth)
    figures: dict = {"items": args.items, "queries": args.queries, "cpus": os.cpu_count(), "machine": platform.node(),
                     "load": os.getloadavg()[0]}
    rows: dict[str, dict[str, float]] = {}

    if args.keywords_only:
        from multiretrieval.keywords import KeywordIndex, keyword_texts

        keywords = KeywordIndex(config.catalog.text_columns)
        t0 = time.perf_counter()
        keys = np.arange(1, len(frame) + 1, dtype=np.int64)
        step = 100_000
        for start in range(0, len(frame), step):
            keywords.add(keys[start:start + step], keyword_texts(frame.iloc[start:start + step], keywords.columns))
        figures["build_s"] = round(time.perf_counter() - t0, 1)
        figures["index"] = "keywords only"
        rows.update(keyword_figures(keywords, texts, depth, {}))
    else:
        r = large_retriever(args, config, base, big, source, figures)
        figures["index"] = r.indexes["joint"].factory
        from multiretrieval.ranking import restrict, search_index

        items = r.collection
        with_text = restrict(items.store.with_modality("text"), len(items.store), None)
        vectors = {t: r.query_vectors(texts=[t])[0] for t in texts}
        vector_keys = {t: search_index(r.indexes["joint"], vectors[t], depth, with_text).keys for t in texts}
        rows.update(keyword_figures(items.keywords, texts, depth, vector_keys))
        rows["vector side: query embedding"] = percentiles(timed(lambda t: r.query_vectors(texts=[t]), texts))
        rows[f"vector side: index read {depth} deep"] = percentiles(
            timed(lambda t: search_index(r.indexes["joint"], vectors[t], depth, with_text), texts))
        rows[f"vector only: index read {PAGE} deep"] = percentiles(
            timed(lambda t: search_index(r.indexes["joint"], vectors[t], PAGE, with_text), texts))
        rows["text query, hybrid (default)"] = percentiles(timed(lambda t: r.search(text=t, k=10), texts))
        rows["text query, vector only"] = percentiles(timed(lambda t: r.search(text=t, k=10, hybrid="off"), texts))
        if args.kinds:
            images = [big.image_sources()[i] for i in rng.choice(len(big), args.queries, replace=False)]
            rows["image"] = percentiles(timed(lambda p: r.search(image=p, k=10), images))
            rows["fused (image + text)"] = percentiles(timed(lambda i: r.search(image=images[i], text=texts[i], k=10),
                                                             list(range(len(texts)))))
            rows["zero-shot text -> images"] = percentiles(timed(lambda t: r.search(text=t, mode="zero-shot", k=10), texts))
            rows["text + where (category)"] = percentiles(timed(lambda t: r.search(text=t, k=10, where="category = 'Kitchen'"), texts))
    figures["load_after"] = os.getloadavg()[0]

    print(f"\n{args.items:,} items, index {figures['index']}, {os.cpu_count()} CPUs, load average {figures['load']:.1f} "
          f"-> {figures['load_after']:.1f}, {args.queries} queries (titles of random rows), build {figures['build_s']} s\n")
    print("| part | p50 ms | p90 ms | p50 CPU ms (this thread) |")
    print("|---|---|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value['p50']:.2f} | {value['p90']:.2f} | {value['cpu_p50']:.2f} |")
    ratios = {}
    p50 = {name: value["p50"] for name, value in rows.items()}
    if "text query, hybrid (default)" in p50:
        vector_read = next(v for k, v in p50.items() if k.startswith("vector side: index read"))
        extra = p50["text query, hybrid (default)"] - p50["text query, vector only"]
        deeper = vector_read - p50[f"vector only: index read {PAGE} deep"]
        ratios = {"hybrid / vector-only text query": p50["text query, hybrid (default)"] / p50["text query, vector only"],
                  "keyword side / vector index read": p50["keyword side (search + having + holds)"] / vector_read,
                  "hybrid - vector-only text query (ms)": extra,
                  f"  of which the deeper vector read, {depth} - {PAGE} deep (ms)": deeper,
                  "  of which the rest: keywords, fusion, more result rows (ms)": extra - deeper}
        print("\n| ratio (p50) | value |")
        print("|---|---|")
        for name, value in ratios.items():
            print(f"| {name} | {value:.2f} |")
    if args.json:
        print(json.dumps({**figures, "p50_p90_ms": rows, "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
