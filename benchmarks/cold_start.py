"""Cold-start times: each command in a new process, N times, against the same commands at another commit.

    python benchmarks/cold_start.py                          # this checkout only
    python benchmarks/cold_start.py --baseline main --runs 5 # and main's code, with ratios
    python benchmarks/cold_start.py --cpus 2                 # children pinned to 2 CPUs (the target machine's size)

Builds a small saved index (tests/fixtures/catalog.csv, or --catalog) in a temporary folder with each
side's own code, runs every command once untimed (the one-time ONNX export and ConSE label
embeddings, the page cache), then times --runs cold processes of each:

- ``import``: ``python -c "import multiretrieval"``
- ``search --text`` / ``search --image``: ``python -m multiretrieval.cli search INDEX ...``
- ``serve ready``: from starting ``python -m multiretrieval.cli serve INDEX`` to the first 200 from GET /health
- ``index --update``: the same catalog again, nothing to encode

The baseline is a temporary ``git worktree`` at REF, put first on PYTHONPATH of its processes (this checkout for
the others). Both sides share the model cache ($MULTIRETRIEVAL_CACHE). Prints a table of median/min/max
seconds and median(this) / median(baseline), with the machine's load (quote it with the figures: a busy machine
slows cold starts far more than it slows the steady state).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Side:
    """One version of the code: its source folder, its index, its environment."""

    def __init__(self, name: str, code: Path, work: Path, cpus: int | None) -> None:
        self.name, self.code, self.work, self.cpus = name, code, work, cpus
        self.index = work / "idx"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p)}

    def _pin(self) -> None:
        if self.cpus:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: self.cpus])

    def run(self, args: list[str]) -> float:
        """Seconds of one process running ``python args...`` to its end (it must succeed)."""
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=self.work, env=self.env, capture_output=True, text=True,
                              preexec_fn=self._pin, timeout=600)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"[{self.name}] python {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return seconds

    def serve_ready(self) -> float:
        """Seconds from starting the service to its first answer to GET /health."""
        port, log = free_port(), (self.work / "serve.log").open("wb")  # a file: a pipe nobody reads could fill
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "multiretrieval.cli", "serve", str(self.index), "--port", str(port)],
                                cwd=self.work, env=self.env, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=self._pin)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                        if response.status == 200:
                            return time.perf_counter() - t0
                except OSError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"[{self.name}] serve exited ({proc.returncode}):\n{(self.work / 'serve.log').read_text()[-3000:]}")
                if time.perf_counter() - t0 > 300:
                    raise SystemExit(f"[{self.name}] serve not ready after 300 s")
                time.sleep(0.01)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()


def commands(side: Side, catalog: Path, text: str, image: Path) -> dict[str, callable]:
    cli = ["-m", "multiretrieval.cli"]
    return {
        "import multiretrieval": lambda: side.run(["-c", "import multiretrieval"]),
        "search --text": lambda: side.run([*cli, "search", str(side.index), "--text", text, "--k", "5"]),
        "search --image": lambda: side.run([*cli, "search", str(side.index), "--image", str(image), "--k", "5"]),
        "serve ready (GET /health)": side.serve_ready,
        "index --update (nothing new)": lambda: side.run([*cli, "index", str(catalog), "--out", str(side.index), "--update",
                                                          "--no-progress"]),
    }


def measure(side: Side, catalog: Path, text: str, image: Path, runs: int) -> dict[str, list[float]]:
    print(f"[{side.name}] indexing {catalog} with {side.code} ...", file=sys.stderr)
    side.run(["-m", "multiretrieval.cli", "index", str(catalog), "--out", str(side.index), "--no-progress"])
    out = {}
    for name, command in commands(side, catalog, text, image).items():
        command()  # untimed: one-time exports and caches, the page cache
        out[name] = [command() for _ in range(runs)]
        print(f"[{side.name}] {name}: {' '.join(f'{s:.2f}' for s in out[name])} s", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="cold processes per command (default 5)")
    parser.add_argument("--baseline", metavar="REF", help="also time the code at this git commit, branch or tag")
    parser.add_argument("--catalog", type=Path, default=ROOT / "tests" / "fixtures" / "catalog.csv")
    parser.add_argument("--text", default="a red armchair")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "fixtures" / "images" / "bed1.png")
    parser.add_argument("--cpus", type=int, help="pin every timed process to this many CPUs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    sides = [Side("this", ROOT, work / "this", args.cpus)]
    baseline_code = None
    try:
        if args.baseline:
            baseline_code = work / "baseline-code"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline_code), args.baseline],
                           check=True, capture_output=True)
            sides.append(Side(f"baseline {args.baseline}", baseline_code, work / "baseline", args.cpus))
        for side in sides:
            side.work.mkdir(parents=True)
        times = {side.name: measure(side, args.catalog.resolve(), args.text, args.image.resolve(), args.runs) for side in sides}
    finally:
        if baseline_code is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_code)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    cpus = args.cpus or len(os.sched_getaffinity(0))
    print(f"\ncold starts, {args.runs} processes each; this checkout {head}"
          + (f", baseline {args.baseline}" if args.baseline else "")
          + f"; {cpus} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Python {sys.version.split()[0]}\n")
    columns = "| command | median s | min s | max s |" + (" baseline median s | min s | max s | ratio |" if args.baseline else "")
    print(columns)
    print("|" + "---|" * (columns.count("|") - 1))
    for name, mine in times["this"].items():
        row = f"| {name} | {statistics.median(mine):.2f} | {min(mine):.2f} | {max(mine):.2f} |"
        if args.baseline:
            base = times[sides[1].name][name]
            row += (f" {statistics.median(base):.2f} | {min(base):.2f} | {max(base):.2f} |"
                    f" {statistics.median(mine) / statistics.median(base):.2f} |")
        print(row)


if __name__ == "__main__":
    main()
