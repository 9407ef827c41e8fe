"""Function definitions and code, kept in the data dir so they survive a restart.

Layout (a one-way door, see docs/decisions/0001-data-dir-layout.md):
  DATA_DIR/ember.db              SQLite (WAL): table `functions`, one row a function; configuration
                                 as JSON text with Lambda's field names; `event_invoke_configs`;
                                 table `meta` (schema_version)
  DATA_DIR/queue.db              asynchronous events (see ember.invoke.asyncq)
  DATA_DIR/code/<sha256>.zip     the uploaded zip, content-addressed (hex SHA-256)
  DATA_DIR/code/<sha256>/        the zip extracted, read-only to sandboxes

Nothing Python-specific is stored: text, integers and JSON only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import shutil
import sqlite3
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ember.api.errors import LambdaError, invalid

SCHEMA_VERSION = 1
# Lambda's limit for a function's unzipped code; EMBER_MAX_UNZIPPED_BYTES lowers it (tests do).
MAX_UNZIPPED_BYTES = int(os.environ.get("EMBER_MAX_UNZIPPED_BYTES", 250 * 1024 * 1024))
MAX_ZIP_ENTRIES = 20_000
MAX_ENTRY_NAME_BYTES = 1024  # a whole path inside the zip
MAX_NAME_COMPONENT_BYTES = 255  # one file or directory name (Linux's NAME_MAX)
MAX_PATH_DEPTH = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    code_sha256 TEXT NOT NULL,
    code_size INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    revision_id TEXT NOT NULL,
    last_modified TEXT NOT NULL,
    reserved_concurrency INTEGER
);
CREATE TABLE IF NOT EXISTS event_invoke_configs (
    function TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    last_modified REAL NOT NULL
);
"""


def now_iso() -> str:
    """Lambda's LastModified format: 2024-01-01T00:00:00.000+0000."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


@dataclass(slots=True)
class FunctionRecord:
    """A function as stored. `revision` grows with every change to code or configuration."""

    name: str
    config: dict[str, Any]  # Runtime, Handler, Role, MemorySize, Timeout, Environment, Description, ...
    code_sha256: str  # hex
    code_size: int
    revision: int
    revision_id: str
    last_modified: str
    reserved_concurrency: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def code_sha256_b64(self) -> str:
        return base64.b64encode(bytes.fromhex(self.code_sha256)).decode()


class Store:
    """SQLite for definitions, files for code. Control-plane only: the invoke path reads memory."""

    def __init__(self, data_dir: Path) -> None:
        # absolute: code dirs are handed to sandboxes (bwrap, the unshare helper) that run with cwd "/"
        data_dir = data_dir.absolute()
        self.data_dir = data_dir
        self.code_dir = data_dir / "code"
        self.code_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(data_dir / "ember.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"data dir {data_dir} has schema {row[0]}, newer than this ember ({SCHEMA_VERSION})"
            )

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ functions

    def load_all(self) -> list[FunctionRecord]:
        rows = self.db.execute(
            "SELECT name, config, code_sha256, code_size, revision, revision_id, last_modified, "
            "reserved_concurrency FROM functions ORDER BY name"
        ).fetchall()
        return [FunctionRecord(r[0], orjson.loads(r[1]), r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows]

    def insert(self, rec: FunctionRecord) -> None:
        self.db.execute(
            "INSERT INTO functions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.name,
                orjson.dumps(rec.config).decode(),
                rec.code_sha256,
                rec.code_size,
                rec.revision,
                rec.revision_id,
                rec.last_modified,
                rec.reserved_concurrency,
            ),
        )

    def update(self, rec: FunctionRecord) -> None:
        self.db.execute(
            "UPDATE functions SET config=?, code_sha256=?, code_size=?, revision=?, revision_id=?, "
            "last_modified=?, reserved_concurrency=? WHERE name=?",
            (
                orjson.dumps(rec.config).decode(),
                rec.code_sha256,
                rec.code_size,
                rec.revision,
                rec.revision_id,
                rec.last_modified,
                rec.reserved_concurrency,
                rec.name,
            ),
        )

    def delete(self, name: str) -> None:
        self.db.execute("DELETE FROM functions WHERE name=?", (name,))
        self.db.execute("DELETE FROM event_invoke_configs WHERE function=?", (name,))

    # ------------------------------------------------------------------ event invoke configs

    def load_event_configs(self) -> dict[str, tuple[dict[str, Any], float]]:
        rows = self.db.execute("SELECT function, config, last_modified FROM event_invoke_configs").fetchall()
        return {r[0]: (orjson.loads(r[1]), r[2]) for r in rows}

    def put_event_config(self, function: str, config: dict[str, Any], last_modified: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO event_invoke_configs VALUES (?, ?, ?)",
            (function, orjson.dumps(config).decode(), last_modified),
        )

    def delete_event_config(self, function: str) -> None:
        self.db.execute("DELETE FROM event_invoke_configs WHERE function=?", (function,))

    # ------------------------------------------------------------------ code

    def code_path(self, sha256: str) -> Path:
        return self.code_dir / sha256

    def zip_path(self, sha256: str) -> Path:
        return self.code_dir / f"{sha256}.zip"

    def put_code(self, zip_bytes: bytes) -> tuple[str, int]:
        """Store and extract a zip; returns (hex sha256, size). Refuses unsafe or oversized zips
        with a 400 before anything is written outside a temporary directory."""
        sha = hashlib.sha256(zip_bytes).hexdigest()
        target = self.code_path(sha)
        if target.is_dir():
            return sha, len(zip_bytes)
        bound = _entry_bound(zip_bytes)  # before zipfile builds an object per entry
        if bound > MAX_ZIP_ENTRIES:
            raise invalid(f"Uploaded zip has more than the {MAX_ZIP_ENTRIES} entries allowed.")
        try:
            archive = zipfile.ZipFile(io.BytesIO(zip_bytes))
            infos = archive.infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
            raise invalid(
                "Could not unzip uploaded file. Please check your file, then try to upload again."
            ) from exc
        if len(infos) > MAX_ZIP_ENTRIES:
            raise invalid(f"Uploaded zip has {len(infos)} entries, more than the {MAX_ZIP_ENTRIES} allowed.")
        if sum(i.file_size for i in infos) > MAX_UNZIPPED_BYTES:
            raise LambdaError(
                400,
                "InvalidParameterValueException",
                f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes",
            )
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=self.code_dir))
        try:
            self._extract(archive, infos, tmp)
            os.replace(tmp, target)
        except OSError:  # another upload of the same zip won the rename
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        zpath = self.zip_path(sha)
        with tempfile.NamedTemporaryFile(dir=self.code_dir, delete=False) as f:
            f.write(zip_bytes)
        os.replace(f.name, zpath)
        return sha, len(zip_bytes)

    @staticmethod
    def _extract(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path) -> None:
        written = 0
        root = dest.resolve()
        for info in infos:
            name = info.filename
            _check_entry_name(info)
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise invalid(f"Zip entry {name!r} points outside the function's directory.")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise invalid(f"Zip entry {name!r} is a symbolic link; links are not allowed.")
            if info.flag_bits & 0x1:
                raise invalid(f"Zip entry {name!r} is encrypted; encrypted zips are not supported.")
            out = (dest / name).resolve()
            if out != root and root not in out.parents:
                raise invalid(f"Zip entry {name!r} points outside the function's directory.")
            if out == root and not info.is_dir():
                raise invalid(f"Zip entry {name!r} has no file name.")
            try:
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > MAX_UNZIPPED_BYTES:
                            raise invalid(f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes")
                        dst.write(chunk)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                raise invalid(
                    f"Zip entry {name!r} collides with another entry (a file and a directory of one name)."
                ) from None
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                raise invalid(
                    f"Could not unzip uploaded file (entry {name!r}: {exc}). Please check your file, "
                    "then try to upload again."
                ) from None
            perm = mode & 0o777
            os.chmod(out, 0o755 if perm & 0o111 or Path(name).name == "bootstrap" else 0o644)

    def gc_code(self, keep: set[str]) -> None:
        """Remove code no function refers to (run at startup, when no sandbox can be using it)."""
        for entry in self.code_dir.iterdir():
            sha = entry.name.removesuffix(".zip")
            if sha not in keep:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()


def _entry_bound(zip_bytes: bytes) -> int:
    """At least as many as the entries zipfile would parse: central directory signatures within the
    central directory the end record names (0 if there is none: zipfile then refuses the zip)."""
    try:
        endrec = zipfile._EndRecData(io.BytesIO(zip_bytes))  # type: ignore[attr-defined]
        if not endrec:
            return 0
        size = endrec[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        start = endrec[zipfile._ECD_LOCATION] - size  # type: ignore[attr-defined]
        if endrec[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
    except Exception:  # an unreadable end record: zipfile.ZipFile refuses it with BadZipFile
        return 0
    start = max(start, 0)
    return zip_bytes.count(b"PK\x01\x02", start, start + size)


def _check_entry_name(info: zipfile.ZipInfo) -> None:
    """Names the filesystem can hold, with no surprises: no NUL (zipfile cuts the name there), at
    most MAX_ENTRY_NAME_BYTES in all, MAX_NAME_COMPONENT_BYTES a component, MAX_PATH_DEPTH deep."""
    name = info.filename
    if "\x00" in info.orig_filename or not name:
        raise invalid(f"Zip entry {info.orig_filename[:200]!r} has an invalid name.")
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_ENTRY_NAME_BYTES:
        raise invalid(f"Zip entry {name[:100]!r}... has a name longer than {MAX_ENTRY_NAME_BYTES} bytes.")
    components = [c for c in encoded.split(b"/") if c]
    if len(components) > MAX_PATH_DEPTH:
        raise invalid(f"Zip entry {name[:100]!r}... is nested deeper than {MAX_PATH_DEPTH} directories.")
    if any(len(c) > MAX_NAME_COMPONENT_BYTES for c in components):
        raise invalid(f"Zip entry {name[:100]!r} has a name longer than {MAX_NAME_COMPONENT_BYTES} bytes.")
