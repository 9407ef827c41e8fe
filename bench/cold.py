"""Cold-start latency of a no-op Python function, end to end through boto3.

Method "create" (default): create N distinct functions and time the first invoke of each; a first
invoke cannot find a warm sandbox, so it is a cold start by construction. Each function is deleted
right after, so at most one extra sandbox exists at a time and the 2-core machine is not flooded.

Method "update": one function; change an environment variable with UpdateFunctionConfiguration
(a new configuration must not reuse old sandboxes) and time the next invoke.

The timed invoke asks for the log tail; its REPORT line carries an Init Duration only when the
platform started a new sandbox, so the result says how many samples were confirmed cold.

Timings include boto3's client overhead (signing, one HTTP round trip), which is also reported
on its own as `warm_invoke_ms_p50` so the two can be told apart.

    python bench/cold.py http://127.0.0.1:9000 -n 40
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import statistics
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

NOOP_DIR = Path(__file__).with_name("noop")
NODE_NOOP_DIR = Path(__file__).with_name("noop-node")
# runtime -> (code dir, handler) of the no-op function
NOOPS = {"python3.12": (NOOP_DIR, "app.handler"), "nodejs20.x": (NODE_NOOP_DIR, "index.handler")}
ROLE = "arn:aws:iam::000000000000:role/x"


def lambda_client(endpoint: str, read_timeout: float = 60.0, pool: int = 32) -> Any:
    """A boto3 Lambda client for a local endpoint: dummy credentials, no retries (a retry would
    hide a failure and double a latency)."""
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=read_timeout,
            max_pool_connections=pool,
        ),
    )


def code_zip(src: Path = NOOP_DIR) -> bytes:
    """Zip a function's code dir in memory (the noop function by default)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in src.rglob("*") if p.suffix in (".py", ".mjs", ".js")):
            zf.write(path, path.relative_to(src).as_posix())
    return buf.getvalue()


def wait_ready(client: Any, name: str, timeout: float = 60.0) -> None:
    """Wait until State is Active and LastUpdateStatus Successful (if the API reports them)."""
    deadline = time.monotonic() + timeout
    while True:
        cfg = client.get_function_configuration(FunctionName=name)
        state, update = cfg.get("State", "Active"), cfg.get("LastUpdateStatus", "Successful")
        if state == "Active" and update == "Successful":
            return
        if state == "Failed" or update == "Failed":
            raise RuntimeError(f"function {name} failed: {cfg.get('StateReason')} {cfg.get('LastUpdateStatusReason')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"function {name} not ready after {timeout:.0f} s: {state}/{update}")
        time.sleep(0.05)


def create_noop(
    client: Any,
    name: str,
    zipped: bytes | None = None,
    env: dict[str, str] | None = None,
    runtime: str = "python3.12",
) -> None:
    """CreateFunction for the noop code of `runtime` (python3.12: app.handler, nodejs20.x: index.handler)
    and wait until it is invocable."""
    src, handler = NOOPS[runtime]
    client.create_function(
        FunctionName=name,
        Runtime=runtime,
        Handler=handler,
        Role=ROLE,
        Code={"ZipFile": zipped if zipped is not None else code_zip(src)},
        Timeout=30,
        MemorySize=128,
        Environment={"Variables": env or {}},
    )
    wait_ready(client, name)


def timed_invoke(client: Any, name: str, tail: bool = False) -> tuple[float, str]:
    """One synchronous invoke: (milliseconds from call to fully read payload, decoded log tail if
    asked for). Raises on any error, so a failed invoke can never pass as a fast one."""
    t0 = time.perf_counter()
    resp = client.invoke(FunctionName=name, Payload=b"{}", LogType="Tail" if tail else "None")
    payload = resp["Payload"].read()
    ms = (time.perf_counter() - t0) * 1000
    if resp.get("StatusCode") != 200 or resp.get("FunctionError"):
        status, err = resp.get("StatusCode"), resp.get("FunctionError")
        raise RuntimeError(f"invoke {name} failed: {status} {err} {payload!r}")
    log = base64.b64decode(resp.get("LogResult") or "").decode(errors="replace")
    return ms, log


def init_duration(log: str) -> float | None:
    """The REPORT line's Init Duration: present only when the invoke started a new sandbox."""
    m = re.search(r"Init Duration: ([0-9.]+) ms", log)
    return float(m.group(1)) if m else None


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (with n=40, p99 is the maximum: no interpolation flattering it)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _summary(method: str, samples: list[float], warm: list[float], inits: list[float | None]) -> dict[str, Any]:
    confirmed = [x for x in inits if x is not None]
    return {
        "method": method,
        "n": len(samples),
        # Invokes whose REPORT line had an Init Duration, i.e. that the platform says were cold.
        "cold_confirmed": len(confirmed),
        "init_duration_ms_p50": round(pct(confirmed, 50), 2) if confirmed else None,
        "p50_ms": round(pct(samples, 50), 2),
        "p90_ms": round(pct(samples, 90), 2),
        "p99_ms": round(pct(samples, 99), 2),
        "min_ms": round(min(samples), 2),
        "max_ms": round(max(samples), 2),
        "mean_ms": round(statistics.fmean(samples), 2),
        "warm_invoke_ms_p50": round(pct(warm, 50), 2) if warm else None,
        "samples_ms": [round(x, 2) for x in samples],
    }


def measure_create(endpoint: str, n: int = 40, runtime: str = "python3.12") -> dict[str, Any]:
    """First invoke of n freshly created functions (one at a time, each deleted afterwards)."""
    client = lambda_client(endpoint)
    zipped = code_zip(NOOPS[runtime][0])
    run = uuid.uuid4().hex[:8]
    samples: list[float] = []
    warm: list[float] = []
    inits: list[float | None] = []
    for i in range(n):
        name = f"cold-{run}-{i}"
        create_noop(client, name, zipped, runtime=runtime)
        try:
            ms, log = timed_invoke(client, name, tail=True)
            samples.append(ms)
            inits.append(init_duration(log))
            warm.append(timed_invoke(client, name)[0])
        finally:
            client.delete_function(FunctionName=name)
    out = _summary("create", samples, warm, inits)
    out["runtime"] = runtime
    return out


def measure_update(endpoint: str, n: int = 40) -> dict[str, Any]:
    """Invoke right after UpdateFunctionConfiguration changed an env var, n times on one function."""
    client = lambda_client(endpoint)
    name = f"cold-upd-{uuid.uuid4().hex[:8]}"
    create_noop(client, name)
    samples: list[float] = []
    warm: list[float] = []
    inits: list[float | None] = []
    try:
        timed_invoke(client, name)
        for i in range(n):
            client.update_function_configuration(FunctionName=name, Environment={"Variables": {"GEN": str(i)}})
            wait_ready(client, name)
            ms, log = timed_invoke(client, name, tail=True)
            samples.append(ms)
            inits.append(init_duration(log))
            warm.append(timed_invoke(client, name)[0])
    finally:
        client.delete_function(FunctionName=name)
    return _summary("update", samples, warm, inits)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint", help="ember base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("-n", type=int, default=40)
    p.add_argument("--method", choices=("create", "update"), default="create")
    p.add_argument("--runtime", choices=tuple(NOOPS), default="python3.12", help="the no-op's runtime (create)")
    args = p.parse_args(argv)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    if args.method == "create":
        print(json.dumps(measure_create(args.endpoint, args.n, args.runtime), indent=2))
    else:
        print(json.dumps(measure_update(args.endpoint, args.n), indent=2))


if __name__ == "__main__":
    main()
