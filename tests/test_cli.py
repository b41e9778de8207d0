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
    search = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["search"]._actions if a.dest == "mode")
    assert tuple(search.choices) == MODES


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


@pytest.mark.parametrize("flags,logged", [([], True), (["--no-access-log"], False)])
def test_serve_logs_each_request_unless_told_not_to(indexed, tmp_path, monkeypatch, capfd, flags, logged):
    """uvicorn as serve runs it: one line a request on stdout (it ran with log_level="warning", which kept its access
    log quiet), none with --no-access-log; uvicorn's own start-up chatter stays below warnings either way."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    indexed.save(tmp_path / "idx")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    assert cli.main(["serve", str(tmp_path / "idx"), *flags]) == 0
    app = served.pop("app")
    del served["host"], served["port"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, **served))  # what uvicorn.run would start, on a free port
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.1)
    try:
        assert httpx.get(f"http://127.0.0.1:{sock.getsockname()[1]}/health?probe=1").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    out, err = capfd.readouterr()
    assert ('"GET /health?probe=1 HTTP/1.1" 200' in out) is logged, out
    assert "Uvicorn running" not in out + err


def shop_export(folder, header: str, rows: list[str], sep: str = ","):
    """A shop's export beside two of the fixture photos (bed1.png, desk_lamp1.png)."""
    from pathlib import Path

    images = Path(__file__).parent / "fixtures" / "images"
    for name in ("bed1.png", "desk_lamp1.png"):
        if not (folder / name).exists():
            (folder / name).symlink_to(images / name)
    path = folder / "export.csv"
    path.write_text("\n".join([header, *rows]).replace(",", sep) + "\n")
    return path


def test_index_announces_the_image_column_it_found_and_indexes_its_images(tmp_path, monkeypatch, capsys):
    """Issue 31: `id,title,description,price,category,image_url` (here semicolon-separated, indexed from another
    directory) was indexed by its texts alone, silently."""
    shop = tmp_path / "shop"
    shop.mkdir()
    path = shop_export(shop, "id,title,description,price,category,image_url",
                       ["1,Bed,double bed,650,Bedroom,bed1.png", "2,Desk lamp,for reading,39,Office,desk_lamp1.png"], sep=";")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["index", "shop/export.csv", "--out", "idx", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "shop/export.csv: images from column 'image_url' (found by its name)" in captured.err
    assert "text only 0, skipped 0" in captured.out and "images from column 'image_url'" in captured.out
    assert cli.main(["search", "idx", "--image", str(path.parent / "desk_lamp1.png"), "--k", "1", "--format", "json"]) == 0
    hit = json.loads(capsys.readouterr().out)[0]
    assert hit["id"] == 2 and hit["score"] > 0.99 and hit["image"] == "desk_lamp1.png"


def test_index_takes_the_image_column_named_and_says_when_there_is_none(tmp_path, capsys):
    path = shop_export(tmp_path, "id,title,main,alt", ["1,Bed,bed1.png,desk_lamp1.png"])
    assert cli.main(["index", str(path), "--out", str(tmp_path / "idx"), "--image-column", "alt", "--no-progress"]) == 0
    assert "images from column 'alt' (as named)" in capsys.readouterr().err
    from multiretrieval import Retriever

    assert Retriever.load(tmp_path / "idx").image_source(1) == str(tmp_path / "desk_lamp1.png")
    text = shop_export(tmp_path, "id,title,price", ["1,Bed,650", "2,Lamp,39"])
    assert cli.main(["index", str(text), "--out", str(tmp_path / "idx2"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert ("no image column: every item is indexed by its text; name it with --image-column / catalog.image_column"
            in captured.err) and "text only 2" in captured.out
    assert cli.main(["index", str(tmp_path), "--out", str(tmp_path / "idx3"), "--image-column", "photo"]) == 2
    assert "a folder, whose images are its files" in capsys.readouterr().err


def test_an_index_whose_every_image_failed_exits_3_with_one_line(tmp_path, capsys):
    path = shop_export(tmp_path, "id,title,image_url", ["1,Bed,gone/bed.png", "2,Lamp,gone/lamp.png"])
    assert cli.main(["index", str(path), "--out", str(tmp_path / "idx"), "--no-progress"]) == 3
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [(f"error: none of the 2 images could be used (first: row 0 (id 1): indexed by its text only: "
                       f"{tmp_path}/gone/bed.png: file not found); the 2 items indexed are indexed by their text only, and "
                       "image queries will not find them")]
    assert "saved to" in captured.out  # the texts are indexed and saved
    with pytest.raises(SystemExit):
        cli.main(["index", "--help"])
    assert "3 indexed and saved, but none of the images" in " ".join(capsys.readouterr().out.split())


def test_a_missing_folder_is_named_as_a_folder_with_what_is_near(tmp_path, capsys):
    (tmp_path / "photos_2024").mkdir()
    assert cli.main(["index", f"{tmp_path}/photos/", "--out", str(tmp_path / "idx")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/photos/: folder not found; did you mean {tmp_path}/photos_2024?\n"


def test_a_refused_filter_is_one_line_and_verbose_adds_the_grammar(indexed, tmp_path, capsys):
    indexed.save(tmp_path / "idx")
    args = ["search", str(tmp_path / "idx"), "--text", "sofa", "--where", "categroy = 'Kitchen'"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'category'?" in err and "A filter is one condition" not in err
    assert cli.main(["-v", *args]) == 2
    assert "A filter is one condition over the catalog's columns" in capsys.readouterr().err
