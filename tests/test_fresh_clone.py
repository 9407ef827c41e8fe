"""A fresh clone anywhere works (issue 14): `git clone` of this repository under /tmp, a virtualenv inside it
(/tmp/.../.venv, as `make install` makes), and `make run`'s command (examples/run.py --data-dir .ember, a
relative data dir under the clone) serves the sample in each isolation mode: bwrap, unshare (bubblewrap
"missing": EMBER_BWRAP names no file) and none (neither). The isolation NOTE is said once.

The clone's virtualenv is made without pip (no network here): ember's own source is the clone's (a .pth
file), the runtime the sandbox imports (RUNTIME_DISTS: awslambdaric and its two dependencies) is copied into the venv's
site-packages, and ember's other dependencies come from this interpreter's site-packages (a .pth file;
never visible inside a sandbox, which needs none of them). The clone is of HEAD: commit first."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, EmberServer, create, free_port, wait_for

pytestmark = pytest.mark.skipif(
    (os.geteuid() != 0 or not all(shutil.which(b) for b in ("git", "bwrap", "unshare", "setpriv")))
    and os.environ.get("CI") != "true",
    reason="needs root, git, bubblewrap and util-linux (CI must have them)",
)
RUNTIME_DISTS = ("awslambdaric", "simplejson", "snapshot-restore-py")  # what a sandbox imports
MARKERS = {"bwrap": "bwrap", "unshare": "NOTE: no bubblewrap", "none": "NOT isolated"}


@pytest.fixture(scope="module")
def clone() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="ember-clone-", dir="/tmp"))
    repo = top / "ember"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        venv = repo / ".venv"
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(
            subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        )  # fmt: skip
        for dist in RUNTIME_DISTS:  # every file each one installed (awslambdaric's C client is top-level)
            for f in importlib.metadata.files(dist) or ():
                src = Path(str(f.locate()))
                if ".." in f.parts or not src.is_file():
                    continue
                (site / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, site / f)
        (site / "aaa-ember.pth").write_text(f"{repo / 'src'}\n")
        (site / "zzz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        yield repo
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("mode", ["bwrap", "unshare", "none"])
def test_make_run_serves_the_sample_from_a_clone_under_tmp(clone: Path, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if mode in ("unshare", "none"):
        env["EMBER_BWRAP"] = "/nonexistent/bwrap"
    if mode == "none":
        env["EMBER_UNSHARE"] = "/nonexistent/unshare"
    shutil.rmtree(clone / ".ember", ignore_errors=True)
    port = free_port()
    err = clone.parent / f"run-{mode}.err"
    with open(err, "w") as err_f:
        run = subprocess.Popen(
            [str(clone / ".venv" / "bin" / "python"), "examples/run.py", "--port", str(port), "--data-dir", ".ember"],
            cwd=clone, env=env, stdout=subprocess.PIPE, stderr=err_f, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert run.stdout is not None
            first = run.stdout.readline()
            assert first.startswith(f"ember listening on http://127.0.0.1:{port}"), (first, err.read_text())
            while "Deployed the sample" not in run.stdout.readline():
                assert run.poll() is None, err.read_text()
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())["isolation"]
            assert health["mode"].startswith(mode), health
            for _ in range(2):  # the cold start and a warm one
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/2015-03-31/functions/hello/invocations", data=b'{"name": "clone"}'
                )
                with urllib.request.urlopen(req, timeout=30) as resp:
                    body = json.loads(resp.read())
                    assert "FunctionError" not in resp.headers and "X-Amz-Function-Error" not in resp.headers, body
                assert "clone" in body.get("message", ""), (body, err.read_text())
        finally:
            os.killpg(run.pid, signal.SIGINT)
            try:
                run.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    text = err.read_text()
    if mode != "bwrap":
        assert text.count(MARKERS[mode]) == 1, text  # the start-up notice, once


FAILING_UNSHARE = """#!/bin/sh
# unshare(1) that works for ember's start-up check but whose sandboxes fail, saying why on stderr
case "$*" in *sandbox-root*) echo "ember-test: the helper could not mount its root" >&2; exit 3;; esac
exec %s "$@"
"""


def test_a_sandbox_that_fails_to_start_says_why(tmp_path: Path) -> None:
    """The helper's stderr reaches the invoke's error message, the function's log and ember's log."""
    fake = tmp_path / "unshare"
    fake.write_text(FAILING_UNSHARE % shutil.which("unshare"))
    fake.chmod(0o755)
    os.environ["EMBER_UNSHARE"] = str(fake)
    try:
        srv = EmberServer(tmp_path / "data", "--isolation", "unshare").start()
    finally:
        del os.environ["EMBER_UNSHARE"]
    why = "ember-test: the helper could not mount its root"
    try:
        lam = srv.client()
        create(lam, "broken", "def handler(e, c):\n    return 1\n")
        resp = lam.invoke(FunctionName="broken")
        body = json.loads(resp["Payload"].read())
        assert resp.get("FunctionError") and why in body["errorMessage"], body
        logs = "".join(p.read_text() for p in (tmp_path / "data" / "logs").rglob("*.jsonl"))
        assert wait_for(
            lambda: why in "".join(p.read_text() for p in (tmp_path / "data" / "logs").rglob("*.jsonl")), 10
        ), logs
    finally:
        srv.stop()
    assert any(why in line and "a sandbox failed to start" in line for line in srv.stderr().splitlines()), srv.stderr()
