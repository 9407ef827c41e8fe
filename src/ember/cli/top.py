"""`ember top`: a live view of the functions, refreshed from GET /_ember/stats, that fits in 80
columns: requests/s, p50 / p99, warm %, sandboxes idle / busy / starting, throttles and errors."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ember.cli.client import Client

SORT_KEYS = {
    "rps": lambda f: (-f["rps"], f["name"]),
    "p99": lambda f: (-(f["p99_ms"] or 0.0), f["name"]),
    "p50": lambda f: (-(f["p50_ms"] or 0.0), f["name"]),
    "errors": lambda f: (-f["errors"], f["name"]),
    "throttles": lambda f: (-f["throttles"], f["name"]),
    "sandboxes": lambda f: (-sum(f["sandboxes"].values()), f["name"]),
    "invocations": lambda f: (-f["invocations"], f["name"]),
    "name": lambda f: (f["name"],),
}


def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v / 1000:.0f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return str(n)


def render(doc: dict[str, Any], endpoint: str, sort: str = "rps", limit: int | None = None) -> Group:
    """One frame of `ember top` for the stats document `doc`."""
    a = doc["account"]
    functions = sorted(doc["functions"], key=SORT_KEYS[sort])
    total_rps = sum(f["rps"] for f in functions)
    header = Text.assemble(
        ("ember top", "bold"),
        f"  {endpoint}  ",
        (time.strftime("%H:%M:%S", time.localtime(doc["time"])), "dim"),
    )
    summary = Text.assemble(
        (f"{total_rps:.1f}", "bold"),
        " req/s  ",
        (str(a["concurrent"]), "bold"),
        f"/{a['concurrency_limit']} running  {len(functions)} fn  {a['sandboxes']} sandboxes  ",
        (str(a["errors"]), "red" if a["errors"] else ""),
        " errors  ",
        (str(a["throttles"]), "yellow" if a["throttles"] else ""),
        " throttles",
    )
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold reverse", expand=False)
    table.add_column("FUNCTION", no_wrap=True, overflow="ellipsis", max_width=18, min_width=8)
    for name in ("REQ/S", "P50ms", "P99ms", "WARM%", "IDLE", "BUSY", "START", "THROT", "ERR"):
        table.add_column(name, justify="right", no_wrap=True)
    shown = functions if limit is None else functions[:limit]
    for f in shown:
        sb = f["sandboxes"]
        warm = f["warm_pct"]
        table.add_row(
            f["name"],
            _num(f["rps"]),
            _num(f["p50_ms"], 2),
            _num(f["p99_ms"], 2),
            "-" if warm is None else f"{warm:.0f}",
            str(sb["idle"]),
            Text(str(sb["busy"]), style="bold" if sb["busy"] else ""),
            Text(str(sb["starting"]), style="yellow" if sb["starting"] else ""),
            Text(_count(f["throttles"]), style="yellow" if f["throttles"] else ""),
            Text(_count(f["errors"]), style="red" if f["errors"] else ""),
        )
    parts: list[Any] = [header, summary, Text(""), table]
    if not functions:
        parts.append(Text("no functions yet", style="dim"))
    elif limit is not None and len(functions) > limit:
        parts.append(Text(f"… {len(functions) - limit} more", style="dim"))
    parts.append(
        Text(
            f"rates and percentiles over the last {doc['window_s']:g} s · sorted by {sort} · Ctrl-C quits",
            style="dim",
        )
    )
    return Group(*parts)


def run(client: Client, interval: float, sort: str, window: float, once: bool, console: Console) -> None:
    query = {"window": f"{window:g}"}
    if once:
        console.print(render(client.get_json("/_ember/stats", query), client.endpoint, sort))
        return
    with Live(console=console, screen=False, auto_refresh=False, transient=False) as live:
        while True:
            doc = client.get_json("/_ember/stats", query)
            rows = max(3, console.size.height - 7)
            live.update(render(doc, client.endpoint, sort, limit=rows), refresh=True)
            time.sleep(interval)
