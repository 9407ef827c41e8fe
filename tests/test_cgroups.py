"""ember.sandbox.cgroups on fake hierarchies: the v1/v2 choice and the files written, without root."""

from __future__ import annotations

from pathlib import Path

from ember.sandbox.cgroups import Cgroup, Cgroups


def _mounts(tmp: Path, lines: list[str]) -> tuple[str, str]:
    (tmp / "mounts").write_text("\n".join(lines) + "\n")
    (tmp / "self").write_text("4:memory:/svc\n8:pids:/svc\n1:cpu:/\n0::/svc\n")
    return str(tmp / "mounts"), str(tmp / "self")


def test_v2_is_chosen_when_it_offers_memory_and_pids(tmp_path: Path) -> None:
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory pids\n")
    mounts, own = _mounts(tmp_path, [f"cgroup2 {v2} cgroup2 rw 0 0", f"cgroup {tmp_path}/mem cgroup rw,memory 0 0"])
    cg = Cgroups.detect(mounts, own)
    assert cg is not None and cg.version == 2 and cg.parents == {"unified": v2 / "svc"}


def test_hybrid_with_an_empty_v2_uses_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("\n")
    lines = [f"cgroup2 {v2} cgroup2 rw 0 0"]
    lines += [f"cgroup {tmp_path}/{c} cgroup rw,relatime,{c} 0 0" for c in ("memory", "pids", "cpu", "cpuacct")]
    cg = Cgroups.detect(*_mounts(tmp_path, lines))
    assert cg is not None and cg.version == 1
    assert cg.parents == {"memory": tmp_path / "memory/svc", "pids": tmp_path / "pids/svc", "cpu": tmp_path / "cpu"}


def test_no_cgroups(tmp_path: Path) -> None:
    assert Cgroups.detect(*_mounts(tmp_path, ["proc /proc proc rw 0 0"])) is None


def test_limits_oom_and_peak_v2(tmp_path: Path) -> None:
    d = tmp_path / "sb"
    d.mkdir()
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "memory.peak").write_text(str(200 * 1024 * 1024))
    cg = Cgroup(2, {"unified": d})
    cg.limit(1769, 1024)
    assert (d / "memory.max").read_text() == str(1769 * 1024 * 1024)
    assert (d / "pids.max").read_text() == "1024" and (d / "cpu.weight").read_text() == "100"
    assert cg.oom_killed() and cg.peak_mb() == 200


def test_limits_and_oom_v1(tmp_path: Path) -> None:
    dirs = {c: tmp_path / c for c in ("memory", "pids", "cpu")}
    for d in dirs.values():
        d.mkdir()
    (dirs["memory"] / "memory.limit_in_bytes").write_text("0")
    (dirs["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    cg = Cgroup(1, dirs)
    cg.limit(128, 64)
    assert (dirs["memory"] / "memory.limit_in_bytes").read_text() == str(128 * 1024 * 1024)
    assert (dirs["pids"] / "pids.max").read_text() == "64"
    assert (dirs["cpu"] / "cpu.shares").read_text() == str(128 * 1024 // 1769)
    assert not cg.oom_killed()
