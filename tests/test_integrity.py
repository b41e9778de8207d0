"""Regression tests for issue 16: indexed items lost or corrupted on ordinary paths.

One test (or a few) per numbered point of the issue; each failed on the code before the fix.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import multiretrieval as mr
from multiretrieval.cli import main as cli

from .conftest import png_bytes

LOCAL = "http://127.0.0.1:8000"


def _write_catalog(path: Path, rows: list[str]) -> None:
    path.write_text("id,image,title\n" + "\n".join(rows) + "\n")


# ---------------------------------------------------------------- 1. re-indexing keeps every good row


def test_reindexing_with_a_bad_row_keeps_every_good_row(fixtures, tmp_path, capsys):
    """Point 1: the shard cache read good rows back as errors (NaN), so a re-run dropped them."""
    (tmp_path / "good.png").write_bytes((fixtures / "images" / "bed1.png").read_bytes())
    (tmp_path / "empty.png").write_bytes(b"")
    catalog = tmp_path / "c.csv"
    _write_catalog(catalog, ["1,good.png,Bed", "2,empty.png,"])  # no title: a bad image skips the row
    out = str(tmp_path / "ix")
    assert cli(["index", str(catalog), "--out", out, "--no-progress"]) == 0
    first = mr.Retriever.load(out)
    assert first.items["id"].tolist() == [1]

    assert cli(["index", str(catalog), "--out", out, "--no-progress"]) == 0  # the same catalog again: all from the cache
    printed = capsys.readouterr().out
    assert "row 0" not in printed and "nan" not in printed
    _write_catalog(catalog, ["1,good.png,Bed", "2,empty.png,", "3,,A text-only row"])
    assert cli(["index", str(catalog), "--out", out, "--no-progress"]) == 0

    again = mr.Retriever.load(out)
    assert again.items["id"].tolist() == [1, 3]
    assert [s.id for s in again.last_report.skipped] == [2] if again.last_report else True
    report = json.loads((Path(out) / "index-report.json").read_text())
    assert [s["id"] for s in report["skipped"]] == [2] and "empty file" in report["skipped"][0]["reason"]
    for name, value in first.features().items():  # the good row's vectors are the first run's
        np.testing.assert_array_equal(again.features()[name][:1], value)


# ---------------------------------------------------------------- 2. ids keep their type and value


@pytest.mark.parametrize("bad_id", [1.5, 99999999999999999999, float("inf"), True])
def test_ids_that_cannot_be_kept_exactly_are_refused_naming_the_row(bad_id):
    with pytest.raises(mr.CatalogError, match=r"row 1.*id"):
        mr.Catalog(pd.DataFrame({"id": pd.Series([7, bad_id], dtype=object), "title": ["a", "b"]}))


def test_csv_ids_keep_their_text_exactly(tmp_path):
    """Integer-looking ids become int64 only when every id is a plain integer that fits;
    otherwise every id stays the string it was ("007" is not 7; 20 digits are not -2**63)."""
    path = tmp_path / "c.csv"
    path.write_text("id,title\n99999999999999999999,big\n007,seven\n")
    assert mr.Catalog.from_csv(path).df["id"].tolist() == ["99999999999999999999", "007"]
    path.write_text("id,title\n12,twelve\n-3,minus three\n")
    assert mr.Catalog.from_csv(path).df["id"].tolist() == [12, -3]


def test_csv_cells_are_read_as_written_not_as_pandas_guesses(tmp_path):
    """Ids "NA" and "null" are ids (pandas read them as gaps: an upsert of the CSV with prune deleted those items);
    an SKU "007" keeps its zeros; "NA" in a column of numbers is a gap; a brand "None" is a brand."""
    rows = [{"id": "NA", "title": "a lamp", "sku": "007", "price": "1.5", "brand": "None"},
            {"id": "null", "title": "a chair", "sku": "0042", "price": "NA", "brand": "NA"},
            {"id": "x", "title": "a sofa", "sku": "9", "price": "", "brand": "Acme"}]
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    cat = mr.Catalog.from_csv(tmp_path / "c.csv")
    assert cat.df["id"].tolist() == ["NA", "null", "x"]
    assert cat.df["sku"].tolist() == ["007", "0042", "9"] and cat.df["brand"].tolist() == ["None", "NA", "Acme"]
    assert cat.df["price"].iloc[0] == 1.5 and cat.df["price"].iloc[1:].isna().all()
    (tmp_path / "d.csv").write_text('id,title,sku,qty\n1,a,"  007", 5\n2,b,42,6\n')  # spaces in front change nothing
    assert mr.Catalog.from_csv(tmp_path / "d.csv").df[["sku", "qty"]].values.tolist() == [["  007", 5], ["42", 6]]

    lines = [{**row, "price": price} for row, price in zip(rows, [1.5, None, None])]  # the same catalog as JSON Lines
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = mr.Retriever()
    r.index(tmp_path / "c.jsonl", show_progress=False)
    report = r.upsert(tmp_path / "c.csv", prune=True, show_progress=False)
    assert (report.changes["unchanged"], report.changes["removed"]) == (3, 0)
    assert r.items["id"].tolist() == ["NA", "null", "x"] and r.get("x")["sku"] == "9"


def test_a_first_row_longer_than_the_header_is_refused_not_shifted(tmp_path):
    """pandas read the extra leading fields as an index: every column moved one place, and id 1 became 'A'."""
    path = tmp_path / "c.csv"
    path.write_text("id,image,title\n1,,A,extra,more\n2,,B\n")
    with pytest.raises(mr.CatalogError, match=r"c.csv: row 0 has 5 fields, the header 3 \(id, image, title\)"):
        mr.Catalog.from_csv(path)


def test_minus_zero_is_an_id_of_its_own_not_the_item_0(tmp_path):
    r = mr.Retriever()
    r.index(pd.DataFrame({"id": ["0", "x"], "title": ["zero", "ex"]}), show_progress=False)
    r.upsert(pd.DataFrame({"id": ["-0"], "title": ["minus zero"]}), show_progress=False)  # int("-0") made it item 0
    assert r.get("0")["title"] == "zero" and r.get("-0")["title"] == "minus zero"
    (tmp_path / "c.csv").write_text("id,title\n0,zero\n-0,minus zero\n")
    assert mr.Catalog.from_csv(tmp_path / "c.csv").df["id"].tolist() == ["0", "-0"]


def test_integer_ids_past_2_53_beside_an_empty_id_are_kept_exactly_or_refused(tmp_path):
    """A column of integers with a gap is floats in pandas, which round past 2**53: 2**53 + 1 became 2**53."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = 2**53 + 1
    lines = [{"id": big, "title": "a lamp"}, {"id": None, "title": "no id"}, {"id": big + 2, "title": "a chair"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert mr.Catalog.read(tmp_path / "c.jsonl", bad_rows="skip").df["id"].tolist() == [big, big + 2]
    pq.write_table(pa.table({"id": pa.array([big, None, big + 2], pa.int64()), "title": ["a", "b", "c"]}), tmp_path / "c.parquet")
    assert mr.Catalog.read(tmp_path / "c.parquet", bad_rows="skip").df["id"].tolist() == [big, big + 2]
    with pytest.raises(mr.CatalogError, match=r"row 0: id 9007199254740992 came as a float .* from 2\*\*53 on"):  # big, rounded
        mr.Catalog(pd.DataFrame({"id": [big, None, 7], "title": ["a", "b", "c"]}), bad_rows="skip")


def test_an_id_named_twice_in_remove_is_one_item_removed():
    r = mr.Retriever()
    r.index(pd.DataFrame({"id": [8, 9, 10], "title": ["a lamp", "a chair", "a sofa"]}), show_progress=False)
    assert r.remove(["9", 9]) == 1 and r.items["id"].tolist() == [8, 10]


def test_added_ids_must_match_the_index_id_kind(retriever_copy):
    with pytest.raises(mr.CatalogError, match="row 0.*'abc'.*integer"):
        retriever_copy.add(pd.DataFrame({"id": ["abc"], "title": ["x"]}))
    assert retriever_copy.items["id"].dtype == np.int64
    retriever_copy.add(pd.DataFrame({"id": ["12"], "title": ["a lamp"]}))  # a plain integer as text is the integer
    assert retriever_copy.items["id"].dtype == np.int64 and 12 in set(retriever_copy.items["id"])


@pytest.fixture()
def client(indexed, tmp_path):
    from fastapi.testclient import TestClient

    from multiretrieval.server import create_app

    indexed.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx"), base_url=LOCAL) as c:
        c.index_dir = tmp_path / "idx"
        yield c


def test_a_float_id_posted_to_the_service_is_refused_and_corrupts_nothing(client):
    r = client.post("/items", data={"metadata": json.dumps({"id": 1.5, "title": "half"})}, headers={"Origin": LOCAL})
    assert r.status_code == 400 and "id" in r.json()["detail"]
    assert client.get("/items/575").json()["id"] == 575
    r = client.post("/items", data={"metadata": json.dumps({"id": 99999999999999999999, "title": "big"})}, headers={"Origin": LOCAL})
    assert r.status_code == 400
    assert mr.Retriever.load(client.index_dir).items["id"].dtype == np.int64


# ---------------------------------------------------------------- 3. one bad query fails alone


def test_a_failing_call_in_a_micro_batch_fails_alone():
    from multiretrieval.server.batching import MicroBatcher

    def forward(texts):
        if any("bad" in t for t in texts):
            raise TypeError("cannot encode")
        return (np.array([len(t) for t in texts]),)

    gate = threading.Event()
    batcher = MicroBatcher(lambda texts: (gate.wait(5), forward(texts))[1], max_batch=64, max_wait_s=0.2)
    results: dict[str, object] = {}

    def call(text):
        try:
            results[text] = int(batcher([text])[0][0])
        except Exception as exc:  # noqa: BLE001
            results[text] = exc

    threads = [threading.Thread(target=call, args=(t,)) for t in ("aa", "bad", "cccc", "d")]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(10)
    assert results["aa"] == 2 and results["cccc"] == 4 and results["d"] == 1
    assert isinstance(results["bad"], TypeError)


def test_bad_and_huge_query_texts_get_a_400_without_touching_other_queries(client):
    from concurrent.futures import ThreadPoolExecutor

    def post(text):  # json.dumps escapes a lone surrogate as \\ud800, as a browser's JSON.stringify does
        body = json.dumps({"text": text, "k": 2})
        return client.post("/search", content=body, headers={"Content-Type": "application/json"}).status_code

    texts = ["a washing machine", "\ud800", "a car", "a bed\udfff", "a lamp"] * 8
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, texts))
    assert [c for t, c in zip(texts, codes) if "\ud800" not in t and "\udfff" not in t] == [200] * 24
    assert {c for t, c in zip(texts, codes) if "\ud800" in t or "\udfff" in t} == {400}
    r = client.post("/search", json={"text": "x" * 9_000_000, "k": 2})
    assert r.status_code in (413, 422)


def test_texts_are_bounded_before_the_tokenizer():
    """A 5 MB text cell is clipped to what the tokenizer would keep anyway (it cost 7.6 GB per 50 MB)."""
    from multiretrieval.encoders import get_text_encoder

    encoder = get_text_encoder("minilm-l6")
    huge = "a red sofa with soft cushions " * 200_000
    np.testing.assert_array_equal(encoder.forward([huge])[0], encoder.forward([huge[: encoder.max_chars]])[0])
    assert encoder.max_chars < 10_000


def test_a_catalog_text_that_is_not_unicode_skips_its_row_only(tmp_path):
    r = mr.Retriever()
    titles = pd.Series(["a lamp", "a bad \ud800 text"], dtype=object)  # pandas' own string type refuses it already
    report = r.index(pd.DataFrame({"id": [1, 2], "title": titles}), show_progress=False)
    assert r.items["id"].tolist() == [1]
    assert [s.id for s in report.skipped] == [2] and "Unicode" in report.skipped[0].reason


# ---------------------------------------------------------------- 4. special files and slow URLs do not hang


def _index_in_thread(retriever, frame, timeout):
    box = {}

    def work():
        try:
            box["report"] = retriever.index(frame, show_progress=False)
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "indexing hung"
    if "error" in box:
        raise box["error"]
    return box["report"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_are_skipped_not_read(tmp_path, fixtures):
    os.mkfifo(tmp_path / "pipe.png")
    frame = pd.DataFrame({"id": [1, 2, 3], "image": [str(tmp_path / "pipe.png"), "/dev/zero", str(fixtures / "images" / "bed1.png")],
                          "title": [None, None, "bed"]})  # no titles: a bad image skips the row
    report = _index_in_thread(mr.Retriever(), frame, 60)
    assert report.indexed == 1
    reasons = {s.id: s.reason for s in report.skipped}
    assert set(reasons) == {1, 2} and all("not a regular file" in r for r in reasons.values())
    with pytest.raises(mr.ImageError, match="not a regular file"):
        mr.load_image("/dev/zero")


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for _ in range(200):  # one byte every 0.1 s: each read is quick, the whole never ends
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_a_url_that_trickles_is_cut_at_the_download_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
        started = time.monotonic()
        with pytest.raises(mr.ImageError, match="timed out"):
            mr.load_image(url, timeout=1.0)
        assert time.monotonic() - started < 8
    finally:
        server.shutdown()


# ---------------------------------------------------------------- 5. writes from other web pages


def test_cross_origin_writes_and_unknown_hosts_are_refused(client):
    evil = client.post("/items", data={"metadata": json.dumps({"id": 9001, "title": "spam"})},
                       headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "origin" in evil.json()["detail"].lower()
    site = client.post("/items", data={"metadata": json.dumps({"id": 9001, "title": "spam"})}, headers={"Sec-Fetch-Site": "cross-site"})
    assert site.status_code == 403
    assert client.delete("/items/575", headers={"Origin": "null"}).status_code == 403
    rebound = client.get("/health", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 400 and "host" in rebound.json()["detail"].lower()
    assert client.get("/items/9001").status_code == 404  # nothing was written
    same = client.post("/items", data={"metadata": json.dumps({"id": 9001, "title": "a kettle"})}, headers={"Origin": LOCAL})
    assert same.status_code == 201


def test_the_host_allow_list_is_configurable(indexed, tmp_path):
    from fastapi.testclient import TestClient

    from multiretrieval.server import create_app

    indexed.save(tmp_path / "idx")
    app = create_app(tmp_path / "idx", allowed_hosts=["shop.example"])
    with TestClient(app, base_url="http://shop.example") as c:
        assert c.get("/health").status_code == 200
        assert c.post("/items", data={"metadata": json.dumps({"id": 5, "title": "x"})},
                      headers={"Origin": "http://shop.example"}).status_code == 201
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/health").status_code == 400


# ---------------------------------------------------------------- 6. one Retriever, many threads


def test_searches_run_safely_while_another_thread_adds_and_removes(retriever_copy, fixtures):
    r = retriever_copy
    errors: list[BaseException] = []
    stop = threading.Event()
    image = fixtures / "images" / "bed1.png"

    def search():
        while not stop.is_set():
            try:
                res = r.search(text="a bed", k=5, where="price > 0")
                assert len(res) == 5 and res["id"].is_unique
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    def write():
        try:
            for i in range(6):
                r.add(pd.DataFrame({"id": [10_000 + i], "image": [str(image)], "title": [f"bed {i}"], "price": [10.0]}))
                if i % 2:
                    r.remove([10_000 + i - 1])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=search) for _ in range(8)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert sorted(i for i in r.items["id"] if i >= 10_000) == [10_001, 10_003, 10_005]


# ---------------------------------------------------------------- 7. the smaller ones


def test_metadata_of_the_wrong_type_is_a_400_naming_the_column(client):
    r = client.post("/items", data={"metadata": json.dumps({"id": 77, "title": "a stool", "price": "cheap"})},
                    headers={"Origin": LOCAL})
    assert r.status_code == 400 and "price" in r.json()["detail"] and "row 0" in r.json()["detail"]
    assert client.get("/items/77").status_code == 404


@pytest.mark.parametrize("where", ["1=1 UNION SELECT 5", "price > 0) UNION (SELECT 1", "price > 0 ORDER BY price"])
def test_a_filter_that_is_not_one_condition_is_a_400(client, where):
    r = client.post("/search", json={"text": "a bed", "where": where})
    assert r.status_code == 400


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert mr.load_image(buf.getvalue()).size == (20, 60)


def test_sixteen_bit_images_keep_their_tones():
    grey = np.full((16, 16), 32768, np.uint16)  # mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    pixels = np.asarray(mr.load_image(buf.getvalue()))
    assert abs(int(pixels.mean()) - 128) <= 1


def test_saves_killed_midway_leave_no_hidden_copies_behind(retriever_copy, tmp_path):
    folder = tmp_path / "saves" / "ix"
    retriever_copy.save(folder)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in (f".ix.saving-{dead}-abc", f".ix.old-{dead}-123"):
        (folder.parent / name).mkdir()
        (folder.parent / name / "manifest.json").write_text("{}")
    retriever_copy.save(folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ix", "ix.lock"]  # the lock file stays, harmless


def test_uploads_of_deleted_and_rejected_items_are_removed(client):
    photo = png_bytes(color=(10, 120, 200))
    ok = client.post("/items", data={"metadata": json.dumps({"id": 501, "title": "a blue tile"})},
                     files={"image": ("t.png", photo, "image/png")}, headers={"Origin": LOCAL})
    assert ok.status_code == 201
    uploads = client.index_dir.with_name(client.index_dir.name + ".uploads")
    assert len(list(uploads.iterdir())) == 1
    assert client.delete("/items/501", headers={"Origin": LOCAL}).status_code == 200
    assert list(uploads.iterdir()) == []
    clash = client.post("/items", data={"metadata": json.dumps({"id": 575, "title": "dup"})},
                        files={"image": ("t.png", png_bytes(color=(1, 2, 3)), "image/png")}, headers={"Origin": LOCAL})
    assert clash.status_code == 400
    assert list(uploads.iterdir()) == []
