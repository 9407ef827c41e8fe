"""Function logs, kept like CloudWatch Logs keeps them: a log group per function, a stream per
sandbox (its AWS_LAMBDA_LOG_STREAM_NAME), each invocation's output between Lambda's START / END /
REPORT lines, and what a sandbox printed outside any invocation (its init, or between invokes).

Format on disk (docs/decisions/0003-function-logs.md): `DATA_DIR/logs/FUNCTION/SEGMENT.jsonl`, JSON
lines `{"ts": epoch ms, "stream": ..., "request_id": ... | null, "message": ...}`, oldest segment
dropped once a function's logs exceed `max_bytes`; a deleted function's logs go with it.

Off the hot path: an ended invocation is a reference appended to a list (`record`); a periodic
task (`flush_s`) formats and writes the batch, one open/append per function. Max Memory Used comes
from the sandbox's VmHWM (a monotone peak), read once per sandbox per flush rather than per invoke
(and at a sandbox's first invocation), so the figure is the sandbox's peak up to at most `flush_s`
after the invocation ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ember.observe.logs import invocation_log
from ember.sandbox.process import Invocation, SandboxProcess

log = logging.getLogger("ember.observe.funclogs")

DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # per function
DEFAULT_SEGMENT_BYTES = 1024 * 1024
FLUSH_S = 0.1
FLUSH_CHUNK = 64  # invocations formatted per step of the writer (~0.5 ms), then the loop runs again
GC_S = 10.0
MAX_PENDING = 50_000  # invocations buffered between flushes; beyond, events are dropped (counted)
FOLLOW_QUEUE = 10_000


def stream_of(proc: SandboxProcess) -> str:
    return proc.spec.env.get("AWS_LAMBDA_LOG_STREAM_NAME", f"sandbox-{proc.ref.id}")


@dataclass(slots=True)
class _Segment:
    path: Path
    first_ts: int
    size: int


@dataclass(slots=True)
class _Group:
    """One function's log group on disk."""

    dir: Path
    segments: list[_Segment] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


class LogStore:
    def __init__(
        self,
        root: Path,
        live: Callable[[], Iterable[str]],
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        flush_s: float = FLUSH_S,
    ) -> None:
        self.root = root
        self.live = live  # names of the functions that exist now
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max(4096, max_bytes // 4))
        self.flush_s = flush_s
        self.pending: deque[tuple[str, Any]] = deque()  # (function, Invocation | _Output | _Gone)
        self.dropped = 0
        self._hwm: dict[int, int] = {}  # sandbox id -> last VmHWM read (MB)
        self._gone: list[tuple[float, int]] = []  # (when, sandbox id) of exited sandboxes
        self._groups: dict[str, _Group] = {}
        self._followers: dict[str, set[asyncio.Queue[bytes | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        root.mkdir(parents=True, exist_ok=True)
        self._load()

    # ------------------------------------------------------------------ the hot path

    def record(self, function: str, inv: Invocation) -> None:
        pending = self.pending
        if len(pending) >= MAX_PENDING:
            self.dropped += 1
            return
        pending.append((function, inv))
        if inv.cold and inv.proc is not None:  # once per sandbox: a first Max Memory Used figure
            self._read_hwm(inv.proc)

    # ------------------------------------------------------------------ sandbox events

    def sandbox_exited(self, function: str, proc: SandboxProcess) -> None:
        """Keep what a sandbox printed outside any invocation before it is gone (an init failure's
        traceback, most often)."""
        if proc.init_log:
            self.pending.append((function, _Output(proc, bytes(proc.init_log), time.time())))
            proc.init_log.clear()
        self.pending.append((function, _Gone(proc.ref.id)))

    # ------------------------------------------------------------------ writing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()
        await self.stop_following()

    async def stop_following(self) -> None:
        """End every `follow` stream (at shutdown)."""
        for queues in self._followers.values():
            for q in queues:
                if q.full():
                    q.get_nowait()
                q.put_nowait(None)

    async def _run(self) -> None:
        last_gc = 0.0
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                while self.pending:  # in chunks, yielding in between: never a long stall of the loop
                    self.flush(FLUSH_CHUNK)
                    if self.pending:
                        await asyncio.sleep(0)
                now = time.monotonic()
                if now - last_gc >= GC_S:
                    last_gc = now
                    self.gc()
            except Exception:  # pragma: no cover - never let the log writer die
                log.exception("function log flush failed")

    def flush(self, limit: int | None = None) -> None:
        """Format and append what was recorded (the oldest `limit` items, or all)."""
        pending = self.pending
        if not pending:
            return
        n = len(pending) if limit is None else min(limit, len(pending))
        batch = [pending.popleft() for _ in range(n)]
        wall_minus_perf = time.time() - time.perf_counter()
        out: dict[str, list[bytes]] = {}
        seen: dict[int, SandboxProcess] = {}
        gone: list[int] = []
        for function, item in batch:
            kind = type(item)
            if kind is _Gone:
                gone.append(item.sandbox_id)
                continue
            lines = out.get(function)
            if lines is None:
                lines = out[function] = []
            if kind is _Output:
                proc = item.proc
                lines.append(_event(int(item.wall * 1000), stream_of(proc), None, item.data))
                continue
            inv: Invocation = item
            proc = inv.proc
            if proc is None:
                continue  # never reached a sandbox (an init failure): its sandbox's output has it
            sid = proc.ref.id
            if sid not in seen:
                seen[sid] = proc
                if proc.init_log:  # printed before this invocation, outside any: init, mostly
                    t0 = proc.spawned_at + wall_minus_perf if inv.cold else (inv.started or inv.ended)
                    lines.append(_event(int(t0 * 1000), stream_of(proc), None, bytes(proc.init_log)))
                    proc.init_log.clear()
                if not proc.exited.is_set():
                    self._read_hwm(proc)
            if not inv.max_memory_mb:
                inv.max_memory_mb = self._hwm.get(sid, 0)
            start = inv.started or inv.ended
            ts = int((start + wall_minus_perf) * 1000) if start else int(time.time() * 1000)
            text = invocation_log(inv, proc.spec.memory_mb)
            lines.append(_event(ts, stream_of(proc), inv.request_id, text))
        now = time.monotonic()  # forget a gone sandbox's figure a little later: its last
        self._gone += [(now, sid) for sid in gone]  # invocations may be recorded after its exit
        while self._gone and now - self._gone[0][0] > 5.0:
            self._hwm.pop(self._gone.pop(0)[1], None)
        for function, lines in out.items():
            if lines:
                self._append(function, lines)

    def _append(self, function: str, lines: list[bytes]) -> None:
        group = self._groups.get(function)
        if group is None:
            group = self._groups[function] = _Group(self.root / function)
            group.dir.mkdir(parents=True, exist_ok=True)
        data = b"".join(lines)
        seg = group.segments[-1] if group.segments else None
        if seg is None or seg.size >= self.segment_bytes:
            first_ts = orjson.loads(lines[0])["ts"]
            self._seq += 1
            seg = _Segment(group.dir / f"{first_ts:013d}-{self._seq:06d}.jsonl", first_ts, 0)
            group.segments.append(seg)
        try:
            with open(seg.path, "ab") as f:
                f.write(data)
        except OSError:
            log.exception("cannot write function logs", extra={"function": function})
            return
        seg.size += len(data)
        while len(group.segments) > 1 and group.size > self.max_bytes:
            old = group.segments.pop(0)
            with contextlib.suppress(OSError):
                old.path.unlink()
        followers = self._followers.get(function)
        if followers:
            for q in list(followers):
                for line in lines:
                    try:
                        q.put_nowait(line)
                    except asyncio.QueueFull:
                        break

    def gc(self) -> None:
        """Remove the log groups of functions that no longer exist."""
        live = set(self.live())
        for name in list(self._groups):
            if name not in live and not any(f == name for f, _ in self.pending):
                group = self._groups.pop(name)
                shutil.rmtree(group.dir, ignore_errors=True)

    def total_bytes(self) -> int:
        return sum(g.size for g in self._groups.values())

    # ------------------------------------------------------------------ reading

    def read(
        self, function: str, since_ms: int = 0, stream: str | None = None, limit: int = 10_000
    ) -> list[bytes]:
        """Events of `function` at or after `since_ms`, oldest first (the newest `limit` of them)."""
        self.flush()
        return self._read_upto(function, self._extent(function), since_ms, stream, limit)

    def segments(self, function: str) -> list[tuple[Path, int, int]]:
        """`function`'s segments as written so far, oldest first: (path, first event's ts, bytes).
        A reader reads each up to that size (segments are appended only, and may be deleted by
        retention meanwhile). The CloudWatch Logs API reads through this (ember.api.cwlogs)."""
        return self._extent(function)

    def _extent(self, function: str) -> list[tuple[Path, int, int]]:
        group = self._groups.get(function)
        return [] if group is None else [(s.path, s.first_ts, s.size) for s in group.segments]

    @staticmethod
    def _read_upto(
        function: str, extent: list[tuple[Path, int, int]], since_ms: int, stream: str | None, limit: int
    ) -> list[bytes]:
        out: list[bytes] = []
        for i, (path, _, size) in enumerate(extent):
            nxt = extent[i + 1][1] if i + 1 < len(extent) else None
            if nxt is not None and nxt < since_ms:
                continue  # the whole segment is older than `since`
            try:
                with open(path, "rb") as f:
                    data = f.read(size)
            except OSError:
                continue  # dropped by retention meanwhile
            for line in data.splitlines():
                if not line:
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if doc.get("ts", 0) < since_ms or (stream is not None and doc.get("stream") != stream):
                    continue
                out.append(line + b"\n")
        return out[-limit:] if limit else out

    def streams(self, function: str) -> list[dict[str, Any]]:
        """Log streams of `function`: name, first and last event time, events."""
        info: dict[str, dict[str, Any]] = {}
        for line in self.read(function, limit=0):
            doc = orjson.loads(line)
            s = info.setdefault(doc["stream"], {"stream": doc["stream"], "first_ts": doc["ts"], "events": 0})
            s["last_ts"] = doc["ts"]
            s["events"] += 1
        return sorted(info.values(), key=lambda s: s["last_ts"], reverse=True)

    async def follow(
        self, function: str, since_ms: int, stream: str | None, limit: int
    ) -> tuple[list[bytes], asyncio.Queue[bytes | None]]:
        """History since `since_ms`, and a queue of every event written after it (no gap, no
        duplicate: the history is read up to the extent the files had when the queue was set up)."""
        self.flush()
        extent = self._extent(function)
        q: asyncio.Queue[bytes | None] = asyncio.Queue(FOLLOW_QUEUE)
        self._followers.setdefault(function, set()).add(q)
        history = await asyncio.to_thread(self._read_upto, function, extent, since_ms, stream, limit)
        return history, q

    def unfollow(self, function: str, q: asyncio.Queue[bytes | None]) -> None:
        followers = self._followers.get(function)
        if followers is not None:
            followers.discard(q)
            if not followers:
                del self._followers[function]

    # ------------------------------------------------------------------ internals

    def _read_hwm(self, proc: SandboxProcess) -> None:
        mb = proc.max_memory_mb() if proc.pid else 0
        if mb:
            self._hwm[proc.ref.id] = mb

    def _load(self) -> None:
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            group = _Group(d)
            for f in sorted(d.glob("*.jsonl")):
                try:
                    first_ts = int(f.name.split("-", 1)[0])
                    size = f.stat().st_size
                except (ValueError, OSError):
                    continue
                group.segments.append(_Segment(f, first_ts, size))
                seq = f.stem.split("-", 1)[1] if "-" in f.stem else "0"
                if seq.isdigit():
                    self._seq = max(self._seq, int(seq))
            self._groups[d.name] = group


class _Output:
    """What a sandbox printed outside any invocation."""

    __slots__ = ("data", "proc", "wall")

    def __init__(self, proc: SandboxProcess, data: bytes, wall: float) -> None:
        self.proc, self.data, self.wall = proc, data, wall


class _Gone:
    __slots__ = ("sandbox_id",)

    def __init__(self, sandbox_id: int) -> None:
        self.sandbox_id = sandbox_id


def _event(ts: int, stream: str, request_id: str | None, message: bytes) -> bytes:
    text = message.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    return orjson.dumps({"ts": ts, "stream": stream, "request_id": request_id, "message": text}) + b"\n"


def parse_since(value: str, now: float | None = None) -> int:
    """`--since`: a duration before now (`30s`, `10m`, `2h`, `1d`), epoch milliseconds, or an ISO
    8601 time. Returns epoch milliseconds."""
    from datetime import datetime

    now = time.time() if now is None else now
    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if v and v[-1] in units and v[:-1].replace(".", "", 1).isdigit():
        return int((now - float(v[:-1]) * units[v[-1]]) * 1000)
    if v.isdigit():
        return int(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"invalid time {value!r}: use e.g. 30s, 10m, 2h, 1d or an ISO 8601 time") from None
    return int(dt.timestamp() * 1000)
