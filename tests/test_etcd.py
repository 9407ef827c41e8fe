"""ember.cluster.etcd against a real etcd: elections give growing epochs, a waiting campaigner takes over when
the leader's session closes or its lease runs out, a deposed leader's journal writes are fenced,
watches see every event in order across an etcd restart, a session notices etcd is gone, and a
restarted member keeps its data. No timing assertions: every wait is bounded and checks an outcome."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from ember.cluster.etcd import (
    CampaignTimeout,
    EtcdUnavailable,
    Leader,
    SessionLost,
    WatchEvent,
    connect,
    dumps,
    loads,
    parse_urls,
)
from ember_devtools.etcdserver import EtcdServer, free_port

T = TypeVar("T")
WAIT = 15.0  # bound on any single wait in these tests


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None:
        reason = "etcd binary not found: run scripts/install-deps.sh (Debian package etcd-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with EtcdServer(tmp_path_factory.mktemp("etcd") / "data") as srv:
        yield srv


@pytest.fixture
def etcd_server(server: EtcdServer) -> Iterator[EtcdServer]:
    """The module's etcd, running again after a test that killed it (even one that failed)."""
    yield server
    if not server.running:
        server.start()


def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/"


async def retry(fn: Callable[[], Awaitable[T]], timeout: float = WAIT) -> T:
    """What a caller's loop does while etcd comes back: retry on EtcdUnavailable, bounded."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await fn()
            except EtcdUnavailable:
                await asyncio.sleep(0.1)


async def until(pred: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


def test_parse_urls() -> None:
    assert parse_urls("http://127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_urls("http://a:1, http://b:2/") == [("a", 1), ("b", 2)]
    for bad in ("", "https://a:1", "http://a", "a:b"):
        with pytest.raises(ValueError):
            parse_urls(bad)
    assert loads(dumps({"s": "s1", "worker": "w1", "inc": 3})) == {"s": "s1", "worker": "w1", "inc": 3}


def test_connect_picks_first_reachable_and_bounds_the_wait(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        dead = f"http://127.0.0.1:{free_port()}"
        async with await connect(f"{dead},{etcd_server.url}", prefix=prefix()) as etcd:
            assert etcd.url == etcd_server.url
            await etcd.put("k", b"v")
            assert (await etcd.get("k")).value == b"v"  # type: ignore[union-attr]
        with pytest.raises(EtcdUnavailable, match="no etcd reachable"):
            await connect(dead, connect_timeout=0.5)

    asyncio.run(body())


def test_restart_keeps_data_and_the_client_reconnects(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        async with await connect(etcd_server.url, prefix=prefix()) as etcd:
            rev = await etcd.put("journal/s1", dumps({"worker": "w1"}))
            etcd_server.restart()
            kv = await retry(lambda: etcd.get("journal/s1"))
            assert kv is not None and loads(kv.value) == {"worker": "w1"} and kv.mod_revision == rev
            assert await etcd.put("journal/s2", b"{}") > rev  # writes work again too

    asyncio.run(body())


def test_epochs_increase_and_a_waiting_campaigner_wins_when_the_leader_leaves(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        async with await connect(etcd_server.url, prefix=prefix()) as etcd:
            key = "partitions/0/leader"
            el_a, el_b = etcd.election(key), etcd.election(key)
            assert await el_a.leader() is None
            seen: list[Leader | None] = []

            async def observe() -> None:
                async with contextlib.aclosing(etcd.election(key).observe()) as leaders:
                    async for leader in leaders:
                        seen.append(leader)

            observer = asyncio.create_task(observe())
            await until(lambda: seen == [None])

            a = await etcd.session(2).start()
            ea = await el_a.campaign(a, b"a", timeout=WAIT)
            assert await el_a.leader() == (b"a", ea)
            assert await el_a.campaign(a, b"a", timeout=WAIT) == ea  # same session again: still us

            b = await etcd.session(2).start()
            b_won = asyncio.create_task(el_b.campaign(b, b"b", timeout=WAIT))
            with pytest.raises(CampaignTimeout):  # a bounded campaign gives up while A leads
                await etcd.election(key).campaign(b, b"c", timeout=0.3)
            assert not b_won.done()
            await a.close()  # revokes: the key goes at once
            eb = await b_won
            assert eb > ea and await el_b.leader() == (b"b", eb)

            a2 = await etcd.session(2).start()
            a_won = asyncio.create_task(el_a.campaign(a2, b"a2", timeout=WAIT))
            assert await el_b.resign()
            ec = await a_won
            assert ec > eb and await el_a.leader() == (b"a2", ec)

            await until(lambda: bool(seen) and seen[-1] == (b"a2", ec))
            epochs = [leader.epoch for leader in seen if leader is not None]
            assert epochs == sorted(set(epochs)) and epochs[0] == ea
            observer.cancel()
            await asyncio.gather(observer, return_exceptions=True)
            await asyncio.gather(b.close(), a2.close())
            with pytest.raises(SessionLost):  # a closed session cannot campaign
                await el_b.campaign(b, b"b", timeout=WAIT)

    asyncio.run(body())


def test_lease_expiry_hands_over_and_fences_the_deposed_leader(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        async with await connect(etcd_server.url, prefix=prefix()) as etcd:
            key = "partitions/1/leader"
            a = await etcd.session(1).start()
            assert a.granted_ttl >= 1
            await a.register("assigners/a", dumps({"addr": "a"}))
            ea = await etcd.election(key).campaign(a, b"a", timeout=WAIT)
            assert await etcd.fenced_txn(key, ea, {"journal/s1": dumps({"worker": "w1", "inc": 1})})

            a.abandon()  # A freezes: no more keepalives, no revoke; etcd expires the lease after its TTL
            b = await etcd.session(2).start()
            eb = await etcd.election(key).campaign(b, b"b", timeout=WAIT)
            assert eb > ea
            assert await etcd.get("assigners/a") is None  # the membership key went with the lease

            # A wakes up: its lease is gone, and it writes with its old epoch: etcd rejects it, nothing changes.
            with pytest.raises(SessionLost, match="expired"):
                await a.register("assigners/a", b"{}")
            assert a.lost.is_set()
            assert not await etcd.fenced_txn(key, ea, {"journal/s2": b"{}"}, deletes=["journal/s1"])
            journal, _ = await etcd.get_prefix("journal/")
            assert journal == {"journal/s1": dumps({"worker": "w1", "inc": 1})}

            assert await etcd.fenced_txn(key, eb, {"journal/s2": b"{}"}, deletes=["journal/s1"])
            journal, _ = await etcd.get_prefix("journal/")
            assert journal == {"journal/s2": b"{}"}
            await b.close()
            assert not await etcd.fenced_txn(key, eb, {"journal/s3": b"{}"})  # nobody leads: fenced too
            await a.close()

    asyncio.run(body())


def test_watch_sees_every_event_in_order_across_an_etcd_restart(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        async with await connect(etcd_server.url, prefix=prefix()) as etcd:
            leader = "partitions/2/leader"
            session = await etcd.session(5).start()
            epoch = await etcd.election(leader).campaign(session, b"me", timeout=WAIT)
            _, start = await etcd.get_prefix("journal/")
            expected: list[tuple[str, str, bytes | None]] = []

            async def write_batch(lo: int, hi: int) -> None:
                for i in range(lo, hi):
                    await etcd.put(f"journal/s{i}", dumps(i))
                    expected.append(("put", f"journal/s{i}", dumps(i)))
                    if i % 5 == 4:  # one transaction, several events at one revision
                        puts = {f"journal/t{i}a": b"a", f"journal/t{i}b": b"b"}
                        assert await etcd.fenced_txn(leader, epoch, puts, deletes=[f"journal/s{i}"])
                        expected.extend(("put", k, v) for k, v in puts.items())
                        expected.append(("delete", f"journal/s{i}", None))

            await write_batch(0, 30)  # history before the watch starts: overflows its queue of 4
            got: list[WatchEvent] = []

            async def tail() -> None:
                async with contextlib.aclosing(etcd.watch_prefix("journal/", start + 1, queue_size=4)) as events:
                    async for ev in events:
                        got.append(ev)

            tailer = asyncio.create_task(tail())
            await until(lambda: len(got) == len(expected))

            etcd_server.restart(kill=True)  # blocks the loop: the watch stream breaks meanwhile
            await retry(etcd.revision)
            await write_batch(30, 60)
            await until(lambda: len(got) >= len(expected))
            await asyncio.sleep(0.2)  # a duplicate would show up as an extra event
            tailer.cancel()
            await asyncio.gather(tailer, return_exceptions=True)

            assert [(e.type, e.key, e.value) for e in got] == expected
            revisions = [e.revision for e in got]
            assert revisions == sorted(revisions) and revisions[0] > start
            await session.close()

    asyncio.run(body())


def test_session_is_lost_when_etcd_is_killed_for_longer_than_the_ttl(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        async with await connect(etcd_server.url, prefix=prefix(), op_timeout=1.0) as etcd:
            s = await etcd.session(1).start()
            await s.register("workers/w1", dumps({"inc": 1}))
            etcd_server.kill()
            try:
                await asyncio.wait_for(s.lost.wait(), WAIT)
                assert "refresh" in s.lost_reason
                with pytest.raises(EtcdUnavailable, match=r"get 'workers/w1' at http://127\.0\.0\.1:\d+"):
                    await etcd.get("workers/w1")
                with pytest.raises(SessionLost):
                    await s.register("workers/w1", b"{}")
            finally:
                etcd_server.start()
            # etcd renews leases when it restarts, so the old key may still be there; close() revokes.
            await s.close()
            async with asyncio.timeout(WAIT):  # revoked now, or (revoke failed) expired after its TTL
                while await retry(lambda: etcd.get("workers/w1")) is not None:
                    await asyncio.sleep(0.05)
            async with etcd.session(1) as s2:
                await s2.register("workers/w1", dumps({"inc": 2}))
                kv = await etcd.get("workers/w1")
                assert kv is not None and kv.lease == s2.lease_id and not s2.lost.is_set()

    asyncio.run(body())


def test_prefixes_isolate(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        p1, p2 = prefix(), prefix()
        async with await connect(etcd_server.url, prefix=p1) as e1, await connect(etcd_server.url, prefix=p2) as e2:
            await e1.put("workers/w", b"1")
            assert await e2.get("workers/w") is None
            assert (await e1.get_prefix("workers/"))[0] == {"workers/w": b"1"}
            assert await e1.delete("workers/w") and not await e1.delete("workers/w")

    asyncio.run(body())


def test_a_watch_overflow_is_counted_and_loses_nothing(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        async with await connect(etcd_server.url, prefix=prefix()) as etcd:
            _, start = await etcd.get_prefix("q/")
            for i in range(20):
                await etcd.put(f"q/k{i:02d}", dumps(i))
            assert etcd.counters() == {"etcd_watch_overflows": 0, "etcd_watch_resumes": 0, "etcd_follow_reloads": 0}
            got: list[WatchEvent] = []
            async with contextlib.aclosing(etcd.watch_prefix("q/", start + 1, queue_size=2)) as events:
                async with asyncio.timeout(WAIT):
                    async for ev in events:
                        got.append(ev)
                        if len(got) == 20:
                            break
            assert [loads(e.value) for e in got if e.value is not None] == list(range(20))
            c = etcd.counters()
            assert c["etcd_watch_overflows"] >= 1 and c["etcd_watch_resumes"] >= c["etcd_watch_overflows"]

    asyncio.run(body())
