"""Why the core stops a sandbox, rejects a waiting request or refuses an invoke at the door.

`StrEnum`s: each member *is* its old string (`StopReason.EXPIRED == "expired"`, `str()`, f-strings,
`%s`, `json.dumps` and orjson values all give the bare string), so shells that compare against,
log or serialise the strings see no change. One caveat: orjson refuses str subclasses as dict
*keys*, so anything that may become a key (a throttle reason is counted per reason in metrics) is
handed out as `.value`, a plain str; see `Throttle` in ember.core.assignment.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["RejectReason", "StopReason", "ThrottleReason"]


class StopReason(StrEnum):
    """`Stop.reason`: why the shell must stop a sandbox."""

    EXPIRED = "expired"  # idle past its keep-alive
    EVICTED = "evicted"  # idle, evicted to make room under a memory budget (R8)
    RETIRED = "retired"  # of an older generation (code or configuration changed)
    DISCARDED = "discarded"  # must not be reused: timed out, broke the protocol, or hung
    INIT_FAILED = "init-failed"  # its init failed
    DELETED = "deleted"  # its function was deleted


class RejectReason(StrEnum):
    """`Reject.reason`: why a request that waited for a sandbox gets none."""

    QUEUE_TIMEOUT = "queue-timeout"  # its deadline passed
    INIT_FAILED = "init-failed"  # the sandbox started for it failed its init
    DELETED = "deleted"  # its function was deleted


class ThrottleReason(StrEnum):
    """`Throttle.reason`: why an invoke is refused at the door (Lambda's names)."""

    RESERVED = "ReservedFunctionConcurrentInvocationLimitExceeded"
    ACCOUNT = "ConcurrentInvocationLimitExceeded"
    QUEUE = "FunctionInvocationRateLimitExceeded"
    NOT_FOUND = "FunctionNotFound"
    NO_WORKER = "NoWorkerAvailable"  # cluster mode: no worker can take the sandbox
    RECONCILING = "PartitionReconciling"  # cluster mode: the partition's new leader is not serving yet
