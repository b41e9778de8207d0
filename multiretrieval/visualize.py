"""Contact sheets: a query, then its top results as thumbnails with id and score, one row per query."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from .catalog import load_image, shrink_to

logger = logging.getLogger(__name__)
THUMB = 128
PAD = 8
CAPTION = 34


@dataclass
class SheetRow:
    label: str  # what was asked, e.g. 'text: "a washing machine"'
    results: pd.DataFrame  # a search() result
    query_image: Image.Image | None = None


def contact_sheet(rows: Sequence[SheetRow], image_of: Callable[[object], str | None], path: str | Path) -> Path:
    """Draw each query (its photo, or its text) and its results; ``image_of(id)`` gives an item's image."""
    font = ImageFont.load_default()
    columns = 1 + max((len(r.results) for r in rows), default=0)
    cell_w, cell_h = THUMB + PAD, THUMB + CAPTION + PAD
    sheet = Image.new("RGB", (PAD + columns * cell_w, PAD + len(rows) * (cell_h + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = PAD + r * (cell_h + 14)
        draw.text((PAD, y), row.label[:150], fill="black", font=font)
        y += 14
        if row.query_image is not None:
            _paste(sheet, row.query_image, PAD, y)
        else:  # a text query: write the words in the box
            words = row.label.split(":", 1)[-1].strip()
            for i, line in enumerate(textwrap.wrap(words, 20)[:8]):
                draw.text((PAD + 6, y + 8 + 14 * i), line, fill="black", font=font)
        draw.rectangle([PAD, y, PAD + THUMB - 1, y + THUMB - 1], outline="blue", width=2)
        draw.text((PAD + 4, y + THUMB + 2), "query", fill="blue", font=font)
        for c, result in enumerate(row.results.itertuples(index=False), start=1):
            x = PAD + c * cell_w
            source = image_of(result.id)
            if source is not None:
                try:
                    _paste(sheet, load_image(source), x, y)
                except Exception as exc:  # noqa: BLE001 - a missing thumbnail must not stop the sheet
                    logger.warning("contact sheet: no thumbnail for id %r: %s", result.id, exc)
                    draw.text((x + 4, y + 4), "(no image)", fill="gray", font=font)
            title = getattr(result, "title", "")
            title = "" if pd.isna(title) else str(title)  # an untitled item's title is NaN: no "nan" caption
            caption = fit_text(draw, f"#{result.rank} {result.score:.3f} id {result.id}", font, THUMB)  # long ids cut, not overlapping
            draw.text((x, y + THUMB + 2), caption, fill="black", font=font)
            draw.text((x, y + THUMB + 16), fit_text(draw, title, font, THUMB), fill="dimgray", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text``, cut and ended with "..." where it would be wider than ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _paste(sheet: Image.Image, image: Image.Image, x: int, y: int) -> None:
    thumb = shrink_to(image, THUMB)  # not image.copy().thumbnail(): no copy of a large image
    sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
