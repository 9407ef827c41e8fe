"""Azure Functions 2019 traces (the In-Vitro `N_inv/N_run/N_mem.csv` samples), turned into invocations.

The trace only gives per-minute counts, duration percentiles and memory percentiles, so a concrete
workload is synthesised from it: each minute's invocations are spread uniformly within the minute,
each duration is drawn from the function's duration percentiles (piecewise linear between them),
and each sandbox is sized by the function's average allocated memory. Every function draws from its
own random stream, seeded by (seed, function hash), so a function gets the same invocations whichever
sample file it is read from (the 100- and 200-function samples are subsets of the 500).
"""

from __future__ import annotations

import bisect
import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_MEMORY_MB", "FunctionTrace", "Workload", "load_trace", "synthesise"]

DEFAULT_MEMORY_MB = 128  # when a function has no memory row (Lambda's default size)
_PCT_POINTS = (0.0, 0.01, 0.25, 0.50, 0.75, 0.99, 1.0)
_RUN_COLUMNS = tuple(f"percentile_Average_{p}" for p in (0, 1, 25, 50, 75, 99, 100))


@dataclass(slots=True)
class FunctionTrace:
    """One function of the trace: per-minute counts, duration percentiles (ms), memory (MB)."""

    name: str
    per_minute: list[int]
    duration_pcts_ms: tuple[float, ...]  # at _PCT_POINTS
    memory_mb: int

    @property
    def invocations(self) -> int:
        return sum(self.per_minute)

    def draw_duration_s(self, rnd: random.Random) -> float:
        """Inverse-CDF sample, linear between the published percentiles; at least 1 ms."""
        u = rnd.random()
        pcts = self.duration_pcts_ms
        i = min(bisect.bisect_right(_PCT_POINTS, u), len(_PCT_POINTS) - 1)
        lo_p, hi_p = _PCT_POINTS[i - 1], _PCT_POINTS[i]
        lo, hi = pcts[i - 1], pcts[i]
        ms = lo + (hi - lo) * (u - lo_p) / (hi_p - lo_p)
        return max(ms, 1.0) / 1000.0


@dataclass(slots=True)
class Workload:
    """Concrete invocations: `arrivals` holds (time s, function index, duration s), sorted by time."""

    functions: list[FunctionTrace]
    arrivals: list[tuple[float, int, float]] = field(default_factory=list)
    horizon_s: float = 0.0


def load_trace(directory: Path | str, sample: int | str) -> list[FunctionTrace]:
    """Read `DIR/N_inv.csv`, `N_run.csv` and `N_mem.csv`, matched by function hash (columns by name)."""
    d = Path(directory)
    with open(d / f"{sample}_run.csv", newline="") as f:
        runs = {row["HashFunction"]: tuple(float(row[c]) for c in _RUN_COLUMNS) for row in csv.DictReader(f)}
    with open(d / f"{sample}_mem.csv", newline="") as f:
        mems = {row["HashApp"]: round(float(row["AverageAllocatedMb"])) for row in csv.DictReader(f)}
    functions = []
    with open(d / f"{sample}_inv.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        name_col = header.index("HashFunction")
        app_col = header.index("HashApp")
        minute_cols = [i for i, h in enumerate(header) if h.startswith("minute_")]
        for row in reader:
            name = row[name_col]
            pcts = runs.get(name)
            if pcts is None:
                raise ValueError(f"{name} has invocations but no durations in {sample}_run.csv")
            memory = mems.get(row[app_col], DEFAULT_MEMORY_MB) or DEFAULT_MEMORY_MB
            functions.append(FunctionTrace(name, [int(row[i]) for i in minute_cols], pcts, memory))
    return functions


def synthesise(functions: list[FunctionTrace], seed: int = 1, minutes: int | None = None) -> Workload:
    """Spread each minute's invocations within the minute and draw their durations (seeded)."""
    arrivals: list[tuple[float, int, float]] = []
    span = max((len(fn.per_minute) for fn in functions), default=0) if minutes is None else minutes
    for index, fn in enumerate(functions):
        rnd = random.Random(f"{seed}:{fn.name}")
        draw = fn.draw_duration_s
        for minute, count in enumerate(fn.per_minute[:span]):
            base = minute * 60.0
            for _ in range(count):
                arrivals.append((base + 60.0 * rnd.random(), index, draw(rnd)))
    arrivals.sort()
    return Workload(functions, arrivals, span * 60.0)
