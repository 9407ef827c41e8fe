"""CloudWatch Logs' API over the function logs ember keeps (ember.observe.funclogs), so that the AWS
CLI (`aws logs tail /aws/lambda/NAME [--follow]`, `aws logs get-log-events`, ...) and boto3's
`logs` client work unchanged against ember's endpoint.

Wire form (botocore's logs service model, protocol `json` 1.1): POST / with
`X-Amz-Target: Logs_20140328.<Operation>`, a JSON object in, a JSON object out
(`application/x-amz-json-1.1`); errors are `{"__type": ..., "message": ...}` with status 400.
SigV4 requests are scoped to the service `logs` (ember.api.auth).

Operations:
  DescribeLogGroups   logGroupNamePrefix | logGroupNamePattern | logGroupIdentifiers, limit, nextToken
  DescribeLogStreams  logGroupName | logGroupIdentifier, logStreamNamePrefix, orderBy, descending,
                      limit, nextToken
  GetLogEvents        logGroupName | logGroupIdentifier, logStreamName, startTime, endTime,
                      startFromHead, limit, nextToken (f/... forward, b/... backward)
  FilterLogEvents     logGroupName | logGroupIdentifier, logStreamNames | logStreamNamePrefix,
                      startTime, endTime, filterPattern (ember.api.logpattern), limit, nextToken

The mapping (docs/decisions/0010-cloudwatch-logs-api.md): a log group `/aws/lambda/NAME` for each
function that exists; a stream per sandbox, named as ember names it (AWS_LAMBDA_LOG_STREAM_NAME);
one CloudWatch event per line of a stored event (START, each printed line, END, REPORT), each with
the stored event's timestamp and a message ending in a newline, as Lambda's do. An event's id and
every pagination token are positions in the group's segments, so they stay valid while the
segment is kept and never repeat.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from ember.api.control import ControlPlane
from ember.api.errors import LambdaError
from ember.api.logpattern import PatternError, Predicate, compile_pattern
from ember.observe.funclogs import FLUSH_CHUNK, LogStore
from ember.observe.reqctx import request_id_var
from ember.sandbox.process import read_bounded

log = logging.getLogger("ember.api.cwlogs")

TARGET_PREFIX = "Logs_20140328."
CONTENT_TYPE = "application/x-amz-json-1.1"
GROUP_PREFIX = "/aws/lambda/"
MAX_REQUEST_BYTES = 1024 * 1024
MAX_PAGE_BYTES = 1024 * 1024  # a page holds at most 1 MB of events, as CloudWatch Logs' do
EVENT_OVERHEAD = 26  # bytes CloudWatch Logs counts for each event besides its message
EVENTS_LIMIT = 10_000
DESCRIBE_LIMIT = 50
# An event's ts (its invocation's start) may precede its segment's first ts by up to one
# invocation (15 min) and an init: a segment is skipped by time only beyond that margin.
SLACK_MS = 16 * 60 * 1000

Key = tuple[int, int, int, int]  # (ts, segment seq, byte offset of the stored event, line in it)
ZERO: Key = (0, 0, 0, 0)


def is_logs_request(headers: Any) -> bool:
    """A CloudWatch Logs call (by its X-Amz-Target), rather than a Lambda API one."""
    return str(headers.get("X-Amz-Target", "")).startswith(TARGET_PREFIX)


class LogsError(Exception):
    """An error answered in CloudWatch Logs' shape."""

    def __init__(self, error_type: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status

    def response(self, request_id: str) -> web.Response:
        return error_response(self.status, self.error_type, self.message, request_id)


def error_response(status: int, error_type: str, message: str, request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"__type": error_type, "message": message}),
        headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id, "x-amzn-ErrorType": error_type},
    )


def invalid(message: str) -> LogsError:
    return LogsError("InvalidParameterException", message)


def group_missing() -> LogsError:
    return LogsError("ResourceNotFoundException", "The specified log group does not exist.")


def stream_missing() -> LogsError:
    return LogsError("ResourceNotFoundException", "The specified log stream does not exist.")


# ---------------------------------------------------------------------- events


class Event(NamedTuple):
    """One CloudWatch event. Tuples order by their key fields first (keys never repeat)."""

    ts: int
    seq: int  # the segment's sequence number (its file name)
    off: int  # the byte offset of the stored event in the segment
    line: int  # the line of the stored event's message
    stream: str
    message: str

    @property
    def key(self) -> Key:
        return self.ts, self.seq, self.off, self.line

    @property
    def event_id(self) -> str:
        return f"{self.ts:013d}{self.seq:010d}{self.off:012d}{self.line:06d}"

    @property
    def size(self) -> int:
        return len(self.message.encode()) + EVENT_OVERHEAD


def _lines(message: str) -> list[str]:
    """A stored event's CloudWatch events: one a line. awslambdaric's `\\r` inside one record (a
    traceback) stays inside one event, as a newline."""
    return [line.replace("\r", "\n") + "\n" for line in message.split("\n")] if message else []


def scan(
    segments: list[tuple[Path, int, int]],
    start: int | None = None,
    end: int | None = None,
    want: Callable[[str], bool] | None = None,
) -> list[Event]:
    """Events in `segments` with start <= ts < end whose stream `want`s, oldest first (by key).
    Reads files: run it off the event loop."""
    out: list[Event] = []
    for i, (path, first_ts, size) in enumerate(segments):
        nxt = segments[i + 1][1] if i + 1 < len(segments) else None
        if start is not None and nxt is not None and nxt + SLACK_MS < start:
            continue  # every event in it is older than `start`
        if end is not None and first_ts - SLACK_MS >= end:
            break
        seq = _segment_seq(path)
        try:
            with open(path, "rb") as f:
                data = f.read(size)
        except OSError:
            continue  # dropped by retention meanwhile
        offset = 0
        for raw in data.split(b"\n"):
            at, offset = offset, offset + len(raw) + 1
            if not raw:
                continue
            try:
                doc = orjson.loads(raw)
                ts, stream, message = doc["ts"], doc["stream"], doc["message"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line, or not an event
            if not isinstance(ts, int) or not isinstance(stream, str) or not isinstance(message, str):
                continue
            if (start is not None and ts < start) or (end is not None and ts >= end):
                continue
            if want is not None and not want(stream):
                continue
            for n, line in enumerate(_lines(message)):
                out.append(Event(ts, seq, at, n, stream, line))
    out.sort()
    return out


def _streams(segments: list[tuple[Path, int, int]], want: Callable[[str], bool] | None) -> dict[str, dict[str, int]]:
    """Each stream's first and last event time."""
    info: dict[str, dict[str, int]] = {}
    for e in scan(segments, want=want):
        s = info.get(e.stream)
        if s is None:
            info[e.stream] = {"first": e.ts, "last": e.ts}
        else:
            s["first"] = min(s["first"], e.ts)
            s["last"] = max(s["last"], e.ts)
    return info


def _segment_seq(path: Path) -> int:
    _, _, seq = path.stem.partition("-")
    return int(seq) if seq.isdigit() else 0


# ---------------------------------------------------------------------- tokens


def _key_text(key: Key) -> str:
    return "-".join(str(k) for k in key)


def _parse_key(text: str) -> Key:
    parts = text.split("-")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 20 for p in parts):
        raise ValueError(text)
    a, b, c, d = (int(p) for p in parts)
    return a, b, c, d


def _succ(key: Key) -> Key:
    return key[0], key[1], key[2], key[3] + 1


def _bad_token() -> LogsError:
    return invalid("The specified nextToken is invalid.")


def _encode(doc: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


def _decode(token: str) -> Any:
    try:
        return orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise _bad_token() from None


# ---------------------------------------------------------------------- parameters


class _Params:
    """Typed reads of a request object; anything malformed is an InvalidParameterException."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def string(self, name: str, max_len: int = 2048, min_len: int = 1) -> str | None:
        v = self.doc.get(name)
        if v is None:
            return None
        if not isinstance(v, str) or not min_len <= len(v) <= max_len:
            raise invalid(f"{name} must be a string of {min_len} to {max_len} characters")
        return v

    def integer(self, name: str, lo: int, hi: int) -> int | None:
        v = self.doc.get(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise invalid(f"{name} must be an integer from {lo} to {hi}")
        return v

    def boolean(self, name: str) -> bool | None:
        v = self.doc.get(name)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise invalid(f"{name} must be a boolean")
        return v

    def strings(self, name: str, max_items: int = 100) -> list[str] | None:
        v = self.doc.get(name)
        if v is None:
            return None
        if (
            not isinstance(v, list)
            or not 1 <= len(v) <= max_items
            or not all(isinstance(s, str) and 1 <= len(s) <= 512 for s in v)
        ):
            raise invalid(f"{name} must be a list of 1 to {max_items} names")
        return v

    def time(self, name: str) -> int | None:
        return self.integer(name, 0, 2**63 - 1)


# ---------------------------------------------------------------------- the API


Operation = Callable[[_Params], Awaitable[dict[str, Any]]]


class CloudWatchLogs:
    def __init__(self, control: ControlPlane, logs: LogStore) -> None:
        self.control = control
        self.logs = logs
        self.operations: dict[str, Operation] = {
            "DescribeLogGroups": self.describe_log_groups,
            "DescribeLogStreams": self.describe_log_streams,
            "GetLogEvents": self.get_log_events,
            "FilterLogEvents": self.filter_log_events,
        }

    def routes(self, app: web.Application) -> None:
        """POST / (before the Lambda frontend's catch-all route)."""
        app.router.add_post("/", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        request_id_var.set(request_id)
        if not is_logs_request(request.headers):  # not ours: the Lambda API's answer to an unknown path
            return LambdaError(
                404, "UnknownOperationException", f"Unknown operation {request.method} {request.path}"
            ).response(request_id)
        name = request.headers["X-Amz-Target"][len(TARGET_PREFIX) :]
        try:
            operation = self.operations.get(name)
            if operation is None:
                raise LogsError("UnknownOperationException", f"Unknown operation {name[:64]!r}")
            raw = await read_bounded(request, MAX_REQUEST_BYTES)
            if raw is None:
                raise invalid(f"The request body is larger than {MAX_REQUEST_BYTES} bytes")
            try:
                doc = orjson.loads(raw) if raw.strip() else {}
            except orjson.JSONDecodeError:
                raise LogsError("SerializationException", "The request body is not valid JSON") from None
            if not isinstance(doc, dict):
                raise LogsError("SerializationException", "The request body must be a JSON object")
            result = await operation(_Params(doc))
        except LogsError as err:
            return err.response(request_id)
        except Exception:
            log.exception("CloudWatch Logs request failed", extra={"request_id": request_id, "operation": name})
            return error_response(
                500,
                "ServiceUnavailableException",
                f"ember failed to process the request (RequestId: {request_id})",
                request_id,
            )
        return web.Response(
            body=orjson.dumps(result), headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id}
        )

    # ------------------------------------------------------------------ names

    def _arn(self, group: str) -> str:
        s = self.control.settings
        return f"arn:aws:logs:{s.region}:{s.account_id}:log-group:{group}"

    def _function_of(self, group: str) -> str | None:
        """The function whose log group is `group`, if it exists."""
        if not group.startswith(GROUP_PREFIX):
            return None
        name = group[len(GROUP_PREFIX) :]
        return name if name in self.control.functions else None

    def _identifier_group(self, ident: str) -> str:
        """A log group name from a name or ARN (`arn:aws:logs:REGION:ACCOUNT:log-group:NAME[:*]`)."""
        if not ident.startswith("arn:"):
            return ident
        parts = ident.split(":", 6)
        if len(parts) < 7 or parts[2] != "logs" or parts[5] != "log-group":
            raise invalid(f"Invalid log group ARN: {ident[:200]}")
        name = parts[6]
        return name[:-2] if name.endswith(":*") else name

    def _group(self, p: _Params) -> tuple[str, str]:
        """(group name, function) from logGroupName or logGroupIdentifier (exactly one)."""
        name = p.string("logGroupName", 512)
        ident = p.string("logGroupIdentifier", 2048)
        if name is not None and ident is not None:
            raise invalid("LogGroup name and LogGroup ARN are mutually exclusive parameters.")
        if name is None and ident is None:
            raise invalid("Either logGroupName or logGroupIdentifier must be specified.")
        group = name if name is not None else self._identifier_group(ident or "")
        function = self._function_of(group)
        if function is None:
            raise group_missing()
        return group, function

    def _segments(self, function: str) -> list[tuple[Path, int, int]]:
        if 0 < len(self.logs.pending) <= 4 * FLUSH_CHUNK:
            self.logs.flush()  # what just ended is readable at once; a backlog is the writer's to drain
        return self.logs.segments(function)

    async def _scan(
        self, function: str, start: int | None, end: int | None, want: Callable[[str], bool] | None
    ) -> list[Event]:
        return await asyncio.to_thread(scan, self._segments(function), start, end, want)

    def _creation_time(self, function: str) -> int:
        segments = self.logs.segments(function)
        if segments:
            return segments[0][1]
        modified = self.control.functions[function].last_modified
        try:
            return int(datetime.fromisoformat(modified.replace("+0000", "+00:00")).timestamp() * 1000)
        except ValueError:
            return 0

    # ------------------------------------------------------------------ DescribeLogGroups

    async def describe_log_groups(self, p: _Params) -> dict[str, Any]:
        prefix = p.string("logGroupNamePrefix", 512)
        pattern = p.string("logGroupNamePattern", 512, min_len=0)
        idents = p.strings("logGroupIdentifiers", 50)
        limit = p.integer("limit", 1, DESCRIBE_LIMIT) or DESCRIBE_LIMIT
        token = p.string("nextToken", 4096)
        p.boolean("includeLinkedAccounts")
        cls = p.string("logGroupClass", 64)
        if sum(x is not None for x in (prefix, pattern, idents)) > 1:
            raise invalid(
                "logGroupNamePrefix, logGroupNamePattern and logGroupIdentifiers are mutually exclusive."
            )
        if cls is not None and cls not in ("STANDARD", "INFREQUENT_ACCESS", "DELIVERY"):
            raise invalid("logGroupClass must be STANDARD, INFREQUENT_ACCESS or DELIVERY")
        names = sorted(GROUP_PREFIX + f for f in self.control.functions)
        if prefix is not None:
            names = [n for n in names if n.startswith(prefix)]
        if pattern:
            low = pattern.lower()
            names = [n for n in names if low in n.lower()]
        if idents is not None:
            wanted = {self._identifier_group(i) for i in idents}
            names = [n for n in names if n in wanted]
        if cls not in (None, "STANDARD"):
            names = []
        if token is not None:
            after = _decode(token)
            if not isinstance(after, str):
                raise _bad_token()
            names = [n for n in names if n > after]
        page = names[:limit]
        groups = []
        for group in page:
            function = group[len(GROUP_PREFIX) :]
            arn = self._arn(group)
            groups.append(
                {
                    "logGroupName": group,
                    "creationTime": self._creation_time(function),
                    "metricFilterCount": 0,
                    "arn": f"{arn}:*",
                    "logGroupArn": arn,
                    "storedBytes": sum(size for _, _, size in self.logs.segments(function)),
                    "logGroupClass": "STANDARD",
                }
            )
        out: dict[str, Any] = {"logGroups": groups}
        if len(names) > limit:
            out["nextToken"] = _encode(page[-1])
        return out

    # ------------------------------------------------------------------ DescribeLogStreams

    async def describe_log_streams(self, p: _Params) -> dict[str, Any]:
        group, function = self._group(p)
        prefix = p.string("logStreamNamePrefix", 512)
        order = p.string("orderBy", 64) or "LogStreamName"
        descending = bool(p.boolean("descending"))
        limit = p.integer("limit", 1, DESCRIBE_LIMIT) or DESCRIBE_LIMIT
        token = p.string("nextToken", 4096)
        if order not in ("LogStreamName", "LastEventTime"):
            raise invalid("orderBy must be LogStreamName or LastEventTime")
        if order == "LastEventTime" and prefix is not None:
            raise invalid("Cannot order by LastEventTime with a logStreamNamePrefix.")
        want = _prefixed(prefix) if prefix is not None else None
        info = await asyncio.to_thread(_streams, self._segments(function), want)

        def sort_key(name: str) -> list[Any]:
            return [name] if order == "LogStreamName" else [info[name]["last"], name]

        names = sorted(info, key=sort_key, reverse=descending)
        if token is not None:
            after = _decode(token)
            shape = [str] if order == "LogStreamName" else [int, str]
            if (
                not isinstance(after, list)
                or len(after) != len(shape)
                or not all(type(v) is t for v, t in zip(after, shape, strict=True))
            ):
                raise _bad_token()
            if descending:
                names = [n for n in names if sort_key(n) < after]
            else:
                names = [n for n in names if sort_key(n) > after]
        page = names[:limit]
        arn = self._arn(group)
        streams = [
            {
                "logStreamName": name,
                "creationTime": info[name]["first"],
                "firstEventTimestamp": info[name]["first"],
                "lastEventTimestamp": info[name]["last"],
                "lastIngestionTime": info[name]["last"],
                "arn": f"{arn}:log-stream:{name}",
                "storedBytes": 0,  # deprecated in CloudWatch Logs, always 0 there too
            }
            for name in page
        ]
        out: dict[str, Any] = {"logStreams": streams}
        if len(names) > limit:
            out["nextToken"] = _encode(sort_key(page[-1]))
        return out

    # ------------------------------------------------------------------ GetLogEvents

    async def get_log_events(self, p: _Params) -> dict[str, Any]:
        _, function = self._group(p)
        stream = p.string("logStreamName", 512)
        if stream is None:
            raise invalid("logStreamName is required.")
        start, end = p.time("startTime"), p.time("endTime")
        limit = p.integer("limit", 1, EVENTS_LIMIT) or EVENTS_LIMIT
        from_head = bool(p.boolean("startFromHead"))
        p.boolean("unmask")
        token = p.string("nextToken", 4096)
        direction, at = None, ZERO
        if token is not None:
            direction, _, rest = token.partition("/")
            if direction not in ("f", "b"):
                raise _bad_token()
            try:
                at = _parse_key(rest)
            except ValueError:
                raise _bad_token() from None
        everything = await self._scan(function, None, None, lambda s: s == stream)
        if not everything:  # a stream exists once it has an event (a sandbox's first output)
            raise stream_missing()
        events = [e for e in everything if (start is None or e.ts >= start) and (end is None or e.ts < end)]
        if direction == "f":
            page = _head([e for e in events if e.key > at], limit)
        elif direction == "b":
            page = _tail([e for e in events if e.key < at], limit)
        elif from_head:
            page = _head(events, limit)
        else:
            page = _tail(events, limit)
        if page:
            forward, backward = f"f/{_key_text(page[-1].key)}", f"b/{_key_text(page[0].key)}"
        elif direction == "f":
            forward, backward = token or "", f"b/{_key_text(_succ(at))}"
        elif direction == "b":
            forward, backward = "f/" + _key_text(ZERO), token or ""
        else:  # nothing in range, no token: from the range's start either way
            forward, backward = "f/" + _key_text(ZERO), "b/" + _key_text(ZERO)
        return {
            "events": [{"timestamp": e.ts, "message": e.message, "ingestionTime": e.ts} for e in page],
            "nextForwardToken": forward,
            "nextBackwardToken": backward,
        }

    # ------------------------------------------------------------------ FilterLogEvents

    async def filter_log_events(self, p: _Params) -> dict[str, Any]:
        _, function = self._group(p)
        names = p.strings("logStreamNames", 100)
        prefix = p.string("logStreamNamePrefix", 512)
        if names is not None and prefix is not None:
            raise invalid("logStreamNames and logStreamNamePrefix are mutually exclusive.")
        start, end = p.time("startTime"), p.time("endTime")
        if start is not None and end is not None and end < start:
            raise invalid("endTime must be greater than or equal to startTime.")
        try:
            match = compile_pattern(p.string("filterPattern", 1024, min_len=0))
        except PatternError as exc:
            raise invalid(f"Invalid filter pattern: {exc}") from None
        limit = p.integer("limit", 1, EVENTS_LIMIT) or EVENTS_LIMIT
        for flag in ("interleaved", "startFromHead", "unmask"):
            p.boolean(flag)
        token = p.string("nextToken", 4096)
        after: Key | None = None
        if token is not None:
            kind, _, rest = token.partition("/")
            try:
                if kind != "n":
                    raise ValueError(token)
                after = _parse_key(rest)
            except ValueError:
                raise _bad_token() from None
        want: Callable[[str], bool] | None = None
        if names is not None:
            want = set(names).__contains__
        elif prefix is not None:
            want = _prefixed(prefix)
        segments = self._segments(function)

        def search() -> tuple[list[Event], bool]:  # off the event loop: reading and matching
            events = scan(segments, start, end, want)
            if after is not None:
                events = [e for e in events if e.key > after]
            return _filtered(events, match, limit)

        page, more = await asyncio.to_thread(search)
        out: dict[str, Any] = {
            "events": [
                {
                    "logStreamName": e.stream,
                    "timestamp": e.ts,
                    "message": e.message,
                    "ingestionTime": e.ts,
                    "eventId": e.event_id,
                }
                for e in page
            ],
            "searchedLogStreams": [],
        }
        if more:
            out["nextToken"] = f"n/{_key_text(page[-1].key)}"
        return out


def _prefixed(prefix: str) -> Callable[[str], bool]:
    return lambda stream: stream.startswith(prefix)


def _head(events: list[Event], limit: int) -> list[Event]:
    out: list[Event] = []
    size = 0
    for e in events[:limit]:
        size += e.size
        if size > MAX_PAGE_BYTES and out:
            break
        out.append(e)
    return out


def _tail(events: list[Event], limit: int) -> list[Event]:
    out: list[Event] = []
    size = 0
    for e in reversed(events[-limit:] if limit else []):
        size += e.size
        if size > MAX_PAGE_BYTES and out:
            break
        out.append(e)
    out.reverse()
    return out


def _filtered(events: Iterable[Event], match: Predicate | None, limit: int) -> tuple[list[Event], bool]:
    """The first `limit` matching events (at most 1 MB), and whether more match after them."""
    out: list[Event] = []
    size = 0
    for e in events:
        if match is not None and not match(e.message.rstrip("\n")):
            continue
        if len(out) >= limit or (size + e.size > MAX_PAGE_BYTES and out):
            return out, True
        size += e.size
        out.append(e)
    return out, False
