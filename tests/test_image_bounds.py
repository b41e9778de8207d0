"""Images of any shape within the pixel guard cost bounded memory (a 100000x1 PNG of 370 bytes took the
indexer to 17 GB): every resize, pad and crop is checked under a memory cap, in a subprocess of its own
(tests/bounded_memory.py), so that a regression fails at once instead of exhausting the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux's /proc/self/clear_refs (to measure peak resident memory)")


def _run(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


def test_every_resize_has_bounded_memory_for_any_shape():
    """Property-based: shapes 1xN, Nx1, 2xN, ... up to the pixel guard through load_image, both encoders'
    preprocessing, the service's thumbnail, a contact-sheet cell and the training views."""
    _run("from tests.bounded_memory import fuzz; fuzz()")


def test_extreme_shapes_index_and_serve_with_bounded_memory(tmp_path):
    """100000x1, 1x100000, 40000x2 and 20000x1 PNGs through Retriever.index, `multiretrieval index`, the service's
    POST /search upload and POST /items: indexed and answered, each under 200 MB of extra resident memory."""
    _run(f"from tests.bounded_memory import faces; faces({str(tmp_path)!r})")
