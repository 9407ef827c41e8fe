"""Credentials a function's runtime gets for its execution role (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN), from what the operator configures; ember has no STS of its own.

- `ember serve --role-credentials FILE`: a JSON object mapping role ARNs to credentials, each either
  {"AccessKeyId", "SecretAccessKey", "SessionToken"?} or the output of `aws sts assume-role` (the same
  under "Credentials"); the key "*" applies to every role not listed. The file is read again when it
  changes (checked at each sandbox start), so rotated session tokens reach new sandboxes without a
  restart; a sandbox keeps the credentials it started with, as in Lambda.
- `ember serve --pass-credentials`: a role the file does not map gets ember's own AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (from its environment at start-up).
- neither: no credentials variables at all (an SDK in the function then finds none, and says so).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("ember.api.credentials")

ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
Creds = dict[str, str]


class RoleCredentialsError(ValueError):
    pass


def load_role_credentials(path: Path) -> dict[str, Creds]:
    """The file's mapping as environment variables per role ARN (or "*"); RoleCredentialsError if malformed."""
    try:
        doc: Any = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise RoleCredentialsError(f"--role-credentials {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise RoleCredentialsError(f"--role-credentials {path}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RoleCredentialsError(f"--role-credentials {path}: expected an object mapping role ARNs to credentials")
    out: dict[str, Creds] = {}
    for role, value in doc.items():
        if role != "*" and not (role.startswith("arn:") and ":role/" in role):
            raise RoleCredentialsError(f"--role-credentials {path}: {role!r} is not a role ARN (or \"*\")")
        if isinstance(value, dict) and isinstance(value.get("Credentials"), dict):
            value = value["Credentials"]  # `aws sts assume-role` output
        key, secret = (value.get("AccessKeyId"), value.get("SecretAccessKey")) if isinstance(value, dict) else (0, 0)
        token = value.get("SessionToken") if isinstance(value, dict) else None
        if not (isinstance(key, str) and key and isinstance(secret, str) and secret):
            raise RoleCredentialsError(f"--role-credentials {path}: {role}: AccessKeyId and SecretAccessKey required")
        if token is not None and not isinstance(token, str):
            raise RoleCredentialsError(f"--role-credentials {path}: {role}: SessionToken must be a string")
        creds = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        if token:
            creds["AWS_SESSION_TOKEN"] = token
        out[role] = creds
    return out


class RoleCredentials:
    """Looks up the credentials for a role: the file's entry, its "*", ember's own (when passed through)."""

    def __init__(self, path: Path | None = None, pass_through: bool = False) -> None:
        self.path = path
        self.own: Creds = {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)} if pass_through else {}
        if self.own and "AWS_ACCESS_KEY_ID" not in self.own:
            self.own = {}
        self._mapping: dict[str, Creds] = {}
        self._stamp: tuple[int, int] | None = None
        if path is not None:
            self._mapping = load_role_credentials(path)
            self._stamp = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        if self.path is None:
            return
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self._mapping = load_role_credentials(self.path)
        except RoleCredentialsError as exc:  # keep the last good mapping; say why
            log.error("role credentials not reloaded", extra={"error": str(exc)})
        self._stamp = stamp

    def for_role(self, role_arn: str) -> Creds:
        self._refresh()
        found = self._mapping.get(role_arn) or self._mapping.get("*")
        return dict(found) if found is not None else dict(self.own)
