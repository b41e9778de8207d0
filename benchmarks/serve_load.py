"""Load test of the search service on loopback: N concurrent clients for a bounded time.

    python benchmarks/serve_load.py --index indexes/demo --clients 8 --seconds 20

Starts `multiretrieval serve` on 127.0.0.1 (a free port) over the index, or uses --url
for a server already running on this machine. Each client sends queries back to back;
prints requests/s, p50, p99 and the error count for text queries and for image queries.
Traffic goes to 127.0.0.1 only, and every loop stops at the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

TEXTS = ["a washing machine", "a comfortable armchair", "a red car", "a bed with a headboard", "a desk lamp",
         "kitchen cabinet", "a bathtub", "a wooden table", "a plant in a pot", "a computer screen"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "multiretrieval.cli", "serve", index, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def run(url: str, clients: int, seconds: float, make_request) -> dict:
    """``clients`` concurrent asyncio clients (one thread, so the load generator stays light) until the deadline."""
    return asyncio.run(_run(url, clients, seconds, make_request))


async def _run(url: str, clients: int, seconds: float, make_request) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient, worker: int) -> None:
        nonlocal errors
        i = worker
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                ok = (await make_request(http, i)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append((time.perf_counter() - t) * 1000)
            else:
                errors += 1
            i += clients

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http, w) for w in range(clients)))
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": float(np.percentile(latencies, 99)) if latencies else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", help="index folder to serve (starts a server)")
    parser.add_argument("--url", help="a server already running on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--photo", default="data/demo/images/KatorLegaz/futon-couch.png")
    args = parser.parse_args()
    if bool(args.index) == bool(args.url):
        parser.error("give --index or --url")
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address")
    proc, url = start_server(args.index) if args.index else (None, args.url)
    photo = Path(args.photo).read_bytes()
    kinds = {
        "text": lambda http, i: http.post("/search", json={"text": TEXTS[i % len(TEXTS)], "k": 10}),
        "image": lambda http, i: http.post("/search", files={"image": ("q.png", photo, "image/png")}, data={"k": "10"}),
    }
    try:
        rows = [(kind, n, run(url, n, args.seconds, fn)) for kind, fn in kinds.items() for n in args.clients]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    print(f"\n{url}, {os.cpu_count()} CPUs, {args.seconds:.0f} s per row\n")
    print("| query | clients | requests | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for kind, n, r in rows:
        print(f"| {kind} | {n} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")


if __name__ == "__main__":
    main()
