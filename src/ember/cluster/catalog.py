"""The function catalog, replicated through etcd: every process keeps a local copy in its own data dir.

A frontend changes a function through the same ControlPlane as the single-process server (same
validation, same shapes), then `publish`es the record (and the code, if etcd lacks it) and answers
only once etcd has it. Every process `follow`s `functions/`: a record that differs from its copy is
applied to its ControlPlane (and its store), so the invoke path of every role reads memory only.
Concurrent changes of one function on two frontends converge on the one etcd applied last.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable

from ember.api.control import ControlPlane
from ember.cluster import layout
from ember.cluster.etcd import Etcd, EtcdError, WatchEvent, dumps, loads, prefix_end

log = logging.getLogger("ember.cluster.catalog")


class Catalog:
    def __init__(self, etcd: Etcd, control: ControlPlane, fetch_code: bool) -> None:
        self.etcd = etcd
        self.control = control
        self.fetch_code = fetch_code  # workers need the code; assigners and frontends only the records
        self.synced = asyncio.Event()  # the initial snapshot is applied
        self.listeners: list[Callable[[str], None]] = []  # told the name of every function applied
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ writing (frontends)

    async def publish(self, name: str) -> None:
        """Make etcd hold this process's copy of `name` (or its absence)."""
        rec = self.control.functions.get(name)
        if rec is None:
            await self.etcd.delete(f"functions/{name}")
            return
        await self._upload_code(rec.code_sha256)
        await self.etcd.put(f"functions/{name}", dumps(layout.function_to_json(rec)))

    async def _upload_code(self, sha: str) -> None:
        if await self.etcd.get(f"code/{sha}/meta") is not None:
            return
        data = self.control.store.zip_path(sha).read_bytes()
        chunks = [data[i : i + layout.CODE_CHUNK] for i in range(0, len(data), layout.CODE_CHUNK)] or [b""]
        for i, chunk in enumerate(chunks):
            await self.etcd.put(f"code/{sha}/{i}", chunk)
        await self.etcd.put(f"code/{sha}/meta", dumps({"size": len(data), "chunks": len(chunks)}))

    async def fetch(self, raw: str) -> bool:
        """Read one function through to etcd (an invoke for a name this copy does not know yet, created
        a moment ago through another frontend). True when it exists now."""
        name = raw.split("function:", 1)[1].split(":", 1)[0] if "function:" in raw else raw.split(":", 1)[0]
        kv = await self.etcd.get(f"functions/{name}")
        if kv is None:
            return False
        await self._apply_put(f"functions/{name}", kv.value)
        return name in self.control.functions

    # ------------------------------------------------------------------ following (every role)

    async def start(self) -> None:
        revision = await self._snapshot()
        self.synced.set()
        self._task = asyncio.create_task(
            self.etcd.follow("functions/", prefix_end("functions/"), self._snapshot, self._on_event, revision))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _snapshot(self) -> int:
        docs, rev = await self.etcd.get_prefix("functions/")
        for key, value in docs.items():
            await self._apply_put(key, value)
        for name in set(self.control.functions) - {k.removeprefix("functions/") for k in docs}:
            self._apply_delete(name)  # deleted while this process was down, or while the watch was
        return rev

    async def _on_event(self, ev: WatchEvent) -> None:
        if ev.type == "put" and ev.value is not None:
            await self._apply_put(ev.key, ev.value)
        else:
            self._apply_delete(ev.key.removeprefix("functions/"))

    async def _apply_put(self, key: str, value: bytes) -> None:
        doc = loads(value)
        rec = layout.function_from_json(doc)
        local = self.control.functions.get(rec.name)
        if local is not None and layout.function_to_json(local) == doc:
            return  # our own change coming back, or nothing new
        if self.fetch_code and not self.control.store.code_path(rec.code_sha256).is_dir():
            await self._download_code(rec.code_sha256)
        self.control.apply_remote(rec)
        for listener in self.listeners:
            listener(rec.name)

    def _apply_delete(self, name: str) -> None:
        rec = self.control.functions.get(name)
        if rec is not None:
            self.control.delete(rec)
            for listener in self.listeners:
                listener(name)

    async def _download_code(self, sha: str) -> None:
        meta_kv = await self.etcd.get(f"code/{sha}/meta")
        if meta_kv is None:
            raise EtcdError(f"code {sha} is missing from etcd")
        meta = loads(meta_kv.value)
        parts = []
        for i in range(int(meta["chunks"])):
            kv = await self.etcd.get(f"code/{sha}/{i}")
            if kv is None:
                raise EtcdError(f"code {sha} chunk {i} is missing from etcd")
            parts.append(kv.value)
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != sha:
            raise EtcdError(f"code {sha} from etcd does not match its hash")
        self.control.store.put_code(data)

