"""Build the evaluation benchmarks from the Debian packages (nothing is downloaded at run time).

    apt-get download sweethome3d-furniture tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/build_benchmarks.py /tmp/mrdata --out bench
    multiretrieval evaluate bench --out reports/eval
"""

from __future__ import annotations

import argparse

from multiretrieval.evaluation import build_benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder the Debian packages were unpacked into with dpkg -x")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    print(build_benchmarks(args.root, args.out))


if __name__ == "__main__":
    main()
