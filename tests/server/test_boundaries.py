"""What crosses the service's boundary (issue 28, points 7, 10, 12 and 13): JSON of any nesting is a 400, never a
500; clients see no server path; a form field that is not UTF-8 is refused naming the field; the OpenAPI schema
states what the server accepts (test_fuzz.py drives it with every check; here, the cases it once got wrong)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from multiretrieval.server import create_app

from ..conftest import png_bytes

LOCAL = "http://127.0.0.1:8000"
WRITE = {"Origin": LOCAL}
DEEP = "[" * 1000 + "]" * 1000  # 2 KB: Python's parser recursed past its limit (a 500)


@pytest.fixture(scope="module")
def served(indexed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("boundaries") / "idx"
    indexed.save(folder)
    with TestClient(create_app(folder), base_url=LOCAL) as client:
        yield client


def multipart(fields: dict[str, bytes], files: dict[str, bytes] | None = None) -> tuple[bytes, dict]:
    """A multipart body with these raw field bytes (a client library would encode text as UTF-8)."""
    parts = [b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v) for k, v in fields.items()]
    parts += [b'--B\r\nContent-Disposition: form-data; name="%s"; filename="p.png"\r\nContent-Type: image/png\r\n\r\n%s\r\n'
              % (k.encode(), v) for k, v in (files or {}).items()]
    return b"".join(parts) + b"--B--\r\n", {"Content-Type": "multipart/form-data; boundary=B", **WRITE}


# ---------------------------------------------------------------- 7. JSON nested 1,000 deep is a 400


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("name,send", [
    ("request body", lambda c: c.post("/search", content=DEEP, headers={"Content-Type": "application/json"})),
    ("request body", lambda c: c.post("/search/batch", content=DEEP, headers={"Content-Type": "application/json"})),
    ("filters", lambda c: c.post("/search", content=multipart({"text": b"a bed", "filters": DEEP.encode()})[0],
                                 headers=multipart({})[1])),
    ("metadata", lambda c: c.post("/items", content=multipart({"metadata": DEEP.encode()})[0], headers=multipart({})[1])),
    ("filters", lambda c: c.get("/facets", params={"filters": DEEP})),
    # Parsed (40 levels), then refused: whatever walks the value next must not recurse that deep either.
    ("request body", lambda c: c.post("/search", json={"text": "a bed", "filters": {"price": nested(40)}})),
    ("metadata", lambda c: c.post("/items", content=multipart({"metadata": json.dumps({"id": 5, "a": nested(40)}).encode()})[0],
                                  headers=multipart({})[1])),
])
def test_json_nested_too_deep_is_a_400_naming_where(served, name, send):
    r = send(served)
    assert r.status_code == 400 and r.json()["detail"] == f"{name}: JSON nested more than 32 levels deep"


def test_json_at_a_usual_depth_still_passes(served):
    r = served.post("/search/batch", json={"queries": [{"text": "a bed", "filters": {"price": {"min": 1, "max": 900}}}]})
    assert r.status_code == 200 and r.json()["results"][0]["count"] > 0


# ---------------------------------------------------------------- 10. no server path reaches a client


def test_an_uploaded_photo_shows_by_its_name_not_the_server_folder(served):
    r = served.post("/items", data={"metadata": json.dumps({"id": 9001, "title": "a red square"})},
                    files={"image": ("red.png", png_bytes((48, 48), (220, 20, 20)), "image/png")}, headers=WRITE)
    assert r.status_code == 201
    uploads = str(served.app.state.service.uploads)
    answers = [served.get("/items/9001"), served.get("/item", params={"id": 9001}),
               served.post("/search", json={"text": "a red square", "k": 20}),
               served.post("/search/batch", json={"queries": [{"text": "a red square", "k": 20}]}),
               served.get("/facets", params={"columns": "image"})]
    for answer in answers:
        assert answer.status_code == 200 and uploads not in answer.text and "/tmp" not in answer.text, answer.text[:300]
    image = answers[0].json()["image"]
    assert image.endswith(".img") and "/" not in image
    assert any(row["id"] == 9001 and row["image"] == image for row in answers[2].json()["results"])
    assert served.get("/items/9001/image").status_code == 200  # the photo itself, for clients


def test_an_item_put_without_a_photo_keeps_showing_its_file_name(served, fixtures):
    r = served.put("/items/575", data={"metadata": json.dumps({"title": "Washing machine", "price": 450})}, headers=WRITE)
    assert r.status_code == 200
    row = served.get("/items/575")
    assert row.json()["image"] == "washing_machine.png" and str(fixtures) not in row.text  # was the resolved absolute path


# ---------------------------------------------------------------- 12. form fields are UTF-8


def test_a_search_text_that_is_not_utf8_is_a_400_naming_the_field(served):
    body, headers = multipart({"text": "café au lait".encode("latin-1")})
    r = served.post("/search", content=body, headers=headers)
    assert r.status_code == 400
    assert r.json()["detail"] == ("malformed form data: form field 'text' is not UTF-8 text (byte 0xe9 at 3); "
                                  "send form fields as UTF-8")
    urlencoded = served.post("/search", content=b"text=caf%E9", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert urlencoded.status_code == 400 and "form field 'text' is not UTF-8" in urlencoded.json()["detail"]
    good = served.post("/search", content=multipart({"text": "café au lait".encode()})[0], headers=headers)
    assert good.status_code == 200 and good.json()["mode"] == "text"


def test_metadata_that_is_not_utf8_is_refused_and_nothing_is_stored(served):
    body, headers = multipart({"metadata": '{"id": 9100, "title": "Crème brûlée dish"}'.encode("latin-1")},
                              {"image": png_bytes()})
    r = served.post("/items", content=body, headers=headers)
    assert r.status_code == 400 and "form field 'metadata' is not UTF-8" in r.json()["detail"]
    assert served.get("/items/9100").status_code == 404


# ---------------------------------------------------------------- 13. the schema states what the server accepts


def test_the_schema_requires_the_bodies_and_types_the_form_fields(served):
    spec = served.get("/openapi.json").json()
    assert "#/$defs/" not in json.dumps(spec)  # /search/batch's queries pointed nowhere: no body was ever generated
    search = spec["paths"]["/search"]["post"]["requestBody"]
    assert search["required"] and spec["paths"]["/search/batch"]["post"]["requestBody"]["required"]
    form = search["content"]["multipart/form-data"]
    for field in form["schema"]["properties"].values():  # a form field is there or not: never null
        assert {"type": "null"} not in [*field.get("anyOf", []), *field.get("anyOf", [{}])[0].get("anyOf", [])]
    assert {"filters", "vector", "weights", "image"} <= set(form["encoding"])
    assert {"required": ["text"], "properties": {"text": {"not": {"enum": [None, ""]}}}} in form["schema"]["anyOf"]
    for path, method in (("/items", "post"), ("/items/{item_id}", "put"), ("/item", "put")):
        body = spec["paths"][path][method]["requestBody"]
        assert body["required"]
        assert body["content"]["multipart/form-data"]["encoding"]["metadata"]["contentType"] == "application/json"
    put = spec["paths"]["/items/{item_id}"]["put"]
    assert "id" not in put["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["metadata"]["examples"][0]
    assert put["parameters"][0]["schema"]["pattern"] == "^(0|-?[1-9][0-9]{0,17})$"  # this index's ids are integers
    (filters,) = [p for p in spec["paths"]["/facets"]["get"]["parameters"] if p["name"] == "filters"]
    assert filters["content"]["application/json"]["schema"]["type"] == "object"


@pytest.mark.parametrize("body", [{"text": "a bed", "k": 5.0}, {"like": 575.0}])
def test_an_integral_number_is_an_integer_as_in_json_schema(served, body):
    r = served.post("/search", json=body)
    assert r.status_code == 200 and r.json()["count"] > 0


def test_like_an_item_whose_id_is_0_is_a_search(served):
    r = served.post("/items", data={"metadata": json.dumps({"id": 0, "title": "a zero"})}, headers=WRITE)
    assert r.status_code == 201
    batch = served.post("/search/batch", json={"queries": [{"like": 0, "k": 3}]})
    assert batch.status_code == 200 and batch.json()["results"][0]["mode"] == "fused"  # "give a query image..." before


@pytest.mark.parametrize("fields,problem", [
    ({"text": "a bed", "facets": "yes"}, "facets"),  # a form's boolean is true or false, as in JSON
    ({"text": "a bed", "k": "5.5"}, "k"),
    ({"text": "a bed", "weights": "null"}, "weights"),
])
def test_form_fields_are_read_as_their_json_values(served, fields, problem):
    r = served.post("/search", data=fields)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == problem


def test_a_form_search_takes_one_photo(served):
    r = served.post("/search", data={"image_url": "null"}, files={"image": ("p.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and r.json()["detail"] == "give the photo once: an uploaded `image` or an `image_url`, not both"
    assert served.post("/search", data={"k": "3"}, files={"image": ("p.png", png_bytes(), "image/png")}).status_code == 200


@pytest.mark.parametrize("value", [{"colour": "red"}, ["red"]])
def test_metadata_values_are_scalars(served, value):
    r = served.post("/items", data={"metadata": json.dumps({"id": 9300, "title": "a vase", "colours": value})}, headers=WRITE)
    assert r.status_code == 400 and r.json()["detail"].startswith("metadata: column 'colours' holds a JSON ")
    assert served.get("/items/9300").status_code == 404

