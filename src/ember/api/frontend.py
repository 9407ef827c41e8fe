"""The Lambda API frontend: Lambda's REST paths and shapes (botocore's lambda service model), so that
boto3 and the AWS CLI work unchanged. Errors leave in Lambda's wire form (errors.py).

Routes (all under the API's dated prefixes):
  POST   /2015-03-31/functions                              CreateFunction (201)
  GET    /2015-03-31/functions                              ListFunctions (Marker, MaxItems)
  GET    /2015-03-31/functions/{name}                       GetFunction
  DELETE /2015-03-31/functions/{name}                       DeleteFunction (204)
  GET    /2015-03-31/functions/{name}/configuration         GetFunctionConfiguration
  PUT    /2015-03-31/functions/{name}/configuration         UpdateFunctionConfiguration
  PUT    /2015-03-31/functions/{name}/code                  UpdateFunctionCode
  POST   /2015-03-31/functions/{name}/invocations           Invoke
  PUT    /2017-10-31/functions/{name}/concurrency           PutFunctionConcurrency
  GET    /2019-09-30/functions/{name}/concurrency           GetFunctionConcurrency
  DELETE /2017-10-31/functions/{name}/concurrency           DeleteFunctionConcurrency (204)
  GET    /2016-08-19/account-settings                       GetAccountSettings
  GET    /health                                            ember's health (JSON)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ember import __version__
from ember.api import openapi
from ember.api.control import ControlPlane
from ember.api.errors import LambdaError, invalid, service_error
from ember.invoke.asyncq import MAX_ASYNC_PAYLOAD, AsyncInvoker
from ember.invoke.protocol import Invoker
from ember.observe.logs import tail_header
from ember.observe.reqctx import request_id_var
from ember.sandbox.process import Outcome, read_bounded

log = logging.getLogger("ember.api.frontend")

MAX_SYNC_PAYLOAD = 6 * 1024 * 1024  # 6 MB: Lambda's synchronous request limit
MAX_CONTROL_BODY = 70167211  # Lambda's request limit for CreateFunction (a 50 MB zip, base64-encoded, plus JSON)
MAX_CLIENT_CONTEXT = 3583
LIST_MAX_ITEMS = 50

Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def api(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Give each request an id, and turn errors into Lambda's wire form (never a bare 500)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        request_id_var.set(request_id)  # ember's own log lines of this request carry it (ember.observe.reqctx)
        try:
            return await handler(request, request_id)
        except LambdaError as err:
            return err.response(request_id)
        except Exception:
            log.exception("request failed", extra={"request_id": request_id, "path": request.path})
            return service_error(f"ember failed to process the request (RequestId: {request_id})").response(
                request_id
            )

    return wrapped


def _json(data: Any, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        headers={"Content-Type": "application/json", "x-amzn-RequestId": request_id},
    )


async def _body_json(request: web.Request, operation: str = "") -> dict[str, Any]:
    raw = await read_bounded(request, MAX_CONTROL_BODY)
    if raw is None:
        raise LambdaError(
            413,
            "RequestEntityTooLargeException",
            f"Request must be smaller than {MAX_CONTROL_BODY} bytes for the {operation or 'requested'} operation",
        )
    if not raw:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise LambdaError(
            400, "InvalidRequestContentException", f"Could not parse request body into json: {exc}"
        ) from None
    if not isinstance(doc, dict):
        raise LambdaError(400, "InvalidRequestContentException", "Request body must be a JSON object")
    return doc


class Frontend:
    def __init__(self, control: ControlPlane, invoker: Invoker, asyncq: AsyncInvoker | None = None) -> None:
        self.on_change: Callable[[str], Awaitable[None]] | None = None  # cluster mode: publish to etcd
        self.on_unknown: Callable[[str], Awaitable[bool]] | None = None  # cluster mode: read through to etcd
        self.control = control
        self.invoker = invoker
        self.asyncq = asyncq
        self.accepting = True

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/2015-03-31/functions/{name}/invocations", api(self.invoke))
        r.add_post("/2015-03-31/functions", api(self.create))
        r.add_post("/2015-03-31/functions/", api(self.create))
        r.add_get("/2015-03-31/functions", api(self.list))
        r.add_get("/2015-03-31/functions/", api(self.list))
        r.add_get("/2015-03-31/functions/{name}", api(self.get))
        r.add_delete("/2015-03-31/functions/{name}", api(self.delete))
        r.add_get("/2015-03-31/functions/{name}/configuration", api(self.get_configuration))
        r.add_put("/2015-03-31/functions/{name}/configuration", api(self.update_configuration))
        r.add_put("/2015-03-31/functions/{name}/code", api(self.update_code))
        r.add_put("/2017-10-31/functions/{name}/concurrency", api(self.put_concurrency))
        r.add_get("/2019-09-30/functions/{name}/concurrency", api(self.get_concurrency))
        r.add_delete("/2017-10-31/functions/{name}/concurrency", api(self.delete_concurrency))
        r.add_get("/2016-08-19/account-settings", api(self.account_settings))
        r.add_get("/2016-08-19/account-settings/", api(self.account_settings))
        eic = "/2019-09-25/functions/{name}/event-invoke-config"
        r.add_put(eic, api(self.put_event_config))
        r.add_post(eic, api(self.update_event_config))
        r.add_get(eic, api(self.get_event_config))
        r.add_delete(eic, api(self.delete_event_config))
        r.add_get(eic + "/list", api(self.list_event_configs))
        r.add_get("/_ember/queues", api(self.queues))
        r.add_get("/health", self.health)
        r.add_get("/openapi.json", openapi.handler)  # describes every route here: keep it in step
        r.add_get("/_ember/code/{name}/{file}", api(self.code))
        r.add_route("*", "/{tail:.*}", api(self.unknown))

    async def _changed(self, name: str) -> None:
        if self.on_change is not None:
            await self.on_change(name)

    # ------------------------------------------------------------------ invoke

    async def invoke(self, request: web.Request, request_id: str) -> web.StreamResponse:
        if not self.accepting:
            raise LambdaError(503, "ServiceException", "ember is shutting down")
        headers = request.headers
        try:
            rec = self.control.resolve(request.match_info["name"], request.query.get("Qualifier"), "invoke")
        except LambdaError as exc:  # cluster mode: another frontend may have just created it
            if exc.status != 404 or self.on_unknown is None or not await self.on_unknown(request.match_info["name"]):
                raise
            rec = self.control.resolve(request.match_info["name"], request.query.get("Qualifier"), "invoke")
        pending = self.control.pending_for(rec.name)
        if pending > 0:  # ember is ready at once: an invoke while Pending waits out the state's short window
            await asyncio.sleep(pending)
        kind = headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if kind not in ("RequestResponse", "DryRun", "Event"):
            raise invalid(f"Invalid InvocationType {kind!r}: expected RequestResponse, Event or DryRun")
        log_type = headers.get("X-Amz-Log-Type", "None")
        if log_type not in ("None", "Tail"):
            raise invalid(f"Invalid LogType {log_type!r}: expected None or Tail")
        client_context = headers.get("X-Amz-Client-Context")
        if client_context is not None:
            client_context = _decode_client_context(client_context)
        limit = MAX_ASYNC_PAYLOAD if kind == "Event" else MAX_SYNC_PAYLOAD
        payload = await read_bounded(request, limit)
        if payload is None:
            raise LambdaError(
                413,
                "RequestTooLargeException",
                f"Request must be smaller than {limit} bytes for the InvokeFunction operation",
            )
        if payload:
            try:
                orjson.loads(payload)
            except orjson.JSONDecodeError as exc:
                raise LambdaError(
                    400, "InvalidRequestContentException", f"Could not parse request body into json: {exc}"
                ) from None
        else:
            payload = b"{}"
        if kind == "DryRun":
            return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
        if kind == "Event":
            if log_type == "Tail":
                raise invalid("LogType Tail is only supported for RequestResponse invocations")
            if self.asyncq is None:
                raise invalid("InvocationType Event is not available in cluster mode yet")
            await self.asyncq.accept(rec.name, payload, request_id)  # returns once durable
            return web.Response(status=202, headers={"x-amzn-RequestId": request_id})
        want_tail = log_type == "Tail"
        inv, outcome = await self.invoker.invoke(rec, payload, request_id, client_context, want_tail)
        out_headers = {
            "x-amzn-RequestId": request_id,
            "X-Amz-Executed-Version": "$LATEST",
            "Content-Type": "application/json",
        }
        if outcome.kind is not Outcome.OK:
            out_headers["X-Amz-Function-Error"] = "Unhandled"
        if want_tail:
            out_headers["X-Amz-Log-Result"] = tail_header(inv, int(rec.config["MemorySize"]))
        return web.Response(body=outcome.body, headers=out_headers)

    # ------------------------------------------------------------------ control plane

    async def create(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.create(await _body_json(request, "CreateFunction"))
        await self._changed(rec.name)
        return _json(self.control.configuration(rec), request_id, 201)

    async def list(self, request: web.Request, request_id: str) -> web.StreamResponse:
        q = request.query
        try:
            max_items = int(q.get("MaxItems", LIST_MAX_ITEMS))
        except ValueError:
            raise invalid("MaxItems must be an integer") from None
        if not 1 <= max_items <= 10000:
            raise invalid("MaxItems must be between 1 and 10000")
        max_items = min(max_items, LIST_MAX_ITEMS)
        names = sorted(self.control.functions)
        marker = q.get("Marker")
        start = 0
        if marker:
            try:
                after = base64.urlsafe_b64decode(marker.encode()).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise invalid("Invalid Marker") from None
            start = next((i for i, n in enumerate(names) if n > after), len(names))
        page = names[start : start + max_items]
        out: dict[str, Any] = {
            "Functions": [self.control.configuration(self.control.functions[n]) for n in page]
        }
        if start + max_items < len(names):
            out["NextMarker"] = base64.urlsafe_b64encode(page[-1].encode()).decode()
        return _json(out, request_id)

    async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"], request.query.get("Qualifier"))
        return _json(self.control.get_function(rec), request_id)

    async def get_configuration(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"], request.query.get("Qualifier"))
        return _json(self.control.configuration(rec), request_id)

    async def delete(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"], request.query.get("Qualifier"), "delete")
        self.control.delete(rec)
        await self._changed(rec.name)
        return web.Response(status=204, headers={"x-amzn-RequestId": request_id})

    async def update_configuration(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        rec = self.control.update_configuration(rec, await _body_json(request, "UpdateFunctionConfiguration"))
        await self._changed(rec.name)
        return _json(self.control.configuration(rec), request_id)

    async def update_code(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        rec = self.control.update_code(rec, await _body_json(request, "UpdateFunctionCode"))
        await self._changed(rec.name)
        return _json(self.control.configuration(rec), request_id)

    async def put_concurrency(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        value = self.control.put_concurrency(rec, await _body_json(request))
        await self._changed(rec.name)
        if self.asyncq is not None:
            self.asyncq.function_changed(rec.name, value)
        return _json({"ReservedConcurrentExecutions": value}, request_id)

    async def get_concurrency(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        body = (
            {}
            if rec.reserved_concurrency is None
            else {"ReservedConcurrentExecutions": rec.reserved_concurrency}
        )
        return _json(body, request_id)

    async def delete_concurrency(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        self.control.delete_concurrency(rec)
        await self._changed(rec.name)
        if self.asyncq is not None:
            self.asyncq.function_changed(rec.name, None)
        return web.Response(status=204, headers={"x-amzn-RequestId": request_id})

    async def account_settings(self, request: web.Request, request_id: str) -> web.StreamResponse:
        return _json(self.control.account_settings(), request_id)

    # ------------------------------------------------------------------ asynchronous invocation

    def _eic_function(self, request: web.Request):
        return self.control.resolve(request.match_info["name"], request.query.get("Qualifier"))

    async def put_event_config(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self._eic_function(request)
        return _json(self.control.put_event_config(rec, await _body_json(request), merge=False), request_id)

    async def update_event_config(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self._eic_function(request)
        return _json(self.control.put_event_config(rec, await _body_json(request), merge=True), request_id)

    async def get_event_config(self, request: web.Request, request_id: str) -> web.StreamResponse:
        try:
            rec = self._eic_function(request)
        except LambdaError as exc:  # Lambda names what has no config, whether or not the function exists
            if not exc.message.startswith("Function not found: "):
                raise
            arn = exc.message.removeprefix("Function not found: ")
            if arn.count(":") == 6:
                arn += ":$LATEST"
            raise LambdaError(
                404, "ResourceNotFoundException", f"The function {arn} doesn't have an EventInvokeConfig"
            ) from None
        return _json(self.control.event_config(rec), request_id)

    async def delete_event_config(self, request: web.Request, request_id: str) -> web.StreamResponse:
        self.control.delete_event_config(self._eic_function(request))
        return web.Response(status=204, headers={"x-amzn-RequestId": request_id})

    async def list_event_configs(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        configs = [self.control.event_config(rec)] if rec.name in self.control.event_configs else []
        return _json({"FunctionEventInvokeConfigs": configs}, request_id)

    async def queues(self, request: web.Request, request_id: str) -> web.StreamResponse:
        """Asynchronous queue depth, oldest event age, retries and drops, per function."""
        return _json(self.asyncq.stats() if self.asyncq else {}, request_id)

    async def code(self, request: web.Request, request_id: str) -> web.StreamResponse:
        rec = self.control.resolve(request.match_info["name"])
        if request.match_info["file"] != f"{rec.code_sha256}.zip":
            raise LambdaError(404, "ResourceNotFoundException", "code version not found")
        path: Path = self.control.store.zip_path(rec.code_sha256)
        return web.FileResponse(path, headers={"Content-Type": "application/zip"})

    async def unknown(self, request: web.Request, request_id: str) -> web.StreamResponse:
        raise LambdaError(
            404, "UnknownOperationException", f"Unknown operation {request.method} {request.path}"
        )

    async def health(self, request: web.Request) -> web.StreamResponse:
        body = {
            "status": "ok" if self.accepting else "stopping",
            "version": __version__,
            "functions": len(self.control.functions),
            **self.invoker.health(),
        }
        if self.asyncq is not None:
            body["async"] = self.asyncq.summary()
        return web.Response(body=orjson.dumps(body), content_type="application/json")


def _decode_client_context(value: str) -> str:
    """The caller sends base64 of a JSON object; the runtime receives the JSON itself."""
    if len(value) > MAX_CLIENT_CONTEXT:
        raise invalid(f"Client context must be at most {MAX_CLIENT_CONTEXT} bytes, base64-encoded")
    try:
        raw = base64.b64decode(value, validate=True)
        doc = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise invalid("Client context must be a valid Base64-encoded JSON object.") from None
    if not isinstance(doc, dict):
        raise invalid("Client context must be a valid Base64-encoded JSON object.")
    return raw.decode()
