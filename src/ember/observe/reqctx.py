"""The request being served, for ember's own log lines: the frontend sets `request_id_var` when it
gives a request its id, and `RequestIdFilter` (on the server's log handler) copies it onto every
record logged while that request is handled, so each JSON line carries `request_id`."""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("ember_request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            rid = request_id_var.get()
            if rid is not None:
                record.request_id = rid
        return True
