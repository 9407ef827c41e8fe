"""One synchronous invocation as a cluster frontend sees it: acquire, send once, one outcome.

Rules (spec/ember.pml R10; the `fe_*` actions):
  C1  The frontend may retry the acquire (same request id, on whoever leads now) until it has sent
      the payload, at most `max_retries` times.
  C2  It sends the payload AT MOST ONCE. After that, a missing result is an error for the client,
      never a second send (the mutant MUTANT_RESEND_PAYLOAD shows the double run this prevents).
  C3  The client gets exactly one outcome; anything arriving later is dropped (`fe_discard`).
  C4  A worker's explicit refusal (w_reject: fenced, busy or absent) means the payload was not run
      and never will be (the worker keeps nothing), so the acquire may be retried (F6, found by the
      chaos harness: a grant in flight across a failover is fenced and would fail the client).
      The new acquire uses a new lease id (`lease_id`: request id, then "/1", "/2"...), so the
      leader does not answer it with the refused grant again (acquire is idempotent per lease id).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Call", "Phase"]


class Phase(IntEnum):
    ACQUIRING = 1  # F_ACQ
    SENT = 2  # F_SENT: payload sent, waiting for the result
    OK = 3  # F_OK
    ERROR = 4  # F_ERR
    THROTTLED = 5  # F_THR


class Call:
    __slots__ = ("max_retries", "phase", "refusals", "request_id", "retries")

    def __init__(self, request_id: str, max_retries: int) -> None:
        assert max_retries >= 0
        self.request_id = request_id
        self.max_retries = max_retries
        self.retries = 0
        self.refusals = 0
        self.phase = Phase.ACQUIRING  # fe_send_acquire happened when the call was made

    @property
    def lease_id(self) -> str:
        """The id acquires carry (and the worker's RELEASE): new after each refusal (C4)."""
        return self.request_id if not self.refusals else f"{self.request_id}/{self.refusals}"

    @property
    def done(self) -> bool:
        return self.phase >= Phase.OK

    def on_grant(self) -> bool:
        """fe_on_grant: True means "send the payload now" (exactly once); False is fe_discard."""
        if self.phase is Phase.ACQUIRING:
            self.phase = Phase.SENT
            return True
        return False

    def on_fail(self, throttled: bool) -> bool:
        """fe_on_fail: throttled by the leader, refused by the worker or an error. True: answer the client."""
        if self.phase in (Phase.ACQUIRING, Phase.SENT):
            self.phase = Phase.THROTTLED if throttled else Phase.ERROR
            return True
        return False

    def on_refused(self) -> str:
        """fe_on_reject (C4): the worker refused the payload without running it: "retry" the acquire,
        or "give-up" (an error for the client) when no retry is left."""
        if self.phase is not Phase.SENT:
            return "ignore"
        if self.retries < self.max_retries:
            self.retries += 1
            self.refusals += 1
            self.phase = Phase.ACQUIRING
            return "retry"
        self.phase = Phase.ERROR
        return "give-up"

    def on_result(self) -> bool:
        """fe_on_result: True means "hand this result to the client"."""
        if self.phase is Phase.SENT:
            self.phase = Phase.OK
            return True
        return False

    def on_timer(self) -> str | None:
        """A timer fired: "retry" the acquire (fe_retry_acquire), or "give-up" (fe_give_up, an error
        for the client), or None when the call is already over."""
        if self.phase is Phase.ACQUIRING:
            if self.retries < self.max_retries:
                self.retries += 1
                return "retry"
            self.phase = Phase.ERROR
            return "give-up"
        if self.phase is Phase.SENT:  # C2: never re-send
            self.phase = Phase.ERROR
            return "give-up"
        return None
