"""The server's life: restart persistence, graceful shutdown with invokes in flight, no orphans,
and the AWS CLI working unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROLE, EmberServer, create, make_zip, pid_alive, wait_for

IDENTITY = """
import os
def handler(event, context):
    return {"pid": os.getpid(), "v": "persisted"}
"""


def test_definitions_and_code_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = EmberServer(data).start()
    lam = srv.client()
    create(lam, "keep", IDENTITY, MemorySize=256, Environment={"Variables": {"K": "V"}})
    lam.put_function_concurrency(FunctionName="keep", ReservedConcurrentExecutions=5)
    lam.get_waiter("function_active_v2").wait(FunctionName="keep")  # the settled RevisionId is the stored one
    before = lam.get_function(FunctionName="keep")
    assert srv.stop() == 0

    srv2 = EmberServer(data).start()
    try:
        lam2 = srv2.client()
        after = lam2.get_function(FunctionName="keep")
        for key in ("CodeSha256", "RevisionId", "MemorySize", "Environment", "LastModified"):
            assert after["Configuration"][key] == before["Configuration"][key], key
        assert after["Concurrency"] == {"ReservedConcurrentExecutions": 5}
        assert json.loads(lam2.invoke(FunctionName="keep")["Payload"].read())["v"] == "persisted"
    finally:
        assert srv2.stop() == 0


def test_sigterm_drains_in_flight_invokes_and_leaves_no_process(tmp_path: Path) -> None:
    # host pids are what this checks, and a sandbox's pid namespace hides them; the isolated
    # twin is test_isolation.py::test_nothing_left_after_shutdown (by uid)
    srv = EmberServer(tmp_path / "data", "--isolation", "none").start()
    lam = srv.client()
    src = """
    import os, time
    def handler(event, context):
        time.sleep(event.get("sleep", 0))
        return {"pid": os.getpid()}
    """
    create(lam, "drain", src, Timeout=20)
    pids = {json.loads(lam.invoke(FunctionName="drain")["Payload"].read())["pid"]}
    out: dict[str, object] = {}

    def slow() -> None:
        out["resp"] = json.loads(lam.invoke(FunctionName="drain", Payload=b'{"sleep": 2}')["Payload"].read())

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.8)  # the slow invoke is running
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert "pid" in out["resp"]  # the in-flight invoke finished with its result
    pids.add(out["resp"]["pid"])  # type: ignore[index]
    assert srv.stop() == 0
    for pid in pids:
        assert wait_for(lambda pid=pid: not pid_alive(pid), 5), f"sandbox {pid} outlived ember"


def test_sigint_also_stops_cleanly_and_kills_runtime_children(tmp_path: Path) -> None:
    # host pids are what this checks, and a sandbox's pid namespace hides them; the isolated
    # twin is test_isolation.py::test_nothing_left_after_shutdown (by uid)
    srv = EmberServer(tmp_path / "data", "--isolation", "none").start()
    lam = srv.client()
    src = """
    import os, subprocess
    CHILD = subprocess.Popen(["sleep", "300"])
    def handler(event, context):
        return {"pid": os.getpid(), "child": CHILD.pid}
    """
    create(lam, "kids", src)
    body = json.loads(lam.invoke(FunctionName="kids")["Payload"].read())
    assert pid_alive(body["pid"]) and pid_alive(body["child"])
    assert srv.stop(signal.SIGINT) == 0
    assert wait_for(lambda: not pid_alive(body["pid"]) and not pid_alive(body["child"]), 5)


def test_aws_cli_works_unchanged(server, tmp_path: Path) -> None:
    aws = Path(sys.executable).parent / "aws"
    assert aws.exists(), "the AWS CLI (PyPI awscli) is part of the test dependencies"
    zip_path = tmp_path / "fn.zip"
    zip_path.write_bytes(
        make_zip({"app.py": "def handler(e, c):\n    return {'hello': e.get('who', 'cli')}\n"})
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_PAGER": "",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }

    def cli(*args: str) -> dict:
        proc = subprocess.run(
            [str(aws), "lambda", *args, "--endpoint-url", server.url, "--output", "json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    created = cli(
        "create-function",
        "--function-name",
        "hello",
        "--runtime",
        "python3.12",
        "--handler",
        "app.handler",
        "--role",
        ROLE,
        "--zip-file",
        f"fileb://{zip_path}",
    )
    assert created["FunctionName"] == "hello"
    out_file = tmp_path / "out.json"
    result = cli(
        "invoke",
        "--function-name",
        "hello",
        "--payload",
        '{"who": "aws"}',
        str(out_file),
    )
    assert result["StatusCode"] == 200
    assert json.loads(out_file.read_text()) == {"hello": "aws"}
    listed = cli("list-functions")
    assert [f["FunctionName"] for f in listed["Functions"]] == ["hello"]
    cli("delete-function", "--function-name", "hello")
    assert cli("list-functions")["Functions"] == []
