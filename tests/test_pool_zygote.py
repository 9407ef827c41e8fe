"""Pooled runtimes forked by the zygote (ember.sandbox.zygote, ember.sandbox.pool): each is a sandbox of its own, with
nothing of the host's privileges and nothing shared with another sandbox but the zygote's imports.
Runs the real `ember serve --isolation bwrap`; in CI nothing skips."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EmberServer, create, wait_for

CAN_ISOLATE = os.geteuid() == 0 and shutil.which("bwrap") is not None
pytestmark = pytest.mark.skipif(
    not CAN_ISOLATE and os.environ.get("CI") != "true", reason="needs root and bubblewrap (CI must have both)"
)

INSPECT = """
import os, random, socket, sys
def fds():
    out = {}
    for f in os.listdir("/proc/self/fd"):
        try:
            out[f] = os.readlink("/proc/self/fd/" + f)
        except OSError:
            continue  # the directory listing's own fd
        if out[f].startswith("socket:"):
            s = socket.socket(fileno=os.dup(int(f)))
            out[f] = "socket:" + s.family.name + ":" + s.type.name
            s.close()
    return out
def handler(event, context):
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    ns = {n: os.readlink("/proc/self/ns/" + n) for n in ("mnt", "pid", "net", "ipc", "uts", "cgroup")}
    return {
        "status": {k: v.split() for k, v in status.items()
                   if k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                            "NoNewPrivs", "Seccomp")},
        "cgroup": open("/proc/self/cgroup").read().splitlines(),
        "ns": ns,
        "exists": {p: os.path.exists(p) for p in event.get("exists", [])},
        "cwd": os.getcwd(),
        "sid": os.getsid(0) == os.getpid(),
        "random": random.random(),
        "fds": fds(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "mods": "ember" in sys.modules or any(m.startswith("ember.") for m in sys.modules),
        "umask": os.umask(0o022),
    }
"""


def health(srv: EmberServer) -> dict:
    return json.loads(urllib.request.urlopen(srv.url + "/health").read())["isolation"]["pool"]


@pytest.fixture(scope="module")
def zyg(tmp_path_factory) -> Iterator[EmberServer]:
    old = os.environ.get("EMBER_ZYGOTE_RETIRE_AFTER")
    os.environ["EMBER_ZYGOTE_RETIRE_AFTER"] = "3"
    try:
        srv = EmberServer(tmp_path_factory.mktemp("zyg") / "data", "--isolation", "bwrap", "--pool", "2").start()
    finally:
        if old is None:
            del os.environ["EMBER_ZYGOTE_RETIRE_AFTER"]
        else:
            os.environ["EMBER_ZYGOTE_RETIRE_AFTER"] = old
    yield srv
    srv.stop()


def inspect(srv: EmberServer, names: list[str], exists: tuple[str, ...] = ()) -> list[dict]:
    lam = srv.client()
    out = []
    for name in names:
        create(lam, name, INSPECT)
        resp = lam.invoke(FunctionName=name, Payload=json.dumps({"exists": exists}))
        assert "FunctionError" not in resp
        out.append(json.loads(resp["Payload"].read()))
    return out


def test_forked_runtime_has_no_privilege_left(zyg: EmberServer) -> None:
    before = health(zyg)
    (r,) = inspect(zyg, ["priv"])
    after = health(zyg)
    assert after["taken"] + after["forked_on_demand"] > before["taken"] + before["forked_on_demand"]
    assert after["forked"] >= 2 and after["fresh"] == 0  # the zygote made them all (no fresh interpreter)
    st = r["status"]
    uid = int(st["Uid"][0])
    assert uid >= 200_000 and st["Uid"] == [str(uid)] * 4 and st["Gid"] == [str(uid)] * 4
    assert st.get("Groups", []) == []
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap][0], 16) == 0, cap
    assert st["NoNewPrivs"] == ["1"] and st["Seccomp"] == ["2"]
    assert r["sid"] and r["cwd"] == "/var/task"
    # stdin/out/err and the runtime client's own connections: not the zygote's pidfd, root, pipes
    fds = r["fds"]
    assert fds["0"] == "/dev/null" and fds["1"] == fds["2"] and fds["1"].startswith("pipe:"), fds
    others = [t for f, t in fds.items() if f not in ("0", "1", "2")]
    # what a fresh awslambdaric has (its socket pair, its Runtime API connection): not the zygote's
    # socket (SOCK_SEQPACKET), the keeper's, a pidfd, the sandbox root's fd, a pipe
    assert all(t.startswith("socket:") and "SEQPACKET" not in t for t in others), fds
    assert len(others) <= 3, fds
    assert not r["mods"]  # nothing of ember's in its memory


def test_forked_runtime_is_in_its_own_namespaces_and_cgroup(zyg: EmberServer) -> None:
    ember_src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "ember")
    a, b = inspect(zyg, ["ns-a", "ns-b"], exists=(str(zyg.data_dir), ember_src, "/var/task/app.py"))
    host = {n: os.readlink("/proc/self/ns/" + n) for n in a["ns"]}
    for n in a["ns"]:
        assert a["ns"][n] != host[n], n
        assert a["ns"][n] != b["ns"][n], n
    # its cgroup namespace is rooted at its own cgroup: no path of the host's, nor another sandbox's
    assert a["cgroup"] and all(line.endswith(":/") for line in a["cgroup"]), a["cgroup"]
    # the sandbox's root, not the host's (the data dir and ember's checkout are not there)
    assert a["exists"] == {str(zyg.data_dir): False, ember_src: False, "/var/task/app.py": True}
    assert a["status"]["Uid"] != b["status"]["Uid"]
    assert max(a["pids"]) < 100  # its own pid namespace: a handful of pids, none of the host's


def test_forked_runtimes_do_not_share_random_state(zyg: EmberServer) -> None:
    a, b = inspect(zyg, ["rnd-a", "rnd-b"])
    assert a["random"] != b["random"]


def test_zygote_is_retired_and_replaced(zyg: EmberServer) -> None:
    """Few sandboxes share one zygote (its address-space layout and hash secret): with a retirement
    after 3 forks, a few cold starts go through more than one zygote, and each still works."""
    before = health(zyg)["zygotes"]
    results = inspect(zyg, [f"retire-{i}" for i in range(8)])
    assert wait_for(lambda: health(zyg)["zygotes"] > before, 10)
    assert len({r["status"]["Uid"][0] for r in results}) == 8


def test_runtime_exit_status_is_reported(zyg: EmberServer) -> None:
    lam = zyg.client()
    create(lam, "exits", "import os\ndef handler(e, c):\n    os._exit(3)\n")
    body = json.loads(lam.invoke(FunctionName="exits")["Payload"].read())
    assert body["errorMessage"].endswith("Runtime exited with error: exit status 3"), body
    create(lam, "killed", "import os, signal\ndef handler(e, c):\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    body = json.loads(lam.invoke(FunctionName="killed")["Payload"].read())
    assert "signal" in body["errorMessage"], body


def test_without_the_zygote_pooled_runtimes_start_fresh(tmp_path) -> None:
    """EMBER_ZYGOTE=0 (and the fallback when a zygote cannot start): the pool's runtimes are fresh
    interpreters, as isolated."""
    os.environ["EMBER_ZYGOTE"] = "0"
    try:
        srv = EmberServer(tmp_path / "data", "--isolation", "bwrap", "--pool", "1").start()
    finally:
        del os.environ["EMBER_ZYGOTE"]
    try:
        (r,) = inspect(srv, ["fresh"])
        h = health(srv)
        assert h["forked"] == 0 and h["fresh"] >= 1 and h["taken"] >= 1
        assert int(r["status"]["Uid"][0]) >= 200_000 and r["status"]["NoNewPrivs"] == ["1"]
    finally:
        srv.stop()


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            out.append(int(entry))
    return out


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_everything_dies_with_ember(tmp_path) -> None:
    """ember killed outright (no shutdown): its zygote, the keepers, the runtimes (busy and pooled) and
    their bwraps all go, though a forked runtime's bwrap is not bound to ember itself."""
    srv = EmberServer(tmp_path / "data", "--isolation", "bwrap", "--pool", "2").start()
    lam = srv.client()
    create(lam, "busy", "import time\ndef handler(e, c):\n    time.sleep(e.get('s', 0))\n    return 1\n", Timeout=60)
    assert json.loads(lam.invoke(FunctionName="busy", Payload=b"{}")["Payload"].read()) == 1
    assert health(srv)["forked"] >= 2
    data = str(tmp_path / "data")
    assert _processes_mentioning(data)  # bwraps of the sandboxes (their task dirs are under the data dir)
    assert srv.proc is not None
    zygotes = [p for p in _processes_mentioning("_main_loop()") if _ppid(p) == srv.proc.pid]
    assert zygotes

    def invoke_busy() -> None:
        with contextlib.suppress(Exception):  # ember is killed under it
            lam.invoke(FunctionName="busy", Payload=b'{"s": 30}')

    threading.Thread(target=invoke_busy, daemon=True).start()
    time.sleep(1.0)  # the invoke is under way (no assertion on it)
    srv.stop(signal.SIGKILL)
    assert wait_for(lambda: not _processes_mentioning(data) and not any(_alive(p) for p in zygotes), 15)


# Runs as `python -c UNDER_SUBREAPER DATA_DIR PORT SIGNAL` in a process of its own (never pytest's: a
# subreaper adopts every orphan below it): like systemd, tini or bench/run.py, it adopts what ember
# leaves behind. Starts ember, makes cold starts pooled (forked by the zygote) and not (a PYTHON*
# variable starts a fresh interpreter), signals ember, then waits (bounded, WITHOUT reaping: a reaper
# that is slow to reap must not keep anything alive) until no adopted process is alive. Prints what
# was left alive as JSON, then cleans up.
UNDER_SUBREAPER = r"""
import ctypes, io, json, os, signal, subprocess, sys, threading, time, zipfile
import boto3
from botocore.config import Config
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
data, port, sig = sys.argv[1], sys.argv[2], int(sys.argv[3])
ember = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", "--port", port, "--data-dir", data,
                          "--isolation", "bwrap", "--pool", "2"],
                         stdout=subprocess.PIPE, stderr=open(data + ".log", "w"), text=True)
assert ember.stdout.readline().startswith("ember listening"), "ember did not start"
lam = boto3.client("lambda", endpoint_url="http://127.0.0.1:" + port, region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="y",
                   config=Config(retries={"max_attempts": 0}, read_timeout=60))
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("app.py", "import time\ndef handler(e, c):\n    time.sleep(e.get('s', 0))\n    return 1\n")
for i in range(5):
    env = {"Variables": {"PYTHONDONTWRITEBYTECODE": "1"}} if i % 2 else {"Variables": {}}  # odd: not pooled
    lam.create_function(FunctionName=f"f{i}", Runtime="python3.12", Role="arn:aws:iam::000000000000:role/x",
                        Handler="app.handler", Code={"ZipFile": buf.getvalue()}, Environment=env, Timeout=60)
    assert json.loads(lam.invoke(FunctionName=f"f{i}", Payload=b"{}")["Payload"].read()) == 1
def busy():
    try:
        lam.invoke(FunctionName="f0", Payload=b'{"s": 3}')
    except Exception:
        pass  # ember is killed under it
threading.Thread(target=busy, daemon=True).start()  # one invoke under way (a second sandbox of f0: pooled)
time.sleep(1.0)
ember.send_signal(sig)
ember.wait(40)
me = os.getpid()
def alive():
    out = []
    for p in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            if int(stat[1]) == me and stat[0] != "Z":
                out.append(open(f"/proc/{p}/status").read())
        except (OSError, ValueError):
            pass
    return out
deadline = time.monotonic() + 10
while alive() and time.monotonic() < deadline:
    time.sleep(0.1)
left = alive()
print(json.dumps(left), flush=True)
for p in os.listdir("/proc"):  # clean up what was left, then reap everything
    try:
        if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == me:
            os.kill(int(p), signal.SIGKILL)
    except (OSError, ValueError):
        pass
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_alive_under_a_subreaper(tmp_path: Path, sig: signal.Signals) -> None:
    """Under a child subreaper (systemd, tini, bench/run.py), what ember leaves is adopted by it, not by
    init: after ember stops (SIGTERM) or is killed (SIGKILL), no sandbox's pid 1 nor any runtime,
    keeper or zygote may stay alive, even if that reaper never reaps."""
    import subprocess
    import sys

    from conftest import free_port

    out = subprocess.run(
        [sys.executable, "-c", UNDER_SUBREAPER, str(tmp_path / "data"), str(free_port()), str(int(sig))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + (tmp_path / "data.log").read_text()
    left = json.loads(out.stdout)
    assert left == [], "\n".join(left)
