"""Node.js runtimes (nodejs18.x, 20.x, 22.x on the host's node, through ember's own runtime client) and the
environment real code reads (for Python too), against the real `ember serve`, unisolated and isolated
(bubblewrap, and unshare(1)): handler resolution (CommonJS, ESM, .js/.mjs/.cjs, nested paths), async and
callback handlers, context.done/succeed/fail, the context object, errors and init errors in Lambda's shape,
timeouts, console output in the function logs and the log tail, role credentials, Powertools."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EMBER, ROLE, EmberServer, make_zip, wait_for

from ember.api.credentials import RoleCredentials, RoleCredentialsError, load_role_credentials

NODE = shutil.which("node")
CAN_ISOLATE = os.geteuid() == 0 and all(shutil.which(b) for b in ("bwrap", "unshare", "setpriv"))
pytestmark = pytest.mark.skipif(
    NODE is None and os.environ.get("CI") != "true", reason="needs node (scripts/install-deps.sh installs it)"
)
_ISOLATED = pytest.mark.skipif(
    not CAN_ISOLATE and os.environ.get("CI") != "true", reason="needs root, bubblewrap and util-linux (CI has them)"
)
MODES = ["none", pytest.param("bwrap", marks=_ISOLATED), pytest.param("unshare", marks=_ISOLATED)]
OTHER_ROLE = "arn:aws:iam::000000000000:role/not-in-the-file"
ROLE_KEYS = {"AccessKeyId": "AKIAROLEFILE", "SecretAccessKey": "role-secret", "SessionToken": "role-token"}
OWN_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAEMBEROWN", "AWS_SECRET_ACCESS_KEY": "own-secret", "AWS_SESSION_TOKEN": "own-tok"}

ENV_KEYS = [
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "AWS_LAMBDA_INITIALIZATION_TYPE", "TZ", "LANG",
    "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR", "PATH", "LD_LIBRARY_PATH", "NODE_PATH", "_X_AMZN_TRACE_ID",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_LAMBDA_FUNCTION_NAME", "_HANDLER",
    "AWS_LAMBDA_RUNTIME_API",
]  # fmt: skip

CONTEXT_JS = """
exports.handler = async (event, context) => {
  const keys = KEYS;
  const env = {};
  for (const k of keys) env[k] = process.env[k] ?? null;
  console.log("node says hi", event.n);
  return {
    env, event, tz: new Date(0).getTimezoneOffset(),
    ctx: {
      functionName: context.functionName, functionVersion: context.functionVersion,
      invokedFunctionArn: context.invokedFunctionArn, memoryLimitInMB: context.memoryLimitInMB,
      awsRequestId: context.awsRequestId, logGroupName: context.logGroupName, logStreamName: context.logStreamName,
      remaining: context.getRemainingTimeInMillis(), clientContext: context.clientContext ?? null,
      callbackWaitsForEmptyEventLoop: context.callbackWaitsForEmptyEventLoop,
    },
  };
};
""".replace("KEYS", json.dumps(ENV_KEYS))

ENV_PY = """
import os, time
KEYS = ENV_KEYS
def handler(event, context):
    return {"env": {k: os.environ.get(k) for k in KEYS}, "tz": time.timezone}
""".replace("ENV_KEYS", repr(ENV_KEYS))


def payload(resp) -> dict:
    return json.loads(resp["Payload"].read())


def tail(resp) -> str:
    return base64.b64decode(resp.get("LogResult", "")).decode(errors="replace")


@pytest.fixture(scope="module", params=MODES)
def srv(request, tmp_path_factory) -> Iterator[EmberServer]:
    """One ember per isolation mode, with a role-credentials file for ROLE and ember's own credentials
    passed through to every other role."""
    tmp = tmp_path_factory.mktemp("node")
    creds = tmp / "roles.json"
    creds.write_text(json.dumps({ROLE: ROLE_KEYS}))
    saved = {k: os.environ.get(k) for k in OWN_KEYS}
    os.environ.update(OWN_KEYS)
    try:
        server = EmberServer(
            tmp / "data", "--isolation", request.param, "--pool", "1", "--role-credentials", str(creds),
            "--pass-credentials",
        ).start()  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    server.mode = request.param  # type: ignore[attr-defined]
    server.creds = creds  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lam(srv):
    return srv.client()


_names: dict[str, int] = {}


def deploy(lam, files: dict[str, str], handler: str, runtime: str = "nodejs20.x", **kw: object) -> str:
    """A new function of `files`; returns its (unique) name."""
    base = handler.replace("/", "-").replace(".", "-")[:40]
    _names[base] = _names.get(base, 0) + 1
    name = f"{base}-{_names[base]}"
    lam.create_function(
        FunctionName=name, Runtime=runtime, Handler=handler, Role=kw.pop("Role", ROLE),
        Code={"ZipFile": make_zip(files)}, **kw,
    )  # fmt: skip
    return name


def ok(lam, name: str, event: object = None, **kw: object):
    resp = lam.invoke(FunctionName=name, Payload=json.dumps(event if event is not None else {}), LogType="Tail", **kw)
    assert "FunctionError" not in resp, (payload(resp), tail(resp))
    return resp


# ------------------------------------------------------------------ handler resolution


def test_commonjs_async_handler_context_and_environment(srv, lam) -> None:
    name = deploy(lam, {"app.js": CONTEXT_JS}, "app.handler", MemorySize=256, Timeout=7)
    resp = ok(lam, name, {"n": 1}, ClientContext=base64.b64encode(b'{"custom": {"k": "v"}}').decode())
    out = payload(resp)
    env, ctx = out["env"], out["ctx"]
    assert out["event"] == {"n": 1}
    assert ctx["functionName"] == name and ctx["functionVersion"] == "$LATEST"
    assert ctx["invokedFunctionArn"] == f"arn:aws:lambda:us-east-1:000000000000:function:{name}"
    assert ctx["memoryLimitInMB"] == "256"
    assert ctx["awsRequestId"] == resp["ResponseMetadata"]["RequestId"]
    assert ctx["logGroupName"] == f"/aws/lambda/{name}" and "[$LATEST]" in ctx["logStreamName"]
    assert 0 < ctx["remaining"] <= 7000
    assert ctx["clientContext"] == {"custom": {"k": "v"}}
    assert ctx["callbackWaitsForEmptyEventLoop"] is True
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_nodejs20.x"
    task = "/var/task" if srv.mode != "none" else env["LAMBDA_TASK_ROOT"]
    assert env["LAMBDA_TASK_ROOT"] == task
    assert env["NODE_PATH"].split(":")[:2] == ["/opt/nodejs/node20/node_modules", "/opt/nodejs/node_modules"]
    assert env["NODE_PATH"].split(":")[-1] == task
    runtime_dir = "/var/runtime" if srv.mode != "none" else env["LAMBDA_RUNTIME_DIR"]
    assert env["LAMBDA_RUNTIME_DIR"] == runtime_dir and runtime_dir.endswith(("/var/runtime", "/runtimes/node"))
    assert f"{runtime_dir}:{task}" in env["NODE_PATH"]
    _common_environment(env, out["tz"], task)
    assert "node says hi 1" in tail(resp)


def _common_environment(env: dict, tz_offset: int, task: str) -> None:
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["TZ"] == ":UTC" and tz_offset == 0
    assert env["LANG"] == "en_US.UTF-8"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin:/opt/bin"
    ld = env["LD_LIBRARY_PATH"].split(":")
    assert ld[:2] == ["/lib64", "/usr/lib64"] and ld[-3:] == [task, f"{task}/lib", "/opt/lib"]
    assert env["_X_AMZN_TRACE_ID"].startswith("Root=1-")
    assert env["AWS_LAMBDA_RUNTIME_API"]
    # ROLE is in the credentials file
    assert env["AWS_ACCESS_KEY_ID"] == ROLE_KEYS["AccessKeyId"]
    assert env["AWS_SECRET_ACCESS_KEY"] == ROLE_KEYS["SecretAccessKey"]
    assert env["AWS_SESSION_TOKEN"] == ROLE_KEYS["SessionToken"]


def test_python_gets_the_same_environment(srv, lam) -> None:
    name = deploy(lam, {"app.py": ENV_PY}, "app.handler", runtime="python3.12")
    out = payload(ok(lam, name))
    env = out["env"]
    task = "/var/task" if srv.mode != "none" else env["LAMBDA_TASK_ROOT"]
    assert env["AWS_EXECUTION_ENV"] == "AWS_Lambda_python3.12"
    assert env["LAMBDA_TASK_ROOT"] == task and env["NODE_PATH"] is None
    _common_environment(env, out["tz"], task)


@pytest.mark.parametrize("runtime", ["python3.12", "nodejs20.x"])
def test_trace_id_is_set_per_invoke(lam, runtime: str) -> None:
    files = {"app.py": ENV_PY} if runtime.startswith("py") else {"app.js": CONTEXT_JS}
    name = deploy(lam, files, "app.handler", runtime=runtime)
    traces = {payload(ok(lam, name))["env"]["_X_AMZN_TRACE_ID"] for _ in range(3)}
    assert len(traces) == 3 and all(t.startswith("Root=1-") and t.endswith(";Sampled=0") for t in traces)


@pytest.mark.parametrize("runtime", ["python3.12", "nodejs22.x"])
def test_roles_not_in_the_file_get_embers_own_credentials(lam, runtime: str) -> None:
    files = {"app.py": ENV_PY} if runtime.startswith("py") else {"app.js": CONTEXT_JS}
    name = deploy(lam, files, "app.handler", runtime=runtime, Role=OTHER_ROLE)
    env = payload(ok(lam, name))["env"]
    assert {k: env[k] for k in OWN_KEYS} == OWN_KEYS


def test_a_changed_credentials_file_reaches_new_sandboxes(srv, lam) -> None:
    first = deploy(lam, {"app.js": CONTEXT_JS}, "app.handler")
    assert payload(ok(lam, first))["env"]["AWS_SESSION_TOKEN"] == "role-token"
    path: Path = srv.creds
    try:
        path.write_text(json.dumps({"*": {"Credentials": {**ROLE_KEYS, "SessionToken": "rotated"}}}))  # sts shape
        second = deploy(lam, {"app.js": CONTEXT_JS}, "app.handler", Role=OTHER_ROLE)
        assert payload(ok(lam, second))["env"]["AWS_SESSION_TOKEN"] == "rotated"
        assert payload(ok(lam, first))["env"]["AWS_SESSION_TOKEN"] == "role-token"  # its sandbox keeps its own
    finally:
        path.write_text(json.dumps({ROLE: ROLE_KEYS}))
        os.utime(path, (time.time() + 5, time.time() + 5))


@pytest.mark.parametrize(
    ("files", "handler"),
    [
        ({"app.mjs": "export const handler = async (e) => ({esm: 'mjs', e});"}, "app.handler"),
        (
            {"package.json": '{"type": "module"}',
             "app.js": "export async function handler(e) { return {esm: 'js', e}; }"},
            "app.handler",
        ),
        ({"app.cjs": "module.exports.handler = async (e) => ({cjs: true, e});"}, "app.handler"),
        ({"src/lambda/fn.js": "exports.go = async (e) => ({nested: true, e});"}, "src/lambda/fn.go"),
        ({"lib/deep.mjs": "export const api = {v1: {get: async (e) => ({deep: true, e})}};"}, "lib/deep.api.v1.get"),
        ({"lib/index.js": "exports.handler = async (e) => ({nested: true, e});"}, "lib.handler"),
        (
            {"app.js": "exports.handler = async (e) => require('helper').twice(e.n);",
             "node_modules/helper/index.js": "exports.twice = (n) => ({twice: 2 * n});"},
            "app.handler",
        ),
    ],
    ids=["mjs", "js-type-module", "cjs", "nested-path", "nested-export", "directory-index", "node_modules"],
)
def test_handler_resolution(lam, files: dict[str, str], handler: str) -> None:
    name = deploy(lam, files, handler)
    out = payload(ok(lam, name, {"n": 21}))
    assert out in (
        {"esm": "mjs", "e": {"n": 21}}, {"esm": "js", "e": {"n": 21}}, {"cjs": True, "e": {"n": 21}},
        {"nested": True, "e": {"n": 21}}, {"deep": True, "e": {"n": 21}}, {"twice": 42},
    )  # fmt: skip


CALLBACKS = """
exports.callback = (event, context, callback) => {
  setTimeout(() => { globalThis.timerRan = true; }, 100);
  callback(null, {cb: true, timerRanBefore: Boolean(globalThis.timerRan)});
};
exports.noWait = (event, context, callback) => {
  context.callbackWaitsForEmptyEventLoop = false;
  const t0 = Date.now();
  setTimeout(() => {}, 2000);
  callback(null, {noWait: true});
};
exports.succeed = (event, context) => { setTimeout(() => {}, 2000); context.succeed({succeeded: event}); };
exports.done = (event, context) => context.done(null, {done: 1});
exports.doneError = (event, context) => context.done(new TypeError("done with an error"));
exports.fail = (event, context) => context.fail("plain string failure");
exports.sync = (event) => { };
exports.callbackError = (event, context, callback) => callback(new RangeError("out of range"));
exports.throws = async () => { const e = new Error("boom 42"); e.name = "CustomError"; throw e; };
exports.rejectsString = () => Promise.reject("just a string");
exports.crash = (event, context, callback) => { setImmediate(() => { throw new Error("escaped"); }); };
exports.slow = async () => new Promise((r) => setTimeout(r, 30000));
"""


def test_callback_handler_waits_for_the_empty_event_loop(lam) -> None:
    name = deploy(lam, {"h.js": CALLBACKS}, "h.callback")
    t0 = time.monotonic()
    assert payload(ok(lam, name)) == {"cb": True, "timerRanBefore": False}
    assert time.monotonic() - t0 >= 0.1  # answered after the timer (the loop emptied)
    assert payload(ok(lam, name)) == {"cb": True, "timerRanBefore": True}  # same process, timer ran


@pytest.mark.parametrize(
    ("export", "expected"),
    [("noWait", {"noWait": True}), ("succeed", {"succeeded": {"x": 1}}), ("done", {"done": 1}), ("sync", None)],
)
def test_answers_without_waiting(lam, export: str, expected: object) -> None:
    name = deploy(lam, {"h.js": CALLBACKS}, f"h.{export}")
    t0 = time.monotonic()
    assert payload(ok(lam, name, {"x": 1})) == expected
    if export in ("noWait", "succeed"):
        assert time.monotonic() - t0 < 1.9  # not after the 2 s timer


@pytest.mark.parametrize(
    ("export", "error_type", "message"),
    [
        ("throws", "CustomError", "boom 42"),
        ("callbackError", "RangeError", "out of range"),
        ("doneError", "TypeError", "done with an error"),
        ("fail", "string", "plain string failure"),
        ("rejectsString", "string", "just a string"),
    ],
)
def test_function_errors_in_lambdas_shape(lam, export: str, error_type: str, message: str) -> None:
    name = deploy(lam, {"h.js": CALLBACKS}, f"h.{export}")
    resp = lam.invoke(FunctionName=name, LogType="Tail")
    assert resp["StatusCode"] == 200 and resp["FunctionError"] == "Unhandled"
    body = payload(resp)
    assert body["errorType"] == error_type and body["errorMessage"] == message
    assert isinstance(body["trace"], list)
    if error_type != "string":
        assert body["trace"][0] == f"{error_type}: {message}" and any("/h.js:" in t for t in body["trace"])
    assert "\tERROR\tInvoke Error \t" in tail(resp)
    assert "FunctionError" not in lam.invoke(FunctionName=deploy(lam, {"h.js": CALLBACKS}, "h.done"))


def test_an_uncaught_exception_fails_the_invoke_and_the_next_one_gets_a_new_sandbox(lam) -> None:
    name = deploy(lam, {"h.js": CALLBACKS + "exports.pid = async () => process.pid;"}, "h.crash")
    resp = lam.invoke(FunctionName=name)
    assert resp["FunctionError"] == "Unhandled"
    body = payload(resp)
    assert body["errorType"] == "Error" and body["errorMessage"] == "escaped"
    lam.update_function_configuration(FunctionName=name, Handler="h.pid")
    assert isinstance(payload(ok(lam, name)), int)


@pytest.mark.parametrize(
    ("files", "handler", "error_type", "message"),
    [
        ({"app.js": "exports.handler = async () => 1;"}, "missing.handler", "Runtime.ImportModuleError",
         "Error: Cannot find module 'missing'"),
        ({"app.js": "exports.handler = async () => 1;"}, "app.nothere", "Runtime.HandlerNotFound",
         "app.nothere is undefined or not exported"),
        ({"app.js": "exports.handler = 42;"}, "app.handler", "Runtime.HandlerNotFound",
         "app.handler is not a function"),
        ({"app.js": "require('not-installed'); exports.handler = async () => 1;"}, "app.handler",
         "Runtime.ImportModuleError", "Error: Cannot find module 'not-installed'"),
        ({"app.mjs": "import x from 'not-installed'; export const handler = async () => x;"}, "app.handler",
         "Runtime.ImportModuleError", "Error [ERR_MODULE_NOT_FOUND]: Cannot find package 'not-installed'"),
        ({"app.js": "exports.handler = async () => {;"}, "app.handler", "Runtime.UserCodeSyntaxError",
         "SyntaxError: Unexpected"),
        ({"app.js": "throw new TypeError('bad config');"}, "app.handler", "TypeError", "bad config"),
        ({"app.js": "exports.handler = async () => 1;"}, "nodots", "Runtime.MalformedHandlerName", "Bad handler"),
    ],
    ids=["missing-module", "missing-handler", "not-a-function", "missing-require", "missing-import", "syntax",
         "top-level-throw", "malformed"],
)  # fmt: skip
def test_init_errors(lam, files: dict[str, str], handler: str, error_type: str, message: str) -> None:
    name = deploy(lam, files, handler)
    for _ in range(2):  # each invoke tries a new sandbox, and fails the same way
        resp = lam.invoke(FunctionName=name, LogType="Tail")
        assert resp["FunctionError"] == "Unhandled"
        body = payload(resp)
        assert body["errorType"] == error_type, body
        assert body["errorMessage"].startswith(message), body


def test_timeout(lam) -> None:
    name = deploy(lam, {"h.js": CALLBACKS}, "h.slow", Timeout=1)
    t0 = time.monotonic()
    resp = lam.invoke(FunctionName=name)
    assert time.monotonic() - t0 < 20
    body = payload(resp)
    assert body["errorType"] == "Sandbox.Timedout" and "Task timed out after 1.00 seconds" in body["errorMessage"]


def test_console_output_reaches_the_function_logs_and_the_tail(srv, lam) -> None:
    src = """
    console.log("at init");
    exports.handler = async (e) => {
      console.log("log", e.n); console.info("info"); console.warn("warn"); console.error("error", new Error("shown"));
      console.debug("two\\nlines");
      return e.n;
    };
    """
    name = deploy(lam, {"app.js": src}, "app.handler")
    resp = ok(lam, name, {"n": 7})
    rid = resp["ResponseMetadata"]["RequestId"]
    lines = tail(resp).split("\n")  # not splitlines(): a message's own newlines are carriage returns
    mine = [ln.split("\t") for ln in lines if ln.count("\t") >= 3]
    expected = [(rid, "INFO", "log 7"), (rid, "INFO", "info"), (rid, "WARN", "warn")]
    assert [(f[1], f[2], f[3]) for f in mine[:3]] == expected
    assert mine[3][1:3] == [rid, "ERROR"] and mine[3][3].startswith("error Error: shown\r    at ")  # one line
    assert any(f[2] == "DEBUG" and f[3] == "two\rlines" for f in mine)
    with urllib.request.urlopen(f"{srv.url}/_ember/logs/{name}") as r:
        events = [json.loads(line) for line in r.read().splitlines() if line.strip()]
    init = [e for e in events if e["request_id"] is None]
    assert any("\tundefined\tINFO\tat init" in e["message"] for e in init)
    # an init error is logged as Lambda logs it, in the function's log
    broken = deploy(lam, {"app.js": "exports.handler = 1;"}, "app.handler")
    assert lam.invoke(FunctionName=broken)["FunctionError"] == "Unhandled"

    def logged() -> str:
        with urllib.request.urlopen(f"{srv.url}/_ember/logs/{broken}") as r:
            return r.read().decode()

    assert wait_for(lambda: "Runtime.HandlerNotFound" in logged())  # written once the sandbox is gone
    assert "\\tundefined\\tERROR\\tUncaught Exception \\t" in logged()
    inv = next(e for e in events if e["request_id"] == rid)
    assert f"\t{rid}\tINFO\tlog 7" in inv["message"] and inv["message"].startswith(f"START RequestId: {rid}")


@pytest.mark.parametrize("runtime", ["nodejs18.x", "nodejs20.x", "nodejs22.x"])
def test_every_node_runtime_runs_on_the_hosts_node(lam, runtime: str) -> None:
    name = deploy(lam, {"app.js": "exports.handler = async () => [process.version, process.env.AWS_EXECUTION_ENV];"},
                  "app.handler", runtime=runtime)  # fmt: skip
    version, execution_env = payload(ok(lam, name))
    assert version == subprocess.run([NODE or "node", "--version"], capture_output=True, text=True).stdout.strip()
    assert execution_env == f"AWS_Lambda_{runtime}"


def test_node_needs_a_handler(lam) -> None:
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_function(
            FunctionName="nohandler", Runtime="nodejs20.x", Role=ROLE, Code={"ZipFile": make_zip({"a.js": ""})}
        )


# ------------------------------------------------------------------ the credentials file, on its own


def test_role_credentials_file_shapes(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        ROLE: {"AccessKeyId": "A", "SecretAccessKey": "S"},
        "arn:aws:iam::1:role/sts": {"Credentials": {"AccessKeyId": "B", "SecretAccessKey": "T", "SessionToken": "X",
                                                    "Expiration": "2030-01-01T00:00:00Z"}},
    }))  # fmt: skip
    got = load_role_credentials(path)
    assert got[ROLE] == {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S"}
    assert got["arn:aws:iam::1:role/sts"]["AWS_SESSION_TOKEN"] == "X"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    assert RoleCredentials(path).for_role(OTHER_ROLE) == {}  # no "*", nothing passed through
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "OWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "OWNS")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert RoleCredentials(path, pass_through=True).for_role(OTHER_ROLE) == {
        "AWS_ACCESS_KEY_ID": "OWN", "AWS_SECRET_ACCESS_KEY": "OWNS"
    }  # fmt: skip
    assert RoleCredentials(None, pass_through=False).for_role(ROLE) == {}
    for bad in ("[]", "{", json.dumps({"not-an-arn": {}}), json.dumps({ROLE: {"AccessKeyId": "A"}})):
        path.write_text(bad)
        with pytest.raises(RoleCredentialsError):
            load_role_credentials(path)


def test_serve_refuses_a_bad_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{nope")
    done = subprocess.run(
        [*EMBER, "serve", "--port", "0", "--data-dir", str(tmp_path / "d"), "--role-credentials", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--role-credentials" in done.stderr and "not JSON" in done.stderr


# ------------------------------------------------------------------ Powertools for AWS Lambda (Python)

POWERTOOLS = """
import os
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

logger = Logger()
metrics = Metrics(namespace="EmberTest")
tracer = Tracer()

@logger.inject_lambda_context(log_event=False)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler
def handler(event, context):
    logger.info("powertools says hi", extra={"n": event["n"]})
    metrics.add_metric(name="Greetings", unit=MetricUnit.Count, value=1)
    return {"region": os.environ["AWS_REGION"], "trace": os.environ.get("_X_AMZN_TRACE_ID")}
"""


def test_a_powertools_function_runs_unchanged(lam) -> None:
    """Logger (JSON lines with the Lambda context), Metrics (EMF on stdout), Tracer (disabled, as
    outside X-Ray). The packages travel in the zip, as a user bundles them (copied from the test extras)."""
    import aws_lambda_powertools
    import aws_xray_sdk
    import jmespath
    import typing_extensions
    import wrapt

    files = {"app.py": POWERTOOLS}
    for mod in (aws_lambda_powertools, aws_xray_sdk, jmespath, wrapt):
        root = Path(mod.__file__).parent
        for f in (f for f in root.rglob("*") if f.suffix in (".py", ".json")):
            files[f"{root.name}/{f.relative_to(root)}"] = f.read_text(encoding="utf-8")
    files["typing_extensions.py"] = Path(typing_extensions.__file__).read_text(encoding="utf-8")
    env = {"POWERTOOLS_SERVICE_NAME": "greeter", "POWERTOOLS_TRACE_DISABLED": "true"}
    name = deploy(lam, files, "app.handler", runtime="python3.12", Environment={"Variables": env})
    resp = ok(lam, name, {"n": 3})
    assert payload(resp)["region"] == "us-east-1"
    docs = [json.loads(ln) for ln in tail(resp).split("\n") if ln.startswith("{")]
    log = next(d for d in docs if d.get("message") == "powertools says hi")
    assert log["service"] == "greeter" and log["n"] == 3 and log["level"] == "INFO"
    assert log["function_name"] == name and log["function_request_id"] == resp["ResponseMetadata"]["RequestId"]
    assert log["cold_start"] is True and log["function_memory_size"] == "128"
    assert log["xray_trace_id"].startswith("1-")
    emf = [d for d in docs if "_aws" in d]
    greetings = next(d for d in emf if "Greetings" in d)
    assert greetings["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "EmberTest" and greetings["Greetings"] == [1.0]
    assert any("ColdStart" in d and d.get("function_name") == name for d in emf)
