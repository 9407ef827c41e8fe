"""The client commands against a real server: deploy (create, then update; exec bits kept), invoke,
ls, rm, top; one clear error line and a non-zero exit code for every failure."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import EMBER, free_port
from rich.console import Console

from ember.cli.client import ProgressBody, zip_dir
from ember.cli.top import render

APP = """
import os
def handler(event, context):
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    print("log line from app")
    return {"hello": event.get("name", "world"), "greeting": os.environ.get("GREETING"),
            "memory": context.memory_limit_in_mb}
"""

BOOTSTRAP = """#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  HEADERS="$(mktemp)"
  EVENT=$(curl -sS -LD "$HEADERS" "$API/invocation/next")
  REQUEST_ID=$(grep -i Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  curl -sS -X POST "$API/invocation/$REQUEST_ID/response" -d "{\\"shell\\": $EVENT}" > /dev/null
  rm -f "$HEADERS"
done
"""


def run(*args: str, endpoint: str | None = None, env: dict[str, str] | None = None, stdin: str | None = None):
    cmd = [*EMBER, *args]
    if endpoint is not None:
        cmd += ["--endpoint-url", endpoint]
    full_env = {k: v for k, v in os.environ.items() if k != "EMBER_ENDPOINT"}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env, input=stdin)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ember: ")
    return lines[0]


def write_app(path: Path, source: str = APP) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "app.py").write_text(source)
    return path


def test_deploy_creates_then_updates_and_invoke_prints_result(server, lam, tmp_path: Path) -> None:
    src = write_app(tmp_path / "fn")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    first = run(
        "deploy", str(src), "--name", "greeter", "--runtime", "python3.12", "--handler", "app.handler",
        "--env", "GREETING=hi", endpoint=server.url,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created greeter: python3.12 app.handler, 128 MB, 3 s, 1 files")
    conf = lam.get_function_configuration(FunctionName="greeter")
    assert conf["Environment"]["Variables"] == {"GREETING": "hi"}

    out = run("invoke", "greeter", "--payload", '{"name": "cli"}', endpoint=server.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"hello": "cli", "greeting": "hi", "memory": "128"}

    (src / "app.py").write_text(APP.replace('"hello"', '"hi again"'))
    second = run(
        "deploy", str(src), "--name", "greeter", "--runtime", "python3.12", "--handler", "app.handler",
        "--memory", "256", "--timeout", "7", endpoint=server.url,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("updated greeter: python3.12 app.handler, 256 MB, 7 s")
    conf = lam.get_function_configuration(FunctionName="greeter")
    assert (conf["MemorySize"], conf["Timeout"]) == (256, 7)
    assert conf["Environment"]["Variables"] == {"GREETING": "hi"}  # kept: --env not given
    out = run("invoke", "greeter", "--log", endpoint=server.url)
    assert json.loads(out.stdout) == {"hi again": "world", "greeting": "hi", "memory": "256"}
    assert "START RequestId:" in out.stderr and "log line from app" in out.stderr
    assert "REPORT RequestId:" in out.stderr and "Memory Size: 256 MB" in out.stderr

    failed = run("invoke", "greeter", "--payload", '{"fail": true}', endpoint=server.url)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["errorType"] == "RuntimeError"
    assert one_error_line(failed) == "ember: greeter failed: RuntimeError: asked to fail"

    piped = run("invoke", "greeter", "--payload", "-", endpoint=server.url, stdin='{"name": "stdin"}')
    assert json.loads(piped.stdout)["hi again"] == "stdin"


def test_deploy_keeps_exec_bits_for_a_bootstrap(server, tmp_path: Path) -> None:
    src = tmp_path / "shell"
    src.mkdir()
    (src / "bootstrap").write_text(BOOTSTRAP)
    (src / "bootstrap").chmod(0o755)
    deployed = run(
        "deploy", str(src), "--name", "shell", "--runtime", "provided.al2023", "--handler", "none",
        endpoint=server.url,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    out = run("invoke", "shell", "--payload", '{"a": 1}', endpoint=server.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"shell": {"a": 1}}


def test_ls_rm_and_endpoint_from_the_environment(server, tmp_path: Path) -> None:
    src = write_app(tmp_path / "fn")
    env = {"EMBER_ENDPOINT": server.url}
    empty = run("ls", env=env)
    assert empty.returncode == 0 and empty.stdout == ""
    for name in ("alpha", "beta"):
        r = run("deploy", str(src), "-n", name, "-r", "python3.12", "--handler", "app.handler", env=env)
        assert r.returncode == 0, r.stderr
    listed = run("ls", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "RUNTIME", "HANDLER", "MEMORY", "TIMEOUT", "CODE", "LAST", "MODIFIED"]
    assert [line.split()[0] for line in lines[1:]] == ["alpha", "beta"]
    as_json = json.loads(run("ls", "--json", env=env).stdout)
    assert [f["FunctionName"] for f in as_json] == ["alpha", "beta"]

    removed = run("rm", "alpha", env=env)
    assert removed.returncode == 0 and removed.stdout.strip() == "deleted alpha"
    assert [f["FunctionName"] for f in json.loads(run("ls", "--json", env=env).stdout)] == ["beta"]
    again = run("rm", "alpha", env=env)
    assert one_error_line(again).startswith("ember: ResourceNotFoundException: Function not found")


def test_errors_are_one_line_with_a_nonzero_exit(server, tmp_path: Path) -> None:
    src = write_app(tmp_path / "fn")
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach ember at " + nowhere in one_error_line(run("ls", endpoint=nowhere))
    assert "cannot reach ember" in one_error_line(run("invoke", "x", endpoint=nowhere))
    assert "cannot reach ember" in one_error_line(run("top", "--once", endpoint=nowhere))
    assert "cannot reach ember" in one_error_line(run("logs", "x", endpoint=nowhere))
    assert one_error_line(run("invoke", "x", "--payload", "{nope", endpoint=server.url)).startswith(
        "ember: --payload is not valid JSON"
    )
    assert one_error_line(run("invoke", "missing", endpoint=server.url)).startswith(
        "ember: ResourceNotFoundException"
    )
    bad_runtime = run(
        "deploy", str(src), "--name", "x", "--runtime", "cobol", "--handler", "a.b", endpoint=server.url
    )
    assert one_error_line(bad_runtime).startswith("ember: InvalidParameterValueException")
    bad_env = run(
        "deploy", str(src), "--name", "x", "--runtime", "python3.12", "--handler", "a.b", "--env", "NOEQUALS",
        endpoint=server.url,
    )  # fmt: skip
    assert one_error_line(bad_env) == "ember: --env expects KEY=VALUE, got 'NOEQUALS'"
    not_dir = run(
        "deploy", str(tmp_path / "missing"), "--name", "x", "--runtime", "python3.12", "--handler", "a.b",
        endpoint=server.url,
    )  # fmt: skip
    assert one_error_line(not_dir).endswith("is not a directory")
    assert "invalid endpoint URL" in one_error_line(run("ls", endpoint="ftp://x"))


def test_top_once_fits_80_columns(server, lam, tmp_path: Path) -> None:
    src = write_app(tmp_path / "fn")
    long_name = "a-function-with-a-rather-long-name-indeed"
    for name in ("short", long_name):
        assert run("deploy", str(src), "-n", name, "-r", "python3.12", "--handler", "app.handler",
                   endpoint=server.url).returncode == 0  # fmt: skip
    for _ in range(3):
        lam.invoke(FunctionName="short", Payload=b"{}")
    out = run("top", "--once", endpoint=server.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if line.startswith("FUNCTION"))
    assert header.split() == [
        "FUNCTION", "REQ/S", "P50ms", "P99ms", "WARM%", "IDLE", "BUSY", "START", "THROT", "ERR",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("short", "a-function"))}
    assert rows["short"][5] == "1"  # one idle sandbox
    assert rows["short"][9] == "0"  # no errors
    assert any(k.startswith("a-function") and k.endswith("…") for k in rows)  # truncated, not wrapped
    assert lines.index(next(line for line in lines if line.startswith("short"))) < lines.index(
        next(line for line in lines if line.startswith("a-function"))
    )  # sorted by requests/s
    bad = run("top", "--sort", "nonsense", endpoint=server.url)
    assert bad.returncode == 2 and "--sort must be one of" in bad.stderr


def test_top_render_marks_throttles_and_errors() -> None:
    doc = {
        "time": 0,
        "window_s": 10,
        "account": {"sandboxes": 3, "concurrent": 2, "concurrency_limit": 1000, "errors": 4, "throttles": 9,
                    "cold_starts": 1},
        "functions": [
            {"name": f"fn{i}", "rps": float(i), "p50_ms": 1.5, "p99_ms": 12.25, "warm_pct": 90.0,
             "sandboxes": {"idle": 1, "busy": i, "starting": 0}, "throttles": 9 * i, "errors": 2 * i,
             "invocations": 10}
            for i in range(3)
        ],
    }  # fmt: skip
    console = Console(width=80, record=True, color_system=None)
    console.print(render(doc, "http://127.0.0.1:9000", "errors", limit=2))
    text = console.export_text()
    rows = [line.split() for line in text.splitlines() if line.startswith("fn")]
    assert [r[0] for r in rows] == ["fn2", "fn1"]  # sorted by errors, limited to 2
    assert rows[0][1:] == ["2.0", "1.50", "12.25", "90", "1", "2", "0", "18", "4"]
    assert "… 1 more" in text


def test_zip_keeps_modes_and_progress_body_reports_every_byte(tmp_path: Path) -> None:
    import zipfile
    from io import BytesIO

    (tmp_path / "sub").mkdir()
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o750)
    (tmp_path / "sub" / "data.txt").write_text("x")
    data, count = zip_dir(tmp_path)
    assert count == 2
    with zipfile.ZipFile(BytesIO(data)) as z:
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in z.infolist()}
    assert set(modes) == {"run.sh", "sub/data.txt"}
    assert modes["run.sh"] == 0o750

    seen: list[int] = []
    body = ProgressBody(b"a" * 200_000, seen.append)
    out = b""
    while chunk := body.read(8192):
        out += chunk
    assert out == b"a" * 200_000 and sum(seen) == 200_000
    body.seek(0)
    assert body.read(10) == b"a" * 10
