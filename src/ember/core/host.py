"""A cluster worker's own table of its sandboxes: the source of truth, and where fencing happens.

Rules (spec/ember.pml R7 to R9, F1, F2; the `w_*` actions):
  H1  A START runs only if its epoch is >= the highest epoch this worker has seen for the partition
      (`wmax`) and it names this worker's current incarnation (F2); anything else is ignored.
  H2  An INVOKE is accepted only if the sandbox is here, IDLE, and the lease's epoch is >= wmax.
      A sandbox then holds that one invocation until its runtime asks for the next one; only then
      is it IDLE again and its RELEASE goes to whoever leads now.
  H3  A SYNC (reconciliation or probe) raises wmax to its epoch and answers the partition's
      inventory; a SYNC with a lower epoch is ignored.
  H4  A DESTROY (epoch >= wmax) removes only an IDLE sandbox.
  H5  A restart (or the loss of this worker's etcd session) is a new incarnation that starts empty
      and reads the current epochs first (F1): make a new `Host`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

__all__ = ["Host", "Slot", "SlotState"]


class SlotState(IntEnum):
    STARTING = 1  # START accepted, the runtime is not ready yet (in the model START is atomic)
    IDLE = 2  # W_IDLE
    BUSY = 3  # W_BUSY: running an invocation, or answered and not yet asking for the next one


class Slot:
    __slots__ = ("partition", "request", "state")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.state = SlotState.STARTING
        self.request: str | None = None


class Inventory(NamedTuple):
    """The answer to a SYNC: what this worker holds of one partition, by sandbox id."""

    incarnation: int
    epoch: int
    sandboxes: dict[int, tuple[str, str | None]]  # id -> ("idle" | "busy" | "starting", request id)
    probe: int  # echoed from the SYNC


class Host:
    def __init__(self, incarnation: int, epochs: dict[int, int] | None = None) -> None:
        self.incarnation = incarnation
        self.wmax: dict[int, int] = dict(epochs or {})  # F1: a new incarnation reads the epochs first
        self.slots: dict[int, Slot] = {}

    def fenced(self, partition: int, epoch: int) -> bool:
        return epoch < self.wmax.get(partition, 0)

    def _raise(self, partition: int, epoch: int) -> None:
        if epoch > self.wmax.get(partition, 0):
            self.wmax[partition] = epoch

    def start(self, sandbox: int, partition: int, epoch: int, incarnation: int) -> bool:
        """w_start (True: start the sandbox's process) or w_start_fenced (False)."""
        if self.fenced(partition, epoch) or incarnation != self.incarnation:
            return False
        self._raise(partition, epoch)
        if sandbox in self.slots:  # a duplicate START: already starting or started
            return False
        self.slots[sandbox] = Slot(partition)
        return True

    def invoke(self, sandbox: int, partition: int, epoch: int, request: str) -> str | None:
        """w_accept (None: run it) or w_reject (the reason, for the frontend)."""
        slot = self.slots.get(sandbox)
        if slot is None or slot.partition != partition:
            return "absent"
        if self.fenced(partition, epoch):
            return "fenced"
        if slot.state is not SlotState.IDLE:
            return "busy"
        self._raise(partition, epoch)
        slot.state = SlotState.BUSY
        slot.request = request
        return None

    def ready(self, sandbox: int) -> tuple[str, str | None] | None:
        """The sandbox's runtime asks for work. Returns what to tell the current leader: ("ready", None)
        after a start, ("release", request) after an invocation (w_finish), or None."""
        slot = self.slots.get(sandbox)
        if slot is None or slot.state is SlotState.IDLE:
            return None
        was, rid = slot.state, slot.request
        slot.state = SlotState.IDLE
        slot.request = None
        return ("ready", None) if was is SlotState.STARTING else ("release", rid)

    def sync(self, partition: int, epoch: int, probe: int = 0) -> Inventory | None:
        """w_sync: raise the fence and report the partition's sandboxes; None for a stale SYNC."""
        if self.fenced(partition, epoch):
            return None
        self._raise(partition, epoch)
        names = {SlotState.STARTING: "starting", SlotState.IDLE: "idle", SlotState.BUSY: "busy"}
        inv = {sid: (names[s.state], s.request) for sid, s in self.slots.items() if s.partition == partition}
        return Inventory(self.incarnation, epoch, inv, probe)

    def destroy(self, sandbox: int, partition: int, epoch: int) -> bool:
        """w_destroy: True when the (idle) sandbox is to be stopped now."""
        slot = self.slots.get(sandbox)
        if slot is None or slot.partition != partition or self.fenced(partition, epoch):
            return False
        if slot.state is SlotState.BUSY:
            return False
        del self.slots[sandbox]
        return True

    def exited(self, sandbox: int) -> Slot | None:
        """The sandbox's process is gone (crash, timeout kill, OOM, destroy): forget it."""
        return self.slots.pop(sandbox, None)
