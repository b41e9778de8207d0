"""The API under generated requests (schemathesis over the app's own OpenAPI schema, in-process):
no 5xx, and every response has a status the schema lists and a body that matches its schema."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from multiretrieval.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(indexed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "idx"
    indexed.save(folder)
    app = create_app(folder, max_upload_bytes=2**20, allowed_hosts=["127.0.0.1", "localhost", "testserver"])
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_the_api_answers_generated_requests_within_its_schema(case):
    # A request valid by the schema may still be refused (mode "fused" needs both inputs; an image
    # field must hold an image): positive_data_acceptance cannot apply. Nor can negative_data_rejection
    # to a form: its fields carry no type, so a "boolean" text arrives as the text "false". Every other check does.
    excluded = [schemathesis.checks.positive_data_acceptance]
    if case.media_type == "multipart/form-data":
        excluded.append(schemathesis.checks.negative_data_rejection)
    case.call_and_validate(excluded_checks=excluded)
