"""The API under generated requests (schemathesis over the app's own OpenAPI schema, in-process), with
every check: no 5xx; every response has a status the schema lists and a body that matches its schema;
a request the schema calls invalid is refused (forms included: a form field holds its JSON value, so a
boolean field's "0" is refused as JSON's 0 is); a request it calls valid is accepted, unless it breaks
one of the rules in UNSTATABLE, which JSON Schema cannot state.

The cases are drawn from each operation's Hypothesis strategy (``as_strategy``), positive and negative,
in one test that takes the app from a fixture: schemathesis's lazy pytest fixture
(``schemathesis.pytest.from_fixture``) fails under pytest 9. The command line's coverage phase
(``schemathesis run --checks all``) has no such API; its refusals are UNSTATABLE's too, and a photo
part of random bytes (the schema says image/*; only the bytes say whether they are one).
"""

from __future__ import annotations

import json
import re
import sys

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from multiretrieval.server import create_app  # noqa: E402

from ..conftest import png_bytes  # noqa: E402

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # a dependency of hypothesis before Python 3.11

# What a request the schema calls valid may still be refused for, and why the schema cannot say it.
UNSTATABLE = {
    # Which inputs a mode takes (mode "fused": a photo and a text; "image": a photo only): JSON Schema could spell
    # these out mode by mode, but the rules would bury the fields (the schema does state which inputs exclude others).
    r"mode '[\w-]+' takes|with a text is a fused query|like=ITEM_ID takes mode|a vector query searches the joint space|"
    r"weights apply to fused queries|give one of: an image": "the inputs a mode takes",
    # A sum of two fields.
    r"k \+ offset = [\d,]+; a query may ask for at most": "k + offset within search.max_k",
    # A filter's grammar (SQL over the catalog's columns), and its running time.
    r'^"where: ': "a filter's grammar",
    # The catalog's columns and their types: they change with every write, and the schema is made at start.
    r"no column|unknown column|is text, but '.*' holds numbers|is a number, but '.*' holds text|"
    r"but its indexed values are of type": "the catalog's columns and their types",
    # A text's length in word pieces: the tokenizer's count.
    r"has [\d,]+ word pieces": "a text's word pieces (search.max_text_tokens)",
    # Whether an address parses (URL grammar, port range, IDNA), names a public host and serves a photo.
    r'^"image_url: ': "a photo address that serves a photo",
    # PATCH's image: as image_url, or a path: whether a file is there, in the server's image folders, and an image.
    r'^"image: ': "a photo address that serves a photo, or the path of an image file in the server's image folders",
    # An item's image given in its metadata (a column named like an image column, catalog.find_image_column): whether
    # the file it names is there.
    r"row 0 \(id .*\): .*: file not found": "the photo a metadata column names is a file that is there",
    # Whether an id is taken, and whether an item PUT without a photo or text has one indexed: the index's state.
    r"is already indexed|neither image nor text|an item needs an image or a text": "a new id is free; it has a photo or text",
    # A crop box's corners against each other (x0 < x1, y0 < y1) and, in pixels, against the photo's size.
    r'crop is empty|crop is inverted|crop: \w+ = \S+ px is outside the photo|crop cuts the query photo, and this query has none': "a crop box within the photo, and a photo to crop",
    # The id in PUT's metadata must be the one in the path: two places of one request.
    r"differs from the id in the URL": "PUT's metadata id is the path's",
}


@pytest.fixture(scope="module")
def api_schema(indexed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "idx"
    indexed.save(folder)
    app = create_app(folder, max_upload_bytes=2**20, allowed_hosts=["127.0.0.1", "localhost", "testserver"])
    # Photos (`image` parts are image/*): real PNGs, so a valid upload is an image.
    photos = [png_bytes((w, h), (r, 90, 200 - r)) for w, h, r in ((32, 32, 0), (64, 48, 120), (40, 90, 250))]
    schemathesis.openapi.media_type("image/png", st.sampled_from(photos))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # An invalid body over the upload limit is refused with the documented 413 before it is read, which is as much
    # a rejection as a 422 (a negative case of /search/batch, its vector 2.4 MB of JSON, was one).
    checks = schema.config.checks
    checks.negative_data_rejection = type(checks.negative_data_rejection)(
        expected_statuses=[*checks.negative_data_rejection.expected_statuses, "413"])
    return schema


def test_the_api_answers_generated_requests_within_its_schema(api_schema):
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                # Every check; positive_data_acceptance as accepted_unless_unstatable: the same rule, with UNSTATABLE.
                excluded = [schemathesis.checks.positive_data_acceptance]
                if isinstance(case.body, dict) and "image" in case.body:
                    # schemathesis 4.32 cannot validate a body holding a file against the schema's conditions ("a photo
                    # or a text": jsonschema_rs raises "Unsupported type: 'Binary'"), so it takes a valid upload for an
                    # invalid one; negative cases without a photo part are checked.
                    excluded.append(schemathesis.checks.negative_data_rejection)
                response = case.call_and_validate(excluded_checks=excluded)
                accepted_unless_unstatable(case, response)

            try:
                check()
            except Unsatisfiable:
                pass  # no negative case exists (an operation without parameters)
            except ValueError as exc:
                # schemathesis 4.32 checks that a negative form it generated is invalid with jsonschema_rs, which cannot
                # read a file part (as above): generation stops there. Whether the examples reach one shifts with the
                # app's code and the modules loaded (schemathesis draws constants from them), not with the API.
                if "Unsupported type: 'Binary'" not in str(exc):
                    failures.append(f"{operation.label} ({mode.value}): {_described(exc)}")
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported below, every operation's
                failures.append(f"{operation.label} ({mode.value}): {_described(exc)}")
    assert not failures, "\n\n".join(failures)


def accepted_unless_unstatable(case, response) -> None:
    """positive_data_acceptance's rule (a refusal is a 4xx other than 401, 403, 404, 409, 429), with UNSTATABLE's exceptions."""
    if not case.meta.generation.mode.is_positive or not 400 <= response.status_code < 500:
        return  # a 5xx: not_a_server_error's
    if response.status_code in (401, 403, 404, 409, 429):
        return
    detail = json.dumps(response.json().get("detail"), ensure_ascii=False)
    assert any(re.search(rule, detail) for rule in UNSTATABLE), (
        f"a request the schema calls valid was refused ({response.status_code}: {detail[:500]}):\n{case.as_curl_command()}")


def _described(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and "Reproduce with" not in str(exc):
        return "\n".join(_described(e) for e in exc.exceptions)
    return str(exc)
