"""ember's OpenAPI document: it describes exactly the routes the frontend serves, it is what
`ember openapi` prints and GET /openapi.json serves, and schemathesis, fuzzing every operation
against a live ember within a bounded number of cases, finds no 5xx, no crash and no hang."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import schemathesis
from aiohttp import web
from conftest import EMBER, EmberServer, create
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from ember.api.frontend import Frontend
from ember.api.openapi import document
from ember.observe.ops import Operations

METHODS = {"get", "put", "post", "delete", "patch"}
CATCH_ALL = "/{tail}"  # the frontend's fallback: a Lambda-shaped 404 for any other path
MAX_EXAMPLES = 25  # per operation and phase; ~20 operations: a few hundred requests in all
REQUEST_TIMEOUT = 30  # seconds; a hang fails the test instead of stalling it


def _app_routes() -> set[tuple[str, str]]:
    """Every route ember serve registers (server.py: Operations' routes, then the frontend's)."""
    app = web.Application()
    Operations.routes(Operations.__new__(Operations), app)  # routes() only registers bound handlers
    Frontend.routes(Frontend.__new__(Frontend), app)
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method.lower() in METHODS and path != CATCH_ALL:
            out.add((path, route.method.lower()))
        elif route.method == "*":
            assert path == CATCH_ALL, f"a wildcard-method route besides the fallback: {path}"
    return out


def _doc_routes() -> set[tuple[str, str]]:
    return {(path, method) for path, ops in document()["paths"].items() for method in ops}


def test_document_describes_exactly_the_registered_routes() -> None:
    app, doc = _app_routes(), _doc_routes()
    assert app - doc == set(), "routes missing from ember/api/openapi.py OPERATIONS"
    assert doc - app == set(), "OPERATIONS describes routes the frontend does not serve"


def test_document_is_valid_openapi_with_unique_operation_ids() -> None:
    doc = document()
    schemathesis.openapi.from_dict(doc)  # loads and resolves every $ref
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(_template_names(path)), (path, method)
            assert "default" in op["responses"] or path in ("/health", "/openapi.json"), (path, method)


def _template_names(path: str) -> list[str]:
    return [seg[1:-1] for seg in path.split("/") if seg.startswith("{") and seg.endswith("}")]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path_factory.mktemp("openapi") / "data").start()
    # one real function, so that operations on `my-function` (the parameter's example) do work
    create(srv.client(), "my-function", "def handler(event, context):\n    return event\n")
    yield srv
    srv.stop()


def test_served_and_printed_documents_are_the_document(fuzz_server) -> None:
    with urllib.request.urlopen(fuzz_server.url + "/openapi.json", timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        assert json.loads(resp.read()) == document()
    printed = subprocess.run([*EMBER, "openapi"], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(printed.stdout) == document()


def test_every_documented_path_is_routed(fuzz_server) -> None:
    """No documented path falls through to the fallback (UnknownOperationException)."""
    for path, method in sorted(_doc_routes()):
        url = fuzz_server.url + path.replace("{name}", "my-function").replace("{file}", "x.zip")
        req = urllib.request.Request(
            url, method=method.upper(), data=b"{}" if method in ("put", "post") else None
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                error_type = resp.headers.get("x-amzn-ErrorType")
        except urllib.error.HTTPError as exc:
            error_type = exc.headers.get("x-amzn-ErrorType")
            assert exc.code < 500, (method, path, exc.code, exc.read())
        assert error_type != "UnknownOperationException", (method, path)


schema = schemathesis.openapi.from_dict(document())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a failure reproduces
    database=None,
)
def test_schemathesis_finds_no_server_error(case, fuzz_server) -> None:
    if case.operation.path == "/2015-03-31/functions/{name}" and case.method.upper() == "DELETE":
        case.path_parameters = {**(case.path_parameters or {}), "name": "not-my-function"}
    if case.query and "follow" in case.query:  # a log stream that stays open by design
        case.query = {k: v for k, v in case.query.items() if k != "follow"}
    response = case.call(base_url=fuzz_server.url, timeout=REQUEST_TIMEOUT)
    case.validate_response(response, checks=[not_a_server_error])
