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


def test_an_index_piped_into_a_closed_reader_is_still_saved(fixtures, tmp_path):
    """`multiretrieval index ... | head`: the reader may be gone before the report is printed; the run is saved first,
    and the closed pipe ends it quietly (exit 141, as a shell reports SIGPIPE), without a traceback."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a shell pipe is by default
    env["HF_HUB_OFFLINE"] = "1"
    run = "import sys; from multiretrieval.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", run, "index", str(fixtures / "catalog.csv"), "--out",
                             str(tmp_path / "idx"), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err
    assert (tmp_path / "idx" / "manifest.json").is_file()


def test_a_nightly_file_of_nothing_but_bad_rows_fails_the_job(fixtures, tmp_path, capsys):
    assert cli.main(["index", str(fixtures / "catalog.csv"), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    (tmp_path / "bad.csv").write_text("id,title\n,no id\n56,\n")
    assert cli.main(["index", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "idx"), "--update", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "row 0: empty id" in captured.out and "no row of" in captured.err and "all 2 skipped" in captured.err
    (tmp_path / "empty.csv").write_text("id,title\n")  # a failed export: refused before any model loads
    assert cli.main(["index", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "idx"), "--update", "--prune"]) == 1
    from multiretrieval import Retriever

    assert "empty.csv has no rows" in capsys.readouterr().err and len(Retriever.load(tmp_path / "idx")) == 8


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["search", str(tmp_path / "none"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such index folder" in err


def test_unknown_mode_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        cli.main(["search", "idx", "--text", "x", "--mode", "sideways"])


def test_serve_help_lists_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_serve_loads_the_index_with_the_given_config(indexed, tmp_path, monkeypatch, capsys):
    """serve --config: the app serves the index with that config (search bounds, display), not the saved one."""
    import uvicorn
    from fastapi.testclient import TestClient

    indexed.save(tmp_path / "idx")
    config = tmp_path / "serve.yaml"
    config.write_text("search:\n  max_k: 3\ndisplay:\n  brand: creator\n")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))  # no real server
    assert cli.main(["serve", str(tmp_path / "idx"), "--port", "8123", "--config", str(config)]) == 0
    assert served["port"] == 8123 and "serving" in capsys.readouterr().out
    with TestClient(served["app"], base_url="http://127.0.0.1:8123") as client:
        assert client.app.state.service.retriever.config.search.max_k == 3
        assert client.get("/info").json()["display"]["brand"] == "creator"
        assert client.post("/search", json={"text": "a bed", "k": 3}).status_code == 200
        assert client.post("/search", json={"text": "a bed", "k": 4}).status_code == 422
