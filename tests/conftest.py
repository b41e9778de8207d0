"""Shared fixtures. The real packaged models run on CPU; nothing touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def catalog():
    import multiretrieval as mr

    return mr.Catalog.from_csv(FIXTURES / "catalog.csv")


@pytest.fixture(scope="session")
def indexed(catalog):
    """A retriever over the eight fixture items. Tests must not change it (copy via save/load)."""
    import multiretrieval as mr

    retriever = mr.Retriever()
    report = retriever.index(catalog, show_progress=False)
    assert report.indexed == len(catalog) and not report.skipped
    return retriever


@pytest.fixture()
def retriever_copy(indexed, tmp_path):
    """A private copy of the indexed retriever, free to change."""
    import multiretrieval as mr

    indexed.save(tmp_path / "copy")
    return mr.Retriever.load(tmp_path / "copy")


def png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()
