"""Image shapes under a memory cap: what tests/test_image_bounds.py runs in a subprocess of its own.

The pixel guard bounds width x height, not the shape: a 100000x1 PNG of 370 bytes passes it, and a
resize by the shorter side or a pad to a square then allocates gigabytes. Here each check first runs
on a small image (models loaded, thread pools and allocator arenas made), then caps the address space
(RLIMIT_AS: an allocation past it fails at once with MemoryError instead of taking the machine's
memory) and measures the growth of peak resident memory (Linux resets the peak through
/proc/self/clear_refs) while the odd shapes go through the real code.

    python -c "from tests.bounded_memory import fuzz; fuzz()"              # property-based, every resize
    python -c "from tests.bounded_memory import faces; faces(DIR)"        # index, CLI, /search, POST /items
"""

from __future__ import annotations

import io
import resource
from pathlib import Path

HEADROOM = 1 << 30  # address space allowed past the warmed-up process (allocator arenas and thread stacks map ahead)
MAX_GROWTH = 200 * 2**20  # resident memory an odd image may add at its peak
FUZZ_PIXELS = 4_000_000  # the guard the fuzzer runs under (a tenth of the default, for speed): shapes up to 1 x 4,000,000
EXTREMES = [(100_000, 1), (1, 100_000), (40_000, 2), (20_000, 1)]  # the shapes that exhausted memory


def png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cap_address_space() -> None:
    limit = _status("VmSize") + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def reset_peak() -> int:
    """Reset the peak resident set to the current one; returns the current one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_growth(start: int) -> int:
    return _status("VmHWM") - start


def _check(what: str, run) -> None:
    start = reset_peak()
    run()
    growth = peak_growth(start)
    assert growth < MAX_GROWTH, f"{what}: peak resident memory grew by {growth / 2**20:.0f} MB (at most {MAX_GROWTH / 2**20:.0f})"


def fuzz(max_examples: int = 40) -> None:
    """Every place an image is resized, padded, cropped or thumbnailed, over generated shapes (1xN, Nx1, 2xN, ...,
    up to the pixel guard): decoded by load_image, then the image encoder's preprocessing, OpenCLIP's (its
    default resize-shorter-side-and-centre-crop), the service's thumbnail, a contact-sheet cell and both training views."""
    import tempfile

    import numpy as np
    import open_clip
    import torch
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st
    from PIL import Image

    from multiretrieval.catalog import MAX_CANVAS_SIDE, load_image
    from multiretrieval.encoders import get_image_encoder
    from multiretrieval.encoders.clip import bounded_preprocess
    from multiretrieval.server.app import render_thumbnail
    from multiretrieval.training import augment_image, style_view
    from multiretrieval.visualize import THUMB, _paste

    torch.set_num_threads(1)
    encoder = get_image_encoder("efficientnet-lite0")
    clip_preprocess = bounded_preprocess(open_clip.image_transform(224, is_train=False))
    sheet = Image.new("RGB", (THUMB, THUMB), "white")
    folder = Path(tempfile.mkdtemp())

    def every_resize(size: tuple[int, int]) -> None:
        data = png(size)
        path = folder / f"{size[0]}x{size[1]}.png"
        path.write_bytes(data)
        image = load_image(data, FUZZ_PIXELS)
        assert image.size == size
        assert encoder.preprocess(image).shape == (3, encoder.image_size, encoder.image_size)
        assert clip_preprocess(image).shape == (3, 224, 224)
        thumb = Image.open(io.BytesIO(render_thumbnail(str(path), 256)))
        assert max(thumb.size) <= 256
        _paste(sheet, image, 0, 0)
        rng = np.random.default_rng(0)
        assert max(style_view(image, rng).size) <= 128
        assert max(augment_image(image, rng).size) <= min(max(size), MAX_CANVAS_SIDE)
        path.unlink()

    every_resize((64, 48))  # warm up: models, thread pools, allocator arenas
    cap_address_space()

    shorter = st.one_of(st.integers(1, 4), st.integers(1, 2000))

    @st.composite
    def shapes(draw):
        short = draw(shorter)
        long = draw(st.integers(short, FUZZ_PIXELS // short))
        return (long, short) if draw(st.booleans()) else (short, long)

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(size=shapes())
    @example(size=(FUZZ_PIXELS, 1))
    @example(size=(1, FUZZ_PIXELS))
    @example(size=(2, FUZZ_PIXELS // 2))
    @example(size=(2000, 2000))
    def property_bounded(size: tuple[int, int]) -> None:
        _check(f"{size[0]}x{size[1]} image", lambda: every_resize(size))

    property_bounded()


def faces(folder: str) -> None:
    """The shapes that exhausted memory through the faces: ``index`` (Python API and CLI), the service's
    POST /search upload and POST /items. Each is indexed or answered, with bounded memory."""
    import pandas as pd
    import torch
    from fastapi.testclient import TestClient

    from multiretrieval.cli import main as cli
    from multiretrieval.server.app import create_app

    torch.set_num_threads(1)
    work = Path(folder)
    (work / "images").mkdir()
    rows = [{"id": "normal", "image": "images/normal.png", "title": "a red square"}]
    (work / "images" / "normal.png").write_bytes(png((64, 48)))
    for w, h in EXTREMES:
        (work / "images" / f"{w}x{h}.png").write_bytes(png((w, h)))
        rows.append({"id": f"{w}x{h}", "image": f"images/{w}x{h}.png", "title": "a red line"})
    pd.DataFrame(rows[:1]).to_csv(work / "normal.csv", index=False)
    pd.DataFrame(rows).to_csv(work / "odd.csv", index=False)
    assert cli(["index", str(work / "normal.csv"), "--out", str(work / "served"), "--no-progress"]) == 0

    with TestClient(create_app(work / "served"), base_url="http://127.0.0.1:8000") as client:
        _index_and_serve(work, len(rows), client, cli)


def _index_and_serve(work: Path, items: int, client, cli) -> None:
    import multiretrieval as mr

    def index_api(catalog: str, expected: int) -> None:
        report = mr.Retriever().index(work / catalog, show_progress=False)
        assert report.indexed == expected and not report.skipped, report

    def index_cli(catalog: str) -> None:
        assert cli(["index", str(work / catalog), "--out", str(work / f"cli-{catalog}"), "--no-progress"]) == 0

    def search(data: bytes) -> None:
        answer = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "3"})
        assert answer.status_code == 200, answer.text

    def add(item_id: str, data: bytes) -> None:
        answer = client.post("/items", files={"image": ("q.png", data, "image/png")},
                             data={"metadata": f'{{"id": "{item_id}", "title": "a line"}}'})
        assert answer.status_code == 201, answer.text

    # Every path once with a normal image, then under the cap with the odd ones.
    index_api("normal.csv", 1)
    index_cli("normal.csv")
    search(png((64, 48)))
    add("warm-up", png((64, 48)))
    cap_address_space()
    _check("Retriever.index of 100000x1, 1x100000, 40000x2, 20000x1 images", lambda: index_api("odd.csv", items))
    _check("multiretrieval index of the same", lambda: index_cli("odd.csv"))
    for w, h in EXTREMES:
        data = png((w, h))
        _check(f"POST /search with a {w}x{h} upload", lambda: search(data))
        _check(f"POST /items with a {w}x{h} upload", lambda: add(f"{w}x{h}", data))
