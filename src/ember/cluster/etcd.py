"""ember's thin layer over etcd (via aetcd): the primitives the cluster protocol is built on.

spec/README.md, "The protocol": membership is a key bound to a lease (`Session.register`), a
partition's leader holds `partitions/<p>/leader` through its lease (`Election`), the key's create
revision is the leader's **epoch** (etcd revisions are global and monotonic, so every election gives a
larger one), and every journal write is a transaction that only applies while the writer still holds
the key with that revision (`Etcd.fenced_txn`, R3). Followers tail the journal with `Etcd.watch_prefix`,
which resumes from the last revision it delivered, so a reconnect loses no event.

Keys are strings relative to a prefix (`/ember/` by default; tests pass their own to isolate).
Values are bytes; `dumps`/`loads` give the JSON form (orjson) the cluster stores: language-neutral,
never pickle.

Every etcd call is bounded (`op_timeout`) and failures raise `EtcdError` subclasses that say which
operation on which key against which server. Nothing here retries a write on its own: after
`EtcdUnavailable` a write may or may not have applied, so the caller's loop decides (journal writes
are idempotent puts). The gRPC channel reconnects by itself (reconnect backoff capped at 1 s), so
after an etcd member restarts on the same ports, the next calls simply work again.

The etcd process for tests and `ember cluster up` lives in ember_devtools.etcdserver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple, Self, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.utils
import grpc
import orjson

log = logging.getLogger("ember.cluster.etcd")
T = TypeVar("T")

DEFAULT_PREFIX = "/ember/"
DEFAULT_TTL = 2.0  # the cluster's session TTL: how long a dead leader can block its partition
OP_TIMEOUT = 3.0  # bound on one etcd call
RETRY_DELAY = 0.1  # first pause before retrying after etcd was unreachable; doubles up to RETRY_MAX
RETRY_MAX = 1.0
WATCH_QUEUE = 1024  # events buffered per watch; on overflow the watch restarts from its last revision

# gRPC channel options. Reconnect backoff is capped so a restarted member is found within ~1 s.
# Keepalive pings (only while calls are active, which etcd permits every 5 s by default) notice a
# peer that vanished without closing the socket, e.g. a network partition made with `ip`.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 5000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 0,
}


async def within(aw: Awaitable[T], seconds: float) -> T:
    """await aw (an aetcd call), bounded, and never losing a cancellation.

    Python 3.11's asyncio.wait_for drops a cancellation that arrives as its inner wait completes, and
    aetcd uses wait_for inside (watch creation): a cancelled watcher then went on watching forever.
    So the bound is asyncio.timeout, and a cancellation swallowed inside aw is raised again here.
    """
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    async with asyncio.timeout(seconds):
        result = await aw
    if task.cancelling() > cancelling:
        raise asyncio.CancelledError
    return result


# ---------------------------------------------------------------------------------------------- errors


class EtcdError(Exception):
    """An etcd operation failed. The message names the operation, the key and the server."""


class EtcdUnavailable(EtcdError, ConnectionError):
    """etcd did not answer in time or the connection failed. The outcome of a write is unknown."""


class EtcdCompacted(EtcdError):
    """A watch asked for history that etcd has compacted away: re-read with get_prefix and watch again."""

    def __init__(self, message: str, compacted_revision: int) -> None:
        super().__init__(message)
        self.compacted_revision = compacted_revision


class SessionLost(EtcdError):
    """The session's lease is (or must be presumed) gone: whatever it held is no longer ours."""


class CampaignTimeout(EtcdError, TimeoutError):
    """campaign() did not win within its timeout."""



# ------------------------------------------------------------------------------------------------ JSON


def dumps(obj: Any) -> bytes:
    """The stored form of a value: JSON bytes, readable from any language."""
    return orjson.dumps(obj)


def loads(data: bytes) -> Any:
    """Inverse of `dumps`."""
    return orjson.loads(data)


# ----------------------------------------------------------------------------------------------- types


class KeyValue(NamedTuple):
    """One key as etcd stores it. `key` is relative to the client's prefix."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int  # 0: not bound to a lease


class WatchEvent(NamedTuple):
    """One change under a watched prefix. A delete has value None; revision is the change's mod revision."""

    type: Literal["put", "delete"]
    key: str
    value: bytes | None
    revision: int


class Leader(NamedTuple):
    """The current holder of an election key: its value and its epoch (the key's create revision)."""

    value: bytes
    epoch: int


# ------------------------------------------------------------------------------------------ the client


def prefix_end(prefix: str) -> str:
    """The end of the key range of `prefix` (exclusive): "functions/" -> "functions0"."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def parse_urls(urls: str) -> list[tuple[str, int]]:
    """'http://h:p[,http://h2:p2]' -> [(h, p), ...]. Only plain http (the cluster runs etcd without TLS)."""
    out: list[tuple[str, int]] = []
    for raw in urls.split(","):
        url = raw.strip()
        if not url:
            continue
        rest = url.removeprefix("http://")
        if "://" in rest:
            raise ValueError(f"etcd url {url!r}: only http:// is supported")
        hostport = rest.rstrip("/")
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd url {url!r}: expected http://HOST:PORT")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError(f"no etcd url in {urls!r}")
    return out


async def connect(
    urls: str, *, prefix: str = DEFAULT_PREFIX, op_timeout: float = OP_TIMEOUT, connect_timeout: float = 5.0
) -> Etcd:
    """Connect to the first reachable etcd of a comma-separated URL list.

    aetcd talks to one host:port, so this probes the URLs in order (each until one answers or
    `connect_timeout` runs out overall) and keeps the first that answers. It stays on that member:
    if the member restarts on the same port the channel reconnects to it; there is no failover to
    another URL after connect (the cluster runs one etcd member today).
    """
    assert op_timeout > 0 and connect_timeout > 0
    targets = parse_urls(urls)
    deadline = time.monotonic() + connect_timeout
    errors: list[str] = []
    delay = RETRY_DELAY
    while True:
        for host, port in targets:
            etcd = Etcd(host, port, prefix=prefix, op_timeout=op_timeout)
            try:
                probe = max(0.2, min(op_timeout, deadline - time.monotonic()))
                await within(etcd.client.status(), probe)
                return etcd
            except (TimeoutError, aetcd.exceptions.ClientError) as e:
                errors.append(f"{host}:{port}: {type(e).__name__}: {e}")
                await etcd.close()
        if time.monotonic() + delay >= deadline:
            raise EtcdUnavailable(f"no etcd reachable at {urls} within {connect_timeout}s: {errors[-len(targets) :]}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


class Etcd:
    """One aetcd client plus ember's key prefix and bounded, context-carrying calls. Use `connect()`."""

    def __init__(self, host: str, port: int, *, prefix: str = DEFAULT_PREFIX, op_timeout: float = OP_TIMEOUT) -> None:
        assert prefix.startswith("/") and prefix.endswith("/"), f"prefix must look like /name/, got {prefix!r}"
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.client = aetcd.Client(host, port, timeout=op_timeout, options=dict(_CHANNEL_OPTIONS))
        self.closed = False
        # Every bound this client hits, counted (tenet: every drop counted). A watch overflow drops
        # the events past its queue and resumes from the last one delivered, so nothing is lost.
        self.watch_overflows = 0  # a watch's bounded queue filled: the events past it were dropped
        self.watch_resumes = 0  # a watch stream broke or overflowed and was re-created from its revision
        self.follow_reloads = 0  # a follow() fell back to a fresh snapshot (watch failed, e.g. compacted)

    def counters(self) -> dict[str, int]:
        """This client's counters, for a role's /metrics (`ember.cluster.metrics`)."""
        return {"etcd_watch_overflows": self.watch_overflows, "etcd_watch_resumes": self.watch_resumes,
                "etcd_follow_reloads": self.follow_reloads}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; running watches end."""
        self.closed = True
        with contextlib.suppress(Exception):
            await within(self.client.close(), self.op_timeout)

    # -- keys

    def full_key(self, key: str) -> bytes:
        """A relative key ('workers/w1') as stored ('/ember/workers/w1')."""
        assert not key.startswith("/"), f"keys are relative to the prefix {self.prefix!r}, got {key!r}"
        return (self.prefix + key).encode()

    def rel_key(self, raw: bytes) -> str:
        full = raw.decode()
        assert full.startswith(self.prefix), f"key {full!r} outside prefix {self.prefix!r}"
        return full[len(self.prefix) :]

    def _kv(self, kv: Any) -> KeyValue:
        return KeyValue(self.rel_key(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.lease)

    async def _call(self, what: str, coro: Any) -> Any:
        """Run one aetcd call with a bound; map its failures to EtcdError with context."""
        try:
            return await within(coro, self.op_timeout)
        except TimeoutError as e:
            raise EtcdUnavailable(f"{what} at {self.url}: no answer within {self.op_timeout}s") from e
        except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError) as e:
            raise EtcdUnavailable(f"{what} at {self.url}: {type(e).__name__}: {e}") from e
        except aetcd.exceptions.ClientError as e:
            raise EtcdError(f"{what} at {self.url}: {type(e).__name__}: {e}") from e

    # -- plain reads and writes

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None when absent."""
        kv = await self._call(f"get {key!r}", self.client.get(self.full_key(key)))
        return None if kv is None else self._kv(kv)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Store value (bound to `lease` when nonzero); returns the revision of the write."""
        assert isinstance(value, bytes)
        res = await self._call(f"put {key!r}", self.client.put(self.full_key(key), value, lease=lease or None))
        return int(res.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete the key; True when it existed."""
        res = await self._call(f"delete {key!r}", self.client.delete(self.full_key(key)))
        return bool(res and res.deleted)

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """All keys under prefix and the revision they were read at (start a watch at revision + 1)."""
        res = await self._call(f"get_prefix {prefix!r}", self.client.get_prefix(self.full_key(prefix)))
        return {self.rel_key(kv.key): kv.value for kv in res.kvs}, int(res.header.revision)

    async def get_at(self, key: str) -> tuple[KeyValue | None, int]:
        """The key (None when absent) and the revision it was read at (start a watch at revision + 1)."""
        raw = self.full_key(key)
        # A one-key range, not get(): aetcd's get() drops the header (the revision) when the key is absent.
        res = await self._call(f"get {key!r}", self.client.get_range(raw, raw + b"\x00"))
        kv = self._kv(res.kvs[0]) if res.kvs else None
        return kv, int(res.header.revision)

    async def revision(self) -> int:
        """The store's current revision."""
        return (await self.get_at(""))[1]

    # -- fenced journal writes (R3)

    async def fenced_txn(
        self, leader_key: str, epoch: int, puts: dict[str, bytes] | None = None, deletes: Sequence[str] = ()
    ) -> bool:
        """Apply puts and deletes atomically iff leader_key still has create revision `epoch`.

        False means fenced: the writer no longer leads (its key expired, was resigned, or someone else
        won since). That is how etcd rejects a deposed leader's journal writes. EtcdUnavailable means
        the outcome is unknown.
        """
        assert epoch > 0, f"epoch must be a create revision (> 0), got {epoch}"
        puts = puts or {}
        assert puts or deletes, "fenced_txn with nothing to write"
        t = self.client.transactions
        success = [t.put(self.full_key(k), v) for k, v in puts.items()]
        success += [t.delete(self.full_key(k)) for k in deletes]
        ok, _ = await self._call(
            f"fenced_txn on {leader_key!r} epoch {epoch} ({len(puts)} puts, {len(deletes)} deletes)",
            self.client.transaction(
                compare=[t.create(self.full_key(leader_key)) == epoch], success=success, failure=[]
            ),
        )
        return bool(ok)

    # -- leases (used by Session)

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """Grant a lease; returns (lease id, granted TTL). etcd may grant more than asked (its minimum)."""
        lease = await self._call(f"lease grant ttl={ttl}", self.client.lease(ttl))
        return int(lease.id), int(lease.ttl)

    async def lease_refresh(self, lease_id: int) -> int:
        """One keepalive; returns the lease's TTL now, 0 when the lease no longer exists."""
        reply = await self._call(f"lease refresh {lease_id:x}", self.client.refresh_lease(lease_id))
        return 0 if reply is None else int(reply.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease: its keys are deleted now."""
        try:
            await self._call(f"lease revoke {lease_id:x}", self.client.revoke_lease(lease_id))
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    def session(self, ttl: float = DEFAULT_TTL) -> Session:
        """A new (not yet started) Session; `async with etcd.session() as s:` starts and closes it."""
        return Session(self, ttl)

    def election(self, key: str) -> Election:
        """An Election over key, e.g. 'partitions/3/leader'."""
        return Election(self, key)

    # -- watches

    def watch_prefix(
        self, prefix: str, start_revision: int, *, queue_size: int = WATCH_QUEUE
    ) -> AsyncGenerator[WatchEvent, None]:
        """Every change under prefix from start_revision on, in revision order, across reconnects.

        The watch remembers the last event it delivered; when the stream breaks (etcd restarted,
        connection lost) or the bounded queue overflows, it re-creates the etcd watch from that
        revision and skips what it already delivered, so nothing is lost or repeated. Raises
        EtcdCompacted if the history it needs was compacted. Close it with `contextlib.aclosing`.
        """
        raw = self.full_key(prefix)
        return self._watch(raw, aetcd.utils.prefix_range_end(raw), start_revision, queue_size)

    def watch_range(
        self, start: str, end: str, start_revision: int, *, queue_size: int = WATCH_QUEUE
    ) -> AsyncGenerator[WatchEvent, None]:
        """Like watch_prefix, for the keys in [start, end): one ordered stream over several prefixes."""
        return self._watch(self.full_key(start), self.full_key(end), start_revision, queue_size)

    async def follow(
        self,
        start: str,
        end: str,
        snapshot: Callable[[], Awaitable[int]],
        on_event: Callable[[WatchEvent], Awaitable[None] | None],
        revision: int | None = None,
    ) -> None:
        """Keep a local view of the keys in [start, end) in step with etcd, for ever (cancel to stop).

        `snapshot()` (re)loads the view and returns the revision it read at; every later change goes
        to `on_event`, in order. `revision`: a snapshot already taken. When the watch fails (history
        compacted, etcd gone for longer than the watch retries), a fresh snapshot replaces the view.
        """
        while revision is None:
            try:
                revision = await snapshot()
            except EtcdError as e:
                log.warning("snapshot of %s..%s failed: %s; retrying", start, end, e)
                await asyncio.sleep(RETRY_MAX)
        while True:
            try:
                async with contextlib.aclosing(self.watch_range(start, end, revision + 1)) as events:
                    async for ev in events:
                        revision = ev.revision
                        done = on_event(ev)
                        if done is not None:
                            await done
            except EtcdError as e:
                log.warning("watch of %s..%s failed: %s; reloading", start, end, e)
                self.follow_reloads += 1
                await asyncio.sleep(RETRY_MAX)
                with contextlib.suppress(EtcdError):
                    revision = await snapshot()

    def watch_key(
        self, key: str, start_revision: int, *, queue_size: int = WATCH_QUEUE
    ) -> AsyncGenerator[WatchEvent, None]:
        """Like watch_prefix, for one key."""
        return self._watch(self.full_key(key), None, start_revision, queue_size)

    async def _watch(
        self, key: bytes, range_end: bytes | None, start_revision: int, queue_size: int
    ) -> AsyncGenerator[WatchEvent, None]:
        assert start_revision >= 1 and queue_size >= 1
        what = f"watch {key.decode()!r}{'*' if range_end else ''}"
        resume_rev = start_revision  # the next etcd watch starts here (inclusive)
        delivered = 0  # events at resume_rev already delivered (one revision may hold several: a txn)
        delay = RETRY_DELAY
        while not self.closed:
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=queue_size)
            overflowed = False
            skip = delivered  # the new etcd watch repeats these first

            async def on_event(item: Any, queue: asyncio.Queue[Any] = queue) -> None:
                # Runs in aetcd's stream task: never block it; on overflow stop and resume later.
                nonlocal overflowed
                if overflowed:
                    return
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:
                    overflowed = True
                    self.watch_overflows += 1

            client = self.client
            watch_id: int | None = None
            try:
                await client.connect()
                cb = await within(
                    client._watcher.add_callback(key, on_event, range_end=range_end, start_revision=resume_rev),
                    self.op_timeout,
                )
                watch_id = cb.watch_id
                while True:
                    if overflowed and queue.empty():
                        log.info("%s: queue of %d overflowed, resuming at revision %d", what, queue_size, resume_rev)
                        self.watch_resumes += 1
                        break
                    item = await queue.get()
                    if isinstance(item, aetcd.exceptions.RevisionCompactedError):
                        raise item
                    if item is None or isinstance(item, BaseException):
                        log.info("%s: stream ended (%r), resuming at revision %d", what, item, resume_rev)
                        self.watch_resumes += 1
                        break
                    ev = item
                    rev = int(ev.kv.mod_revision)
                    assert rev >= resume_rev, f"{what}: revision {rev} before {resume_rev}"
                    if rev == resume_rev and skip > 0:
                        skip -= 1
                        continue  # delivered before the resume
                    if rev != resume_rev:
                        resume_rev, delivered, skip = rev, 0, 0
                    # Count it before yielding: if the consumer stops here, a resume must not repeat it.
                    delivered += 1
                    delay = RETRY_DELAY
                    if ev.kind == "PUT":
                        yield WatchEvent("put", self.rel_key(ev.kv.key), ev.kv.value, rev)
                    else:
                        yield WatchEvent("delete", self.rel_key(ev.kv.key), None, rev)
            except aetcd.exceptions.RevisionCompactedError as e:
                raise EtcdCompacted(
                    f"{what} at {self.url}: revision {resume_rev} compacted (now {e.compacted_revision})",
                    e.compacted_revision,
                ) from e
            except (TimeoutError, aetcd.exceptions.ClientError, grpc.RpcError) as e:
                log.info("%s at %s: %s: %s; retrying in %.1fs", what, self.url, type(e).__name__, e, delay)
                self.watch_resumes += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            finally:
                if watch_id is not None and client._watcher is not None:
                    with contextlib.suppress(Exception):
                        await within(client._watcher.cancel(watch_id), self.op_timeout)


# --------------------------------------------------------------------------------------------- session


class Session:
    """An etcd lease kept alive in the background: the lifetime of a worker's or assigner's claims.

    TTL: etcd takes whole seconds, so the lease is granted with ceil(ttl) (at least 1), and etcd itself
    may raise that to its minimum (2 s with the default election timeout). Locally the session keeps
    the *requested* ttl: it refreshes every ttl/3, and sets `lost` when no refresh has succeeded for
    ttl seconds (monotonic clock, measured from when the last successful refresh was *sent*), or when
    etcd says the lease is gone. Since etcd holds the lease at least that long, a holder stops
    believing it leads no later than etcd lets another take over. `lost` is final: make a new
    session (etcd 3.4 also renews all leases when its leader restarts, so a lease can outlive a
    "lost" session; `close()` revokes it).
    """

    def __init__(self, etcd: Etcd, ttl: float = DEFAULT_TTL) -> None:
        assert ttl > 0, f"ttl must be positive, got {ttl}"
        self.etcd = etcd
        self.ttl = float(ttl)
        self.lease_id = 0
        self.granted_ttl = 0
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> Self:
        """Grant the lease and start the keepalive task."""
        assert self._task is None, "session already started"
        sent = time.monotonic()
        self.lease_id, self.granted_ttl = await self.etcd.lease_grant(max(1, math.ceil(self.ttl)))
        self._deadline = sent + self.ttl
        self._task = asyncio.create_task(self._keepalive(), name=f"etcd-session-{self.lease_id:x}")
        return self

    @property
    def alive(self) -> bool:
        """Started, not lost, not closed."""
        return self._task is not None and not self.lost.is_set()

    def _lose(self, reason: str, *, warn: bool = True) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            if warn:
                log.warning("etcd session %x lost: %s", self.lease_id, reason)
            self.lost.set()

    async def _keepalive(self) -> None:
        interval = self.ttl / 3
        ok = True
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._lose(f"no successful refresh within ttl {self.ttl}s")
                return
            await asyncio.sleep(min(interval if ok else min(RETRY_DELAY, interval), remaining))
            sent = time.monotonic()
            if sent >= self._deadline:
                self._lose(f"no successful refresh within ttl {self.ttl}s")
                return
            try:
                ttl_left = await within(self.etcd.lease_refresh(self.lease_id), self._deadline - sent)
            except (TimeoutError, EtcdError) as e:
                ok = False
                log.info("etcd session %x: refresh failed: %s", self.lease_id, e)
                continue
            if ttl_left <= 0:
                self._lose("lease expired in etcd")
                return
            ok = True
            self._deadline = sent + self.ttl

    def abandon(self) -> None:
        """Stop refreshing without revoking: the lease runs out in etcd after its TTL, as for a crashed
        or frozen process. For tests and the chaos harness. `lost` is not set (a frozen process
        would not notice either)."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        """Stop the keepalive and revoke the lease, so its keys go at once. Best effort, bounded by
        op_timeout: if etcd stays unreachable the lease expires on its own."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._lose("closed", warn=False)
        if not self.lease_id:
            return
        deadline = time.monotonic() + self.etcd.op_timeout
        delay = RETRY_DELAY
        while True:  # etcd may just be coming back: retry the revoke for up to op_timeout
            try:
                await self.etcd.lease_revoke(self.lease_id)
                return
            except EtcdUnavailable as e:
                if time.monotonic() + delay >= deadline:
                    log.info("etcd session %x: revoke failed (the lease will expire): %s", self.lease_id, e)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def register(self, key: str, value: bytes) -> int:
        """Put key bound to this session's lease (membership: workers/<id>, assigners/<id>); returns
        the write's revision. The key disappears when the session ends or expires."""
        if not self.alive:
            raise SessionLost(f"register {key!r}: session {self.lease_id:x} is not alive ({self.lost_reason})")
        with self.lease_gone_is_lost(f"register {key!r}"):
            return await self.etcd.put(key, value, lease=self.lease_id)

    @contextlib.contextmanager
    def lease_gone_is_lost(self, what: str) -> Iterator[None]:
        """etcd refusing our lease ('requested lease not found') means the session is lost: say so."""
        try:
            yield
        except EtcdError as e:
            if isinstance(e, EtcdUnavailable) or "lease not found" not in str(e):
                raise
            self._lose("lease expired in etcd")
            raise SessionLost(f"{what}: lease {self.lease_id:x} expired in etcd") from e


# -------------------------------------------------------------------------------------------- election


class Election:
    """Leader election on one key, e.g. 'partitions/<p>/leader'.

    The winner creates the key bound to its session's lease; its epoch is the key's create revision.
    etcd revisions only grow, so each later winner has a larger epoch: the fencing token of the
    protocol. Leadership ends when the session closes or expires (the key goes with the lease) or
    on `resign()`.
    """

    def __init__(self, etcd: Etcd, key: str) -> None:
        self.etcd = etcd
        self.key = key
        self.epoch = 0  # ours, once campaign() won

    async def campaign(self, session: Session, value: bytes, timeout: float | None = None) -> int:
        """Wait until we hold the key (or `timeout` seconds pass: CampaignTimeout); returns the epoch.

        Cancellable. If the key already holds our own lease (a retried create whose answer was lost),
        we are the leader with the existing epoch. Raises SessionLost if the session ends meanwhile.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self._campaign(session, value)
        except TimeoutError as e:
            if isinstance(e, EtcdError):
                raise
            raise CampaignTimeout(f"campaign for {self.key!r} at {self.etcd.url}: not elected within {timeout}s") from e

    async def _campaign(self, session: Session, value: bytes) -> int:
        t = self.etcd.client.transactions
        raw = self.etcd.full_key(self.key)
        delay = RETRY_DELAY
        while True:
            if not session.alive:
                raise SessionLost(f"campaign for {self.key!r}: session is not alive ({session.lost_reason})")
            try:
                with session.lease_gone_is_lost(f"campaign {self.key!r}"):
                    ok, responses = await self.etcd._call(
                        f"campaign {self.key!r}",
                        self.etcd.client.transaction(
                            compare=[t.create(raw) == 0],
                            success=[t.put(raw, value, lease=session.lease_id), t.get(raw)],
                            failure=[t.get(raw)],
                        ),
                    )
            except EtcdUnavailable as e:
                log.info("campaign %s: %s; retrying in %.1fs", self.key, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_DELAY
            kvs = responses[-1]
            assert kvs, f"campaign {self.key!r}: the txn read no key"  # either branch reads an existing key
            _, kv = kvs[0]
            if ok or kv.lease == session.lease_id:
                self.epoch = int(kv.create_revision)
                return self.epoch
            await self._wait_vacant(session, int(kv.header.revision) + 1)

    async def _wait_vacant(self, session: Session, from_revision: int) -> None:
        """Return once the key is deleted (at or after from_revision) or the session is lost."""

        async def deleted() -> None:
            async with contextlib.aclosing(self.etcd.watch_key(self.key, from_revision, queue_size=16)) as events:
                async for ev in events:
                    if ev.type == "delete":
                        return

        watch = asyncio.create_task(deleted())
        lost = asyncio.create_task(session.lost.wait())
        try:
            await asyncio.wait({watch, lost}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                watch.result()  # surface EtcdCompacted etc.
        finally:
            for task in (watch, lost):
                task.cancel()
            await asyncio.gather(watch, lost, return_exceptions=True)

    async def leader(self) -> Leader | None:
        """The current leader's (value, epoch), or None when nobody leads."""
        kv = await self.etcd.get(self.key)
        return None if kv is None else Leader(kv.value, kv.create_revision)

    async def observe(self) -> AsyncGenerator[Leader | None, None]:
        """Yield the leader now and after every change (None: nobody leads). Each change re-reads the
        key (leader changes are rare), so reconnects and compactions need no special case. Retries
        while etcd is unreachable. Close it with `contextlib.aclosing`."""
        last: Leader | Literal["unset"] | None = "unset"
        delay = RETRY_DELAY
        while True:
            try:
                kv, rev = await self.etcd.get_at(self.key)
            except EtcdUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_DELAY
            current = None if kv is None else Leader(kv.value, kv.create_revision)
            if current != last:
                last = current
                yield current
            with contextlib.suppress(EtcdCompacted):
                async with contextlib.aclosing(self.etcd.watch_key(self.key, rev + 1, queue_size=16)) as events:
                    async for _ in events:
                        break  # something changed: re-read

    async def resign(self) -> bool:
        """Give up leadership: delete the key iff it is still ours (same epoch). True if deleted."""
        if not self.epoch:
            return False
        t = self.etcd.client.transactions
        raw = self.etcd.full_key(self.key)
        ok, _ = await self.etcd._call(
            f"resign {self.key!r} epoch {self.epoch}",
            self.etcd.client.transaction(compare=[t.create(raw) == self.epoch], success=[t.delete(raw)], failure=[]),
        )
        self.epoch = 0
        return bool(ok)
