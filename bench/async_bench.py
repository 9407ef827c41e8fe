"""Asynchronous invocations: durable accept rate and drain rate for a no-op function.

Accept: wrk (one thread, a separate process) posts `InvocationType: Event` invokes for a fixed time;
every 202 means the event was committed (fsync) to the queue. The function is paused meanwhile
(reserved concurrency 0, Lambda's own switch), so the figure is the accept path's. Drain: the
reservation is lifted and the backlog runs through the load balancer on the no-op function, timed
until the queue is empty.

    python bench/async_bench.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUA = HERE / "invoke.lua"


def _call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def _noop_zip() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(HERE / "noop" / "app.py", "app.py")
    return buf.getvalue()


def measure(endpoint: str, duration: float = 10.0, connections: int = 32, name: str = "noop-async") -> dict:
    """Run the accept phase with wrk, then wait for the queue to drain; returns the figures."""
    _call(
        f"{endpoint}/2015-03-31/functions",
        "POST",
        {
            "FunctionName": name,
            "Runtime": "python3.12",
            "Handler": "app.handler",
            "Role": "arn:aws:iam::000000000000:role/bench",
            "Code": {"ZipFile": base64.b64encode(_noop_zip()).decode()},
        },
    )
    concurrency = f"{endpoint}/2017-10-31/functions/{name}/concurrency"
    _call(concurrency, "PUT", {"ReservedConcurrentExecutions": 0})
    url = f"{endpoint}/2015-03-31/functions/{name}/invocations"
    t0 = time.perf_counter()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(LUA), url],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "EMBER_INVOCATION_TYPE": "Event"},
    ).stdout
    accept_s = time.perf_counter() - t0
    line = next(ln for ln in out.splitlines() if ln.startswith("WRK_JSON "))
    wrk = json.loads(line.removeprefix("WRK_JSON "))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(wrk["errors"].values()) + (int(non2xx.group(1)) if non2xx else 0)
    accepted = wrk["requests"] - errors
    time.sleep(0.5)  # let requests still in flight when wrk stopped land
    base = _call(f"{endpoint}/_ember/queues")["succeeded"]
    t1 = time.perf_counter()
    _call(concurrency, "DELETE")
    deadline = time.perf_counter() + 600
    while time.perf_counter() < deadline:
        queues = _call(f"{endpoint}/_ember/queues")
        if queues["depth"] == 0 and queues["accepted"] >= accepted:
            break
        time.sleep(0.1)
    drained_s = time.perf_counter() - t1
    queues = _call(f"{endpoint}/_ember/queues")
    return {
        "accepted": accepted,
        "errors": errors,
        "accept_per_s": round(accepted / (wrk["duration_us"] / 1e6), 1),
        "accept_p50_ms": wrk["latency_us"]["p50"] / 1000,
        "accept_p99_ms": wrk["latency_us"]["p99"] / 1000,
        "drained": queues["succeeded"] - base,
        "drain_per_s": round((queues["succeeded"] - base) / drained_s, 1),
        "drain_s": round(drained_s, 2),
        "accept_s": round(accept_s, 2),
        "dropped": queues["dropped"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("serve_args", nargs="*", help="extra `ember serve` arguments (after --)")
    args = parser.parse_args()
    extra = args.serve_args
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "serve", "--port", "0", "--data-dir", tmp, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            endpoint = line.split()[3]
            result = measure(endpoint, args.duration, args.connections)
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
