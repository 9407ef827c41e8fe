"""Issue 8's cluster bar: warm-invoke p99 through a cluster frontend vs the single-process server.

Bar: "Warm-invoke p99 through a frontend in cluster mode at most 2 ms above the single-process
figure, same machine, same run" -- read at concurrency 1; concurrency 16 is measured for
information.

One run starts both: the single-process server (`ember serve`, as bench/run.py starts it) and a
LocalCluster (etcd + `ember serve --role ...` processes; by default 1 frontend, 1 assigner, 1
worker: the minimal topology, every hop present once). Both get the same isolation mode and pool
(ember's defaults, as bench/run.py uses), the same no-op function (bench/noop), and the same warm-up
(`concurrency`-wide invokes, so that many warm sandboxes exist). Then wrk (bench/load.py, -t1,
invoke.lua) runs against each, INTERLEAVED: for each round, c1 then c16, single and cluster
alternating which goes first; every measured run follows its own short wrk warm-up. Figures are
medians over rounds. CPU per request is recorded per process (the cluster's per role), which shows
where the cluster's extra time goes when a neighbour makes the latencies noisy.

    .venv/bin/python bench/cluster_bench.py [--rounds 3] [--duration 10] [--workers 1] [--out F]

bench/run.py (`make bench`) calls `measure()` after its other parts and saves the result under
the "cluster" key of its JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import proctools
from load import WrkResult, run_wrk

HERE = Path(__file__).resolve().parent
FUNCTION = "noop"
BAR_MS = 2.0
BAR_NAME = f"cluster p99 at c1 <= single-process p99 + {BAR_MS:g} ms"
NOISY_OTHERS_PCT = 25.0  # as bench/run.py: CPU neither the targets nor wrk used, % of one core
Json = dict[str, Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- CPU accounting --------------------------------------------------------------------------------


def _cpu_sample(pids: dict[str, int]) -> Json:
    """CPU seconds of each process alone and with its descendants (sandboxes), wrk's, the machine's."""
    busy, idle = proctools.machine_cpu_seconds()
    return {
        "own": {name: proctools.cpu_seconds(pid) for name, pid in pids.items()},
        "tree": {name: proctools.cpu_seconds(pid, tree=True) for name, pid in pids.items()},
        "wrk": proctools.reaped_children_cpu_seconds(),
        "busy": busy,
        "idle": idle,
        "wall": time.monotonic(),
    }


def _cpu_figures(a: Json, b: Json, r: WrkResult) -> Json:
    wall = b["wall"] - a["wall"]
    busy, idle, wrk = b["busy"] - a["busy"], b["idle"] - a["idle"], b["wrk"] - a["wrk"]
    tree = {k: b["tree"][k] - a["tree"][k] for k in a["tree"]}
    own = {k: b["own"][k] - a["own"][k] for k in a["own"]}
    out: Json = {
        "wrk_cpu_pct": round(wrk / wall * 100, 1),
        "machine_idle_pct": round(idle / (busy + idle) * 100, 1) if busy + idle else None,
        "others_cpu_pct": round(max(0.0, busy - sum(tree.values()) - wrk) / wall * 100, 1),
    }
    if r.requests:
        out["cpu_us_per_req"] = {k: round(v / r.requests * 1e6, 1) for k, v in own.items()}
        out["total_cpu_us_per_req"] = round(sum(tree.values()) / r.requests * 1e6, 1)
    return out


# --- the two targets -------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _worker_sandboxes(cluster: Any) -> list[Json]:
    out = []
    for proc in cluster.procs.values():
        if proc.role == "worker":
            with contextlib.suppress(OSError, ValueError):
                out += _get_json(f"{proc.url}/_cluster/status")["sandboxes"]
    return out


def _frontend_stats(cluster: Any) -> list[Json]:
    out = []
    for proc in cluster.procs.values():
        if proc.role == "frontend":
            with contextlib.suppress(OSError, ValueError):
                out.append(_get_json(f"{proc.url}/_cluster/status"))
    return out


async def _start_single(run_mod: Any, tmp: Path, opts: argparse.Namespace) -> Any:
    child = run_mod.Child("single", tmp / "single.log")
    data = tmp / "single-data"
    data.mkdir()
    argv = [run_mod.ember_bin(), "serve", "--host", "127.0.0.1", "--port", str(proctools.free_port()),
            "--data-dir", str(data), "--isolation", opts.isolation, "--pool", str(opts.pool)]
    await child.start(argv, "ember listening on", opts.start_timeout)
    return child


# --- measurement -----------------------------------------------------------------------------------


async def _matrix(
    targets: dict[str, tuple[str, dict[str, int]]], conns: list[int], opts: argparse.Namespace
) -> list[Json]:
    runs: list[Json] = []
    names = list(targets)
    for rep in range(opts.rounds):
        order = names if rep % 2 == 0 else names[::-1]
        for c in conns:
            for target in order:
                url, pids = targets[target]
                if opts.warmup > 0:
                    await run_wrk(url, c, opts.warmup, FUNCTION, opts.timeout)
                cpu0 = _cpu_sample(pids)
                r = await run_wrk(url, c, opts.duration, FUNCTION, opts.timeout)
                run: Json = {"target": target, "rep": rep, **r.as_dict(), **_cpu_figures(cpu0, _cpu_sample(pids), r)}
                runs.append(run)
                per_role = " ".join(f"{k} {v:.0f}" for k, v in run.get("cpu_us_per_req", {}).items())
                log(f"  {target:7} c{c:<2} round {rep + 1}/{opts.rounds}: {r.rps:8.1f} req/s  p50 {r.p50_ms:.3f}  "
                    f"p99 {r.p99_ms:.3f}  p99.9 {r.p999_ms:.3f} ms; cpu/req us: {per_role}; "
                    f"others {run['others_cpu_pct']}%" + ("" if r.ok else f"  ERRORS {r.errors}"))
    return runs


def summarize(runs: list[Json]) -> dict[str, dict[str, Json]]:
    """Per target and concurrency: medians over rounds, errors summed."""
    grouped: dict[str, dict[str, list[Json]]] = {}
    for run in runs:
        grouped.setdefault(run["target"], {}).setdefault(f"c{run['connections']}", []).append(run)
    out: dict[str, dict[str, Json]] = {}
    for target, per_c in grouped.items():
        for c, rs in per_c.items():
            cell: Json = {k: round(statistics.median(r[k] for r in rs), 3)
                          for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")}
            cell["p99_ms_runs"] = [r["p99_ms"] for r in rs]
            for k in ("others_cpu_pct", "machine_idle_pct", "total_cpu_us_per_req"):
                if all(r.get(k) is not None for r in rs):
                    cell[k] = round(statistics.median(r[k] for r in rs), 1)
            if all("cpu_us_per_req" in r for r in rs):
                cell["cpu_us_per_req"] = {k: round(statistics.median(r["cpu_us_per_req"][k] for r in rs), 1)
                                          for k in rs[0]["cpu_us_per_req"]}
            cell["requests"] = sum(r["requests"] for r in rs)
            cell["error_count"] = sum(r["error_count"] for r in rs)
            cell["ok"] = all(r["ok"] for r in rs)
            cell["rounds"] = len(rs)
            out.setdefault(target, {})[c] = cell
    return out


def compare(summary: dict[str, dict[str, Json]]) -> Json:
    s, k = summary.get("single", {}), summary.get("cluster", {})
    out: Json = {}
    for c in sorted(set(s) & set(k), key=lambda x: int(x[1:])):
        a, b = s[c], k[c]
        out[c] = {
            "throughput_cluster_over_single": round(b["rps"] / a["rps"], 3) if a["rps"] else None,
            "p50_cluster_over_single": round(b["p50_ms"] / a["p50_ms"], 3) if a["p50_ms"] else None,
            "p99_cluster_over_single": round(b["p99_ms"] / a["p99_ms"], 3) if a["p99_ms"] else None,
            "p50_cluster_minus_single_ms": round(b["p50_ms"] - a["p50_ms"], 3),
            "p99_cluster_minus_single_ms": round(b["p99_ms"] - a["p99_ms"], 3),
        }
    return out


def bar(result: Json | None) -> Json:
    """The bars-table row (bench/run.py shows it): SKIP when not measured, FAIL when a run had errors."""
    s = ((result or {}).get("summary") or {})
    a, b = s.get("single", {}).get("c1"), s.get("cluster", {}).get("c1")
    if not a or not b:
        return {"bar": BAR_NAME, "value": (result or {}).get("error", "-"), "result": "SKIP"}
    delta = b["p99_ms"] - a["p99_ms"]
    clean = a["ok"] and b["ok"]
    noisy = a.get("others_cpu_pct", 0) > NOISY_OTHERS_PCT or b.get("others_cpu_pct", 0) > NOISY_OTHERS_PCT
    value = f"{delta:+.3f} ms ({a['p99_ms']:.2f} -> {b['p99_ms']:.2f})"
    value += "" if clean else " (errors)"
    value += " NOISY" if noisy else ""
    return {"bar": BAR_NAME, "value": value, "result": "PASS" if clean and delta <= BAR_MS else "FAIL",
            "p99_c1_single_ms": a["p99_ms"], "p99_c1_cluster_ms": b["p99_ms"], "p99_c1_delta_ms": round(delta, 3)}


def table(result: Json) -> str:
    s = result.get("summary", {})
    lines = [f"{'':24}{'single':>12}{'cluster':>12}{'cluster/single':>16}{'diff':>12}"]
    for c in ("c1", f"c{result['config']['concurrency']}"):
        a, b = s.get("single", {}).get(c), s.get("cluster", {}).get(c)
        if not a or not b:
            continue
        lines.append(f"{c + ' req/s':24}{a['rps']:>12,.0f}{b['rps']:>12,.0f}{b['rps'] / a['rps']:>16.1%}{'':>12}")
        for key, label in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms")):
            lines.append(f"{c + ' ' + label:24}{a[key]:>12.3f}{b[key]:>12.3f}{b[key] / a[key]:>15.2f}x"
                         f"{b[key] - a[key]:>+12.3f}")
        if "total_cpu_us_per_req" in a and "total_cpu_us_per_req" in b:
            ta, tb = a["total_cpu_us_per_req"], b["total_cpu_us_per_req"]
            lines.append(f"{c + ' CPU/req us (all)':24}{ta:>12.0f}{tb:>12.0f}{tb / ta:>15.2f}x")
            roles = ", ".join(f"{k} {v:.0f}" for k, v in b.get("cpu_us_per_req", {}).items())
            lines.append(f"{'':24}cluster per process (own, us/req): {roles}")
        lines.append(f"{c + ' others CPU %':24}{a.get('others_cpu_pct', '-'):>12}{b.get('others_cpu_pct', '-'):>12}")
        errs = (a["error_count"], b["error_count"])
        if any(errs):
            lines.append(f"{c + ' errors':24}{errs[0]:>12}{errs[1]:>12}  FLAGGED")
    b = result.get("bar") or bar(result)
    lines.append(f"load avg {result.get('loadavg_before')} before, {result.get('loadavg_after')} after")
    lines.append(f"[{b['result']}] {b['bar']}: {b['value']}")
    return "\n".join(lines)


async def measure(opts: argparse.Namespace, tmp: Path) -> Json:
    """Start both targets, deploy and warm, run the interleaved wrk matrix, stop both (always).
    Returns the result dict (summary, comparison, bar, load average before and after)."""
    import run as run_mod  # bench/run.py: the same Child, ember_bin and deploy_and_warm

    from ember_devtools.localcluster import LocalCluster

    result: Json = {
        "config": {k: v for k, v in vars(opts).items() if k in (
            "rounds", "duration", "warmup", "concurrency", "frontends", "assigners", "workers", "partitions",
            "isolation", "pool", "timeout")},
        "loadavg_before": loadavg(),
    }
    single = None
    cluster = LocalCluster(tmp / "cluster", assigners=opts.assigners, workers=opts.workers, frontends=opts.frontends,
                           partitions=opts.partitions, isolation=opts.isolation, pool=opts.pool)
    try:
        t0 = time.perf_counter()
        single = await _start_single(run_mod, tmp, opts)
        result["single_startup_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        await asyncio.to_thread(cluster.start)
        result["cluster_startup_s"] = round(time.perf_counter() - t0, 3)
        front = cluster.frontend_urls()[0]
        log(f"cluster: single {single.url}; cluster frontend {front} ({opts.frontends}f/{opts.assigners}a/"
            f"{opts.workers}w, etcd {cluster.etcd_url}), isolation {opts.isolation}")
        result["deploy"] = {
            "single": await asyncio.to_thread(run_mod.deploy_and_warm, single.url, opts.concurrency),
            "cluster": await asyncio.to_thread(run_mod.deploy_and_warm, front, opts.concurrency),
        }
        result["cluster_sandboxes_after_warmup"] = len(await asyncio.to_thread(_worker_sandboxes, cluster))
        log(f"cluster: deployed and warmed: {result['deploy']}; cluster sandboxes "
            f"{result['cluster_sandboxes_after_warmup']}")
        assert single.proc is not None
        cpids = {p.name: p.pid for p in cluster.procs.values()}
        if cluster.etcd is not None and cluster.etcd.proc is not None:
            cpids["etcd"] = cluster.etcd.proc.pid
        targets = {"single": (single.url, {"ember": single.proc.pid}), "cluster": (front, cpids)}
        conns = [1] + ([opts.concurrency] if opts.concurrency > 1 else [])
        log(f"cluster: {opts.rounds} rounds x {conns} x (single, cluster), {opts.warmup:g} s warm-up + "
            f"{opts.duration:g} s each; load avg {result['loadavg_before']}")
        runs = await _matrix(targets, conns, opts)
        result["frontend_stats"] = await asyncio.to_thread(_frontend_stats, cluster)
        result["cluster_sandboxes_at_end"] = len(await asyncio.to_thread(_worker_sandboxes, cluster))
        result["runs"] = runs
        result["summary"] = summarize(runs)
        result["compare"] = compare(result["summary"])
    finally:
        await asyncio.to_thread(cluster.stop)
        keep = {single.proc.pid} if single is not None and single.proc is not None else set()
        result["orphans_after_cluster_stop"] = _orphans(keep)
        if single is not None:
            await single.stop(15)
        result["orphans_after_single_stop"] = _orphans(set())
        result["loadavg_after"] = loadavg()
    result["bar"] = bar(result)
    return result


def _orphans(keep: set[int]) -> int:
    """Live processes adopted by this (subreaper) process, besides `keep`: what a stopped target left."""
    time.sleep(0.2)
    return sum(1 for pid in proctools.adopted_children() if pid not in keep and not proctools._is_zombie(pid))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk warm-up before each run (default 2)")
    p.add_argument("--concurrency", type=int, default=16, help="the high concurrency level; c1 always (default 16)")
    p.add_argument("--frontends", type=int, default=1)
    p.add_argument("--assigners", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--isolation", default="auto", help="both targets; default: ember's, as bench/run.py uses")
    p.add_argument("--pool", type=int, default=2, help="pre-started runtimes, both targets (default: ember's, 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="wrk per-request timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--out", default=str(HERE / "results" / "cluster.json"), help="JSON result file")
    return p.parse_args(argv)


def options_from(run_opts: argparse.Namespace) -> argparse.Namespace:
    """measure()'s options from bench/run.py's: its rounds, durations and high concurrency; the
    minimal topology and ember's default isolation and pool."""
    opts = parse_args([])
    opts.rounds, opts.duration, opts.warmup = run_opts.repeats, run_opts.duration, run_opts.warmup
    opts.concurrency, opts.timeout, opts.start_timeout = run_opts.runtimes, run_opts.timeout, run_opts.start_timeout
    return opts


async def amain(opts: argparse.Namespace) -> Json:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    proctools.become_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="ember-cluster-bench-"))
    try:
        return await measure(opts, tmp)
    except BaseException:
        for f in sorted(tmp.rglob("*.log")):
            log(f"--- tail of {f.relative_to(tmp)} ---\n{proctools.tail(f, 15)}")
        raise
    finally:
        leftover = {pid: _cmdline(pid) for pid in proctools.adopted_children()}
        left = proctools.reap_leftovers()
        if left:
            kinds: dict[str, int] = {}
            for pid in left:
                kinds[leftover.get(pid, "?")] = kinds.get(leftover.get(pid, "?"), 0) + 1
            log(f"WARNING: killed {len(left)} leftover process(es): {kinds}")
        shutil.rmtree(tmp, ignore_errors=True)


def _cmdline(pid: int) -> str:
    """What a process is: its command line, or (none: a zombie, a kernel-side state) (comm) and state."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
        if cmd:
            return cmd
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{stat[stat.find('(') : stat.rfind(')') + 1]} state {stat[stat.rfind(')') + 2]}"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    try:
        result = asyncio.run(amain(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; everything stopped")
        sys.exit(130)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
