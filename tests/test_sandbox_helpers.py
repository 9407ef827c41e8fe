"""The programs ember runs as text in other processes (ember.sandbox.zygote_server, ember.sandbox.unshare_helper),
tested in-process where they are pure: argument, request and config parsing, the remount plan, exit codes;
that what reaches the interpreter is exactly the module's file; and the process tools of ember.sandbox.spawn
that need no root."""

from __future__ import annotations

import ast
import asyncio
import os
import struct
import sys
from pathlib import Path

import pytest

from ember.sandbox import fresh_runtime, jail, pool, spawn, unshare_helper, zygote, zygote_server
from ember.sandbox.jail import IsolationConfig, Jailer

# ------------------------------------------------------------------ the text is the module


def test_the_zygote_runs_exactly_its_module_file() -> None:
    argv = zygote.server_argv(7, b"\x06\x00\x00\x00\x00\x00\xff\x7f")
    assert argv[:2] == [sys.executable, "-c"]
    assert argv[2] == Path(zygote_server.__file__).read_text(encoding="utf-8")
    assert "_main_loop()" in argv[2]  # what tests and operators look for among processes
    # and as the zygote reads its arguments (`python -c` makes sys.argv[0] "-c")
    assert zygote_server.parse_args(["-c", *argv[3:]]) == (7, b"\x06\x00\x00\x00\x00\x00\xff\x7f")


def test_the_unshare_helper_runs_exactly_its_module_file_with_a_config_it_accepts() -> None:
    jailer = Jailer(IsolationConfig(mode="none"))  # no probing of bwrap/unshare here
    jailer.unshare, jailer.setpriv = "/usr/bin/unshare", "/usr/bin/setpriv"
    jailer._unshare_root = Path("/run/ember/sandbox-root")
    jailer._unshare_ops = [["dir", "/etc", "0755"], ["bind", "/usr", "/usr"], ["symlink", "usr/lib", "/lib"]]
    argv = jailer.unshare_argv(200_001, "/data/code/abc", 5, 6, (9,))
    at = argv.index("-c")
    assert argv[at - 3 : at] == [sys.executable, "-I", "-S"]
    assert argv[at + 1] == Path(unshare_helper.__file__).read_text(encoding="utf-8") == jail.UNSHARE_HELPER
    cfg = unshare_helper.parse_config(argv[at + 2])
    assert cfg["root"] == "/run/ember/sandbox-root" and cfg["keep"] == [9]
    assert cfg["ops"][0][0] == "tmpfs" and cfg["ops"][-1] == ["bind", "/data/code/abc", "/var/task"]
    assert cfg["runtime"] == jail.ENV_EXEC
    assert bytes.fromhex(cfg["seccomp"]) == jailer.seccomp


def test_a_fresh_pooled_runtime_runs_exactly_its_module_file() -> None:
    assert Path(fresh_runtime.__file__).read_text(encoding="utf-8") == pool.ZYGOTE
    assert "__main__" in pool.ZYGOTE  # `python -c` runs it as __main__


@pytest.mark.parametrize("module", [zygote_server, unshare_helper, fresh_runtime])
def test_the_helpers_import_nothing_of_embers(module: object) -> None:
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    allowed = set(sys.stdlib_module_names) | {"awslambdaric"}
    assert {m for m in imported if m.split(".")[0] not in allowed} == set()
    # `typing` only for the type checker: TYPE_CHECKING is a plain False at run time
    at_run_time = [n for n in tree.body if not (isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")]
    assert "typing" not in {a.name for n in at_run_time if isinstance(n, ast.Import) for a in n.names}
    assert "typing" not in {n.module for n in at_run_time if isinstance(n, ast.ImportFrom)}


# ------------------------------------------------------------------ zygote_server


def test_zygote_arguments() -> None:
    assert zygote_server.parse_args(["-c", "3", ""]) == (3, b"")
    for bad in (["-c", "3"], ["-c", "-1", ""], ["-c", "x", ""], ["-c", "3", "abc"], ["-c", "3", "00" * 7]):
        with pytest.raises(ValueError):
            zygote_server.parse_args(bad)


def test_zygote_requests_as_ember_sends_them() -> None:
    msg = zygote.fork_request(4242, 200_007, 1024, 1024)
    assert len(msg) < zygote_server.MSG_MAX_BYTES
    assert zygote_server.parse_request(msg) == {"pid": 4242, "uid": 200_007, "nofile": 1024, "nproc": 1024}
    for bad in (b"[]", b'{"pid": 1}', b'{"pid": 1, "uid": -1, "nofile": 1, "nproc": 1}',
                b'{"pid": true, "uid": 1, "nofile": 1, "nproc": 1}', b'{"pid": "1", "uid": 1, "nofile": 1, "nproc": 1}',
                b"not json"):  # fmt: skip
        with pytest.raises(ValueError):
            zygote_server.parse_request(bad)


def test_zygote_request_fds() -> None:
    assert zygote_server.split_fds([10, 11, 12, 13, 14]) == ([10, 11, 12, 13, 14], [])
    assert zygote_server.split_fds([10, 11, 12, 13, 14, 15, 16]) == ([10, 11, 12, 13, 14], [15, 16])
    with pytest.raises(ValueError):
        zygote_server.split_fds([10, 11, 12, 13])


def test_specialisation_line_round_trips() -> None:
    env = {"AWS_LAMBDA_FUNCTION_NAME": "f", "QUOTE": 'it\'s "x"\n'}
    line = pool.specialisation(env, "app.handler")
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and len(line) < zygote_server.SPEC_MAX_BYTES
    assert zygote_server.parse_spec(line) == (env, "app.handler")
    for bad in (b"[]", b'{"env": {}}', b'{"env": {"A": 1}, "handler": "h"}', b'{"env": [], "handler": "h"}'):
        with pytest.raises(ValueError):
            zygote_server.parse_spec(bad)


def test_zygote_exit_codes_as_bwrap_reports_them() -> None:
    assert zygote_server.exit_code(0) == 0
    assert zygote_server.exit_code(3 << 8) == 3  # exited 3
    assert zygote_server.exit_code(9) == 128 + 9  # killed by SIGKILL
    assert zygote_server.exit_code(11 | 0x80) == 128 + 11  # SIGSEGV with a core


def test_the_filter_fits_the_zygote() -> None:
    program = jail.seccomp_program()
    assert len(program) % 8 == 0
    assert zygote_server.parse_args(["-c", "3", program.hex()]) == (3, program)


# ------------------------------------------------------------------ unshare_helper


def _config(**over: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "root": "/run/ember/sandbox-root", "ops": [["proc"], ["dev"], ["tmpfs", "/tmp", "8388608", "1777"]],
        "pivot_root": 155, "info_fd": 5, "block_fd": -1, "seccomp": "", "keep": [], "argv": ["setpriv", "--"],
        "runtime": ["/bin/sh"],
    }  # fmt: skip
    cfg.update(over)
    return cfg


def test_unshare_config_is_checked() -> None:
    import json

    assert unshare_helper.parse_config(json.dumps(_config()))["pivot_root"] == 155
    bad = [
        _config(root="/"), _config(root="relative"), _config(pivot_root="155"), _config(info_fd=True),
        _config(ops=[["mount", "/x"]]), _config(ops=[["bind", "/a"]]), _config(ops=[["dir", "/a", 755]]),
        {k: v for k, v in _config().items() if k != "seccomp"},
    ]  # fmt: skip
    for cfg in bad:
        with pytest.raises(ValueError):
            unshare_helper.parse_config(json.dumps(cfg))
    with pytest.raises(ValueError):
        unshare_helper.parse_config("[]")


def test_unshare_remounts_everything_read_only_but_tmp_and_proc() -> None:
    root = "/run/ember/sandbox-root"
    info = "\n".join(
        f"{i} 1 0:{i} / {point} {opts} - fs src rw"
        for i, (point, opts) in enumerate([
            ("/", "rw,relatime"),
            (root, "rw,nosuid,nodev"),
            (f"{root}/usr", "rw,nodev"),
            (f"{root}/tmp", "rw,nosuid,nodev"),
            (f"{root}/tmpfoo", "rw"),
            (f"{root}/proc", "rw,nosuid,nodev,noexec"),
            (f"{root}/proc/sys", "rw"),
            (f"{root}/var/task\\040code", "rw,noexec"),
            (f"{root}-other", "rw"),
        ])
    )  # fmt: skip
    u = unshare_helper
    base = u.REMOUNT | u.BIND | u.RDONLY | u.NOSUID
    assert u.remounts(info, root) == [
        (root, base | u.NODEV),
        (f"{root}/usr", base | u.NODEV),
        (f"{root}/tmpfoo", base),  # not under /tmp: a sibling
        (f"{root}/var/task code", base | u.NOEXEC),  # \040 is a space
    ]


def test_unshare_pid1_and_its_spare_fd() -> None:
    u = unshare_helper
    assert u.spare_fd([]) == 3 and u.spare_fd([3, 4]) == 5
    cfg = _config(argv=["setpriv", "--reuid=7", "--"], runtime=["/bin/sh", "-c", "x", "sh"])
    argv = u.pid1_argv(cfg, ["/var/task/bootstrap", "a"], 5)
    assert argv[:2] == ["sh", "-c"] and "0<&5 5<&-" in argv[2] and argv[3] == "sh"
    assert argv[4:] == ["setpriv", "--reuid=7", "--", "/bin/sh", "-c", "x", "sh", "/var/task/bootstrap", "a"]


def test_unshare_loopback_request() -> None:
    req = unshare_helper.loopback_up_request()
    assert len(req) == 32 and req[:16].rstrip(b"\0") == b"lo"
    assert struct.unpack_from("H", req, 16)[0] == 0x1 | 0x8 | 0x40


# ------------------------------------------------------------------ spawn


def test_read_json_is_bounded() -> None:
    async def read(data: bytes, limit: int = spawn.INFO_MAX_BYTES) -> dict[str, object]:
        r, w = os.pipe()
        try:
            os.write(w, data)
            os.close(w)
            w = -1
            return await spawn.read_json(r, timeout_s=5.0, limit=limit)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    assert asyncio.run(read(b'{"child-pid": 42}\n')) == {"child-pid": 42}
    assert asyncio.run(read(b'{"child-pid": ')) == {}  # EOF before the end
    assert asyncio.run(read(b"[1]")) == {}
    assert asyncio.run(read(b'{"x": "' + b"a" * 10_000 + b'"}', limit=1000)) == {}


def test_tasks_are_owned_until_done_and_cancelled_on_close() -> None:
    async def main() -> None:
        tasks = spawn.Tasks("test")
        done = tasks.start(asyncio.sleep(0))
        forever = tasks.start(asyncio.Event().wait())
        failing = tasks.start(_fail())
        assert len(tasks) == 3
        await asyncio.sleep(0.01)
        assert done.done() and failing.done() and len(tasks) == 1  # discarded once done
        await tasks.close()
        assert forever.cancelled() and len(tasks) == 0
        drained = spawn.Tasks("test")
        finishing = drained.start(asyncio.sleep(0.01, "ok"))
        await drained.drain()
        assert finishing.result() == "ok"

    asyncio.run(main())


async def _fail() -> None:
    raise RuntimeError("logged, not lost")
