"""The cluster's etcd key layout and how functions map to partitions. One-way door: decision 0007.

Keys (under the etcd prefix, `/ember/` by default), values JSON:
  config                         {"partitions": P}: written once, by the first process to start
  functions/<name>               a function record (the SQLite row's fields, see store.FunctionRecord)
  code/<sha256>/meta             {"size": bytes, "chunks": n}
  code/<sha256>/<i>              the deployment zip, in chunks of CODE_CHUNK bytes (etcd caps values)
  workers/<id>                   {"url", "capacity_mb", "free_mb", "pid"}, bound to the worker's
                                 session; the key's create revision is the worker's incarnation
  assigners/<id>                 {"url", "pid"}, bound to the assigner's session
  partitions/<p>/leader          {"id", "url", "pid"}, bound to the leader's session; the key's create
                                 revision is the epoch (fencing token)
  journal/<p>/<sandbox>          a journal record (core.partition.Record as an object): LIVE sandbox
"""

from __future__ import annotations

import zlib
from typing import Any

from ember.core.partition import Record
from ember.store import FunctionRecord

CODE_CHUNK = 1 << 20  # etcd's default request limit is 1.5 MiB
DEFAULT_PARTITIONS = 4


def partition_of(function: str, partitions: int) -> int:
    """Stable across processes and languages: CRC-32 of the UTF-8 name, modulo the partition count."""
    return zlib.crc32(function.encode()) % partitions


def leader_key(p: int) -> str:
    return f"partitions/{p}/leader"


def journal_prefix(p: int) -> str:
    return f"journal/{p}/"


def journal_key(p: int, sandbox: int) -> str:
    return f"journal/{p}/{sandbox}"


def record_to_json(r: Record) -> dict[str, Any]:
    return r._asdict()


def record_from_json(d: dict[str, Any]) -> Record:
    return Record(int(d["sandbox"]), d["function"], int(d["generation"]), int(d["memory_mb"]), d["worker"],
                  int(d["incarnation"]))


def function_to_json(rec: FunctionRecord) -> dict[str, Any]:
    return {
        "name": rec.name,
        "config": rec.config,
        "code_sha256": rec.code_sha256,
        "code_size": rec.code_size,
        "revision": rec.revision,
        "revision_id": rec.revision_id,
        "last_modified": rec.last_modified,
        "reserved_concurrency": rec.reserved_concurrency,
    }


def function_from_json(d: dict[str, Any]) -> FunctionRecord:
    return FunctionRecord(d["name"], d["config"], d["code_sha256"], int(d["code_size"]), int(d["revision"]),
                          d["revision_id"], d["last_modified"], d.get("reserved_concurrency"))
