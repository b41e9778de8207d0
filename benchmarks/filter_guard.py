"""A filter cannot stall the service: refusal latency, the time limit's cut, plain searches meanwhile.

    python benchmarks/filter_guard.py --index indexes/demo

1. A real server (`multiretrieval serve`, loopback) over the index plus 16,384 text-only rows with a
   1,000-character note (written to a temporary folder; filter time limit 0.5 s there): the latency
   of filters with subqueries (refused), of a legal filter, of a legal but slow filter (cut at the
   limit; its uncut time measured in-process), and of plain text searches, idle and while a slow
   filter runs.
2. In-process, without models: an item store of 300,000 rows with 100-character notes and the
   default 2 s limit: how long after the limit the slow filter stops (DuckDB checks for the
   interrupt between chunks of 2,048 rows).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import start_server  # noqa: E402

CROSS_JOIN = "(SELECT sum(a.range * b.range) FROM range(200000) a, range(200000) b) > 0"
SUBQUERY = "id IN (SELECT 1 FROM duckdb_settings())"
TEXTS = ["a washing machine", "a comfortable armchair", "a red car", "a bed with a headboard", "a desk lamp"]


def slow_filter(column: str = "notes") -> str:
    """Legal, and costly on long text: 39 different case conversions measured on every row."""
    terms = ["length(" + "".join(f"{c}(" for c in calls) + column + ")" * len(calls) + ")"
             for n in (1, 2, 3) for calls in itertools.product(("upper", "lower", "trim"), repeat=n)]
    return " + ".join(terms) + " > 0"


def timed(fn, n: int) -> tuple[list[float], list]:
    times, results = [], []
    for i in range(n):
        t = time.perf_counter()
        results.append(fn(i))
        times.append((time.perf_counter() - t) * 1000)
    return times, results


def row(name: str, times: list[float], statuses: list[int]) -> str:
    codes = ", ".join(f"{c} x{statuses.count(c)}" for c in sorted(set(statuses)))
    return (f"| {name} | {len(times)} | {statistics.median(times):.1f} | {np.percentile(times, 99):.1f} | {max(times):.1f} "
            f"| {codes} |")


def build_index(index: str, folder: Path, rows: int, chars: int, limit: float) -> tuple[Path, float]:
    import multiretrieval as mr
    from multiretrieval.config import RetrieverConfig

    config = RetrieverConfig().with_overrides({"search": {"filter_timeout_s": limit}})
    r = mr.Retriever.load(index, config=config)
    r.add(pd.DataFrame({"id": [f"note-{i}" for i in range(rows)] if r.items["id"].dtype == object else range(10**9, 10**9 + rows),
                        "title": "a note", "notes": [f"{i} " + "ab" * (chars // 2) for i in range(rows)]}), show_progress=False)
    r.save(folder)
    started = time.perf_counter()
    r.store.filter(slow_filter(), None)  # uncut
    return folder, time.perf_counter() - started


def service(args) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder, uncut = build_index(args.index, Path(tmp) / "idx", args.rows, args.chars, args.limit)
        proc, url = start_server(str(folder))
        out = []
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                post = lambda **body: http.post("/search", json=body)  # noqa: E731
                post(text="warm-up", where="notes IS NULL")  # DuckDB's copy of the rows
                for name, where in (("refused: the cross join (a subquery)", CROSS_JOIN),
                                    ("refused: IN (SELECT ... duckdb_settings())", SUBQUERY),
                                    ("legal filter `notes IS NULL AND title <> 'x'`", "notes IS NULL AND title <> 'x'")):
                    times, rs = timed(lambda i, w=where: post(text=TEXTS[i % 5], where=w), args.n)
                    out.append(row(name, times, [r.status_code for r in rs]))
                times, rs = timed(lambda i: post(text=TEXTS[i % 5]), args.n)
                out.append(row("plain text search, idle", times, [r.status_code for r in rs]))
                during, statuses, cuts = [], [], []
                for _ in range(args.slow_runs):
                    done = threading.Event()
                    slow: dict = {}

                    def run_slow():
                        t = time.perf_counter()
                        slow["status"] = post(text="a note", where=slow_filter()).status_code
                        slow["ms"] = (time.perf_counter() - t) * 1000
                        done.set()

                    threading.Thread(target=run_slow).start()
                    time.sleep(0.05)
                    i = 0
                    while not done.is_set():
                        t = time.perf_counter()
                        r = post(text=TEXTS[i % 5])
                        if not done.is_set():  # count only searches that ended while the slow filter ran
                            during.append((time.perf_counter() - t) * 1000)
                            statuses.append(r.status_code)
                        i += 1
                    done.wait()
                    cuts.append((slow["ms"], slow["status"]))
                out.append(row(f"slow legal filter, limit {args.limit:g} s (uncut: {uncut:.1f} s)", [c[0] for c in cuts],
                               [c[1] for c in cuts]))
                out.append(row("plain text search while a slow filter runs", during, statuses))
        finally:
            proc.terminate()
            proc.wait(10)
        return out


def in_process(rows: int = 300_000, limit: float = 2.0) -> list[str]:
    from multiretrieval.embedder import FEATURES
    from multiretrieval.errors import LimitError
    from multiretrieval.items import ItemStore

    store = ItemStore()
    features = {n: np.zeros((rows, 1, 1), np.float32) if "tokens" in n else np.zeros((rows, 1), bool) for n in FEATURES}
    notes = [f"{i} " + "ab" * 50 for i in range(rows)]
    store.append(pd.DataFrame({"id": np.arange(rows), "notes": notes}), [None] * rows, features)
    store.filter("id < 0", None)
    started = time.perf_counter()
    store.filter(slow_filter(), None)
    uncut = time.perf_counter() - started
    cuts = []
    for _ in range(3):
        started = time.perf_counter()
        try:
            store.filter(slow_filter(), limit)
            cuts.append(float("nan"))
        except LimitError:
            cuts.append(time.perf_counter() - started)
    return [f"| {rows:,} rows x 100 characters, in-process | {limit:g} | {uncut:.1f} | {statistics.median(cuts):.2f} | "
            f"{(statistics.median(cuts) - limit) * 1000:.0f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="a saved index (e.g. indexes/demo)")
    parser.add_argument("--rows", type=int, default=16_384, help="text-only rows added with a long note")
    parser.add_argument("--chars", type=int, default=1000, help="characters of each note")
    parser.add_argument("--limit", type=float, default=0.5, help="search.filter_timeout_s of the served copy")
    parser.add_argument("-n", type=int, default=50, help="requests per measure")
    parser.add_argument("--slow-runs", type=int, default=5)
    args = parser.parse_args()
    rows = service(args)
    print(f"\nService on loopback, {args.rows:,} extra rows of {args.chars:,}-character notes\n")
    print("| request | n | p50 ms | p99 ms | max ms | statuses |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| store | limit s | uncut s | stopped after s | past the limit ms |")
    print("|---|---|---|---|---|")
    print("\n".join(in_process()))


if __name__ == "__main__":
    main()
