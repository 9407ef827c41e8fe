"""What `ember serve` is told (flags), shared by the single node and the cluster roles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 9000
    data_dir: Path = Path(".ember")
    account_concurrency: int = 1000
    max_starting: int = 4
    max_waiting: int = 128
    keep_alive: str = "default"
    drain_s: float = 30.0
    region: str = "us-east-1"
    async_concurrency: int = 32
    async_delay_scale: float = 1.0
    credentials: dict[str, str] | None = None  # ACCESS_KEY_ID -> secret (ember.api.auth); None: auth off
    insecure: bool = False  # allow a non-loopback address without credentials
    isolation: str = "auto"  # auto | bwrap | none (ember.sandbox.isolation)
    pool: int = 2  # pre-started python runtimes (ember.sandbox.pool); 0: none
    ephemeral_storage_mb: int = 512  # each sandbox's /tmp
    role_credentials: Path | None = None  # a JSON file: role ARN -> credentials (ember.api.credentials)
    pass_credentials: bool = False  # roles the file does not map get ember's own AWS_* credentials
    network: str = "egress"  # isolated sandboxes: egress | none (ember.sandbox.egress)
    deny_private: bool = False  # egress: also deny 10/8, 172.16/12, 192.168/16
    debug_verify: bool = False  # check the core's invariants after every transition (slow; for debugging)
