"""Sandbox isolation (ember.sandbox: isolation, cgroups, pool): each escape is denied and every
other function keeps working. Runs the real `ember serve --isolation bwrap` and `--isolation unshare`
(util-linux; the same promises but the pool); in CI nothing skips."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EmberServer, create, pid_alive, wait_for

CAN_ISOLATE = os.geteuid() == 0 and all(shutil.which(b) for b in ("bwrap", "unshare", "setpriv"))
MODES = ("bwrap", "unshare")
pytestmark = pytest.mark.skipif(
    not CAN_ISOLATE and os.environ.get("CI") != "true",
    reason="needs root, bubblewrap and util-linux (CI must have them)",
)

CANARY = """
import os
def handler(event, context):
    open("/tmp/canary", "w").write("ok")
    return {"ok": True, "uid": os.getuid(), "tmp": sorted(os.listdir("/tmp"))}
"""

PROBE = """
import errno, json, os, socket, subprocess, sys
def try_(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": getattr(exc, "errno", None)}
def handler(event, context):
    import resource
    out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    out["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    for path in event.get("write", []):
        out["write " + path] = try_(lambda p=path: open(p, "w").write("x"))
    for path in event.get("read", []):
        out["read " + path] = try_(lambda p=path: open(p, "rb").read(100).decode(errors="replace"))
    for path in event.get("exists", []):
        out["exists " + path] = os.path.exists(path)
    for port in event.get("connect", []):
        out["connect %d" % port] = try_(lambda p=port: socket.create_connection(("127.0.0.1", p), 1).close())
    if event.get("proc"):
        out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    if event.get("listening"):
        rows = open("/proc/net/tcp").read().splitlines()[1:]
        out["listening"] = [r.split()[1] for r in rows if r.split()[3] == "0A"]
    if event.get("userns"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        out["userns"] = [libc.unshare(0x10000000), ctypes.get_errno()]  # CLONE_NEWUSER
    out["task"] = sorted(os.listdir("/var/task"))
    return out
"""


def payload(resp) -> dict:
    return json.loads(resp["Payload"].read())


def tail(resp) -> str:
    return base64.b64decode(resp.get("LogResult", "")).decode(errors="replace")


@pytest.fixture(scope="module", params=MODES)
def iso(request, tmp_path_factory) -> Iterator[EmberServer]:
    mode = request.param
    srv = EmberServer(
        tmp_path_factory.mktemp("iso") / "data", "--isolation", mode, "--ephemeral-storage", "8", "--pool", "1"
    ).start()
    srv.mode = mode  # type: ignore[attr-defined]
    lam = srv.client()
    create(lam, "canary", CANARY)
    create(lam, "probe", PROBE, Timeout=10)
    yield srv
    srv.stop()


def canary_works(lam) -> None:
    """Another function, invoked now, answers normally and sees a /tmp of its own."""
    resp = lam.invoke(FunctionName="canary")
    assert "FunctionError" not in resp, tail(resp)
    body = payload(resp)
    assert body["ok"] is True and body["tmp"] == ["canary"]


def in_background(fn) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


def uids_alive(uid: int) -> list[int]:
    """Host pids (not zombies) running as `uid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^Uid:\s+(\d+)", status, re.M)
        if m and int(m.group(1)) == uid and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def test_health_reports_isolation(iso: EmberServer) -> None:
    health = json.loads(urllib.request.urlopen(iso.url + "/health").read())
    if iso.mode == "bwrap":  # type: ignore[attr-defined]
        assert re.fullmatch(r"bwrap\+cgroup-v[12]", health["isolation"]["mode"])
        assert "pool" in health["isolation"]
    else:  # says what it lacks, and runs no pool
        assert re.fullmatch(
            r"unshare\+cgroup-v[12] \(NOTE: no bubblewrap: .*pre-started runtimes.*\)", health["isolation"]["mode"]
        )
        assert "pool" not in health["isolation"]
    assert health["isolation"]["ephemeral_mb"] == 8


def test_own_unprivileged_uid_per_sandbox(iso: EmberServer) -> None:
    lam = iso.client()
    a, b = payload(lam.invoke(FunctionName="probe")), payload(lam.invoke(FunctionName="canary"))
    assert a["uid"] != 0 and b["uid"] != 0 and a["uid"] != b["uid"]
    assert a["uid"] >= 200_000 and a["gid"] == a["uid"] and a["groups"] in ([], [a["gid"]])
    assert a["nofile"] == [1024, 1024]  # open files, as Lambda's limit


def test_only_tmp_is_writable(iso: EmberServer) -> None:
    lam = iso.client()
    paths = ["/var/task/app.py", "/var/task/new", "/x", "/usr/x", "/etc/passwd", "/etc/x", "/dev/x", "/root/x"]
    body = payload(lam.invoke(FunctionName="probe", Payload=json.dumps({"write": [*paths, "/tmp/x"]})))
    for path in paths:
        assert body["write " + path]["ok"] is False, (path, body["write " + path])
    assert body["write /tmp/x"]["ok"] is True
    canary_works(lam)


def test_data_dir_ember_files_and_other_code_invisible(iso: EmberServer) -> None:
    lam = iso.client()
    code_dirs = [str(p) for p in (iso.data_dir / "code").iterdir() if p.is_dir()]
    assert len(code_dirs) >= 2  # probe's and canary's
    ember_src = str(Path(__file__).resolve().parent.parent / "src" / "ember")
    looks = [str(iso.data_dir), *code_dirs, ember_src, str(iso.log_path)]
    body = payload(
        lam.invoke(
            FunctionName="probe",
            Payload=json.dumps({"exists": looks, "read": [f"{d}/app.py" for d in code_dirs]}),
        )
    )
    for path in looks:
        assert body["exists " + path] is False, path
    for d in code_dirs:
        assert body[f"read {d}/app.py"]["ok"] is False
    assert body["task"] == ["app.py"]  # its own code, and nothing else
    canary_works(lam)


def test_proc_shows_only_the_sandbox(iso: EmberServer) -> None:
    lam = iso.client()
    assert iso.proc is not None
    ember_pid = iso.proc.pid
    body = payload(
        lam.invoke(
            FunctionName="probe",
            Payload=json.dumps({"proc": True, "read": [f"/proc/{ember_pid}/environ", "/proc/1/environ"]}),
        )
    )
    assert len(body["pids"]) <= 4, body["pids"]  # bwrap's init, the runtime (and its threads' group)
    assert ember_pid not in body["pids"] or ember_pid <= 4
    assert body[f"read /proc/{ember_pid}/environ"]["ok"] is False or ember_pid <= 4
    assert body["read /proc/1/environ"]["ok"] is False  # pid 1 of the sandbox is root's, not readable
    canary_works(lam)


def test_cannot_reach_ember_or_other_sandboxes(iso: EmberServer) -> None:
    lam = iso.client()
    body = payload(lam.invoke(FunctionName="probe", Payload=json.dumps({"connect": [iso.port], "listening": True})))
    assert body[f"connect {iso.port}"]["ok"] is False
    assert body[f"connect {iso.port}"]["error"] == "ConnectionRefusedError"
    # the only listener it can see is its own Runtime API: no other sandbox's, no ember's
    assert body["listening"] == ["0100007F:2329"]  # 127.0.0.1:9001
    canary_works(lam)


def test_fork_bomb_is_contained(iso: EmberServer) -> None:
    lam = iso.client()
    create(
        lam,
        "forkbomb",
        """
        import os, sys
        def handler(event, context):
            print("uid=%d" % os.getuid(), flush=True)
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """,
        Timeout=3,
    )
    results = {}
    bomb = in_background(lambda: results.update(r=lam.invoke(FunctionName="forkbomb", LogType="Tail")))
    for _ in range(3):
        canary_works(lam)
    bomb.join(60)
    resp = results["r"]
    assert resp.get("FunctionError")
    assert payload(resp)["errorType"] in ("Sandbox.Timedout", "Runtime.OutOfMemory", "Runtime.ExitError")
    m = re.search(r"uid=(\d+)", tail(resp))
    if m:
        assert wait_for(lambda: not uids_alive(int(m.group(1))), 15), "fork bomb processes survived"
    canary_works(lam)


def test_endless_stdout_is_bounded_by_the_timeout(iso: EmberServer) -> None:
    lam = iso.client()
    create(
        lam,
        "chatty",
        """
        import sys
        def handler(event, context):
            while True:
                sys.stdout.write("x" * 4096 + "\\n")
        """,
        Timeout=2,
    )
    results = {}
    t = in_background(lambda: results.update(r=lam.invoke(FunctionName="chatty", LogType="Tail")))
    canary_works(lam)
    t.join(60)
    resp = results["r"]
    assert payload(resp)["errorType"] == "Sandbox.Timedout"
    assert len(base64.b64decode(resp["LogResult"])) <= 4096
    canary_works(lam)


def test_busy_loop_past_the_timeout_is_killed(iso: EmberServer) -> None:
    lam = iso.client()
    create(
        lam,
        "spin",
        """
        import os
        def handler(event, context):
            print("uid=%d" % os.getuid(), flush=True)
            while True:
                pass
        """,
        Timeout=1,
    )
    results = {}
    t = in_background(lambda: results.update(r=lam.invoke(FunctionName="spin", LogType="Tail")))
    canary_works(lam)
    t.join(60)
    resp = results["r"]
    assert payload(resp)["errorType"] == "Sandbox.Timedout"
    uid = int(re.search(r"uid=(\d+)", tail(resp)).group(1))
    assert wait_for(lambda: not uids_alive(uid), 10)
    canary_works(lam)


def test_filling_tmp_stops_at_the_cap(iso: EmberServer) -> None:
    lam = iso.client()
    create(
        lam,
        "filler",
        """
        import errno
        def handler(event, context):
            written = 0
            try:
                with open("/tmp/fill", "wb") as f:
                    while True:
                        f.write(b"x" * 65536)
                        f.flush()
                        written += 65536
            except OSError as exc:
                return {"written": written, "errno": exc.errno == errno.ENOSPC}
        """,
        Timeout=10,
    )
    body = payload(lam.invoke(FunctionName="filler"))
    assert body["errno"] is True and 0 < body["written"] <= 8 * 1024 * 1024
    canary_works(lam)  # its own /tmp: empty but for what it wrote, and writable


def test_memory_limit_is_out_of_memory_and_the_sandbox_is_replaced(iso: EmberServer) -> None:
    lam = iso.client()
    create(
        lam,
        "hog",
        """
        def handler(event, context):
            if event.get("hog"):
                blocks = []
                while True:
                    blocks.append(b"x" * (16 * 1024 * 1024))
            return "fine"
        """,
        MemorySize=128,
        Timeout=20,
    )
    resp = lam.invoke(FunctionName="hog", Payload=b'{"hog": true}')
    body = payload(resp)
    assert resp.get("FunctionError") and body["errorType"] == "Runtime.OutOfMemory", body
    assert re.fullmatch(r"RequestId: \S+ Error: Runtime exited with error: signal: killed", body["errorMessage"])
    resp = lam.invoke(FunctionName="hog", Payload=b"{}")
    assert payload(resp) == "fine"
    canary_works(lam)


@pytest.mark.parametrize("mode", MODES)
def test_nothing_left_after_shutdown(tmp_path: Path, mode: str) -> None:
    srv = EmberServer(tmp_path / "data", "--isolation", mode, "--pool", "2").start()
    lam = srv.client()
    create(
        lam,
        "parent",
        """
        import os, subprocess
        def handler(event, context):
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            return {"uid": os.getuid(), "child": child.pid}
        """,
    )
    uid = payload(lam.invoke(FunctionName="parent"))["uid"]
    assert srv.proc is not None
    ember_pid = srv.proc.pid
    assert uids_alive(uid)
    assert srv.stop() == 0
    assert wait_for(lambda: not uids_alive(uid), 10)
    assert not (tmp_path / "data" / "sandboxes").exists()
    left = [p for p in Path("/sys/fs/cgroup").glob(f"**/ember-{ember_pid}") if p.exists()]
    assert left == []
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts


@pytest.mark.parametrize("mode", MODES)
def test_sandboxes_die_with_ember(tmp_path: Path, mode: str) -> None:
    """ember SIGKILLed: no sandbox process outlives it (parent-death signals, --die-with-parent/--kill-child)."""
    srv = EmberServer(tmp_path / "data", "--isolation", mode, "--pool", "0").start()
    lam = srv.client()
    create(
        lam,
        "orphan",
        """
        import os, subprocess
        def handler(event, context):
            subprocess.Popen(["sleep", "300"], start_new_session=True)
            return {"uid": os.getuid()}
        """,
    )
    uid = payload(lam.invoke(FunctionName="orphan"))["uid"]
    assert uids_alive(uid)
    srv.stop(signal.SIGKILL)
    assert wait_for(lambda: not uids_alive(uid), 10)


def test_auto_falls_back_to_unshare_then_to_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a working bwrap, `auto` isolates with unshare(1) (and says so); without either, none (warned)."""
    monkeypatch.setenv("EMBER_BWRAP", str(tmp_path / "no-bwrap"))
    for expect, marker in (("unshare", "NOTE: no bubblewrap"), ("none", "NOT isolated")):
        if expect == "none":
            monkeypatch.setenv("EMBER_UNSHARE", str(tmp_path / "no-unshare"))
        srv = EmberServer(tmp_path / expect, "--isolation", "auto", "--pool", "0").start()
        try:
            mode = json.loads(urllib.request.urlopen(srv.url + "/health").read())["isolation"]["mode"]
            assert mode.startswith(expect + "+") and marker in mode, mode
            lam = srv.client()
            create(lam, "who", "import os\ndef handler(e, c):\n    return os.getuid()\n")
            uid = payload(lam.invoke(FunctionName="who"))
            assert (uid >= 200_000) if expect == "unshare" else (uid == os.geteuid())
        finally:
            srv.stop()
        assert marker in srv.stderr()
    # asked for explicitly, a mode that does not work is an error, not a silent downgrade
    srv = EmberServer(tmp_path / "explicit", "--isolation", "unshare")
    with pytest.raises(RuntimeError):
        srv.start()


def test_without_isolation_a_loud_warning(tmp_path: Path) -> None:
    srv = EmberServer(tmp_path / "data", "--isolation", "none").start()
    try:
        health = json.loads(urllib.request.urlopen(srv.url + "/health").read())
        assert "WARNING" in health["isolation"]["mode"]
        lam = srv.client()
        create(lam, "plain", "def handler(e, c):\n    return 7\n")
        assert payload(lam.invoke(FunctionName="plain")) == 7
    finally:
        srv.stop()
    assert "WARNING" in srv.stderr()


@pytest.mark.parametrize("iso", ["bwrap"], indirect=True)  # unshare mode runs no pool
def test_pooled_runtimes_carry_nothing_between_functions(iso: EmberServer) -> None:
    lam = iso.client()
    src = """
    import os, sys
    def handler(event, context):
        seen = {"tmp": sorted(os.listdir("/tmp")), "env": os.environ.get("LEAK"), "mod": "leaky" in sys.modules}
        os.environ["LEAK"] = "yes"
        open("/tmp/leak", "w").write("x")
        sys.modules["leaky"] = sys
        return {"uid": os.getuid(), "seen": seen, "name": os.environ["AWS_LAMBDA_FUNCTION_NAME"]}
    """
    before = json.loads(urllib.request.urlopen(iso.url + "/health").read())["isolation"]["pool"]["taken"]
    results = []
    for name in ("pooled-a", "pooled-b"):
        create(lam, name, src)
        assert wait_for(
            lambda: json.loads(urllib.request.urlopen(iso.url + "/health").read())["isolation"]["pool"]["idle"] >= 1,
            30,
        )
        results.append(payload(lam.invoke(FunctionName=name)))
    assert json.loads(urllib.request.urlopen(iso.url + "/health").read())["isolation"]["pool"]["taken"] >= before + 2
    a, b = results
    assert (a["name"], b["name"]) == ("pooled-a", "pooled-b") and a["uid"] != b["uid"]
    for r in results:
        assert r["seen"] == {"tmp": [], "env": None, "mod": False}
    # a function that sets PYTHON* variables (read at interpreter start) gets a fresh runtime
    create(lam, "py-env", src, Environment={"Variables": {"PYTHONDONTWRITEBYTECODE": "1"}})
    assert payload(lam.invoke(FunctionName="py-env"))["seen"]["env"] is None


def test_no_user_namespaces_inside(iso: EmberServer) -> None:
    """seccomp: a sandbox cannot make a user namespace (and with it capabilities of its own)."""
    lam = iso.client()
    body = payload(lam.invoke(FunctionName="probe", Payload=json.dumps({"userns": True})))
    assert body["userns"] == [-1, 1]  # EPERM
    canary_works(lam)


PRELOAD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void ember_preload_probe(void) {
    char exe[256] = "", line[512];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) exe[n] = 0;
    int len = snprintf(line, sizeof line, "%d %d %s\n", (int)getuid(), (int)getpid(), exe);
    int fd = open("LOG", O_WRONLY | O_APPEND | O_CREAT, 0666);  /* the function's /tmp, inside a sandbox */
    if (fd >= 0) { write(fd, line, len); close(fd); }
    fd = open("MARKER", O_WRONLY | O_APPEND | O_CREAT, 0644);  /* only reachable from the host */
    if (fd >= 0) { write(fd, line, len); close(fd); }
}
"""

PRELOAD_APP = """
import os, subprocess
def handler(event, context):
    subprocess.run(["/bin/true"], check=True)  # a child of the runtime loads LD_PRELOAD too (as the sandbox uid)
    try:
        log = open("LOG").read()
    except FileNotFoundError:
        log = ""
    return {"uid": os.getuid(), "pid": os.getpid(), "log": log, "env": dict(os.environ)}
"""

TRICKY = 'it\'s "$HOME" `id` $(id) \\ ${X:-y} !\nsecond line\n'


@pytest.mark.parametrize(
    ("iso", "pooled"), [("bwrap", False), ("bwrap", True), ("unshare", False)],  # unshare mode runs no pool
    ids=["bwrap-fresh", "bwrap-pooled", "unshare-fresh"], indirect=["iso"],
)
def test_ld_preload_never_reaches_a_root_process(iso: EmberServer, tmp_path: Path, pooled: bool) -> None:
    """A function's environment is the runtime's only (ENV_EXEC): its LD_PRELOAD, naming a library in its own
    code both at /var/task and at the host path of its code dir (DATA_DIR/code/<sha256>, which the API
    tells), is loaded by the runtime and its children as the sandbox's uid, never by bwrap, unshare(1), the
    helper or setpriv, which run as root (on the host, or in the sandbox before the uid drop)."""
    mode = iso.mode  # type: ignore[attr-defined]
    import hashlib
    import io
    import subprocess
    import zipfile

    token = f"{mode}-{'pooled' if pooled else 'fresh'}-{os.getpid()}"
    log, marker = f"/tmp/ember-preload-{token}.log", tmp_path / "ran-outside-the-sandbox"
    src = tmp_path / "preload.c"
    src.write_text(PRELOAD_C.replace("LOG", log).replace("MARKER", str(marker)))
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(tmp_path / "preload.so"), str(src)], check=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", PRELOAD_APP.replace("LOG", log))
        info = zipfile.ZipInfo("preload.so")
        info.external_attr = 0o100755 << 16
        z.writestr(info, (tmp_path / "preload.so").read_bytes())
    code = buf.getvalue()
    host_so = iso.data_dir.resolve() / "code" / hashlib.sha256(code).hexdigest() / "preload.so"
    env = {"LD_PRELOAD": f"/var/task/preload.so:{host_so}", "TRICKY": TRICKY, "QUOTE": "'", "EMPTY": ""}
    if not pooled:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # PYTHON*: a fresh runtime, not a pooled one
    lam = iso.client()
    name = f"preload-{'pooled' if pooled else 'fresh'}"

    def pool_stat(key: str) -> int:
        return json.loads(urllib.request.urlopen(iso.url + "/health").read())["isolation"]["pool"][key]

    try:
        lam.create_function(
            FunctionName=name, Runtime="python3.12", Handler="app.handler", Role="arn:aws:iam::000000000000:role/x",
            Code={"ZipFile": code}, Environment={"Variables": env}, Timeout=10,
        )  # fmt: skip
        assert host_so.is_file()  # the attack's premise: the library is at a host path root could load
        if mode == "bwrap":
            assert wait_for(lambda: pool_stat("idle") >= 1, 30)
            taken = pool_stat("taken")
        resp = lam.invoke(FunctionName=name)
        assert "FunctionError" not in resp, tail(resp)
        body = payload(resp)
        if mode == "bwrap":
            assert pool_stat("taken") == taken + (1 if pooled else 0)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log)  # written on the host only if a host process loaded the library
    assert not marker.exists(), "a process outside the sandbox loaded the function's LD_PRELOAD:\n" + (
        marker.read_text() if marker.exists() else ""
    )
    lines = [line.split(" ", 2) for line in body["log"].splitlines()]
    assert lines, "the function's own processes must still load its LD_PRELOAD"
    assert all(int(uid) == body["uid"] != 0 for uid, _pid, _exe in lines), body["log"]
    if not pooled:  # a fresh runtime is exec'd with the environment: it loads the library itself
        assert any(int(pid) == body["pid"] for _uid, pid, _exe in lines), body["log"]
    assert any(exe.endswith("/true") for _uid, _pid, exe in lines), body["log"]
    seen = body["env"]
    for key, value in env.items():
        assert seen.get(key) == value, key
    assert seen["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9001" and seen["AWS_LAMBDA_FUNCTION_NAME"] == name
    assert not {"PWD", "SHLVL", "_"} & set(seen) - set(env), sorted(seen)
