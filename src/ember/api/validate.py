"""Request validation as Lambda answers it.

Lambda checks a request against its model before anything else and answers one
`ValidationException` listing every member that fails ("1 validation error detected: Value '...' at
'member' failed to satisfy constraint: ...", or "N validation errors detected: A; B"). Some members
(function name length on create, runtime) answer `InvalidParameterValueException` instead; the
constraint texts and the exception each member answers are Lambda's, as recorded from real AWS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ember.api.errors import LambdaError

# The patterns Lambda quotes in its messages (they are also what it checks, as a full match).
NAMESPACED_NAME_PATTERN = (
    r"(arn:(aws[a-zA-Z-]*)?:lambda:)?((eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?(\d{12}:)?"
    r"(function:)?([a-zA-Z0-9-_\.]+)(:(\$LATEST(\.PUBLISHED)?|[a-zA-Z0-9-_]+))?"
)
CREATE_NAME_PATTERN = (
    r"(arn:(aws[a-zA-Z-]*)?:lambda:)?((eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?(\d{12}:)?"
    r"(function:)?([a-zA-Z0-9-_]+)(:(\$LATEST|[a-zA-Z0-9-_]+))?"
)
QUALIFIER_PATTERN = r"\$(LATEST(\.PUBLISHED)?)|[a-zA-Z0-9-_$]+"
ROLE_PATTERN = r"arn:(aws[a-zA-Z-]*)?:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+"
HANDLER_PATTERN = r"[^\s]+"
ENV_NAME_RE = re.compile(r"[a-zA-Z]([a-zA-Z0-9_])*")
ARCHITECTURES = ("x86_64", "arm64")

_NAMESPACED = re.compile(NAMESPACED_NAME_PATTERN)
_CREATE = re.compile(CREATE_NAME_PATTERN)
_QUALIFIER = re.compile(QUALIFIER_PATTERN)
_ROLE = re.compile(ROLE_PATTERN)
_HANDLER = re.compile(HANDLER_PATTERN)
_REGION = re.compile(r"(eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}")

# The enum Lambda quotes when a runtime is unknown (its order is Lambda's).
RUNTIME_ENUM = (
    "nodejs20.x, python3.14, provided.al2023, python3.12, python3.13, nodejs24.x, nodejs22.x, java25, "
    "python3.10, python3.11, java21, ruby3.3, ruby3.4, ruby3.2, python3.8, python3.9, java17, nodejs16.x, "
    "dotnet10, dotnet8, java11, dotnet6, nodejs18.x, provided.al2, java8.al2"
)
# Runtimes Lambda no longer lets anyone create or update a function with.
DEPRECATED_RUNTIMES = frozenset(
    {
        "nodejs", "nodejs4.3", "nodejs4.3-edge", "nodejs6.10", "nodejs8.10", "nodejs10.x", "nodejs12.x",
        "nodejs14.x", "java8", "python2.7", "python3.6", "python3.7", "dotnetcore1.0", "dotnetcore2.0",
        "dotnetcore2.1", "dotnetcore3.1", "go1.x", "ruby2.5", "ruby2.7",
    }
)  # fmt: skip

FULL_MATCH = "Member must satisfy regular expression pattern: "


def _render(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


@dataclass(slots=True)
class Problem:
    value: Any
    member: str
    constraint: str

    def text(self) -> str:
        return f"Value '{_render(self.value)}' at '{self.member}' failed to satisfy constraint: {self.constraint}"


class Problems:
    """Collects the members that fail, in the order Lambda lists them."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, value: Any, member: str, constraint: str) -> None:
        self.items.append(Problem(value, member, constraint))

    def raise_if_any(self, error_type: str = "ValidationException") -> None:
        if self.items:
            raise validation_error(self.items, error_type)


def validation_error(items: list[Problem], error_type: str = "ValidationException") -> LambdaError:
    n = len(items)
    head = f"{n} validation error{'s' if n != 1 else ''} detected: "
    message = head + "; ".join(p.text() for p in items)
    return LambdaError(400, error_type, message)


def one(value: Any, member: str, constraint: str, error_type: str = "ValidationException") -> LambdaError:
    return validation_error([Problem(value, member, constraint)], error_type)


def max_length(n: int) -> str:
    return f"Member must have length less than or equal to {n}"


def int_range(value: Any, member: str, low: int, high: int, problems: Problems) -> None:
    """The model's bounds (Lambda's request validation)."""
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(value, member, "Member must not be null")  # boto3 never sends a non-integer
    elif value < low:
        problems.add(value, member, f"Member must have value greater than or equal to {low}")
    elif value > high:
        problems.add(value, member, f"Member must have value less than or equal to {high}")


def check_limit(value: Any, name: str, limit: int) -> None:
    """The service's own limit, tighter than the model's (MemorySize 10240, Timeout 900): Lambda
    answers it in its other form, without the count and with the member's name quoted."""
    if isinstance(value, int) and value > limit:
        raise LambdaError(
            400,
            "ValidationException",
            f"'{name}' value failed to satisfy constraint: Member must have value less than or equal to {limit}",
        )


@dataclass(slots=True)
class FunctionRef:
    """A function name as a caller wrote it, taken apart: the name, and the qualifier if any; region
    and account when the caller gave an ARN."""

    name: str
    qualifier: str | None
    region: str | None
    account: str | None


def parse_ref(raw: str) -> FunctionRef:
    """Split a name that matched Lambda's pattern: NAME, NAME:QUAL, ACCOUNT:function:NAME[:QUAL],
    function:NAME[:QUAL], REGION:ACCOUNT:function:NAME[:QUAL] or arn:PARTITION:lambda:...."""
    parts = raw.split(":")
    region = account = None
    if parts[0] == "arn":
        parts = parts[3:]  # arn, partition, lambda
        if parts and _REGION.fullmatch(parts[0]):
            region, parts = parts[0], parts[1:]
    elif len(parts) > 1 and _REGION.fullmatch(parts[0]) and len(parts) >= 3:
        region, parts = parts[0], parts[1:]
    if len(parts) > 1 and re.fullmatch(r"\d{12}", parts[0]):
        account, parts = parts[0], parts[1:]
    if len(parts) > 1 and parts[0] == "function":
        parts = parts[1:]
    name = parts[0]
    qualifier = parts[1] if len(parts) > 1 else None
    return FunctionRef(name, qualifier, region, account)


def check_ref(raw: Any, qualifier: str | None) -> FunctionRef:
    """GetFunction, DeleteFunction, Invoke and the other operations on an existing function: the
    qualifier's constraints first, then the function name's, all in one answer."""
    problems = Problems()
    if qualifier is not None:
        if len(qualifier) > 128:
            problems.add(qualifier, "qualifier", max_length(128))
        elif not _QUALIFIER.fullmatch(qualifier):
            problems.add(qualifier, "qualifier", FULL_MATCH + QUALIFIER_PATTERN)
    if not isinstance(raw, str) or not raw:
        problems.add(raw, "functionName", "Member must have length greater than or equal to 1")
    elif len(raw) > 256:
        problems.add(raw, "functionName", max_length(256))
    elif not _NAMESPACED.fullmatch(raw):
        problems.add(raw, "functionName", FULL_MATCH + NAMESPACED_NAME_PATTERN)
    problems.raise_if_any()
    assert isinstance(raw, str)
    return parse_ref(raw)


def check_create_name(raw: Any) -> FunctionRef:
    """CreateFunction's FunctionName: length 140 and the pattern (both reported), then the name
    itself at most 64 characters (InvalidParameterValueException)."""
    problems = Problems()
    if not isinstance(raw, str) or not raw:
        problems.add(raw, "functionName", "Member must not be null")
        problems.raise_if_any()
    assert isinstance(raw, str)
    if len(raw) > 140:
        problems.add(raw, "functionName", max_length(140))
    if not _CREATE.fullmatch(raw):
        problems.add(raw, "functionName", FULL_MATCH + CREATE_NAME_PATTERN)
    problems.raise_if_any()
    ref = parse_ref(raw)
    if len(ref.name) > 64:
        raise one(raw, "functionName", max_length(64), "InvalidParameterValueException")
    return ref


def check_role(role: Any, problems: Problems) -> None:
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        problems.add(role, "role", FULL_MATCH + ROLE_PATTERN)


def check_handler(handler: Any, problems: Problems) -> None:
    if not isinstance(handler, str):
        problems.add(handler, "handler", FULL_MATCH + HANDLER_PATTERN)
    elif len(handler) > 128:
        problems.add(handler, "handler", max_length(128))
    elif not _HANDLER.fullmatch(handler):
        problems.add(handler, "handler", FULL_MATCH + HANDLER_PATTERN)


def check_description(desc: Any, problems: Problems) -> None:
    if not isinstance(desc, str) or len(desc) > 256:
        problems.add(desc, "description", max_length(256))


def check_architectures(arch: Any, problems: Problems) -> None:
    if not isinstance(arch, list) or not arch:
        problems.add(arch, "architectures", "Member must have length greater than or equal to 1")
    elif len(arch) > 1:
        problems.add(arch, "architectures", max_length(1))
    elif arch[0] not in ARCHITECTURES:
        problems.add(
            arch,
            "architectures",
            "Member must satisfy constraint: [Member must satisfy enum value set: [x86_64, arm64], "
            "Member must not be null]",
        )


def runtime_error(runtime: Any) -> LambdaError:
    return LambdaError(
        400,
        "InvalidParameterValueException",
        f"Value {runtime} at 'runtime' failed to satisfy constraint: Member must satisfy enum value set: "
        f"[{RUNTIME_ENUM}] or be a valid ARN",
    )


def deprecated_runtime_error(runtime: str) -> LambdaError:
    return LambdaError(
        400,
        "InvalidParameterValueException",
        f"The runtime parameter of {runtime} is no longer supported for creating or updating AWS Lambda "
        "functions. We recommend you use a supported runtime while creating or updating functions.",
    )


# Every runtime Lambda's enum names (botocore's model): one outside it is answered with RUNTIME_ENUM.
KNOWN_RUNTIMES = frozenset(
    {
        "nodejs", "nodejs4.3", "nodejs6.10", "nodejs8.10", "nodejs10.x", "nodejs12.x", "nodejs14.x",
        "nodejs16.x", "nodejs18.x", "nodejs20.x", "nodejs22.x", "nodejs24.x", "java8", "java8.al2", "java11",
        "java17", "java21", "java25", "python2.7", "python3.6", "python3.7", "python3.8", "python3.9",
        "python3.10", "python3.11", "python3.12", "python3.13", "python3.14", "dotnetcore1.0",
        "dotnetcore2.0", "dotnetcore2.1", "dotnetcore3.1", "dotnet6", "dotnet8", "dotnet10",
        "nodejs4.3-edge", "go1.x", "ruby2.5", "ruby2.7", "ruby3.2", "ruby3.3", "ruby3.4", "provided",
        "provided.al2", "provided.al2023",
    }
)  # fmt: skip


APPLICATION_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
SYSTEM_LOG_LEVELS = ("DEBUG", "INFO", "WARN")


def check_logging(logging: Any, problems: Problems) -> None:
    if not isinstance(logging, dict):
        problems.add(logging, "loggingConfig", "Member must not be null")
        return
    enums = (
        ("LogFormat", "logFormat", ("JSON", "Text")),
        ("ApplicationLogLevel", "applicationLogLevel", APPLICATION_LOG_LEVELS),
        ("SystemLogLevel", "systemLogLevel", SYSTEM_LOG_LEVELS),
    )
    for key, member, allowed in enums:
        if key in logging and logging[key] not in allowed:
            problems.add(
                logging[key], f"loggingConfig.{member}", f"Member must satisfy enum value set: [{', '.join(allowed)}]"
            )
    group = logging.get("LogGroup")
    if group is not None and (not isinstance(group, str) or not re.fullmatch(r"[\.\-_/#A-Za-z0-9]+", group)):
        problems.add(group, "loggingConfig.logGroup", FULL_MATCH + r"[\.\-_/#A-Za-z0-9]+")
    elif isinstance(group, str) and len(group) > 512:
        problems.add(group, "loggingConfig.logGroup", max_length(512))


def merge_logging(current: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """LoggingConfig as Lambda keeps it: members not sent stay; JSON brings INFO levels by default;
    Text has no levels. Only what differs from the defaults is stored (LogFormat Text, the
    function's own log group)."""
    merged = {**current, **{k: v for k, v in update.items() if v is not None}}
    if merged.get("LogFormat", "Text") == "JSON":
        merged.setdefault("ApplicationLogLevel", "INFO")
        merged.setdefault("SystemLogLevel", "INFO")
    else:
        merged.pop("ApplicationLogLevel", None)
        merged.pop("SystemLogLevel", None)
    return merged
