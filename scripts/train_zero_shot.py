"""Train the LiT zero-shot projections that ship in multiretrieval/weights/ (reproduces them).

    apt-get download sweethome3d-furniture openclipart-png tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" /tmp/mrdata; done
    python scripts/train_zero_shot.py /tmp/mrdata

Training data (DESIGN.md): sweethome3d-furniture, openclipart-png and the TRAINING split of
tuxpaint-stamps-default; the tuxpaint evaluation split is never read here. Features of each
data set are cached under --cache, so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402

from multiretrieval.catalog import Catalog  # noqa: E402
from multiretrieval.datasets import read_openclipart, read_sweethome3d_furniture, read_tuxpaint_stamps  # noqa: E402
from multiretrieval.encoders.clip import PACKAGED_LIT  # noqa: E402
from multiretrieval.training import encode_catalog, fit_zero_shot  # noqa: E402


def training_catalogs(root: Path, cache: Path) -> dict[str, Catalog]:
    df, images = read_sweethome3d_furniture(root)
    image_dir = cache / "sweethome3d-images"
    for rel, data in images.items():
        (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (image_dir / rel).write_bytes(data)
    sh3d = df.assign(id=df["source_id"], image=[str(image_dir / p) for p in df["image"]],
                     description=df["category"] + ". " + df["tags"].fillna(""))
    tux = read_tuxpaint_stamps(root)
    tux = tux[tux["split"] == "train"]  # the eval split is reserved for `multiretrieval evaluate`
    clip = read_openclipart(root)
    clip = clip.assign(description=clip["category"])
    return {
        "sweethome3d": Catalog(sh3d[["id", "image", "title", "description"]]),
        "openclipart": Catalog(clip[["id", "image", "title", "description"]]),
        "tuxpaint-train": Catalog(pd.DataFrame(tux[["id", "image", "title"]])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder the three Debian packages were unpacked into with dpkg -x")
    parser.add_argument("--out", type=Path, default=PACKAGED_LIT)
    parser.add_argument("--cache", type=Path, default=Path(".cache/zero-shot"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    catalogs = training_catalogs(args.root, args.cache)
    pairs = {name: encode_catalog(cat, args.cache / f"{name}.npz", show_progress=True) for name, cat in catalogs.items()}
    report = fit_zero_shot(pairs, args.out, seed=args.seed, show_progress=True)
    v = report["validation"]
    print(f"wrote {args.out} ({report['trainable_parameters']:,} trained parameters, {report['epochs_run']} epochs)")
    print(f"held-out text->image: LiT {v['lit']}, ConSE {v['conse']}, best ConSE weight {v['best_conse_weight']}: {v['mixed']}")


if __name__ == "__main__":
    main()
