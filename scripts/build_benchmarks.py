"""Build the evaluation benchmarks from the Debian packages (nothing is downloaded at run time).

    apt-get download sweethome3d-furniture tuxpaint-stamps-default openclipart-png
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/build_benchmarks.py /tmp/mrdata --out bench
    multiretrieval evaluate bench --out reports/eval
"""

from __future__ import annotations

import argparse
import json

from multiretrieval.evaluation import build_benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder the Debian packages were unpacked into with dpkg -x")
    parser.add_argument("--out", default="bench")
    parser.add_argument("--no-composed", action="store_true",
                        help="skip the unseen-concepts, composed and fused benchmarks (they need openclipart-png unpacked too)")
    args = parser.parse_args()
    print(json.dumps(build_benchmarks(args.root, args.out, composed=not args.no_composed), indent=1))


if __name__ == "__main__":
    main()
