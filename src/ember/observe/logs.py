"""Lambda's platform log lines (START / END / REPORT) around what a function printed."""

from __future__ import annotations

import base64
import math

from ember.sandbox.process import Invocation

TAIL_BYTES = 4096


def invocation_log(inv: Invocation, memory_mb: int) -> bytes:
    """The invocation's log as CloudWatch shows it."""
    rid = inv.request_id
    duration = max(0.0, (inv.ended - inv.started) * 1000.0) if inv.started else 0.0
    report = (
        f"REPORT RequestId: {rid}\tDuration: {duration:.2f} ms\tBilled Duration: {math.ceil(duration)} ms\t"
        f"Memory Size: {memory_mb} MB\tMax Memory Used: {inv.max_memory_mb} MB\t"
    )
    if inv.cold:
        report += f"Init Duration: {inv.init_duration_ms:.2f} ms\t"
    out = bytearray(f"START RequestId: {rid} Version: $LATEST\n".encode())
    out += inv.log
    if inv.log and not inv.log.endswith(b"\n"):
        out += b"\n"
    out += f"END RequestId: {rid}\n{report}\n".encode()
    return bytes(out)


def tail_header(inv: Invocation, memory_mb: int) -> str:
    """X-Amz-Log-Result: base64 of the last 4 KB of the invocation's log."""
    return base64.b64encode(invocation_log(inv, memory_mb)[-TAIL_BYTES:]).decode()
