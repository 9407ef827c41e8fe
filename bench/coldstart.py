"""Cold starts with and without isolation and the pool, in one run: the same no-op python function,
first invoke of N freshly created functions, end to end through boto3 (bench/cold.py's
`measure_create`), against `ember serve` configurations started one after the other:

    bwrap+pool        --isolation bwrap --pool 2   (the default when bubblewrap works)
    bwrap+pool-burst  the same, cold starts back to back (faster than a pool of 2 refills)
    ...-nonet         the same two with --network none (no egress: what egress costs, same run)
    bwrap             --isolation bwrap --pool 0   (a new sandbox + interpreter per cold start)
    none              --isolation none  --pool 0   (a plain process: the old behaviour)
    node-bwrap        --isolation bwrap --pool 2   a no-op nodejs20.x function (no pool: a new node per cold start)
    node-none         --isolation none  --pool 0   the same, unisolated

Bars: isolated python p50 <= 15 ms, p99 <= 50 ms (issue 4); node p50 <= 150 ms (issue 14). `--pace` (0.25 s) waits
before each timed invoke, so the pool is always full; the burst row issues cold starts back to back,
faster than a pool of 2 is refilled: each refill is a new bwrap sandbox into which the zygote forks a
pre-imported runtime (ember.sandbox.zygote, ~10-25 ms of wall time, mostly waiting), and a cold start that finds
the pool empty gets one made on the spot (no fresh interpreter, ~70 ms, unless the zygote is down).

    .venv/bin/python bench/coldstart.py [-n 40] [--out FILE] [--pace 0.25] [--modes bwrap+pool,bwrap,none]

`measure(endpoint, n, pace_s)` is the function bench/run.py can call against a server it started itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cold
from proctools import free_port

ROOT = Path(__file__).resolve().parent.parent
MODES: dict[str, list[str]] = {
    "bwrap+pool": ["--isolation", "bwrap", "--pool", "2"],
    "bwrap+pool-burst": ["--isolation", "bwrap", "--pool", "2"],  # back to back: drains the pool
    # the same without outbound network (--network none: a loopback only, as before issue 14), to see
    # what egress (docs/decisions/0008) costs in the same run
    "bwrap+pool-nonet": ["--isolation", "bwrap", "--pool", "2", "--network", "none"],
    "bwrap+pool-burst-nonet": ["--isolation", "bwrap", "--pool", "2", "--network", "none"],
    "bwrap": ["--isolation", "bwrap", "--pool", "0"],
    "none": ["--isolation", "none", "--pool", "0"],
    "node-bwrap": ["--isolation", "bwrap", "--pool", "2"],
    "node-none": ["--isolation", "none", "--pool", "0"],
}
NODE_MODES = {"node-bwrap", "node-none"}  # the no-op is nodejs20.x
# measured with no pause between cold starts, whatever --pace says
BURST = {"bwrap+pool-burst", "bwrap+pool-burst-nonet"}
BAR_P50_MS, BAR_P99_MS = 15.0, 50.0
NODE_BAR_P50_MS = 150.0


def measure(endpoint: str, n: int = 40, pace_s: float = 0.0, runtime: str = "python3.12") -> dict[str, Any]:
    """First invoke of `n` new no-op functions on a running ember: p50/p99 and the rest (bench/cold.py's
    summary). `pace_s`: a pause before each timed invoke, so the pool's background refill always keeps
    up; 0 measures back-to-back cold starts, which drain it."""
    if pace_s <= 0:
        return cold.measure_create(endpoint, n, runtime)
    client = cold.lambda_client(endpoint)
    zipped = cold.code_zip(cold.NOOPS[runtime][0])
    run = uuid.uuid4().hex[:8]
    samples: list[float] = []
    warm: list[float] = []
    inits: list[float | None] = []
    for i in range(n):
        name = f"cold-{run}-{i}"
        cold.create_noop(client, name, zipped, runtime=runtime)
        try:
            time.sleep(pace_s)
            ms, log = cold.timed_invoke(client, name, tail=True)
            samples.append(ms)
            inits.append(cold.init_duration(log))
            warm.append(cold.timed_invoke(client, name)[0])
        finally:
            client.delete_function(FunctionName=name)
    out = cold._summary("create", samples, warm, inits)
    out["runtime"] = runtime
    return out


def serve(data_dir: Path, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), "--data-dir", str(data_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=open(data_dir.parent / f"ember-{port}.log", "w"),  # noqa: SIM115 - lives with the process
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ember listening on "):
        proc.kill()
        raise RuntimeError(f"ember did not start: {line!r}")
    return proc, f"http://127.0.0.1:{port}"


def run(n: int, modes: list[str], pace_s: float = 0.0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ember-coldstart-") as tmp:
        for mode in modes:
            data = Path(tmp) / mode / "data"
            data.mkdir(parents=True)
            proc, url = serve(data, MODES[mode])
            try:
                time.sleep(1.0)  # the pool fills (and the server settles) before the first sample
                runtime = "nodejs20.x" if mode in NODE_MODES else "python3.12"
                out[mode] = measure(url, n, 0.0 if mode in BURST else pace_s, runtime)
                out[mode]["pace_s"] = 0.0 if mode in BURST else pace_s
            except Exception as exc:  # one broken mode must not cost the others' figures
                out[mode] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    return out


def table(result: dict[str, Any]) -> str:
    rows = [f"{'mode':<22} {'n':>3} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'init p50':>9} {'warm p50':>9}  bar"]
    for mode, r in result.items():
        if "error" in r:
            rows.append(f"{mode:<22} {r['error']}")
            continue
        bar = ""
        if mode == "bwrap+pool":  # the bar is for the configuration ember runs by default
            ok = r["p50_ms"] <= BAR_P50_MS and r["p99_ms"] <= BAR_P99_MS
            bar = f"{'PASS' if ok else 'FAIL'} (p50 <= {BAR_P50_MS:.0f}, p99 <= {BAR_P99_MS:.0f})"
        elif mode == "node-bwrap":
            bar = f"{'PASS' if r['p50_ms'] <= NODE_BAR_P50_MS else 'FAIL'} (p50 <= {NODE_BAR_P50_MS:.0f})"
        rows.append(
            f"{mode:<22} {r['n']:>3} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['init_duration_ms_p50'] or 0:>9.1f} {r['warm_invoke_ms_p50'] or 0:>9.1f}  {bar}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=40, help="cold starts per mode")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument(
        "--pace", type=float, default=0.25, help="seconds before each cold start, so the pool refills (0: none)"
    )
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    result = run(args.n, [m for m in args.modes.split(",") if m], args.pace)
    print(table(result))
    doc = json.dumps(result, indent=2)
    print(doc)
    if args.out:
        args.out.write_text(doc)


if __name__ == "__main__":
    main()
