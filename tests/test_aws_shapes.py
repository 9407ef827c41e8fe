"""Lambda's answers, member for member, through boto3 against a real `ember serve`: error bodies,
request validation worded as AWS words it, the function state model (Pending, InProgress, settling),
and every FunctionConfiguration member AWS returns for a Zip function. The expected texts come from
AWS's API reference and botocore's service model, and from responses recorded against real AWS."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import ROLE, EmberServer, create, make_zip

HELLO = """
def handler(event, context):
    return {"v": 1}
"""
ARN = "arn:aws:lambda:us-east-1:000000000000:function"
NAME_PATTERN = (
    r"(arn:(aws[a-zA-Z-]*)?:lambda:)?((eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?(\d{12}:)?"
    r"(function:)?([a-zA-Z0-9-_\.]+)(:(\$LATEST(\.PUBLISHED)?|[a-zA-Z0-9-_]+))?"
)
CREATE_PATTERN = (
    r"(arn:(aws[a-zA-Z-]*)?:lambda:)?((eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?(\d{12}:)?"
    r"(function:)?([a-zA-Z0-9-_]+)(:(\$LATEST|[a-zA-Z0-9-_]+))?"
)


def error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, str]:
    err = exc.value.response["Error"]
    return err["Code"], err["Message"]


def raw(server: EmberServer, method: str, path: str) -> tuple[int, dict[str, str], dict]:
    req = urllib.request.Request(server.url + path, method=method)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, dict(resp.headers.items()), json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), json.loads(exc.read() or b"{}")


@pytest.fixture
def slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An ember whose changes stay Pending / InProgress for 3 s, long enough to act on."""
    monkeypatch.setenv("EMBER_SETTLE_S", "3")
    srv = EmberServer(tmp_path / "slow").start()
    yield srv.client()
    srv.stop()


# ---------------------------------------------------------------------- error bodies


def test_error_bodies_carry_type_and_the_models_message_member(lam, server) -> None:
    status, headers, body = raw(server, "GET", "/2015-03-31/functions/nope")
    assert status == 404 and headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert body == {"Type": "User", "Message": f"Function not found: {ARN}:nope"}
    status, headers, body = raw(server, "GET", "/2015-03-31/functions/bad!name")
    assert status == 400 and headers["x-amzn-ErrorType"] == "ValidationException"
    assert set(body) == {"message"} and body["message"].startswith("1 validation error detected: ")
    create(lam, "dup", HELLO)
    with pytest.raises(lam.exceptions.ResourceConflictException) as exc:
        create(lam, "dup", HELLO)
    assert exc.value.response["Type"] == "User"  # modeled member: boto3 hands it over
    assert exc.value.response["message"] == exc.value.response["Error"]["Message"]
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as nf:
        lam.get_function(FunctionName="nope")
    assert nf.value.response["Type"] == "User" and nf.value.response["Message"] == f"Function not found: {ARN}:nope"


# ---------------------------------------------------------------------- names, ARNs, qualifiers


def test_function_name_pattern_is_a_validation_exception(lam) -> None:
    for call in (lam.get_function, lam.get_function_configuration, lam.delete_function, lam.invoke):
        with pytest.raises(ClientError) as exc:
            call(FunctionName="my-function!")
        assert error(exc) == (
            "ValidationException",
            "1 validation error detected: Value 'my-function!' at 'functionName' failed to satisfy constraint: "
            f"Member must satisfy regular expression pattern: {NAME_PATTERN}",
        )
    for bad in (
        "invalid-account:function:my-function",
        "arn:aws:lambda:invalid-region:000000000000:function:my-function",
        "arn:aws:ec2:us-east-1:000000000000:instance:i-1234567890abcdef0",
        f"{ARN}:my-function:1:2",
        "function:my-function:$LATEST:extra",
        "arn:aws:lambda::000000000000:function:my-function",
        f"{ARN}:my-function:$LATES",
    ):
        with pytest.raises(ClientError) as exc:
            lam.get_function(FunctionName=bad)
        assert error(exc)[0] == "ValidationException", bad
        assert f"Value '{bad}' at 'functionName'" in error(exc)[1]


def test_qualifier_constraints_come_first_and_are_counted(lam) -> None:
    with pytest.raises(ClientError) as exc:
        lam.get_function(FunctionName="my-function", Qualifier="a" * 129)
    assert error(exc) == (
        "ValidationException",
        f"1 validation error detected: Value '{'a' * 129}' at 'qualifier' failed to satisfy constraint: "
        "Member must have length less than or equal to 128",
    )
    with pytest.raises(ClientError) as exc:
        lam.invoke(FunctionName="my-function", Qualifier="invalid!")
    assert error(exc)[1] == (
        "1 validation error detected: Value 'invalid!' at 'qualifier' failed to satisfy constraint: "
        r"Member must satisfy regular expression pattern: \$(LATEST(\.PUBLISHED)?)|[a-zA-Z0-9-_$]+"
    )
    bad = "arn:aws:lambda:invalid-region:000000000000:function:my-function"
    with pytest.raises(ClientError) as exc:
        lam.get_function(FunctionName=bad, Qualifier="a" * 129)
    code, message = error(exc)
    assert code == "ValidationException"
    assert message.startswith("2 validation errors detected: Value 'aaa")
    assert f"; Value '{bad}' at 'functionName' failed to satisfy constraint: " in message


def test_not_found_is_worded_per_operation(lam) -> None:
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function(FunctionName="a" * 65)  # matches the pattern: simply not there
    assert error(exc)[1] == f"Function not found: {ARN}:{'a' * 65}"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.invoke(FunctionName="nope")
    assert error(exc)[1] == f"Function not found: {ARN}:nope:$LATEST"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function(FunctionName=f"{ARN}:function")  # the name is "function"
    assert error(exc)[1] == f"Function not found: {ARN}:function"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function(FunctionName=f"{ARN}:my-function", Qualifier="$latest")
    assert error(exc)[1] == f"Function not found: {ARN}:my-function:$latest"
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as exc:
        lam.get_function(FunctionName=f"{ARN}:my-function:$LATEST", Qualifier="1")
    assert error(exc)[1] == "The derived qualifier from the function name does not match the specified qualifier."
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as exc:
        lam.delete_function(FunctionName="my-function", Qualifier="prod")
    assert error(exc)[1] == "Deletion of aliases is not currently supported."
    create(lam, "here", HELLO)
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function(FunctionName="here", Qualifier="1221")
    assert error(exc)[1] == f"Function not found: {ARN}:here:1221"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function_event_invoke_config(FunctionName="nope")
    assert error(exc)[1] == f"The function {ARN}:nope:$LATEST doesn't have an EventInvokeConfig"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function_event_invoke_config(FunctionName="here")
    assert error(exc)[1] == f"The function {ARN}:here:$LATEST doesn't have an EventInvokeConfig"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function_event_invoke_config(FunctionName="here", Qualifier="1221")
    assert error(exc)[1] == f"The function {ARN}:here:1221 doesn't have an EventInvokeConfig"
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        lam.get_function_concurrency(FunctionName="nope")
    assert error(exc)[1] == f"Function not found: {ARN}:nope"


def test_arns_of_another_region_or_account(lam) -> None:
    create(lam, "reg", HELLO)
    other = "arn:aws:lambda:ap-southeast-1:000000000000:function:reg"
    for call in (lam.get_function, lam.get_function_configuration, lam.invoke, lam.delete_function):
        with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
            call(FunctionName=other)
        assert error(exc)[1] == "Functions from 'ap-southeast-1' are not reachable in this region ('us-east-1')"
    with pytest.raises(ClientError) as exc:
        lam.get_function(FunctionName="arn:aws:lambda:us-east-1:111111111111:function:reg")
    assert exc.value.response["Error"]["Code"] == "AccessDeniedException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # ours, by full and partial ARN
    assert lam.get_function(FunctionName=f"{ARN}:reg")["Configuration"]["FunctionName"] == "reg"
    assert lam.get_function(FunctionName="000000000000:function:reg")["Configuration"]["FunctionName"] == "reg"


# ---------------------------------------------------------------------- CreateFunction's members


def test_create_by_arn_and_its_name_limits(lam) -> None:
    out = create(lam, f"{ARN}:by-arn", HELLO)
    assert out["FunctionName"] == "by-arn" and out["FunctionArn"] == f"{ARN}:by-arn"
    out = create(lam, "000000000000:function:by-partial", HELLO)
    assert out["FunctionName"] == "by-partial"
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as exc:
        create(lam, "a" * 65, HELLO)
    assert error(exc)[1] == (
        f"1 validation error detected: Value '{'a' * 65}' at 'functionName' failed to satisfy constraint: "
        "Member must have length less than or equal to 64"
    )
    with pytest.raises(ClientError) as exc:
        create(lam, "invalid:function:name", HELLO)
    assert error(exc) == (
        "ValidationException",
        "1 validation error detected: Value 'invalid:function:name' at 'functionName' failed to satisfy "
        f"constraint: Member must satisfy regular expression pattern: {CREATE_PATTERN}",
    )
    long_arn = f"{ARN}:" + "a" * (141 - len(ARN) - 1)
    with pytest.raises(ClientError) as exc:
        create(lam, long_arn, HELLO)
    assert error(exc) == (
        "ValidationException",
        f"1 validation error detected: Value '{long_arn}' at 'functionName' failed to satisfy constraint: "
        "Member must have length less than or equal to 140",
    )
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as exc:
        create(lam, "arn:aws:lambda:ap-southeast-1:000000000000:function:elsewhere", HELLO)
    assert error(exc)[1] == "Functions from 'ap-southeast-1' are not reachable in this region ('us-east-1')"


def test_create_member_validation(server) -> None:
    lam = server.client(parameter_validation=False)  # boto3 checks minimums itself; Lambda does too

    def refused(**kw: object) -> tuple[str, str]:
        with pytest.raises(ClientError) as exc:
            create(lam, "v", HELLO, **kw)
        return error(exc)

    assert refused(Role="r1") == (
        "ValidationException",
        "1 validation error detected: Value 'r1' at 'role' failed to satisfy constraint: Member must satisfy "
        r"regular expression pattern: arn:(aws[a-zA-Z-]*)?:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+",
    )
    assert refused(MemorySize=64) == (
        "ValidationException",
        "1 validation error detected: Value '64' at 'memorySize' failed to satisfy constraint: "
        "Member must have value greater than or equal to 128",
    )
    assert refused(Timeout=0) == (
        "ValidationException",
        "1 validation error detected: Value '0' at 'timeout' failed to satisfy constraint: "
        "Member must have value greater than or equal to 1",
    )
    assert refused(Timeout=901) == (
        "ValidationException",
        "'Timeout' value failed to satisfy constraint: Member must have value less than or equal to 900",
    )
    code, message = refused(MemorySize=64, Timeout=0, Description="d" * 257)
    assert code == "ValidationException" and message.startswith("3 validation errors detected: ")
    assert message.count("; Value '") == 2
    assert f"Value '{'d' * 257}' at 'description' failed to satisfy constraint: " in message
    assert "Member must have length less than or equal to 256" in message
    assert refused(Handler="has space") == (
        "ValidationException",
        "1 validation error detected: Value 'has space' at 'handler' failed to satisfy constraint: "
        r"Member must satisfy regular expression pattern: [^\s]+",
    )
    assert refused(Handler="h" * 129)[1].endswith("Member must have length less than or equal to 128")
    assert refused(Architectures=["x86_64", "arm64"]) == (
        "ValidationException",
        "1 validation error detected: Value '[x86_64, arm64]' at 'architectures' failed to satisfy constraint: "
        "Member must have length less than or equal to 1",
    )
    assert refused(Architectures=["X86_64"]) == (
        "ValidationException",
        "1 validation error detected: Value '[X86_64]' at 'architectures' failed to satisfy constraint: "
        "Member must satisfy constraint: [Member must satisfy enum value set: [x86_64, arm64], "
        "Member must not be null]",
    )
    code, message = refused(Runtime="PYTHON3.9")
    assert code == "InvalidParameterValueException"
    assert message.startswith(
        "Value PYTHON3.9 at 'runtime' failed to satisfy constraint: Member must satisfy enum value set: ["
    )
    assert message.endswith("] or be a valid ARN") and "python3.12" in message
    assert refused(Runtime="python3.7") == (
        "InvalidParameterValueException",
        "The runtime parameter of python3.7 is no longer supported for creating or updating AWS Lambda "
        "functions. We recommend you use a supported runtime while creating or updating functions.",
    )
    variables = {"SMALL_VAR": "ok", "LARGE_VAR": "x" * 4096}
    assert refused(Environment={"Variables": variables}) == (
        "InvalidParameterValueException",
        "Lambda was unable to configure your environment variables because the environment variables you "
        "have provided exceeded the 4KB limit. String measured: "
        + json.dumps(variables, separators=(",", ":")),
    )
    assert [f["FunctionName"] for f in lam.list_functions()["Functions"]] == []


def test_update_configuration_member_validation(lam) -> None:
    create(lam, "uv", HELLO)
    lam.get_waiter("function_active_v2").wait(FunctionName="uv", WaiterConfig={"Delay": 1})
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName="uv", Role="r1")
    assert error(exc)[0] == "ValidationException" and "at 'role'" in error(exc)[1]
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as exc:
        lam.update_function_configuration(FunctionName="uv", Runtime="non-existent-runtime")
    assert error(exc)[1].startswith("Value non-existent-runtime at 'runtime' failed to satisfy constraint: ")
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName="uv", MemorySize=20000)
    assert error(exc) == (
        "ValidationException",
        "'MemorySize' value failed to satisfy constraint: Member must have value less than or equal to 10240",
    )


def test_code_size_limits(lam, server) -> None:
    body = json.dumps(
        {
            "FunctionName": "big",
            "Runtime": "python3.12",
            "Handler": "app.handler",
            "Role": ROLE,
            "Code": {"ZipFile": base64.b64encode(b"\0" * (50 * 1024 * 1024 + 1)).decode()},
        }
    ).encode()
    req = urllib.request.Request(
        server.url + "/2015-03-31/functions", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    assert exc.value.code == 413
    assert exc.value.headers["x-amzn-ErrorType"] == "RequestEntityTooLargeException"
    assert json.loads(exc.value.read())["message"] == "Zipped size must be smaller than 52428800 bytes"


# ---------------------------------------------------------------------- states


def test_create_is_pending_then_active_and_the_revision_changes(slow) -> None:
    lam = slow
    out = create(lam, "st", HELLO)
    assert out["State"] == "Pending"
    assert out["StateReason"] == "The function is being created."
    assert out["StateReasonCode"] == "Creating"
    assert "LastUpdateStatus" not in out
    assert lam.get_function(FunctionName="st")["Configuration"]["State"] == "Pending"
    with pytest.raises(lam.exceptions.ResourceConflictException) as exc:
        lam.update_function_configuration(FunctionName="st", Timeout=5)
    assert error(exc)[1] == (
        "The operation cannot be performed at this time. The function is currently in the following state: Pending"
    )
    lam.get_waiter("function_active_v2").wait(FunctionName="st", WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    cfg = lam.get_function(FunctionName="st")["Configuration"]
    assert cfg["State"] == "Active" and cfg["LastUpdateStatus"] == "Successful"
    assert "StateReason" not in cfg and "StateReasonCode" not in cfg
    assert cfg["RevisionId"] != out["RevisionId"]


def test_invoke_while_pending_runs_once_active(slow) -> None:
    lam = slow
    create(lam, "early", HELLO)
    started = time.monotonic()
    assert json.loads(lam.invoke(FunctionName="early")["Payload"].read()) == {"v": 1}
    assert time.monotonic() - started >= 2.0  # it waited out Pending
    assert lam.get_function(FunctionName="early")["Configuration"]["State"] == "Active"


def test_update_is_in_progress_then_successful(slow) -> None:
    lam = slow
    create(lam, "up", HELLO)
    lam.get_waiter("function_active_v2").wait(FunctionName="up", WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    out = lam.update_function_configuration(FunctionName="up", Description="changed")
    assert out["State"] == "Active" and out["Description"] == "changed"
    assert out["LastUpdateStatus"] == "InProgress"
    assert out["LastUpdateStatusReason"] == "The function is being created."
    assert out["LastUpdateStatusReasonCode"] == "Creating"
    arn = f"{ARN}:up"
    for call in (
        lambda: lam.update_function_code(FunctionName="up", ZipFile=make_zip({"app.py": HELLO})),
        lambda: lam.update_function_configuration(FunctionName="up", Timeout=9),
    ):
        with pytest.raises(lam.exceptions.ResourceConflictException) as exc:
            call()
        assert error(exc)[1] == (
            f"The operation cannot be performed at this time. An update is in progress for resource: {arn}"
        )
    lam.get_waiter("function_updated_v2").wait(FunctionName="up", WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    cfg = lam.get_function_configuration(FunctionName="up")
    assert cfg["LastUpdateStatus"] == "Successful" and "LastUpdateStatusReason" not in cfg
    assert cfg["RevisionId"] != out["RevisionId"]
    code = lam.update_function_code(FunctionName="up", ZipFile=make_zip({"app.py": HELLO + "\n"}))
    assert code["LastUpdateStatus"] == "InProgress"
    lam.get_waiter("function_updated_v2").wait(FunctionName="up", WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    assert lam.get_function(FunctionName="up")["Configuration"]["LastUpdateStatus"] == "Successful"


def test_waiters_with_the_default_window(lam) -> None:
    create(lam, "w", HELLO)
    lam.get_waiter("function_active_v2").wait(FunctionName="w")
    lam.get_waiter("function_active").wait(FunctionName="w")
    lam.update_function_configuration(FunctionName="w", MemorySize=256)
    lam.get_waiter("function_updated_v2").wait(FunctionName="w")
    lam.get_waiter("function_updated").wait(FunctionName="w")
    assert lam.get_function_configuration(FunctionName="w")["MemorySize"] == 256


# ---------------------------------------------------------------------- configuration members


def test_every_configuration_member_lambda_returns(lam) -> None:
    zip_bytes = make_zip({"app.py": HELLO})
    out = lam.create_function(
        FunctionName="full", Runtime="python3.12", Handler="app.handler", Role=ROLE, Code={"ZipFile": zip_bytes}
    )
    lam.get_waiter("function_active_v2").wait(FunctionName="full")
    cfg = lam.get_function(FunctionName="full")["Configuration"]
    for doc in (out, cfg):
        assert doc["PackageType"] == "Zip"
        assert doc["Architectures"] == ["x86_64"]
        assert doc["EphemeralStorage"] == {"Size": 512}
        assert doc["TracingConfig"] == {"Mode": "PassThrough"}
        assert doc["SnapStart"] == {"ApplyOn": "None", "OptimizationStatus": "Off"}
        assert doc["LoggingConfig"] == {"LogFormat": "Text", "LogGroup": "/aws/lambda/full"}
        runtime_arn = doc["RuntimeVersionConfig"]["RuntimeVersionArn"]
        assert re.fullmatch(r"arn:aws:lambda:us-east-1::runtime:[0-9a-f]{64}", runtime_arn)
        assert doc["CodeSha256"] == base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode()
        assert doc["CodeSize"] == len(zip_bytes)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", doc["LastModified"])
        assert doc["Version"] == "$LATEST" and doc["Description"] == ""
        assert doc["MemorySize"] == 128 and doc["Timeout"] == 3
        assert "Environment" not in doc  # none was given
    # Environment, when given, even empty, is shaped as AWS shapes it
    out = create(lam, "envy", HELLO, Environment={"Variables": {}})
    assert out["Environment"] == {"Variables": {}}
    lam.get_waiter("function_active_v2").wait(FunctionName="envy")
    out = lam.update_function_configuration(
        FunctionName="envy",
        Environment={"Variables": {"A": "1"}},
        EphemeralStorage={"Size": 1024},
        TracingConfig={"Mode": "Active"},
    )
    assert out["Environment"] == {"Variables": {"A": "1"}}
    assert out["EphemeralStorage"] == {"Size": 1024} and out["TracingConfig"] == {"Mode": "Active"}
    lam.get_waiter("function_updated_v2").wait(FunctionName="envy")
    out = lam.update_function_code(FunctionName="envy", ZipFile=make_zip({"app.py": HELLO}), Architectures=["arm64"])
    assert out["Architectures"] == ["arm64"]


def test_logging_config_and_snapstart_are_kept_as_lambda_keeps_them(lam) -> None:
    create(lam, "logs", HELLO, LoggingConfig={"LogFormat": "JSON"}, SnapStart={"ApplyOn": "PublishedVersions"})
    cfg = lam.get_function_configuration(FunctionName="logs")
    assert cfg["LoggingConfig"] == {
        "LogFormat": "JSON", "ApplicationLogLevel": "INFO", "SystemLogLevel": "INFO", "LogGroup": "/aws/lambda/logs",
    }  # fmt: skip
    assert cfg["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "Off"}
    lam.get_waiter("function_active_v2").wait(FunctionName="logs")
    out = lam.update_function_configuration(FunctionName="logs", LoggingConfig={"ApplicationLogLevel": "DEBUG"})
    assert out["LoggingConfig"]["ApplicationLogLevel"] == "DEBUG" and out["LoggingConfig"]["LogFormat"] == "JSON"
    lam.get_waiter("function_updated_v2").wait(FunctionName="logs")
    out = lam.update_function_configuration(
        FunctionName="logs", LoggingConfig={"LogFormat": "Text", "LogGroup": "cool_lambda"}
    )
    assert out["LoggingConfig"] == {"LogFormat": "Text", "LogGroup": "cool_lambda"}
    lam.get_waiter("function_updated_v2").wait(FunctionName="logs")
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName="logs", SnapStart={"ApplyOn": "invalidOption"})
    assert error(exc) == (
        "ValidationException",
        "1 validation error detected: Value 'invalidOption' at 'snapStart.applyOn' failed to satisfy constraint: "
        "Member must satisfy enum value set: [PublishedVersions, None]",
    )
    with pytest.raises(ClientError) as exc:
        lam.update_function_configuration(FunctionName="logs", LoggingConfig={"LogFormat": "XML"})
    assert error(exc)[0] == "ValidationException" and "at 'loggingConfig.logFormat'" in error(exc)[1]


def test_account_settings_members(lam) -> None:
    create(lam, "acct", HELLO)
    got = lam.get_account_settings()
    assert sorted(got["AccountLimit"]) == [
        "CodeSizeUnzipped", "CodeSizeZipped", "ConcurrentExecutions", "TotalCodeSize",
        "UnreservedConcurrentExecutions",
    ]  # fmt: skip
    assert got["AccountLimit"]["CodeSizeZipped"] == 52428800
    assert got["AccountLimit"]["CodeSizeUnzipped"] == 262144000
    assert got["AccountLimit"]["TotalCodeSize"] == 80530636800
    assert sorted(got["AccountUsage"]) == ["FunctionCount", "TotalCodeSize"]
    assert got["AccountUsage"]["FunctionCount"] == 1
