"""Load and soak test of the search service on loopback: N concurrent clients for a bounded time.

    python benchmarks/serve_load.py --index indexes/demo --clients 8 32 64 --seconds 300        # the soak
    python benchmarks/serve_load.py --index indexes/demo --clients 1 8 --seconds 15 --kinds text image
    python benchmarks/serve_load.py --index indexes/demo --clients 8 --seconds 60 --kinds text+facets   # as the shop page asks
    python benchmarks/serve_load.py --index indexes/demo --clients 48 --seconds 300 --read-only      # memory drift of reads alone

Starts `multiretrieval serve` on 127.0.0.1 (a free port) over the index, or uses --url (and --pid
for its memory) for a server already running on this machine. Each client sends requests back to
back until the level's deadline. With the default ``--kinds mix`` every client cycles through the
endpoints (text search, filtered text search, photo search, an item, its thumbnail, health, and a
write: PUT of one of 20 items with a photo and a new title, so the index keeps its size; ``--read-only``
leaves the write out) and the table gives requests/s, p50, p99 and errors per endpoint and level; the
server's resident memory is sampled every second and printed at the start, after the level's first
minute and at the end of each level (each the median of 15 s of samples; after a warm-up), with the
highest sample and the drift from the first minute to the end. Other kinds run one endpoint at a time. Traffic goes to 127.0.0.1 only,
every loop stops at its deadline, and a request may take at most 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

TEXTS = ["a washing machine", "a comfortable armchair", "a red car", "a bed with a headboard", "a desk lamp",
         "kitchen cabinet", "a bathtub", "a wooden table", "a plant in a pot", "a computer screen"]
FILTERS = ["width_cm < 100", "category = 'Kitchen' OR category = 'Bathroom'", "width_cm BETWEEN 40 AND 120",
           "lower(title) LIKE '%chair%' OR tags IS NULL"]  # over the demo catalog's columns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="serve-load-", suffix=".log", delete=False)  # a pipe nobody reads would fill
    print(f"server log: {log.name}", file=sys.stderr)
    proc = subprocess.Popen([sys.executable, "-m", "multiretrieval.cli", "serve", index, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {Path(log.name).read_text()[-2000:]}")
    proc.kill()
    raise SystemExit("server did not start within 180 s")


class Memory:
    """The server's resident memory, sampled every second in a thread (psutil)."""

    def __init__(self, pid: int | None) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self.process = None
        if pid is not None:
            import psutil

            self.process = psutil.Process(pid)
            threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> float:
        return self.process.memory_info().rss / 2**20 if self.process else float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append(self.process.memory_info().rss)
            except Exception:  # noqa: BLE001 - the server went away
                return

    def at(self, index: int, window: int = 15) -> float:
        """The median of the ``window`` samples from ``index`` seconds after sampling began (the latest ones if
        there are fewer): a single sample swings by tens of MB with the requests in flight."""
        if not self.samples:
            return float("nan")
        start = max(0, min(index, len(self.samples) - window))
        return float(np.median(self.samples[start:start + window])) / 2**20

    def peak_since(self, index: int) -> float:
        window = self.samples[index:]
        return max(window) / 2**20 if window else float("nan")

    def stop(self) -> None:
        self._stop.set()


WRITTEN_IDS = 20  # the write kind upserts ids 900000000 .. 900000019 again and again: the index keeps its size


def requests_for(kinds: list[str], photo: bytes, ids: list[str], read_only: bool = False) -> dict:
    """Endpoint name -> a function (client, i) -> awaitable response."""
    def write(http, i):
        metadata = json.dumps({"title": f"soak item, version {i}", "price": i % 500})
        # a number: fits an index of integer ids or of texts
        return http.put(f"/items/{900_000_000 + i % WRITTEN_IDS}", files={"image": ("q.png", photo, "image/png")},
                        data={"metadata": metadata})

    every = {
        "text": lambda http, i: http.post("/search", json={"text": TEXTS[i % len(TEXTS)], "k": 10}),
        "text+facets": lambda http, i: http.post("/search", json={"text": TEXTS[i % len(TEXTS)], "k": 24, "facets": True}),
        "text+where": lambda http, i: http.post("/search", json={"text": TEXTS[i % len(TEXTS)], "k": 10,
                                                                 "where": FILTERS[i % len(FILTERS)]}),
        "image": lambda http, i: http.post("/search", files={"image": ("q.png", photo, "image/png")}, data={"k": "10"}),
        "item": lambda http, i: http.get(f"/items/{ids[i % len(ids)]}"),
        "thumbnail": lambda http, i: http.get(f"/items/{ids[i % len(ids)]}/image"),
        "health": lambda http, i: http.get("/health"),
        "write": write,
    }
    if kinds == ["mix"]:
        return {k: v for k, v in every.items() if not (read_only and k == "write")}
    unknown = set(kinds) - set(every)
    if unknown:
        raise SystemExit(f"unknown kinds {sorted(unknown)}; choose mix or some of {sorted(every)}")
    return {k: every[k] for k in kinds}


def run(url: str, clients: int, seconds: float, endpoints: dict) -> dict:
    return asyncio.run(_run(url, clients, seconds, endpoints))


async def _run(url: str, clients: int, seconds: float, endpoints: dict) -> dict:
    """``clients`` asyncio clients (one thread, so the load generator stays light), each cycling through
    the endpoints until the deadline; latencies and errors per endpoint."""
    names = list(endpoints)
    latencies: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, int] = dict.fromkeys(names, 0)
    first_errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, worker: int) -> None:
        i = worker
        while time.perf_counter() < deadline:
            name = names[i % len(names)]
            t = time.perf_counter()
            try:
                response = await endpoints[name](http, i // len(names))
                ok = response.status_code in (200, 307)
                problem = f"{name}: {response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                ok, problem = False, f"{name}: {type(exc).__name__} {exc}"
            if ok:
                latencies[name].append((time.perf_counter() - t) * 1000)
            else:
                errors[name] += 1
                if len(first_errors) < 5:
                    first_errors.append(problem)
            i += clients

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, follow_redirects=False) as http:
        await asyncio.gather(*(client(http, w) for w in range(clients)))
    elapsed = time.perf_counter() - started
    rows = {}
    for name in names:
        lat = latencies[name]
        rows[name] = {"requests": len(lat), "rps": len(lat) / elapsed, "errors": errors[name],
                      "p50": statistics.median(lat) if lat else float("nan"),
                      "p99": float(np.percentile(lat, 99)) if lat else float("nan")}
    return {"rows": rows, "first_errors": first_errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", help="index folder to serve (starts a server)")
    parser.add_argument("--url", help="a server already running on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seconds", type=float, default=300, help="per level (default 300)")
    parser.add_argument("--warmup", type=float, default=10, help="seconds of load before the first memory reading")
    parser.add_argument("--kinds", nargs="+", default=["mix"], help="mix (default), or some of: text text+facets text+where image item "
                                                                      "thumbnail health (each run alone)")
    parser.add_argument("--read-only", action="store_true", help="mix: leave the write out")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON (the soak test reads them)")
    parser.add_argument("--photo", default="data/demo/images/KatorLegaz/futon-couch.png")
    args = parser.parse_args()
    if bool(args.index) == bool(args.url):
        parser.error("give --index or --url")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address")
    proc, url = start_server(args.index) if args.index else (None, args.url)
    memory = Memory(proc.pid if proc else args.pid)
    photo = Path(args.photo).read_bytes()
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            ids = [str(r["id"]) for r in http.post("/search", json={"text": "a chair", "k": 50}).json()["results"]]
        endpoints = requests_for(args.kinds, photo, ids, args.read_only)
        groups = [endpoints] if args.kinds == ["mix"] else [{k: v} for k, v in endpoints.items()]
        if args.warmup:
            run(url, args.clients[0], args.warmup, groups[0])
        results = []
        for group in groups:
            for n in args.clients:
                mark, before = len(memory.samples), memory.now()
                outcome = run(url, n, args.seconds, group)
                after = memory.at(len(memory.samples))  # the median of the last 15 s
                readings = [v for v in (memory.peak_since(mark), before, after) if v == v]  # v == v: not NaN (no --pid)
                peak = max(readings, default=float("nan"))
                minute = memory.at(mark + 60) if args.seconds > 60 else float("nan")
                results.append((n, outcome, before, minute, after, peak))
    finally:
        memory.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(f"\n{url}, {os.cpu_count()} CPUs, {args.seconds:.0f} s per level, kinds {' '.join(args.kinds)}\n")
    print("| clients | endpoint | requests | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for n, outcome, *_ in results:
        for name, r in outcome["rows"].items():
            print(f"| {n} | {name} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    print("\n| clients | requests | errors | resident MiB at start | after 1 min | at end | highest | end - 1 min |")
    print("|---|---|---|---|---|---|---|---|")
    for n, outcome, before, minute, after, peak in results:
        rows = outcome["rows"].values()
        requests, errors = sum(r["requests"] for r in rows), sum(r["errors"] for r in rows)
        print(f"| {n} | {requests} | {errors} | {before:.0f} | {minute:.0f} | {after:.0f} | {peak:.0f} | {after - minute:+.0f} |")
    if args.json:
        levels = [{"clients": n, "endpoints": outcome["rows"], "first_errors": outcome["first_errors"],
                   "memory_mib": {"start": before, "after_1_min": minute, "end": after, "highest": peak}}
                  for n, outcome, before, minute, after, peak in results]
        levels[-1]["memory_every_10s_mib"] = [round(v / 2**20) for v in memory.samples[::10]]  # of the whole run
        Path(args.json).write_text(json.dumps({"seconds": args.seconds, "kinds": args.kinds, "levels": levels}, indent=1))
    problems = [p for _, outcome, *_ in results for p in outcome["first_errors"]]
    if problems:
        print("\nfirst errors:\n" + "\n".join(problems[:10]))


if __name__ == "__main__":
    main()
