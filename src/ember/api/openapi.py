"""An OpenAPI 3.1 description of ember's HTTP API: `ember openapi` prints it, GET /openapi.json
serves it. It describes every route Frontend.routes registers (tests/test_openapi.py fails when the
two drift apart, and fuzzes each operation with schemathesis).

Shapes follow botocore's `lambda` service model where ember implements Lambda's operations; only
the fields ember reads or returns are listed. A route added to the frontend needs an entry in
OPERATIONS below.
"""

from __future__ import annotations

from typing import Any

from ember import __version__
from ember.api.control import RUNTIMES

Json = dict[str, Any]

# Lambda's FunctionName pattern (botocore's model): a name, a partial or full ARN, with a qualifier.
FUNCTION_NAME_PATTERN = (
    r"^(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\d{1}:)?(\d{12}:)?(function:)?"
    r"([a-zA-Z0-9-_\.]+)(:(\$LATEST|[a-zA-Z0-9-_]+))?$"
)

_ERROR_TYPES = (
    "ResourceNotFoundException, InvalidParameterValueException, InvalidRequestContentException, "
    "RequestTooLargeException, RequestEntityTooLargeException, ResourceConflictException, "
    "PreconditionFailedException, TooManyRequestsException, UnknownOperationException, "
    "ServiceException; with --auth also MissingAuthenticationTokenException, "
    "IncompleteSignatureException, UnrecognizedClientException, InvalidSignatureException"
)


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: Json, required: bool = True) -> Json:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _ok(status: int, description: str, schema: Json | None = None) -> Json:
    out: Json = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return {str(status): out}


_ERRORS: Json = {
    "default": {
        "description": (
            "An error in Lambda's wire form: the `x-amzn-ErrorType` header names it "
            f"({_ERROR_TYPES}); 5xx only for ember's own faults."
        ),
        "headers": {"x-amzn-ErrorType": {"schema": {"type": "string"}}},
        "content": {"application/json": {"schema": _ref("Error")}},
    }
}

_NAME: Json = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A function name, a full or partial ARN, or NAME:$LATEST.",
    "example": "my-function",
    "schema": {"type": "string", "minLength": 1, "maxLength": 170, "pattern": FUNCTION_NAME_PATTERN},
}
_QUALIFIER: Json = {
    "name": "Qualifier",
    "in": "query",
    "required": False,
    "description": "Only $LATEST exists.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 128},
}


def _op(
    operation_id: str,
    summary: str,
    responses: Json,
    *,
    name: bool = False,
    qualifier: bool = False,
    params: list[Json] | None = None,
    body: Json | None = None,
    open_: bool = False,
) -> Json:
    op: Json = {"operationId": operation_id, "summary": summary}
    parameters = ([_NAME] if name else []) + ([_QUALIFIER] if qualifier else []) + (params or [])
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {**responses, **_ERRORS}
    if open_:
        op["security"] = []
    return op


_STR: Json = {"type": "string"}


def _header(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "header", "required": False, "schema": schema, "description": description}


_INVOKE = _op(
    "Invoke",
    "Invoke a function (RequestResponse, Event or DryRun).",
    {
        **_ok(200, "The function's response (a function error adds X-Amz-Function-Error).", {}),
        **_ok(202, "Event: queued for asynchronous invocation."),
        **_ok(204, "DryRun: the caller may invoke the function."),
    },
    name=True,
    qualifier=True,
    params=[
        _header(
            "X-Amz-Invocation-Type",
            {"type": "string", "enum": ["RequestResponse", "Event", "DryRun"]},
            "How to invoke; RequestResponse when absent.",
        ),
        _header("X-Amz-Log-Type", {"type": "string", "enum": ["None", "Tail"]}, "Tail: last 4 KB of log."),
        _header(
            "X-Amz-Client-Context",
            {"type": "string", "maxLength": 3583},
            "Base64 of a JSON object, handed to the function.",
        ),
    ],
    body=_json_body({"description": "The event: any JSON document (at most 6 MB)."}, required=False),
)

_CREATE = _op(
    "CreateFunction",
    "Create a function from a zip (Code.ZipFile).",
    _ok(201, "The function's configuration.", _ref("FunctionConfiguration")),
    body=_json_body(_ref("CreateFunctionRequest")),
)
_LIST = _op(
    "ListFunctions",
    "List functions, at most 50 a page.",
    _ok(200, "A page of functions.", _ref("ListFunctionsResponse")),
    params=[
        {"name": "Marker", "in": "query", "required": False, "schema": {"type": "string"}},
        {
            "name": "MaxItems",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
        },
    ],
)
_ACCOUNT = _op(
    "GetAccountSettings",
    "Account limits and usage.",
    _ok(200, "Limits and usage.", _ref("AccountSettings")),
)
_EIC_BODY = _json_body(_ref("FunctionEventInvokeConfigRequest"))

OPERATIONS: dict[str, dict[str, Json]] = {
    "/2015-03-31/functions": {"post": _CREATE, "get": _LIST},
    "/2015-03-31/functions/": {
        "post": {**_CREATE, "operationId": "CreateFunctionSlash"},
        "get": {**_LIST, "operationId": "ListFunctionsSlash"},
    },
    "/2015-03-31/functions/{name}": {
        "get": _op(
            "GetFunction",
            "A function's configuration, code location and concurrency.",
            _ok(200, "The function.", _ref("GetFunctionResponse")),
            name=True,
            qualifier=True,
        ),
        "delete": _op(
            "DeleteFunction",
            "Delete a function.",
            _ok(204, "Deleted."),
            name=True,
            qualifier=True,
        ),
    },
    "/2015-03-31/functions/{name}/configuration": {
        "get": _op(
            "GetFunctionConfiguration",
            "A function's configuration.",
            _ok(200, "The configuration.", _ref("FunctionConfiguration")),
            name=True,
            qualifier=True,
        ),
        "put": _op(
            "UpdateFunctionConfiguration",
            "Change a function's configuration.",
            _ok(200, "The new configuration.", _ref("FunctionConfiguration")),
            name=True,
            body=_json_body(_ref("UpdateFunctionConfigurationRequest")),
        ),
    },
    "/2015-03-31/functions/{name}/code": {
        "put": _op(
            "UpdateFunctionCode",
            "Replace a function's code.",
            _ok(200, "The new configuration.", _ref("FunctionConfiguration")),
            name=True,
            body=_json_body(_ref("UpdateFunctionCodeRequest")),
        ),
    },
    "/2015-03-31/functions/{name}/invocations": {"post": _INVOKE},
    "/2017-10-31/functions/{name}/concurrency": {
        "put": _op(
            "PutFunctionConcurrency",
            "Reserve concurrency for a function.",
            _ok(200, "The reservation.", _ref("Concurrency")),
            name=True,
            body=_json_body(_ref("Concurrency")),
        ),
        "delete": _op(
            "DeleteFunctionConcurrency",
            "Remove a function's reservation.",
            _ok(204, "Removed."),
            name=True,
        ),
    },
    "/2019-09-30/functions/{name}/concurrency": {
        "get": _op(
            "GetFunctionConcurrency",
            "A function's reservation.",
            _ok(200, "The reservation ({} when none).", _ref("Concurrency")),
            name=True,
        ),
    },
    "/2016-08-19/account-settings": {"get": _ACCOUNT},
    "/2016-08-19/account-settings/": {"get": {**_ACCOUNT, "operationId": "GetAccountSettingsSlash"}},
    "/2019-09-25/functions/{name}/event-invoke-config": {
        "put": _op(
            "PutFunctionEventInvokeConfig",
            "Set the retry and age limits and destinations of asynchronous invokes.",
            _ok(200, "The configuration.", _ref("FunctionEventInvokeConfig")),
            name=True,
            qualifier=True,
            body=_EIC_BODY,
        ),
        "post": _op(
            "UpdateFunctionEventInvokeConfig",
            "Change some of the asynchronous invoke configuration.",
            _ok(200, "The configuration.", _ref("FunctionEventInvokeConfig")),
            name=True,
            qualifier=True,
            body=_EIC_BODY,
        ),
        "get": _op(
            "GetFunctionEventInvokeConfig",
            "The asynchronous invoke configuration.",
            _ok(200, "The configuration.", _ref("FunctionEventInvokeConfig")),
            name=True,
            qualifier=True,
        ),
        "delete": _op(
            "DeleteFunctionEventInvokeConfig",
            "Remove the asynchronous invoke configuration.",
            _ok(204, "Removed."),
            name=True,
            qualifier=True,
        ),
    },
    "/2019-09-25/functions/{name}/event-invoke-config/list": {
        "get": _op(
            "ListFunctionEventInvokeConfigs",
            "The function's asynchronous invoke configurations.",
            _ok(200, "The configurations.", {"type": "object"}),
            name=True,
        ),
    },
    "/_ember/queues": {
        "get": _op(
            "EmberQueues",
            "ember: asynchronous queue depth, oldest event age, retries and drops per function.",
            _ok(200, "Per function.", {"type": "object"}),
        ),
    },
    "/_ember/code/{name}/{file}": {
        "get": _op(
            "EmberCode",
            "ember: a function's zip, at the URL GetFunction returns as Code.Location.",
            {"200": {"description": "The zip.", "content": {"application/zip": {}}}},
            name=True,
            params=[{"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
            open_=True,
        ),
    },
    "/metrics": {
        "get": _op(
            "EmberMetrics",
            "ember: Prometheus metrics (text exposition format).",
            {"200": {"description": "Metrics.", "content": {"text/plain": {}}}},
        ),
    },
    "/_ember/stats": {
        "get": _op(
            "EmberStats",
            "ember: functions, sandboxes and account figures behind `ember top` and the dashboard.",
            _ok(200, "Stats.", {"type": "object"}),
            params=[
                {
                    "name": "window",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 1},
                },
                {
                    "name": "series",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["0", "1"]},
                },
            ],
        ),
    },
    "/_ember/logs/{name}": {
        "get": _op(
            "EmberFunctionLogs",
            "ember: a function's log events, JSON lines, oldest first (follow=1 keeps streaming).",
            {"200": {"description": "Log events.", "content": {"application/x-ndjson": {}}}},
            name=True,
            params=[
                {
                    "name": "since",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 0, "maximum": 100000},
                },
                {"name": "stream", "in": "query", "required": False, "schema": _STR},
                {
                    "name": "follow",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["0", "1"]},
                },
            ],
        ),
    },
    "/_ember/logs/{name}/streams": {
        "get": _op(
            "EmberLogStreams",
            "ember: a function's log streams.",
            _ok(200, "Streams.", {"type": "object"}),
            name=True,
        ),
    },
    "/dashboard": {
        "get": _op(
            "EmberDashboardRedirect", "ember: redirects to /dashboard/.", {"302": {"description": "Moved."}}
        ),
    },
    "/dashboard/": {
        "get": _op("EmberDashboard", "ember: the web dashboard.", {"200": {"description": "HTML."}}),
    },
    "/dashboard/{file}": {
        "get": _op(
            "EmberDashboardFile",
            "ember: the dashboard's static files.",
            {"200": {"description": "A static file."}},
            params=[{"name": "file", "in": "path", "required": True, "schema": _STR}],
        ),
    },
    "/health": {
        "get": {
            "operationId": "EmberHealth",
            "summary": "ember: liveness, functions, sandboxes, cold and warm starts.",
            "security": [],
            "responses": _ok(200, "Health.", {"type": "object"}),
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "EmberOpenAPI",
            "summary": "ember: this document.",
            "security": [],
            "responses": _ok(200, "OpenAPI 3.1.", {"type": "object"}),
        }
    },
}

_ENV: Json = {
    "type": "object",
    "properties": {"Variables": {"type": "object", "additionalProperties": {"type": "string"}}},
}
_CONFIG_FIELDS: Json = {
    "Runtime": {"type": "string", "enum": list(RUNTIMES)},
    "Role": {"type": "string", "minLength": 1},
    "Handler": {"type": "string", "minLength": 1, "maxLength": 128},
    "Description": {"type": "string", "maxLength": 256},
    "Timeout": {"type": "integer", "minimum": 1, "maximum": 900},
    "MemorySize": {"type": "integer", "minimum": 128, "maximum": 10240},
    "Environment": _ENV,
    "Architectures": {"type": "array", "items": {"type": "string", "enum": ["x86_64", "arm64"]}},
}
_ZIP: Json = {"type": "string", "format": "byte", "description": "The zip, base64-encoded (at most 50 MB)."}

SCHEMAS: Json = {
    "Error": {
        "type": "object",
        "properties": {"Type": _STR, "Message": _STR, "message": _STR, "Reason": _STR},
    },
    "FunctionConfiguration": {
        "type": "object",
        "properties": {
            "FunctionName": _STR,
            "FunctionArn": _STR,
            **_CONFIG_FIELDS,
            "CodeSize": {"type": "integer"},
            "CodeSha256": _STR,
            "LastModified": _STR,
            "Version": _STR,
            "RevisionId": _STR,
            "State": _STR,
            "LastUpdateStatus": _STR,
            "PackageType": _STR,
        },
    },
    "CreateFunctionRequest": {
        "type": "object",
        "required": ["FunctionName", "Role", "Code"],
        "properties": {
            "FunctionName": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            **_CONFIG_FIELDS,
            "PackageType": {"type": "string", "enum": ["Zip"]},
            "Code": {"type": "object", "required": ["ZipFile"], "properties": {"ZipFile": _ZIP}},
        },
    },
    "UpdateFunctionConfigurationRequest": {
        "type": "object",
        "properties": {**_CONFIG_FIELDS, "RevisionId": _STR},
    },
    "UpdateFunctionCodeRequest": {
        "type": "object",
        "properties": {"ZipFile": _ZIP, "DryRun": {"type": "boolean"}, "RevisionId": _STR},
    },
    "GetFunctionResponse": {
        "type": "object",
        "properties": {
            "Configuration": _ref("FunctionConfiguration"),
            "Code": {"type": "object", "properties": {"RepositoryType": _STR, "Location": _STR}},
            "Concurrency": _ref("Concurrency"),
        },
    },
    "ListFunctionsResponse": {
        "type": "object",
        "properties": {
            "Functions": {"type": "array", "items": _ref("FunctionConfiguration")},
            "NextMarker": _STR,
        },
    },
    "Concurrency": {
        "type": "object",
        "properties": {"ReservedConcurrentExecutions": {"type": "integer", "minimum": 0}},
    },
    "AccountSettings": {
        "type": "object",
        "properties": {"AccountLimit": {"type": "object"}, "AccountUsage": {"type": "object"}},
    },
    "FunctionEventInvokeConfigRequest": {
        "type": "object",
        "properties": {
            "MaximumRetryAttempts": {"type": "integer", "minimum": 0, "maximum": 2},
            "MaximumEventAgeInSeconds": {"type": "integer", "minimum": 60, "maximum": 21600},
            "DestinationConfig": {
                "type": "object",
                "properties": {
                    "OnSuccess": {"type": "object", "properties": {"Destination": _STR}},
                    "OnFailure": {"type": "object", "properties": {"Destination": _STR}},
                },
            },
        },
    },
    "FunctionEventInvokeConfig": {
        "type": "object",
        "properties": {
            "FunctionArn": _STR,
            "LastModified": {"type": "number"},
            "MaximumRetryAttempts": {"type": "integer"},
            "MaximumEventAgeInSeconds": {"type": "integer"},
            "DestinationConfig": {"type": "object"},
        },
    },
}


def document(server_url: str | None = None) -> Json:
    """The OpenAPI document (a fresh dict each call)."""
    import copy

    doc: Json = {
        "openapi": "3.1.0",
        "info": {
            "title": "ember",
            "version": __version__,
            "description": (
                "Lambda-compatible functions on your own machines: Lambda's REST API as botocore's "
                "`lambda` service model describes it, plus ember's own routes (/health, "
                "/openapi.json, /_ember/...). With `ember serve --auth FILE` every route but "
                "/health, /openapi.json and /_ember/code/... needs an AWS SigV4 signature "
                "(service `lambda`)."
            ),
        },
        "paths": copy.deepcopy(OPERATIONS),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {
                "sigv4": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "AWS Signature Version 4 (AWS4-HMAC-SHA256, service lambda); "
                    "enforced only when ember runs with --auth.",
                }
            },
        },
        "security": [{"sigv4": []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc


async def handler(request: Any) -> Any:
    """GET /openapi.json (open even with --auth)."""
    import orjson
    from aiohttp import web

    return web.Response(body=orjson.dumps(document()), content_type="application/json")
