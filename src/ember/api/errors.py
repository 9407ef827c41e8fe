"""Errors in Lambda's wire form: the `x-amzn-ErrorType` header plus a JSON body, so that botocore
raises the named exception (ResourceNotFoundException, TooManyRequestsException, ...).

The body is what Lambda sends: `Type` ("User" for 4xx, "Service" for 5xx) and the message under the
member name Lambda's model gives that exception: `Message` for ResourceNotFoundException,
ServiceException and the others listed below, `message` for InvalidParameterValueException,
ResourceConflictException, TooManyRequestsException and every other. ValidationException is
not an exception of Lambda's model: its body is `{"message": ...}` only, as AWS's request validation
sends it."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

# Exceptions whose model member is a capitalised `Message` (botocore's lambda service model); every
# other exception carries `message`.
CAPITAL_MESSAGE = frozenset(
    {
        "CallbackTimeoutException", "CodeSigningConfigNotFoundException", "CodeVerificationFailedException",
        "DurableExecutionAlreadyStartedException", "EC2AccessDeniedException", "EC2ThrottledException",
        "EC2UnexpectedException", "EFSIOException", "EFSMountConnectivityException",
        "EFSMountFailureException", "EFSMountTimeoutException", "ENILimitReachedException",
        "ENINotReadyException", "InvalidCodeSignatureException", "InvalidRuntimeException",
        "InvalidSecurityGroupIDException", "InvalidSubnetIDException", "InvalidZipFileException",
        "KMSAccessDeniedException", "KMSDisabledException", "KMSInvalidStateException",
        "KMSNotFoundException", "NoPublishedVersionException", "PublicPolicyException",
        "RecursiveInvocationException", "ResourceInUseException", "ResourceNotFoundException",
        "ServiceException", "ServiceQuotaExceededException", "SnapStartException",
        "SnapStartNotReadyException", "SnapStartRegenerationFailureException", "SnapStartTimeoutException",
        "SubnetIPAddressLimitReachedException",
    }
)  # fmt: skip


class LambdaError(Exception):
    """An error answered to a Lambda API caller. `extra` adds fields to the body (Reason, Type)."""

    def __init__(self, status: int, error_type: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        if self.error_type == "ValidationException":
            return {"message": self.message}
        key = "Message" if self.error_type in CAPITAL_MESSAGE else "message"
        body: dict[str, Any] = {"Type": "User" if self.status < 500 else "Service"}
        if self.message:  # AccessDeniedException for another account's function carries none
            body[key] = self.message
        body.update(self.extra)
        return body

    def response(self, request_id: str) -> web.Response:
        body = self.body()
        headers = {
            "x-amzn-ErrorType": self.error_type,
            "x-amzn-RequestId": request_id,
            "Content-Type": "application/json",
            **self.headers,
        }
        return web.Response(status=self.status, body=orjson.dumps(body), headers=headers)


def not_found(kind: str, name: str, arn: str | None = None) -> LambdaError:
    return LambdaError(404, "ResourceNotFoundException", f"{kind} not found: {arn or name}")


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
