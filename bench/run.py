"""`make bench`: ember's synchronous invoke path against the floor (bench/relay.py).

Starts ember (`ember serve`) and the relay as subprocesses, deploys and warms the noop function,
then runs wrk against both at concurrency 1 and 16, INTERLEAVED (relay c1, ember c1, relay c16,
ember c16, repeated, alternating which goes first) so the noise of a shared 2-core machine hits
both alike; each figure is the median over repeats. Then cold starts on ember (bench/cold.py) and
the sans-IO core microbenchmark (bench/core_bench.py), after both servers are stopped so they cost
it no CPU. Prints a table with the bars, writes every figure as one JSON object.

Every child runs in its own session with a parent-death signal, and this process is a child
subreaper: whatever is left at the end (even a sandbox ember forgot) is killed and reported.

    .venv/bin/python bench/run.py [--duration 10] [--quick] [--out bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cold
import proctools
from load import WrkResult, run_wrk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FUNCTION = "noop"
NODE_FUNCTION = "noop-node"  # the same no-op in nodejs20.x, on the same ember (target "node")
Json = dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- processes -------------------------------------------------------------------------------------


class Child:
    """A server subprocess whose stdout/stderr go to a log file we can poll (a pipe nobody drains
    would eventually block the server mid-benchmark)."""

    def __init__(self, name: str, logfile: Path) -> None:
        self.name = name
        self.logfile = logfile
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.clean_stop: bool | None = None

    async def start(self, argv: list[str], ready: str, timeout: float, cwd: Path = ROOT) -> str:
        with self.logfile.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=proctools.die_with_parent(signal.SIGTERM),
            )
        line = await proctools.wait_for_line(self.proc, self.logfile, ready, timeout)
        m = re.search(r"https?://\S+", line)
        if not m:
            raise RuntimeError(f"{self.name}: no URL in ready line {line!r}")
        self.url = m.group(0).rstrip("/")
        return self.url

    async def stop(self, grace: float) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        t0 = time.monotonic()
        await proctools.stop_process(proc, grace)
        self.clean_stop = proc.returncode is not None and proc.returncode in (0, -signal.SIGTERM)
        log(f"{self.name}: stopped in {time.monotonic() - t0:.2f} s (exit {proc.returncode})")


def ember_bin() -> str:
    here = Path(sys.executable).with_name("ember")
    return str(here) if here.exists() else (shutil.which("ember") or "ember")


# --- ember deploy ----------------------------------------------------------------------------------


def deploy_and_warm(
    url: str, concurrency: int, rounds: int = 3, name: str = FUNCTION, runtime: str = "python3.12"
) -> Json:
    """Create the noop function and invoke it `concurrency`-wide a few times so that many warm
    sandboxes exist before wrk starts (the first round is all cold starts)."""
    client = cold.lambda_client(url, pool=concurrency * 2)
    t0 = time.perf_counter()
    cold.create_noop(client, name, runtime=runtime)
    created_ms = (time.perf_counter() - t0) * 1000
    round_ms: list[float] = []
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(lambda _i: cold.timed_invoke(client, name)[0], range(concurrency)))
            round_ms.append(round((time.perf_counter() - t0) * 1000, 1))
    return {"create_ms": round(created_ms, 1), "warm_round_ms": round_ms}


# --- load matrix -----------------------------------------------------------------------------------


def _cpu_sample(pid: int | None) -> tuple[float, float, float, float, float, float]:
    server = proctools.cpu_seconds(pid) if pid else 0.0
    tree = proctools.cpu_seconds(pid, tree=True) if pid else 0.0
    busy, idle = proctools.machine_cpu_seconds()
    return server, tree, proctools.reaped_children_cpu_seconds(), busy, idle, time.monotonic()


def _cpu_figures(a: tuple[float, ...], b: tuple[float, ...], r: WrkResult) -> Json:
    """CPU per request of the server (alone and with runtimes), and how busy the rest of the machine
    was: `others_cpu_pct` is CPU (percent of one core) that neither the target nor wrk used, i.e.
    the noisy neighbour's share during this run."""
    server, tree, wrk, busy, idle, wall = (y - x for x, y in zip(a, b, strict=True))
    out: Json = {
        "wrk_cpu_pct": round(wrk / wall * 100, 1),
        "machine_idle_pct": round(idle / (busy + idle) * 100, 1) if busy + idle else None,
    }
    if tree:  # we know the target's processes (not so for --ember-url)
        out["others_cpu_pct"] = round(max(0.0, busy - tree - wrk) / wall * 100, 1)
        if r.requests:
            out["server_cpu_us_per_req"] = round(server / r.requests * 1e6, 1)
            out["total_cpu_us_per_req"] = round(tree / r.requests * 1e6, 1)
    return out


async def load_matrix(
    targets: dict[str, tuple[str, int | None, str]], conns: list[int], opts: argparse.Namespace
) -> list[Json]:
    """Interleaved wrk runs; each measured run follows its own short warm-up against the same target.

    Besides wrk's figures, each run records the server's CPU time per request (the server process
    alone, and with its runtimes): the figure a noisy neighbour distorts least.
    """
    runs: list[Json] = []
    names = list(targets)
    for rep in range(opts.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for c in conns:
            for target in order:
                url, pid, function = targets[target]
                if opts.warmup > 0:
                    await run_wrk(url, c, opts.warmup, function, opts.timeout)
                cpu0 = _cpu_sample(pid)
                r = await run_wrk(url, c, opts.duration, function, opts.timeout)
                run: Json = {
                    "target": target,
                    "rep": rep,
                    **r.as_dict(),
                    **_cpu_figures(cpu0, _cpu_sample(pid), r),
                }
                flag = "" if r.ok else f"  ERRORS {r.errors}"
                log(
                    f"  {target:5} c{c:<2} rep {rep + 1}/{opts.repeats}: {r.rps:9.1f} req/s  "
                    f"p50 {r.p50_ms:.3f}  p99 {r.p99_ms:.3f}  p99.9 {r.p999_ms:.3f} ms  "
                    f"cpu/req {run.get('server_cpu_us_per_req', '-')} us server, "
                    f"{run.get('total_cpu_us_per_req', '-')} us with runtimes; "
                    f"idle {run['machine_idle_pct']}%, others {run.get('others_cpu_pct', '-')}%{flag}"
                )
                runs.append(run)
    return runs


def summarize(runs: list[Json]) -> dict[str, dict[str, Json]]:
    """Per target and concurrency: the median of each figure over the repeats, errors summed."""
    out: dict[str, dict[str, Json]] = {}
    for run in runs:
        out.setdefault(run["target"], {}).setdefault(f"c{run['connections']}", {"runs": []})["runs"].append(run)
    for per_c in out.values():
        for cell in per_c.values():
            rs = cell.pop("runs")
            for key in ("rps", "p50_ms", "p75_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms"):
                cell[key] = round(statistics.median(r[key] for r in rs), 3)
            for key in (
                "server_cpu_us_per_req",
                "total_cpu_us_per_req",
                "others_cpu_pct",
                "machine_idle_pct",
            ):
                if all(key in r for r in rs):
                    cell[key] = round(statistics.median(r[key] for r in rs), 1)
            cell["requests"] = sum(r["requests"] for r in rs)
            cell["error_count"] = sum(r["error_count"] for r in rs)
            cell["ok"] = all(r["ok"] for r in rs)
            cell["repeats"] = len(rs)
            cell["rps_min"] = min(r["rps"] for r in rs)
            cell["rps_max"] = max(r["rps"] for r in rs)
    return out


# --- bars ------------------------------------------------------------------------------------------


def bars(
    summary: dict[str, dict[str, Json]], cold_res: Json | None, core: Json | None, asyncq: Json | None = None
) -> list[Json]:
    """The bars; SKIP when a figure was not measured, FAIL when a run it rests on had errors."""
    e, r = summary.get("ember", {}), summary.get("relay", {})

    def bar(name: str, value: str, passed: bool | None) -> Json:
        return {
            "bar": name,
            "value": value,
            "result": "SKIP" if passed is None else ("PASS" if passed else "FAIL"),
        }

    out: list[Json] = []
    if "c16" in e and "c16" in r:
        ratio = e["c16"]["rps"] / r["c16"]["rps"]
        clean = e["c16"]["ok"] and r["c16"]["ok"]
        out.append(
            bar(
                "warm throughput at c16 >= 60% of relay",
                f"{ratio:.1%}" + ("" if clean else " (errors)"),
                clean and ratio >= 0.6,
            )
        )
    else:
        out.append(bar("warm throughput at c16 >= 60% of relay", "-", None))
    if "c1" in e and "c1" in r:
        delta = e["c1"]["p99_ms"] - r["c1"]["p99_ms"]
        clean = e["c1"]["ok"] and r["c1"]["ok"]
        out.append(
            bar(
                "p99 at c1 <= relay p99 + 1 ms",
                f"{delta:+.3f} ms" + ("" if clean else " (errors)"),
                clean and delta <= 1.0,
            )
        )
    else:
        out.append(bar("p99 at c1 <= relay p99 + 1 ms", "-", None))
    if cold_res and "p50_ms" in cold_res:
        out.append(bar("cold start p50 < 150 ms", f"{cold_res['p50_ms']:.1f} ms", cold_res["p50_ms"] < 150))
    else:
        out.append(bar("cold start p50 < 150 ms", "-", None))
    if core and "core_pairs_per_s_100k_sandboxes" in core:
        v = core["core_pairs_per_s_100k_sandboxes"]
        out.append(bar("core >= 200,000 pairs/s with 100k sandboxes", f"{v:,}", v >= 200_000))
    else:
        out.append(bar("core >= 200,000 pairs/s with 100k sandboxes", "-", None))
    default_core = (core or {}).get("core_pairs_per_s_100k_sandboxes_default_policy")
    if default_core is not None:
        out.append(bar("core (default keep-alive) >= 200,000 pairs/s", f"{default_core:,}", default_core >= 200_000))
    if asyncq and "accept_per_s" in asyncq:
        v = asyncq["accept_per_s"]
        clean = asyncq.get("errors", 0) == 0 and asyncq.get("dropped", 0) == 0
        out.append(bar("async accept >= 2,000 durable events/s", f"{v:,.0f}/s", clean and v >= 2000))
    else:
        out.append(bar("async accept >= 2,000 durable events/s", "-", None))
    return out


def isolation_bars(cold_isolation: Json | None) -> list[Json]:
    """Issue 4's cold-start bar, with isolation on: paced (the pool refills between cold starts) and
    in a burst (back to back, faster than the pool refills)."""
    out: list[Json] = []
    for mode, label in (("bwrap+pool", "paced 0.25 s"), ("bwrap+pool-burst", "back to back")):
        r = (cold_isolation or {}).get(mode) or {}
        name = f"isolated cold start p50 <= 15 ms, p99 <= 50 ms ({label})"
        if "p50_ms" in r:
            ok = r["p50_ms"] <= 15 and r["p99_ms"] <= 50
            out.append(
                {
                    "bar": name,
                    "value": f"p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms",
                    "result": "PASS" if ok else "FAIL",
                }
            )
        else:
            out.append({"bar": name, "value": "-", "result": "SKIP"})
    return out


def node_bars(summary: dict[str, dict[str, Json]], cold_isolation: Json | None) -> list[Json]:
    """Issue 14's Node.js bars: a no-op's cold start isolated, and its warm c1 p99 beside python's, same run."""
    out: list[Json] = []
    r = (cold_isolation or {}).get("node-bwrap") or {}
    name = "node cold start p50 <= 150 ms (isolated, bwrap)"
    if "p50_ms" in r:
        out.append({"bar": name, "value": f"p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms",
                    "result": "PASS" if r["p50_ms"] <= 150 else "FAIL"})  # fmt: skip
    else:
        out.append({"bar": name, "value": "-", "result": "SKIP"})
    py, node = summary.get("ember", {}).get("c1"), summary.get("node", {}).get("c1")
    name = "node warm c1 p99 <= python's + 1 ms"
    if py and node:
        delta = node["p99_ms"] - py["p99_ms"]
        clean = py["ok"] and node["ok"]
        value = f"{node['p99_ms']:.3f} vs {py['p99_ms']:.3f} ms ({delta:+.3f})" + ("" if clean else " (errors)")
        out.append({"bar": name, "value": value, "result": "PASS" if clean and delta <= 1.0 else "FAIL"})
    else:
        out.append({"bar": name, "value": "-", "result": "SKIP"})
    return out


def cluster_bars(cluster: Json | None) -> list[Json]:
    """Issue 8's cluster bar (bench/cluster_bench.py); SKIP when not measured (--skip-cluster)."""
    import cluster_bench

    return [cluster_bench.bar(cluster)]


def ratios(summary: dict[str, dict[str, Json]]) -> Json:
    e, r = summary.get("ember", {}), summary.get("relay", {})
    out: Json = {}
    for c in ("c1", "c16"):
        if c in e and c in r and r[c]["rps"]:
            out[f"throughput_ember_over_relay_{c}"] = round(e[c]["rps"] / r[c]["rps"], 3)
            for p in ("p50_ms", "p99_ms", "p999_ms"):
                out[f"{p.removesuffix('_ms')}_ember_minus_relay_{c}_ms"] = round(e[c][p] - r[c][p], 3)
    return out


# --- machine ---------------------------------------------------------------------------------------


def machine_info() -> Json:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    wrk_version = ""
    with contextlib.suppress(OSError):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
        wrk_version = (out.stdout + out.stderr).splitlines()[0].strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gb": mem_gb,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version,
        "git_commit": commit or None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# --- output ----------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


NOISY_OTHERS_PCT = 25.0  # CPU that neither the target nor wrk used, in % of one core


def _noisy(cell: Json) -> bool:
    return cell.get("others_cpu_pct", 0.0) > NOISY_OTHERS_PCT


def _rps(cell: Json) -> str:
    """Median throughput, with the range over repeats when there were several (noise, visibly)."""
    if not cell:
        return "-"
    if cell["repeats"] < 2:
        return f"{cell['rps']:,.0f}"
    return f"{cell['rps']:,.0f} ({cell['rps_min']:,.0f}-{cell['rps_max']:,.0f})"


def render(result: Json) -> None:
    """Human-readable tables: rich when installed, plain text otherwise."""
    s = result["load"]["summary"]
    e, r = s.get("ember", {}), s.get("relay", {})
    rows: list[tuple[str, str, str, str]] = []
    for c in ("c1", "c16"):
        ec, rc = e.get(c, {}), r.get(c, {})
        if not ec and not rc:
            continue
        ratio = f"{ec['rps'] / rc['rps']:.1%}" if ec and rc and rc["rps"] else "-"
        rows.append((f"{c} throughput (req/s)", _rps(rc), _rps(ec), ratio))
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
            d = f"{ec[key] - rc[key]:+.3f} ms" if ec and rc else "-"
            rows.append((f"{c} {label} (ms)", _fmt(rc.get(key), ".3f"), _fmt(ec.get(key), ".3f"), d))
        for key, label in (
            ("server_cpu_us_per_req", "server CPU/req (us)"),
            ("total_cpu_us_per_req", "+runtimes CPU/req (us)"),
        ):
            if key in rc or key in ec:
                d = f"{ec[key] / rc[key]:.2f}x" if key in rc and key in ec and rc[key] else "-"
                rows.append((f"{c} {label}", _fmt(rc.get(key), ".0f"), _fmt(ec.get(key), ".0f"), d))
        if "others_cpu_pct" in rc or "others_cpu_pct" in ec:
            rows.append(
                (
                    f"{c} others' CPU (% of a core)",
                    _fmt(rc.get("others_cpu_pct"), ".0f"),
                    _fmt(ec.get("others_cpu_pct"), ".0f"),
                    "NOISY" if _noisy(rc) or _noisy(ec) else "",
                )
            )
        errs = (str(rc.get("error_count", "-")), str(ec.get("error_count", "-")))
        rows.append((f"{c} errors", *errs, "" if errs == ("0", "0") else "FLAGGED"))
    cold_res = result.get("cold") or {}
    extra: list[tuple[str, str]] = []
    for c, cell in s.get("node", {}).items():
        py = e.get(c, {})
        extra.append(
            (
                f"node {c} (python beside it)",
                f"{_rps(cell)} req/s ({_rps(py)}), p50 {cell['p50_ms']:.3f} ({py.get('p50_ms', 0):.3f}), "
                f"p99 {cell['p99_ms']:.3f} ({py.get('p99_ms', 0):.3f}) ms, errors {cell['error_count']}",
            )
        )
    if "p50_ms" in cold_res:
        extra.append(
            (
                f"cold start ({cold_res['method']}, n={cold_res['n']})",
                f"p50 {cold_res['p50_ms']:.1f} ms  p99 {cold_res['p99_ms']:.1f} ms",
            )
        )
        extra.append(
            (
                "  of which",
                f"{cold_res['cold_confirmed']}/{cold_res['n']} reported Init Duration "
                f"(p50 {cold_res['init_duration_ms_p50']} ms); boto3 warm invoke "
                f"{cold_res['warm_invoke_ms_p50']} ms",
            )
        )
    elif cold_res:
        extra.append(("cold start", str(cold_res.get("error", "skipped"))))
    for key, val in (result.get("core") or {}).items():
        extra.append((key, f"{val:,}" if isinstance(val, int) else str(val)))
    async_res = result.get("async") or {}
    if "accept_per_s" in async_res:
        extra.append(
            (
                "async accept (durable, fsync'd)",
                f"{async_res['accept_per_s']:,.0f} events/s (p99 {async_res['accept_p99_ms']:.1f} ms, "
                f"{async_res['accepted']:,} events)",
            )
        )
        extra.append(("async drain (no-op function)", f"{async_res['drain_per_s']:,.0f} events/s"))
    elif async_res:
        extra.append(("async", str(async_res.get("error", "skipped"))))
    unclean = [name for name, clean in result.get("clean_stop", {}).items() if not clean]
    if unclean or result.get("leftover_processes"):
        extra.append(
            (
                "WARNING",
                f"not stopped by SIGTERM: {unclean}; leftover processes killed: {result['leftover_processes']}",
            )
        )
    m = result["machine"]
    extra.append(
        (
            "machine",
            f"{m['nproc']} cpu {m['cpu_model']}; load avg {m['loadavg_at_start'][0]} at start, "
            f"{m.get('loadavg_at_end', ['?'])[0]} at end",
        )
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{'':28}{'relay':>14}{'ember':>14}{'ember vs relay':>18}")
        for row in rows:
            print(f"{row[0]:28}{row[1]:>14}{row[2]:>14}{row[3]:>18}")
        for k, v in extra:
            print(f"{k}: {v}")
        for b in result["bars"]:
            print(f"[{b['result']}] {b['bar']}: {b['value']}")
        return
    console = Console(width=shutil.get_terminal_size((120, 24)).columns, highlight=False)
    t = Table(title="warm invoke: ember vs relay (floor), median (range) over repeats")
    for col, just in (("", "left"), ("relay", "right"), ("ember", "right"), ("ember vs relay", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*row, style="red" if row[3] in ("FLAGGED", "NOISY") else None)
    console.print(t)
    if extra:
        t2 = Table(show_header=False)
        t2.add_column()
        t2.add_column(justify="right")
        for k, v in extra:
            t2.add_row(k, v)
        console.print(t2)
    t3 = Table(title="bars")
    t3.add_column("bar")
    t3.add_column("value", justify="right")
    t3.add_column("result")
    colors = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for b in result["bars"]:
        t3.add_row(b["bar"], b["value"], f"[{colors[b['result']]}]{b['result']}[/]")
    console.print(t3)


# --- main ------------------------------------------------------------------------------------------


async def bench(opts: argparse.Namespace, tmp: Path, result: Json) -> None:
    ember = Child("ember", tmp / "ember.log")
    relay = Child("relay", tmp / "relay.log")
    children = [relay, ember]
    try:
        if opts.ember_url:
            ember_url = opts.ember_url.rstrip("/")
        else:
            port = proctools.free_port()
            data = tmp / "ember-data"
            data.mkdir()
            t0 = time.perf_counter()
            ember_url = await ember.start(
                [ember_bin(), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)],
                "ember listening on",
                opts.start_timeout,
            )
            result["ember_startup_s"] = round(time.perf_counter() - t0, 3)
            log(f"ember: {ember_url} (ready in {result['ember_startup_s']} s)")
        if not opts.no_deploy:
            result["deploy"] = await asyncio.to_thread(deploy_and_warm, ember_url, opts.runtimes)
            log(f"ember: deployed and warmed {FUNCTION}: {result['deploy']}")
            if not opts.skip_node:
                result["deploy_node"] = await asyncio.to_thread(
                    deploy_and_warm, ember_url, opts.runtimes, 3, NODE_FUNCTION, "nodejs20.x"
                )
                log(f"ember: deployed and warmed {NODE_FUNCTION}: {result['deploy_node']}")

        relay_url = await relay.start(
            [
                sys.executable,
                str(HERE / "relay.py"),
                "--port",
                str(proctools.free_port()),
                "--code",
                str(HERE / "noop"),
                "--handler",
                "app.handler",
                "--runtimes",
                str(opts.runtimes),
            ],
            "relay listening on",
            opts.start_timeout,
        )
        log(f"relay: {relay_url} ({opts.runtimes} runtimes)")

        conns = [1, opts.runtimes]
        pids = {c.name: c.proc.pid if c.proc else None for c in children}
        targets = {"relay": (relay_url, pids["relay"], FUNCTION), "ember": (ember_url, pids["ember"], FUNCTION)}
        if not opts.no_deploy and not opts.skip_node:
            targets["node"] = (ember_url, pids["ember"], NODE_FUNCTION)  # issue 14: beside python, same run
        log(
            f"load: {opts.repeats} x {conns} x ({', '.join(targets)}), {opts.warmup:g} s warm-up + "
            f"{opts.duration:g} s each"
        )
        runs = await load_matrix(targets, conns, opts)
        summary = summarize(runs)
        # Key the summary as c1/c16 regardless of --runtimes so the bars read the same.
        for per_c in summary.values():
            if f"c{opts.runtimes}" in per_c and opts.runtimes != 16:
                per_c["c16"] = per_c.pop(f"c{opts.runtimes}")
        noisy = sorted(f"{t} {c}" for t, per_c in summary.items() for c, cell in per_c.items() if _noisy(cell))
        result["load"] = {"runs": runs, "summary": summary, "ratios": ratios(summary), "noisy_cells": noisy}
        if noisy:
            log(f"WARNING: other processes used > {NOISY_OTHERS_PCT:.0f}% of a core during {', '.join(noisy)}")

        if opts.no_deploy or opts.cold_n <= 0:
            result["cold"] = {"skipped": "no deploy" if opts.no_deploy else "cold-n 0"}
        else:
            await relay.stop(5)  # 16 idle runtimes cost nothing, but leave ember the machine anyway
            log(f"cold: {opts.cold_n} x {opts.cold_method} ...")
            fn: Callable[[str, int], Json] = (
                cold.measure_create if opts.cold_method == "create" else cold.measure_update
            )
            try:
                result["cold"] = await asyncio.to_thread(fn, ember_url, opts.cold_n)
                log(f"cold: p50 {result['cold']['p50_ms']} ms, p99 {result['cold']['p99_ms']} ms")
            except Exception as exc:  # a broken cold path must not cost the load figures
                result["cold"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"cold: FAILED {result['cold']['error']}")
        if not opts.no_deploy:
            import async_bench

            log(f"async: {opts.duration:g} s of durable Event accepts, then the drain ...")
            try:
                result["async"] = await asyncio.to_thread(async_bench.measure, ember_url, opts.duration, 32)
                log(f"async: {result['async']}")
            except Exception as exc:
                result["async"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"async: FAILED {result['async']['error']}")
    finally:
        for child in children:
            await child.stop(opts.stop_timeout)
        result["clean_stop"] = {c.name: c.clean_stop for c in children if c.clean_stop is not None}

    if not opts.skip_core:
        log(f"core: core_bench.main({opts.core_pairs:,}) ...")
        import core_bench

        result["core"] = await asyncio.to_thread(core_bench.main, opts.core_pairs)
        log(f"core: {result['core']}")

    if not opts.no_deploy and opts.cold_n > 0:
        import coldstart

        modes = ["bwrap+pool", "bwrap+pool-burst", "bwrap", "none"]
        if not opts.skip_node:
            modes += ["node-bwrap", "node-none"]
        n = max(10, opts.cold_n // 2)
        log(f"cold starts by isolation mode: {modes}, {n} each ...")
        result["cold_isolation"] = await asyncio.to_thread(coldstart.run, n, modes, 0.25)
        log("\n" + coldstart.table(result["cold_isolation"]))

    if not opts.skip_cluster:
        import cluster_bench  # issue 8: cluster frontend vs single process, interleaved, same run

        copts = cluster_bench.options_from(opts)
        log(f"cluster: {copts.rounds} rounds of {copts.duration:g} s, single vs cluster ...")
        try:
            result["cluster"] = await cluster_bench.measure(copts, tmp)
            log(cluster_bench.table(result["cluster"]))
        except Exception as exc:  # a broken cluster must not cost the other figures
            result["cluster"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"cluster: FAILED {result['cluster']['error']}")


async def amain(opts: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    proctools.become_subreaper()
    result: Json = {
        "machine": machine_info(),
        "config": {k: v for k, v in vars(opts).items() if k not in ("out",)},
    }
    tmp = Path(tempfile.mkdtemp(prefix="ember-bench-"))
    failed: BaseException | None = None
    try:
        await bench(opts, tmp, result)
    except BaseException as exc:
        failed = exc
        raise
    finally:
        left = proctools.reap_leftovers()
        if left:
            log(f"WARNING: killed {len(left)} leftover process(es): {left}")
        result["leftover_processes"] = len(left)
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if failed is None:
            result.setdefault("load", {"summary": {}})
            result["bars"] = bars(
                result["load"]["summary"], result.get("cold"), result.get("core"), result.get("async")
            ) + isolation_bars(result.get("cold_isolation")) + cluster_bars(result.get("cluster"))
            result["bars"] += node_bars(result["load"]["summary"], result.get("cold_isolation"))
            out = Path(opts.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            render(result)
            print(f"results written to {out}")
        elif not isinstance(failed, asyncio.CancelledError | KeyboardInterrupt):
            for name in ("ember.log", "relay.log"):
                if (tmp / name).exists():
                    log(f"--- tail of {name} ---\n{proctools.tail(tmp / name)}")
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.strict and any(b["result"] == "FAIL" for b in result["bars"]):
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=None, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of wrk warm-up before each run (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds; figures are medians (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s runs, 1 round, 10 cold starts, small core")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    p.add_argument("--runtimes", type=int, default=16, help="relay runtimes = high concurrency level (default 16)")
    p.add_argument("--timeout", type=float, default=5.0, help="wrk per-request timeout, seconds")
    p.add_argument("--cold-n", type=int, default=None, help="cold starts to sample (default 40)")
    p.add_argument("--cold-method", choices=("create", "update"), default="create")
    p.add_argument("--core-pairs", type=int, default=None, help="pairs per core_bench run (default 1,000,000)")
    p.add_argument("--skip-core", action="store_true")
    p.add_argument("--skip-cluster", action="store_true", help="skip the cluster-vs-single bench (issue 8)")
    p.add_argument("--skip-node", action="store_true", help="skip the Node.js figures (issue 14)")
    p.add_argument("--ember-url", help="use an already running endpoint instead of starting ember")
    p.add_argument("--no-deploy", action="store_true", help="skip CreateFunction/warm-up and cold starts")
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--stop-timeout", type=float, default=15.0)
    p.add_argument("--strict", action="store_true", help="exit 1 if any bar FAILs")
    opts = p.parse_args(argv)
    for name, normal, quick in (
        ("duration", 10.0, 2.0),
        ("warmup", 2.0, 1.0),
        ("repeats", 3, 1),
        ("cold_n", 40, 10),
        ("core_pairs", 1_000_000, 200_000),
    ):
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else normal)
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    try:
        code = asyncio.run(amain(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; everything stopped")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
