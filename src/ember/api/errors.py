"""Errors in Lambda's wire form: the `x-amzn-ErrorType` header plus a JSON body, so that botocore
raises the named exception (ResourceNotFoundException, TooManyRequestsException, ...)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


class LambdaError(Exception):
    """An error answered to a Lambda API caller. `extra` adds fields to the body (Reason, Type)."""

    def __init__(self, status: int, error_type: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def response(self, request_id: str) -> web.Response:
        body: dict[str, Any] = {"Type": "User" if self.status < 500 else "Service", "message": self.message}
        body.update(self.extra)
        headers = {
            "x-amzn-ErrorType": self.error_type,
            "x-amzn-RequestId": request_id,
            "Content-Type": "application/json",
            **self.headers,
        }
        return web.Response(status=self.status, body=orjson.dumps(body), headers=headers)


def not_found(kind: str, name: str, arn: str | None = None) -> LambdaError:
    return LambdaError(404, "ResourceNotFoundException", f"{kind} not found: {arn or name}", Type="User")


def invalid(message: str) -> LambdaError:
    return LambdaError(400, "InvalidParameterValueException", message)


def conflict(message: str) -> LambdaError:
    return LambdaError(409, "ResourceConflictException", message)


def throttled(reason: str, retry_after_s: int = 1) -> LambdaError:
    err = LambdaError(429, "TooManyRequestsException", "Rate Exceeded.", Reason=reason)
    err.headers["Retry-After"] = str(retry_after_s)
    return err


def service_error(message: str) -> LambdaError:
    return LambdaError(500, "ServiceException", message)
