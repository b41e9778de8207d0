"""Rebuild data/demo (catalog.csv, images/, licences) from the Debian package sweethome3d-furniture.

    apt-get download sweethome3d-furniture && dpkg -x sweethome3d-furniture_*.deb /tmp/sh3d
    python scripts/build_demo_catalog.py /tmp/sh3d

Every pack of the package is CC-BY 3.0 or CC0, so all 820 items go into the demo.
"""

from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

from multiretrieval.datasets import SWEETHOME3D_FURNITURE_DIR, SWEETHOME3D_LICENSES, read_sweethome3d_furniture


def demo_price(df):
    """A made-up price in euros, so the demo looks like a shop (sorting, price filters): it grows with
    the piece's volume (litres ** 0.75) and ends in .99. It is NOT data from the package."""
    import numpy as np

    litres = (df["width_cm"] * df["depth_cm"] * df["height_cm"] / 1000).fillna(10)
    return np.floor(19 + 1.2 * litres ** 0.75) + 0.99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_root", help="folder that dpkg -x unpacked sweethome3d-furniture into")
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    args = parser.parse_args()

    out = Path(args.out)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    df, images = read_sweethome3d_furniture(args.package_root)
    for rel, data in images.items():
        path = out / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    df.insert(0, "id", range(1, len(df) + 1))
    df["price"] = demo_price(df)
    df["image"] = "images/" + df["image"]
    df.to_csv(out / "catalog.csv", index=False)

    # Licences: each pack's own LICENSE.TXT, plus the Debian copyright file.
    licences = out / "licenses"
    licences.mkdir(exist_ok=True)
    furniture = Path(args.package_root) / SWEETHOME3D_FURNITURE_DIR
    for pack in SWEETHOME3D_LICENSES:
        with zipfile.ZipFile(furniture / f"{pack}.sh3f") as zf:
            (licences / f"{pack}-LICENSE.TXT").write_bytes(zf.read("LICENSE.TXT"))
    copyright_file = Path(args.package_root) / "usr/share/doc/sweethome3d-furniture/copyright"
    if copyright_file.is_file():
        shutil.copy(copyright_file, licences / "debian-copyright")
    print(f"wrote {len(df)} items to {out / 'catalog.csv'}")


if __name__ == "__main__":
    main()
