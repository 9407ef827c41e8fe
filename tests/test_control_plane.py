"""The control plane through boto3: create, get, list with paging, update, delete, concurrency,
account settings, and the error shapes boto3 turns into named exceptions."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError
from conftest import ROLE, create, make_zip

HELLO = """
def handler(event, context):
    return {"v": 1}
"""


def settled(lam, name: str) -> None:
    lam.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1})


def test_create_get_and_configuration_shapes(lam) -> None:
    out = create(lam, "shapes", HELLO, MemorySize=256, Timeout=7, Environment={"Variables": {"A": "1"}})
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert out["FunctionName"] == "shapes"
    assert out["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:shapes"
    assert out["Runtime"] == "python3.12" and out["Handler"] == "app.handler"
    assert out["MemorySize"] == 256 and out["Timeout"] == 7
    assert out["Environment"] == {"Variables": {"A": "1"}}
    assert out["State"] == "Pending" and out["Version"] == "$LATEST"  # as Lambda answers CreateFunction
    lam.get_waiter("function_active_v2").wait(FunctionName="shapes", WaiterConfig={"Delay": 1})
    got = lam.get_function(FunctionName="shapes")
    assert got["Configuration"]["CodeSha256"] == out["CodeSha256"]
    assert got["Configuration"]["State"] == "Active"
    assert got["Code"]["RepositoryType"] == "S3"
    cfg = lam.get_function_configuration(FunctionName="shapes")
    assert cfg["RevisionId"] == got["Configuration"]["RevisionId"] != out["RevisionId"]  # changes as it settles


def test_code_location_serves_the_zip(lam, server) -> None:
    import urllib.request

    zip_bytes = make_zip({"app.py": HELLO})
    lam.create_function(
        FunctionName="dl", Runtime="python3.12", Handler="app.handler", Role=ROLE, Code={"ZipFile": zip_bytes}
    )
    location = lam.get_function(FunctionName="dl")["Code"]["Location"]
    with urllib.request.urlopen(location) as resp:
        assert resp.read() == zip_bytes


def test_list_functions_pages_with_marker(lam) -> None:
    names = [f"fn-{i:02d}" for i in range(7)]
    for name in names:
        create(lam, name, HELLO)
    seen: list[str] = []
    marker = None
    pages = 0
    while True:
        kw = {"MaxItems": 3}
        if marker:
            kw["Marker"] = marker
        page = lam.list_functions(**kw)
        pages += 1
        seen += [f["FunctionName"] for f in page["Functions"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    assert seen == names
    assert pages == 3
    # and the paginator boto3 users reach for
    paginated = [
        f["FunctionName"]
        for p in lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2})
        for f in p["Functions"]
    ]
    assert paginated == names


def test_update_configuration_and_code_take_effect_immediately(lam) -> None:
    create(lam, "upd", 'import os\ndef handler(e, c):\n    return {"v": 1, "env": os.environ.get("X")}\n')
    assert json.loads(lam.invoke(FunctionName="upd")["Payload"].read()) == {"v": 1, "env": None}
    lam.update_function_configuration(FunctionName="upd", Environment={"Variables": {"X": "two"}})
    assert json.loads(lam.invoke(FunctionName="upd")["Payload"].read()) == {"v": 1, "env": "two"}
    settled(lam, "upd")  # as on Lambda, the next update waits for this one to settle
    new = make_zip(
        {"app.py": 'import os\ndef handler(e, c):\n    return {"v": 2, "env": os.environ.get("X")}\n'}
    )
    lam.update_function_code(FunctionName="upd", ZipFile=new)
    for _ in range(3):
        assert json.loads(lam.invoke(FunctionName="upd")["Payload"].read()) == {"v": 2, "env": "two"}
    settled(lam, "upd")
    lam.update_function_configuration(FunctionName="upd", Handler="app.other")
    err = lam.invoke(FunctionName="upd")
    assert err["FunctionError"] == "Unhandled"
    assert json.loads(err["Payload"].read())["errorType"] == "Runtime.HandlerNotFound"


def test_update_with_stale_revision_is_refused(lam) -> None:
    create(lam, "rev", HELLO)
    lam.get_waiter("function_active_v2").wait(FunctionName="rev", WaiterConfig={"Delay": 1})
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName="rev", Timeout=5, RevisionId="not-the-revision")
    assert exc.value.response["Error"]["Code"] == "PreconditionFailedException"


def test_delete_function(lam) -> None:
    create(lam, "gone", HELLO)
    lam.invoke(FunctionName="gone")
    out = lam.delete_function(FunctionName="gone")
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="gone")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="gone")
    create(lam, "gone", HELLO)  # the name can be reused
    assert json.loads(lam.invoke(FunctionName="gone")["Payload"].read()) == {"v": 1}


def test_concurrency_api_and_account_settings(lam) -> None:
    create(lam, "conc", HELLO)
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName="conc")
    before = lam.get_account_settings()["AccountLimit"]
    assert before["ConcurrentExecutions"] == 1000
    assert before["UnreservedConcurrentExecutions"] == 1000
    assert (
        lam.put_function_concurrency(FunctionName="conc", ReservedConcurrentExecutions=10)[
            "ReservedConcurrentExecutions"
        ]
        == 10
    )
    assert lam.get_function_concurrency(FunctionName="conc")["ReservedConcurrentExecutions"] == 10
    assert lam.get_function(FunctionName="conc")["Concurrency"] == {"ReservedConcurrentExecutions": 10}
    assert lam.get_account_settings()["AccountLimit"]["UnreservedConcurrentExecutions"] == 990
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.put_function_concurrency(FunctionName="conc", ReservedConcurrentExecutions=950)
    lam.delete_function_concurrency(FunctionName="conc")
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName="conc")
    assert lam.get_account_settings()["AccountUsage"]["FunctionCount"] == 1


def test_create_errors(lam) -> None:
    create(lam, "dup", HELLO)
    with pytest.raises(lam.exceptions.ResourceConflictException):
        create(lam, "dup", HELLO)
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as exc:
        create(lam, "badrt", HELLO, Runtime="java21")
    assert "runtime" in str(exc.value)
    with pytest.raises(ClientError) as exc:  # Lambda's own limit, above the model's
        create(lam, "badmem", HELLO, MemorySize=20000)
    assert exc.value.response["Error"] == {
        "Code": "ValidationException",
        "Message": "'MemorySize' value failed to satisfy constraint: "
        "Member must have value less than or equal to 10240",
    }
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        create(lam, "badenv", HELLO, Environment={"Variables": {"AWS_REGION": "x"}})
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as exc:
        lam.create_function(
            FunctionName="badzip",
            Runtime="python3.12",
            Handler="app.handler",
            Role=ROLE,
            Code={"ZipFile": b"this is not a zip"},
        )
    assert "unzip" in str(exc.value)
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_function(
            FunctionName="evil",
            Runtime="python3.12",
            Handler="app.handler",
            Role=ROLE,
            Code={"ZipFile": make_zip({"../escape.py": "x = 1"})},
        )
    names = [f["FunctionName"] for f in lam.list_functions()["Functions"]]
    assert names == ["dup"]  # nothing half-created


def test_not_found_shapes(lam) -> None:
    for call in (
        lambda: lam.get_function(FunctionName="nope"),
        lambda: lam.get_function_configuration(FunctionName="nope"),
        lambda: lam.delete_function(FunctionName="nope"),
        lambda: lam.invoke(FunctionName="nope"),
        lambda: lam.update_function_configuration(FunctionName="nope", Timeout=5),
        lambda: lam.put_function_concurrency(FunctionName="nope", ReservedConcurrentExecutions=1),
    ):
        with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
            call()
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        assert "nope" in exc.value.response["Error"]["Message"]


def test_unknown_path_is_a_lambda_shaped_404(server) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{server.url}/2015-03-31/nothing-here")
    assert exc.value.code == 404
    assert exc.value.headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert json.loads(exc.value.read())["message"].startswith("Unknown operation")
