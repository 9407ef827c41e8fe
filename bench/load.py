"""Closed-loop invoke load with wrk, parsed into throughput and a latency distribution.

wrk runs with one thread: on 2 cores the generator competes with the server under test, and a
second wrk thread would only steal more of it. p99.9 comes from a Lua done() hook reading wrk's
own histogram (invoke.lua), since --latency stops at p99. A run with any socket error, timeout or
non-2xx response is flagged (`ok` is False) rather than silently averaged in.

    python bench/load.py http://127.0.0.1:9000 -c 16 -d 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from proctools import die_with_parent

LUA = Path(__file__).with_name("invoke.lua")
INVOKE_PATH = "/2015-03-31/functions/{name}/invocations"


@dataclass
class WrkResult:
    """One wrk run. Latencies in milliseconds."""

    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.requests > 0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "error_count": self.error_count, "ok": self.ok}


def parse(stdout: str, connections: int) -> WrkResult:
    """Read the WRK_JSON line from invoke.lua; cross-check non-2xx against wrk's own summary."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result line:\n{stdout}")
    d = json.loads(line.removeprefix("WRK_JSON "))
    lat = {k: v / 1000.0 for k, v in d["latency_us"].items()}
    errors = dict(d["errors"])
    # wrk counts status >= 400 in errors.status; "Non-2xx or 3xx" also covers 3xx, so take the max.
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", stdout)
    errors["non2xx"] = max(int(m.group(1)) if m else 0, errors.pop("status"))
    duration_s = d["duration_us"] / 1e6
    return WrkResult(
        connections=connections,
        duration_s=round(duration_s, 3),
        requests=d["requests"],
        rps=round(d["requests"] / duration_s, 1) if duration_s else 0.0,
        p50_ms=lat["p50"],
        p75_ms=lat["p75"],
        p90_ms=lat["p90"],
        p99_ms=lat["p99"],
        p999_ms=lat["p99.9"],
        max_ms=lat["max"],
        mean_ms=round(lat["mean"], 3),
        errors=errors,
    )


async def run_wrk(
    base_url: str,
    connections: int,
    duration: float,
    function: str = "noop",
    timeout: float = 5.0,
    wrk: str = "wrk",
) -> WrkResult:
    """Run wrk against base_url's invoke path for `function`.

    The timeout is generous (a warm no-op invoke takes well under 10 ms) so a timeout means a stuck
    request, which is counted as an error instead of quietly truncating the latency tail.
    """
    url = base_url.rstrip("/") + INVOKE_PATH.format(name=function)
    proc = await asyncio.create_subprocess_exec(
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout:g}s",
        "--latency",
        "-s",
        str(LUA),
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}:\n{text}")
    return parse(text, connections)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:9000")
    p.add_argument("-c", "--connections", type=int, default=16)
    p.add_argument("-d", "--duration", type=float, default=10)
    p.add_argument("--function", default="noop")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    result = asyncio.run(run_wrk(args.url, args.connections, args.duration, args.function, args.timeout))
    print(json.dumps(result.as_dict(), indent=2))


if __name__ == "__main__":
    main()
