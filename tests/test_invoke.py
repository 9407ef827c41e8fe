"""Invoke through boto3 against the real server: results, function errors, timeouts, crashes, init
errors, log tails, custom runtimes, warm reuse, throttling and the cold-start herd bound."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError
from conftest import ROLE, create, make_zip

IDENTITY = """
import os, uuid
SANDBOX = uuid.uuid4().hex
def handler(event, context):
    return {"sandbox": SANDBOX, "pid": os.getpid(), "event": event}
"""

SLOW = """
import os, time, uuid
SANDBOX = uuid.uuid4().hex
def handler(event, context):
    time.sleep(event.get("sleep", 1.0))
    return {"sandbox": SANDBOX}
"""


def payload(resp) -> dict:
    return json.loads(resp["Payload"].read())


def test_invoke_returns_result_and_headers(lam) -> None:
    create(lam, "id", IDENTITY)
    resp = lam.invoke(FunctionName="id", Payload=json.dumps({"a": [1, 2]}))
    assert resp["StatusCode"] == 200
    assert resp["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in resp
    assert payload(resp)["event"] == {"a": [1, 2]}
    headers = resp["ResponseMetadata"]["HTTPHeaders"]
    assert headers["x-amzn-requestid"]


def test_function_sees_lambda_environment_and_context(lam) -> None:
    src = """
    import os
    def handler(event, context):
        keys = ["AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "LAMBDA_TASK_ROOT", "_HANDLER",
                "AWS_REGION", "AWS_LAMBDA_RUNTIME_API", "MY_VAR"]
        return {"env": {k: os.environ.get(k) for k in keys},
                "ctx": {"name": context.function_name, "arn": context.invoked_function_arn,
                        "mem": context.memory_limit_in_mb, "left": context.get_remaining_time_in_millis(),
                        "rid": context.aws_request_id}}
    """
    create(lam, "envy", src, MemorySize=512, Timeout=9, Environment={"Variables": {"MY_VAR": "yes"}})
    resp = lam.invoke(FunctionName="envy")
    out = payload(resp)
    env, ctx = out["env"], out["ctx"]
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "envy"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/envy"
    assert "[$LATEST]" in env["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert env["_HANDLER"] == "app.handler" and env["AWS_REGION"] == "us-east-1"
    assert env["LAMBDA_TASK_ROOT"] and env["AWS_LAMBDA_RUNTIME_API"].startswith("127.0.0.1:")
    assert env["MY_VAR"] == "yes"
    assert ctx["name"] == "envy" and ctx["arn"].endswith(":function:envy") and ctx["mem"] == "512"
    assert 0 < ctx["left"] <= 9000
    assert ctx["rid"] == resp["ResponseMetadata"]["RequestId"]


def test_function_names_arns_and_qualifiers(lam) -> None:
    create(lam, "named", IDENTITY)
    for name in (
        "named",
        "arn:aws:lambda:us-east-1:000000000000:function:named",
        "arn:aws:lambda:us-east-1:000000000000:function:named:$LATEST",
        "000000000000:function:named",
        "named:$LATEST",
    ):
        assert lam.invoke(FunctionName=name)["StatusCode"] == 200, name
    assert lam.invoke(FunctionName="named", Qualifier="$LATEST")["StatusCode"] == 200
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="named", Qualifier="7")


def test_function_error_is_200_with_unhandled(lam) -> None:
    create(lam, "boom", "def handler(e, c):\n    raise ValueError('bad input: 42')\n")
    resp = lam.invoke(FunctionName="boom")
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    body = payload(resp)
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "bad input: 42"
    assert isinstance(body["stackTrace"], list)


def test_timeout_kills_the_sandbox_and_answers_lambdas_error(lam) -> None:
    create(lam, "sleepy", SLOW, Timeout=1)
    t0 = time.monotonic()
    resp = lam.invoke(FunctionName="sleepy", Payload=json.dumps({"sleep": 30}))
    elapsed = time.monotonic() - t0
    assert resp["FunctionError"] == "Unhandled"
    body = payload(resp)
    assert body["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in body["errorMessage"]
    assert elapsed < 20  # answered at the timeout, not after the sleep (a bound, not a benchmark)
    ok = lam.invoke(FunctionName="sleepy", Payload=json.dumps({"sleep": 0}))
    assert "FunctionError" not in ok  # a fresh sandbox serves the next invoke


def test_crash_mid_invoke_is_runtime_exit_error(lam) -> None:
    create(lam, "crash", "import os\ndef handler(e, c):\n    os._exit(3)\n")
    resp = lam.invoke(FunctionName="crash")
    assert resp["FunctionError"] == "Unhandled"
    body = payload(resp)
    assert body["errorType"] == "Runtime.ExitError"
    assert "exit status 3" in body["errorMessage"]
    assert resp["ResponseMetadata"]["RequestId"] in body["errorMessage"]


def test_init_error_goes_to_the_invoke_that_caused_it(lam) -> None:
    create(lam, "broken", "import no_such_module_anywhere\ndef handler(e, c):\n    return 1\n")
    resp = lam.invoke(FunctionName="broken")
    assert resp["StatusCode"] == 200 and resp["FunctionError"] == "Unhandled"
    body = payload(resp)
    assert body["errorType"] == "Runtime.ImportModuleError"
    assert "no_such_module_anywhere" in body["errorMessage"]
    # and again: each invoke gets its own init attempt, nothing hangs
    assert payload(lam.invoke(FunctionName="broken"))["errorType"] == "Runtime.ImportModuleError"


def test_log_tail_has_lambdas_lines_and_only_this_invokes_output(lam) -> None:
    src = """
    def handler(event, context):
        print("line for", event["n"])
        return event["n"]
    """
    create(lam, "logger", src)
    for n in (1, 2):
        resp = lam.invoke(FunctionName="logger", Payload=json.dumps({"n": n}), LogType="Tail")
        rid = resp["ResponseMetadata"]["RequestId"]
        text = base64.b64decode(resp["LogResult"]).decode()
        lines = text.splitlines()
        assert lines[0] == f"START RequestId: {rid} Version: $LATEST"
        assert f"line for {n}" in text
        assert f"line for {3 - n}" not in text
        assert f"END RequestId: {rid}" in lines
        report = next(line for line in lines if line.startswith("REPORT"))
        for field in ("Duration:", "Billed Duration:", "Memory Size: 128 MB", "Max Memory Used:"):
            assert field in report
        assert ("Init Duration:" in report) == (n == 1)
    resp = lam.invoke(FunctionName="logger", Payload=json.dumps({"n": 3}))
    assert "LogResult" not in resp


def test_log_tail_is_the_last_4kb(lam) -> None:
    create(lam, "chatty", "def handler(e, c):\n    print('x' * 20000)\n    print('the end')\n")
    resp = lam.invoke(FunctionName="chatty", LogType="Tail")
    raw = base64.b64decode(resp["LogResult"])
    assert len(raw) == 4096
    assert b"the end" in raw and raw.rstrip().split(b"\n")[-1].startswith(b"REPORT")


def test_provided_runtime_bootstrap_shell_script_with_curl(lam) -> None:
    bootstrap = r"""
    #!/bin/sh
    set -eu
    API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
    while true; do
      HEADERS="$(mktemp)"
      EVENT=$(curl -sS -LD "$HEADERS" "$API/invocation/next")
      REQUEST_ID=$(grep -i Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
      echo "shell got $EVENT"
      BODY="{\"echo\": $EVENT, \"by\": \"sh\"}"
      curl -sS -X POST "$API/invocation/$REQUEST_ID/response" -d "$BODY" > /dev/null
      rm -f "$HEADERS"
    done
    """
    lam.create_function(
        FunctionName="shell",
        Runtime="provided.al2023",
        Handler="unused",
        Role=ROLE,
        Code={"ZipFile": make_zip({"bootstrap": bootstrap}, {"bootstrap": 0o755})},
    )
    for i in range(3):
        resp = lam.invoke(FunctionName="shell", Payload=json.dumps({"i": i}), LogType="Tail")
        assert payload(resp) == {"echo": {"i": i}, "by": "sh"}
        assert f'shell got {{"i": {i}}}'.replace(": ", ":") in base64.b64decode(
            resp["LogResult"]
        ).decode().replace(": ", ":")


def test_provided_runtime_python_bootstrap_reports_errors(lam) -> None:
    bootstrap = """
    #!/usr/bin/env python3
    import json, os, urllib.request
    api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
    while True:
        with urllib.request.urlopen(api + "next") as r:
            rid = r.headers["Lambda-Runtime-Aws-Request-Id"]
            event = json.loads(r.read())
        if event.get("fail"):
            body = json.dumps({"errorMessage": "asked to fail", "errorType": "CustomError"}).encode()
            req = urllib.request.Request(api + rid + "/error", data=body, method="POST",
                                         headers={"Lambda-Runtime-Function-Error-Type": "CustomError"})
        else:
            req = urllib.request.Request(api + rid + "/response", data=json.dumps({"ok": event}).encode(),
                                         method="POST")
        urllib.request.urlopen(req).read()
    """
    lam.create_function(
        FunctionName="pyboot",
        Runtime="provided",
        Handler="x",
        Role=ROLE,
        Code={"ZipFile": make_zip({"bootstrap": bootstrap}, {"bootstrap": 0o755})},
    )
    assert payload(lam.invoke(FunctionName="pyboot", Payload=b'{"a": 1}')) == {"ok": {"a": 1}}
    resp = lam.invoke(FunctionName="pyboot", Payload=b'{"fail": true}')
    assert resp["FunctionError"] == "Unhandled"
    assert payload(resp) == {"errorMessage": "asked to fail", "errorType": "CustomError"}


def test_missing_bootstrap_is_an_init_error(lam) -> None:
    lam.create_function(
        FunctionName="nobootstrap",
        Runtime="provided.al2",
        Handler="x",
        Role=ROLE,
        Code={"ZipFile": make_zip({"readme.txt": "no bootstrap here"})},
    )
    resp = lam.invoke(FunctionName="nobootstrap")
    assert resp["FunctionError"] == "Unhandled"
    assert payload(resp)["errorType"] == "Runtime.InvalidEntrypoint"


def test_warm_reuse_lands_on_the_same_sandbox(lam) -> None:
    create(lam, "warm", IDENTITY)
    first = payload(lam.invoke(FunctionName="warm"))
    second = payload(lam.invoke(FunctionName="warm"))
    third = payload(lam.invoke(FunctionName="warm", LogType="Tail"))
    assert first["sandbox"] == second["sandbox"] == third["sandbox"]


def test_reserved_concurrency_one_throttles_the_second_concurrent_invoke(lam) -> None:
    create(lam, "one", SLOW, Timeout=10)
    lam.put_function_concurrency(FunctionName="one", ReservedConcurrentExecutions=1)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(payload(lam.invoke(FunctionName="one", Payload=b'{"sleep": 2}')))
        except ClientError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, ClientError)]
    assert len(errors) == 1 and len(results) == 2
    err = errors[0].response
    assert err["Error"]["Code"] == "TooManyRequestsException"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert err["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert err["ResponseMetadata"]["HTTPHeaders"]["retry-after"]
    # the limit frees up once the first is done
    assert "sandbox" in payload(lam.invoke(FunctionName="one", Payload=b'{"sleep": 0}'))


def test_reserved_concurrency_zero_throttles_everything(lam) -> None:
    create(lam, "zero", IDENTITY)
    lam.put_function_concurrency(FunctionName="zero", ReservedConcurrentExecutions=0)
    with pytest.raises(lam.exceptions.TooManyRequestsException):
        lam.invoke(FunctionName="zero")


def test_account_concurrency_throttles_with_its_reason(tmp_path) -> None:
    from conftest import EmberServer

    srv = EmberServer(tmp_path / "acct", "--account-concurrency", "1").start()
    try:
        lam = srv.client()
        create(lam, "acct", SLOW, Timeout=10)
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(lambda: lam.invoke(FunctionName="acct", Payload=b'{"sleep": 2}'))
            time.sleep(0.5)
            with pytest.raises(lam.exceptions.TooManyRequestsException) as exc:
                lam.invoke(FunctionName="acct", Payload=b'{"sleep": 0}')
            assert exc.value.response["Reason"] == "ConcurrentInvocationLimitExceeded"
            assert "sandbox" in payload(first.result())
    finally:
        assert srv.stop() == 0


def test_herd_bound_50_concurrent_first_invokes(tmp_path) -> None:
    from conftest import EmberServer

    k = 3
    srv = EmberServer(tmp_path / "herd", "--max-starting", str(k)).start()
    try:
        lam = srv.client()
        # init takes a second, so all 50 arrive while the first sandboxes are still starting
        create(lam, "herd", "import time\ntime.sleep(1.0)\n" + SLOW, Timeout=30)
        barrier = threading.Barrier(50)

        def call(_: int) -> dict:
            barrier.wait()
            return payload(lam.invoke(FunctionName="herd", Payload=b'{"sleep": 0.05}'))

        with ThreadPoolExecutor(50) as ex:
            results = list(ex.map(call, range(50)))
        assert len(results) == 50 and all("sandbox" in r for r in results)
        sandboxes = {r["sandbox"] for r in results}
        assert 1 <= len(sandboxes) <= k
        health = json.loads(urllib.request.urlopen(f"{srv.url}/health").read())
        assert health["sandboxes"] <= k
    finally:
        assert srv.stop() == 0


def test_bad_invoke_input_gets_lambda_errors_and_loses_nothing(lam, server) -> None:
    create(lam, "strict", IDENTITY)
    with pytest.raises(lam.exceptions.InvalidRequestContentException) as exc:
        lam.invoke(FunctionName="strict", Payload=b"{not json")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(lam.exceptions.RequestTooLargeException) as exc:
        lam.invoke(FunctionName="strict", Payload=b'"' + b"x" * (6 * 1024 * 1024) + b'"')
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke(FunctionName="strict", LogType="Sideways")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke(FunctionName="strict", ClientContext="%%% not base64")
    url = f"{server.url}/2015-03-31/functions/strict/invocations"
    req = urllib.request.Request(
        url, data=b"{}", method="POST", headers={"X-Amz-Invocation-Type": "Sideways"}
    )
    with pytest.raises(urllib.error.HTTPError) as http_exc:
        urllib.request.urlopen(req)
    assert http_exc.value.code == 400
    assert http_exc.value.headers["x-amzn-ErrorType"] == "InvalidParameterValueException"
    # nothing was lost: the function still works, nothing is stuck in flight
    assert payload(lam.invoke(FunctionName="strict", Payload=b"[1]"))["event"] == [1]
    health = json.loads(urllib.request.urlopen(f"{server.url}/health").read())
    assert health["unreserved_inflight"] == 0


def test_dry_run_is_204_and_runs_nothing(lam) -> None:
    create(lam, "dry", IDENTITY)
    resp = lam.invoke(FunctionName="dry", InvocationType="DryRun")
    assert resp["StatusCode"] == 204
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="nope", InvocationType="DryRun")


def test_client_context_reaches_the_function(lam) -> None:
    src = """
    def handler(event, context):
        return {"custom": context.client_context.custom if context.client_context else None}
    """
    create(lam, "ctx", src)
    cc = base64.b64encode(json.dumps({"custom": {"who": "me"}}).encode()).decode()
    assert payload(lam.invoke(FunctionName="ctx", ClientContext=cc)) == {"custom": {"who": "me"}}
