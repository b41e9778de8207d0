"""Two `multiretrieval evaluate` results side by side, figure by figure.

    python benchmarks/compare_evaluations.py BASE/results.json NEW/results.json [--tolerance 0.01] [--top 25]

Every number both runs report is compared, except timings (``seconds``), counts (``n``, ``items``, ``queries``,
``catalog``, ``categories``, ``epochs``, training pairs, query kinds), settings (``conse_weight``) and anything under
``config``. Prints the largest moves, how many figures moved by more than the tolerance (absolute), and the
figures that exist in one run only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SKIP = {"seconds", "n", "items", "queries", "catalog", "categories", "epochs", "epochs_run", "pairs", "kinds", "config", "conse_weight"}


def figures(tree, path: str = ""):
    """(path, value) of every number in a results tree, skipping timings and counts."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in SKIP:
                yield from figures(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from figures(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    base, new = (dict(figures(json.loads(p.read_text()))) for p in (args.base, args.new))
    shared = sorted(set(base) & set(new))
    moves = sorted(((new[k] - base[k], k) for k in shared), key=lambda m: -abs(m[0]))
    over = [m for m in moves if abs(m[0]) > args.tolerance + 1e-12]
    print(f"{len(shared)} figures in both; {len(over)} moved by more than {args.tolerance}; "
          f"mean move {sum(m for m, _ in moves) / max(1, len(moves)):+.4f}, mean |move| {sum(abs(m) for m, _ in moves) / max(1, len(moves)):.4f}")
    print(f"| figure | base | new | move |\n|---|---|---|---|")
    for move, key in moves[:args.top]:
        print(f"| {key} | {base[key]:.4f} | {new[key]:.4f} | {move:+.4f} |")
    for name, only in (("base", set(base) - set(new)), ("new", set(new) - set(base))):
        if only:
            print(f"only in {name}: {', '.join(sorted(only)[:10])}{' ...' if len(only) > 10 else ''}")


if __name__ == "__main__":
    main()
