import json
import subprocess
import sys

import pytest

from multiretrieval import cli
from multiretrieval.retriever import MODES


def test_help_does_not_import_the_heavy_libraries():
    code = "import sys; from multiretrieval import cli; cli.build_parser(); print(sorted(m for m in ('torch', 'faiss', 'transformers', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_modes_match_the_api():
    assert cli.MODES == MODES


def test_index_then_search(fixtures, tmp_path, capsys):
    assert cli.main(["index", str(fixtures / "catalog.csv"), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    assert "indexed 8 items" in capsys.readouterr().out
    assert cli.main(["search", str(tmp_path / "idx"), "--text", "a washing machine", "--k", "2", "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in results] == [1, 2] and results[0]["title"] == "Washing machine"
    sheet = tmp_path / "sheet.png"
    assert cli.main(["search", str(tmp_path / "idx"), "--image", str(fixtures / "images" / "bed1.png"), "--text", "sofa",
                     "--where", "price < 1000", "--show", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "Sofa" in out and sheet.stat().st_size > 10_000


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["search", str(tmp_path / "none"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such index folder" in err


def test_unknown_mode_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        cli.main(["search", "idx", "--text", "x", "--mode", "sideways"])
