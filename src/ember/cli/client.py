"""The client side of ember's commands: the Lambda API through botocore, ember's own routes
(/_ember/...) through plain HTTP signed the same way, and errors turned into one clear line.

Credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) from the environment
when set (needed when the server runs with --auth), else a placeholder that an ember without auth
accepts. Nothing else is looked up: no profile files, and never an instance metadata service.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_ENDPOINT = "http://127.0.0.1:9000"
DEFAULT_ROLE = "arn:aws:iam::000000000000:role/ember"
PROGRESS_MIN_BYTES = 1024 * 1024  # show upload progress from this size on
SKIP_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn"})


class ClientError(Exception):
    """What went wrong, in one line, for stderr."""


def endpoint_url(value: str | None) -> str:
    url = (value or os.environ.get("EMBER_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ClientError(f"invalid endpoint URL {url!r}: expected e.g. http://127.0.0.1:9000")
    return url


def _credentials() -> tuple[str, str, str | None]:
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return key, secret, os.environ.get("AWS_SESSION_TOKEN")
    return "ember", "ember", None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class Client:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._lambda: Any = None

    # ------------------------------------------------------------------ the Lambda API

    @property
    def lam(self) -> Any:
        if self._lambda is None:
            import botocore.session
            from botocore.config import Config

            key, secret, token = _credentials()
            session = botocore.session.get_session()
            self._lambda = session.create_client(
                "lambda",
                endpoint_url=self.endpoint,
                region_name=_region(),
                aws_access_key_id=key,
                aws_secret_access_key=secret,
                aws_session_token=token,
                config=Config(
                    retries={"total_max_attempts": 1},
                    connect_timeout=5,
                    read_timeout=960,  # an invoke may run 900 s
                    parameter_validation=True,
                ),
            )
        return self._lambda

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        """A Lambda API operation; any failure becomes a ClientError with one line."""
        from botocore.exceptions import (
            BotoCoreError,
            EndpointConnectionError,
            ParamValidationError,
        )
        from botocore.exceptions import (
            ClientError as BotoClientError,
        )

        try:
            return getattr(self.lam, operation)(**params)
        except BotoClientError as exc:
            err = exc.response.get("Error", {})
            code = err.get("Code") or "Error"
            message = (err.get("Message") or str(exc)).strip()
            raise ClientError(f"{code}: {message}") from None
        except EndpointConnectionError:
            raise ClientError(f"cannot reach ember at {self.endpoint} (is `ember serve` running?)") from None
        except ParamValidationError as exc:
            raise ClientError(" ".join(str(exc).split())) from None
        except BotoCoreError as exc:
            raise ClientError(f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ ember's own routes

    def _open(self, path: str, query: dict[str, str] | None = None, timeout: float | None = 30.0) -> Any:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = self.endpoint + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = AWSRequest(method="GET", url=url, headers={"Accept": "application/json"})
        SigV4Auth(Credentials(*_credentials()), "lambda", _region()).add_auth(req)
        request = urllib.request.Request(url, headers=dict(req.headers.items()), method="GET")
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise ClientError(_http_error(exc)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(
                f"cannot reach ember at {self.endpoint} ({reason}; is `ember serve` running?)"
            ) from None

    def get_json(self, path: str, query: dict[str, str] | None = None) -> Any:
        with self._open(path, query) as resp:
            return json.loads(resp.read())

    def stream_lines(self, path: str, query: dict[str, str] | None = None) -> Iterator[bytes]:
        """Lines of a streamed response, as they arrive (for `logs --follow`)."""
        resp = self._open(path, query, timeout=None)
        with resp:
            while True:
                line = resp.readline()
                if not line:
                    return
                yield line


def _http_error(exc: urllib.error.HTTPError) -> str:
    code = exc.headers.get("x-amzn-ErrorType") or f"HTTP {exc.code}"
    try:
        body = json.loads(exc.read() or b"{}")
        message = body.get("message") or body.get("Message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    return f"{code}: {message}"


# ---------------------------------------------------------------------- packaging


def zip_dir(root: Path) -> tuple[bytes, int]:
    """The folder as a zip (deflated, unix permissions kept, so a `bootstrap` stays executable);
    __pycache__ and VCS folders are left out. Returns (zip bytes, number of files)."""
    if not root.is_dir():
        raise ClientError(f"{root} is not a directory")
    buf = io.BytesIO()
    count = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                arcname = path.relative_to(root).as_posix()
                try:
                    st = path.stat()
                except OSError as exc:
                    raise ClientError(f"cannot read {path}: {exc.strerror}") from None
                if not stat.S_ISREG(st.st_mode):
                    continue
                info = zipfile.ZipInfo.from_file(path, arcname)
                info.compress_type = zipfile.ZIP_DEFLATED
                try:
                    with open(path, "rb") as f:
                        z.writestr(info, f.read())
                except OSError as exc:
                    raise ClientError(f"cannot read {path}: {exc.strerror}") from None
                count += 1
    if count == 0:
        raise ClientError(f"{root} has no files to deploy")
    return buf.getvalue(), count


class ProgressBody(io.RawIOBase):
    """A request body that reports how much of it was sent (for botocore's before-send hook)."""

    def __init__(self, data: bytes, advance: Any) -> None:
        self._buf = io.BytesIO(data)
        self._advance = advance
        self.len = len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self._buf.read(min(size, 64 * 1024) if size and size > 0 else 64 * 1024)
        if chunk:
            self._advance(len(chunk))
        return chunk

    def readinto(self, b: Any) -> int:
        chunk = self.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
