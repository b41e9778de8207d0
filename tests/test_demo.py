from multiretrieval.demo import run_demo


def test_demo_runs_the_four_kinds_of_query(fixtures, tmp_path):
    lines = []
    sheet = run_demo(fixtures / "catalog.csv", tmp_path, k=3, show_progress=False, echo=lines.append)
    text = "\n".join(lines)
    for kind in ('text: "a washing machine"', "image: a photo", "fused: that photo", 'zero-shot: "a car"'):
        assert kind in text
    # "This, but X": a photo of the red armchair (a recoloured variant) + "blue" finds the blue one first.
    after = lines[next(i for i, line in enumerate(lines) if '+ "blue" (this, but in blue)' in line) + 1]
    assert after.splitlines()[1].split()[0] == "1" and after.splitlines()[1].rstrip().endswith("Armchair, blue Living room")
    assert "Washing machine" in text and "Smart car" in text
    from PIL import Image

    assert Image.open(sheet).size[0] > 4 * 128


def test_contact_sheet_captions_fit_their_cell():
    """A long id (a photo's path in its folder) is cut with "..." to a thumbnail's width instead of running
    into the next result's caption."""
    from PIL import Image, ImageDraw, ImageFont

    from multiretrieval.visualize import THUMB, fit_text

    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), ImageFont.load_default()
    long = "#1 0.738 id shop/living room/chairs/RC-100 blue.jpg"
    cut = fit_text(draw, long, font, THUMB)
    assert cut.endswith("...") and long.startswith(cut[:-3]) and draw.textlength(cut, font=font) <= THUMB
    assert fit_text(draw, "#2 0.714 id 56", font, THUMB) == "#2 0.714 id 56"


def test_an_untitled_result_is_captioned_without_nan(tmp_path, monkeypatch):
    """A photo folder's items have no title (NaN in the results): the sheet wrote "nan" under them."""
    import numpy as np
    import pandas as pd

    from multiretrieval import visualize

    written = []
    monkeypatch.setattr(visualize, "fit_text", lambda draw, text, font, width: written.append(text) or text)
    results = pd.DataFrame({"rank": [1, 2], "id": ["a.jpg", "b.jpg"], "score": [0.9, 0.8], "title": [np.nan, "Lamp"]})
    visualize.contact_sheet([visualize.SheetRow('text: "a lamp"', results)], lambda item: None, tmp_path / "s.png")
    assert "nan" not in written and "Lamp" in written and (tmp_path / "s.png").is_file()
