"""Authentication: AWS Signature Version 4 on the Lambda API (`ember serve --auth FILE`).

The credentials file (a one-way door, see docs/decisions/0004-authentication.md): one
`ACCESS_KEY_ID SECRET_ACCESS_KEY` pair a line, separated by white space; blank lines and lines
starting with `#` are ignored.

Every request except OPEN_PATHS must carry an `Authorization: AWS4-HMAC-SHA256 ...` header that
botocore's own signer, fed the request as received (method, path as sent, query, the signed headers,
the body's SHA-256), reproduces with the secret of the named key, dated within five minutes of
ember's clock, scoped to the service `lambda`, or `logs` for a CloudWatch Logs call (ember.api.cwlogs:
an `X-Amz-Target: Logs_20140328.*` header), whose failures answer 400 in CloudWatch Logs' shape
(`{"__type": ..., "message": ...}`). Other failures answer 403 in Lambda's shape (`x-amzn-ErrorType` +
JSON body):
  no Authorization header           MissingAuthenticationTokenException
  a malformed one                   IncompleteSignatureException
  an access key not in the file     UnrecognizedClientException
  a wrong signature, wrong scope    InvalidSignatureException
  a clock skew over 5 minutes       InvalidSignatureException ("Signature expired: ...")

The middleware reads the (bounded) body once to hash it and leaves it on the request under
sandbox.PRELOADED_BODY, where `read_bounded` finds it. Without --auth it is not installed at all.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

from ember.api.cwlogs import error_response as logs_error_response
from ember.api.cwlogs import is_logs_request
from ember.api.errors import LambdaError, service_error
from ember.api.frontend import MAX_CONTROL_BODY, MAX_SYNC_PAYLOAD
from ember.sandbox.process import PRELOADED_BODY, read_bounded

log = logging.getLogger("ember.api.auth")

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "lambda"
LOGS_SERVICE = "logs"  # CloudWatch Logs calls (X-Amz-Target Logs_20140328.*, ember.api.cwlogs)
MAX_SKEW = timedelta(minutes=5)
# Routes that answer without a signature: liveness and the API's own description (neither tells
# anything about functions), and the code download URL GetFunction hands out, which stands in for
# S3's pre-signed URL: it names the SHA-256 of the code, which only an authenticated caller learns.
OPEN_PATHS = frozenset({"/health", "/openapi.json"})
OPEN_PREFIXES = ("/_ember/code/",)


class CredentialsError(ValueError):
    """The credentials file cannot be used; the message names the file and line."""


def load_credentials(path: Path) -> dict[str, str]:
    """ACCESS_KEY_ID -> SECRET_ACCESS_KEY from `path` (format in the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc}") from None
    keys: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) != 2:
            raise CredentialsError(
                f"{path}:{lineno}: expected `ACCESS_KEY_ID SECRET_ACCESS_KEY`, got {len(fields)} fields"
            )
        key_id, secret = fields
        if "/" in key_id or not key_id.isascii() or not key_id.isprintable():
            raise CredentialsError(f"{path}:{lineno}: access key id must be printable ASCII without '/'")
        if key_id in keys:
            raise CredentialsError(f"{path}:{lineno}: access key id {key_id} appears twice")
        keys[key_id] = secret
    if not keys:
        raise CredentialsError(f"{path}: no credentials (one `ACCESS_KEY_ID SECRET_ACCESS_KEY` a line)")
    return keys


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; anything else (0.0.0.0, a name, a LAN address) is not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, auth: bool, insecure: bool) -> str | None:
    """Why `ember serve` must not listen on `host`, or None if it may."""
    if auth or insecure or is_loopback(host):
        return None
    return (
        f"ember: refusing to listen on {host} without authentication: pass --auth FILE "
        "(see README, Authentication), or --insecure to serve it unauthenticated anyway"
    )


# ---------------------------------------------------------------------- verification


def _denied(error_type: str, message: str) -> LambdaError:
    return LambdaError(403, error_type, message)


class _Resigner(SigV4Auth):
    """botocore's SigV4 signer, told exactly which headers the client signed (botocore's own list
    of headers never to sign does not apply to what another client chose to sign)."""

    def __init__(self, credentials: Credentials, service: str, region: str, signed: list[str]) -> None:
        super().__init__(credentials, service, region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        out = HTTPHeaders()
        for name in self._signed:
            for value in request.headers.get_all(name) or ():
                out[name] = value
        return out


def parse_authorization(value: str) -> tuple[str, list[str], list[str], str]:
    """(key id, credential scope [date, region, service, terminator], signed headers, signature)."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise _denied(
            "IncompleteSignatureException",
            f"Unsupported Authorization algorithm {algorithm[:40]!r}: expected {ALGORITHM}",
        )
    params: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if sep:
            params[key] = val.strip()
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not params.get(k)]
    if missing:
        raise _denied(
            "IncompleteSignatureException",
            f"Authorization header requires {', '.join(repr(m) for m in missing)} parameter(s). "
            f"Authorization={ALGORITHM} Credential=..., SignedHeaders=..., Signature=...",
        )
    credential = params["Credential"].split("/")
    if len(credential) != 5 or not all(credential):
        raise _denied(
            "IncompleteSignatureException",
            "Credential must have the form ACCESS_KEY_ID/YYYYMMDD/REGION/lambda/aws4_request",
        )
    signed = params["SignedHeaders"].lower().split(";")
    return credential[0], credential[1:], signed, params["Signature"].lower()


def _timestamp(headers: Mapping[str, str]) -> tuple[str, datetime]:
    raw = headers.get("X-Amz-Date")
    try:
        if raw is not None:
            when = datetime.strptime(raw, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
        elif "Date" in headers:
            when = parsedate_to_datetime(headers["Date"]).astimezone(UTC)
            raw = when.strftime(SIGV4_TIMESTAMP)
        else:
            raise _denied(
                "IncompleteSignatureException",
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            )
    except (ValueError, TypeError, IndexError, OverflowError):
        raise _denied("IncompleteSignatureException", "X-Amz-Date must be YYYYMMDD'T'HHMMSS'Z'") from None
    return raw, when


class Verifier:
    """Checks SigV4 signatures against a fixed set of keys."""

    def __init__(self, credentials: Mapping[str, str], clock: Callable[[], datetime] | None = None) -> None:
        self.credentials = dict(credentials)
        self.clock = clock or (lambda: datetime.now(UTC))

    def check_headers(self, request: web.BaseRequest) -> tuple[str, str, list[str], list[str], str]:
        """Everything that needs no body: returns (secret, timestamp, scope, signed headers, signature)."""
        value = request.headers.get("Authorization")
        if value is None:
            raise _denied("MissingAuthenticationTokenException", "Missing Authentication Token")
        key_id, scope, signed, signature = parse_authorization(value)
        secret = self.credentials.get(key_id)
        if secret is None:
            raise _denied(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        stamp, when = _timestamp(request.headers)
        now = self.clock()
        if when < now - MAX_SKEW:
            raise _denied(
                "InvalidSignatureException",
                f"Signature expired: {stamp} is now earlier than {(now - MAX_SKEW):{SIGV4_TIMESTAMP}} "
                f"({now:{SIGV4_TIMESTAMP}} - 5 min.)",
            )
        if when > now + MAX_SKEW:
            raise _denied(
                "InvalidSignatureException",
                f"Signature not yet current: {stamp} is still later than "
                f"{(now + MAX_SKEW):{SIGV4_TIMESTAMP}} ({now:{SIGV4_TIMESTAMP}} + 5 min.)",
            )
        date, _region, service, terminator = scope
        if date != stamp[:8]:
            raise _denied(
                "InvalidSignatureException",
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from "
                f"HTTP: '{date[:16]}' != '{stamp[:8]}', from '{stamp}'.",
            )
        expected = LOGS_SERVICE if is_logs_request(request.headers) else SERVICE
        if service != expected:
            raise _denied(
                "InvalidSignatureException", f"Credential should be scoped to correct service: '{expected}'."
            )
        if terminator != "aws4_request":
            raise _denied(
                "InvalidSignatureException",
                "Credential should be scoped with a valid terminator: 'aws4_request', "
                f"not '{terminator[:20]}'.",
            )
        if "host" not in signed:
            raise _denied("InvalidSignatureException", "The Host header must be signed.")
        for name in signed:
            if name not in request.headers:
                raise _denied(
                    "InvalidSignatureException", f"Signed header {name[:64]!r} is not in the request."
                )
        return secret, stamp, scope, signed, signature

    def check_signature(
        self,
        request: web.BaseRequest,
        body: bytes,
        secret: str,
        stamp: str,
        scope: list[str],
        signed: list[str],
        signature: str,
    ) -> None:
        declared = request.headers.get("X-Amz-Content-SHA256")
        if declared is not None and declared.lower() != hashlib.sha256(body).hexdigest():
            raise _denied(
                "InvalidSignatureException",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        raw = request.raw_path
        # origin-form "/path?query", or absolute-form "http://host/path?query"
        parts = urlsplit(raw) if not raw.startswith("/") else None
        path = (parts.path or "/") if parts else raw.partition("?")[0]
        query = parts.query if parts else raw.partition("?")[2]
        headers = HTTPHeaders()
        for name in signed:
            for value in request.headers.getall(name, ()):
                headers[name] = value
        url = f"http://{request.headers.get('Host', 'localhost')}{path}"
        # the key id is not part of what is signed (the credential scope is date/region/service)
        signer = _Resigner(Credentials("-", secret), scope[2], scope[1], signed)
        # botocore canonicalises the query as it appears in the URL it sends; the SigV4 spec (and
        # the other SDKs) as decoded, then re-encoded: try the first, then the second if it differs.
        as_sent = f"{url}?{query}" if query else url
        try:
            candidates = [AWSRequest(method=request.method, url=as_sent, headers=headers, data=body)]
            params = list(request.query.items())
            if signer.canonical_query_string(candidates[0]) != signer._canonical_query_string_params(params):
                candidates.append(
                    AWSRequest(method=request.method, url=url, headers=headers, data=body, params=params)
                )
            for aws_request in candidates:
                aws_request.context["timestamp"] = stamp
                canonical = signer.canonical_request(aws_request)
                expected = signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)
                if hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
                    return
        except ValueError:  # a Host or path no URL can hold ("[", ...): no signature can match
            pass
        raise _denied(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check "
            "your AWS Secret Access Key and signing method. Consult the service documentation for "
            "details.",
        )

    async def verify(self, request: web.Request) -> None:
        """Raise a 403 LambdaError unless `request` is signed; leaves the body on the request."""
        secret, stamp, scope, signed, signature = self.check_headers(request)
        invoke = request.path.endswith("/invocations")
        limit = MAX_SYNC_PAYLOAD if invoke else MAX_CONTROL_BODY
        body = await read_bounded(request, limit)
        if body is None:
            if invoke:
                raise LambdaError(
                    413,
                    "RequestTooLargeException",
                    f"Request must be smaller than {limit} bytes for the InvokeFunction operation",
                )
            raise LambdaError(413, "RequestEntityTooLargeException", "Request body too large")
        self.check_signature(request, body, secret, stamp, scope, signed, signature)
        request[PRELOADED_BODY] = body


def middleware(verifier: Verifier) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware: every route but OPEN_PATHS / OPEN_PREFIXES needs a valid signature."""

    @web.middleware
    async def sigv4(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        path = request.path
        if path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            request_id = str(uuid.uuid4())
            try:
                await verifier.verify(request)
            except LambdaError as err:
                if is_logs_request(request.headers):  # CloudWatch Logs' shape: JSON 1.1, status 400
                    return logs_error_response(400, err.error_type, err.message, request_id)
                return err.response(request_id)
            except Exception:  # never a bare 500: ember's own fault, in Lambda's shape
                log.exception("signature check failed", extra={"request_id": request_id, "path": path})
                if is_logs_request(request.headers):
                    return logs_error_response(
                        500, "ServiceUnavailableException", "ember failed to check the request's signature", request_id
                    )
                return service_error(
                    f"ember failed to check the request's signature (RequestId: {request_id})"
                ).response(request_id)
        return await handler(request)

    return sigv4
