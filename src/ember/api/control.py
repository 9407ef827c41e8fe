"""The control plane: function definitions in Lambda's shapes, validated, stored, and published to
its listeners (the single node's invoker, which moves the core to a new generation per change, so no
invoke reaches old code once an update has returned).

The invoke path never touches SQLite: it reads `functions`, kept in memory and written through.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from ember.api import validate
from ember.api.credentials import RoleCredentials
from ember.api.errors import LambdaError, conflict, invalid, not_found
from ember.core.assignment import reservation_error
from ember.core.eventqueue import DEFAULT_MAX_AGE_S, DEFAULT_MAX_RETRIES, RetryPolicy
from ember.options import ServeOptions
from ember.sandbox import runtimes
from ember.sandbox.process import LaunchSpec
from ember.store import FunctionRecord, Store, now_iso

PYTHON_RUNTIMES = ("python3.9", "python3.10", "python3.11", "python3.12", "python3.13")
NODE_RUNTIMES = runtimes.NODE_RUNTIMES
PROVIDED_RUNTIMES = ("provided", "provided.al2", "provided.al2023")
RUNTIMES = PYTHON_RUNTIMES + NODE_RUNTIMES + PROVIDED_RUNTIMES
RESERVED_ENV = frozenset(
    {
        "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
    }
)  # fmt: skip
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ENV_BYTES = 4096
MAX_MEMORY_MB = 10240
MAX_TIMEOUT_S = 900
MAX_ZIP_BYTES = 50 * 1024 * 1024  # Lambda's limit for a direct upload


# How long a change stays in Lambda's transitional states (Pending after CreateFunction, InProgress
# after an update) before it settles; EMBER_SETTLE_S sets it (tests lengthen it).
SETTLE_S = float(os.environ.get("EMBER_SETTLE_S", "0.1"))
CREATING = "The function is being created."


@dataclass(slots=True)
class Settings:
    region: str = "us-east-1"
    account_id: str = "000000000000"
    endpoint: str = "http://127.0.0.1:9000"
    settle_s: float = field(default_factory=lambda: SETTLE_S)
    role_credentials: RoleCredentials | None = None  # what a function's role gets (ember.api.credentials)

    @classmethod
    def of(cls, opts: ServeOptions) -> Settings:
        """The settings `ember serve` (or a cluster role) was given."""
        creds = None
        if opts.role_credentials is not None or opts.pass_credentials:
            creds = RoleCredentials(opts.role_credentials, opts.pass_credentials)
        return cls(region=opts.region, endpoint=f"http://{opts.host}:{opts.port}", role_credentials=creds)


class FunctionListener(Protocol):
    """Told every change, synchronously, before the API call that made it returns."""

    def function_put(self, rec: FunctionRecord) -> None: ...
    def function_deleted(self, name: str) -> None: ...


class ControlPlane:
    def __init__(self, store: Store, settings: Settings, account_limit: int = 1000) -> None:
        self.store = store
        self.settings = settings
        self.account_limit = account_limit
        self.listeners: list[FunctionListener] = []
        self.functions: dict[str, FunctionRecord] = {}
        self.event_configs: dict[str, tuple[dict[str, Any], float]] = store.load_event_configs()
        # name -> (monotonic time it settles, "create" or "update"); in memory only: a restarted
        # ember, or another cluster process, sees every function settled
        self.transitions: dict[str, tuple[float, str]] = {}
        for rec in store.load_all():
            self._publish(rec)
        store.gc_code({r.code_sha256 for r in self.functions.values()})

    def subscribe(self, listener: FunctionListener) -> None:
        """Add a listener; it hears every function there is now, then every change."""
        self.listeners.append(listener)
        for rec in self.functions.values():
            listener.function_put(rec)

    @property
    def reserved_total(self) -> int:
        return sum(r.reserved_concurrency or 0 for r in self.functions.values())

    # ------------------------------------------------------------------ names

    def arn(self, name: str) -> str:
        s = self.settings
        return f"arn:aws:lambda:{s.region}:{s.account_id}:function:{name}"

    def resolve(self, raw: str, qualifier: str | None = None, op: str = "get") -> FunctionRecord:
        """A function by name, full ARN, partial ARN (ACCOUNT:function:NAME) or NAME:QUALIFIER, checked
        as Lambda checks it. Only $LATEST exists (no versions or aliases yet). `op` words the answers
        as Lambda words them for that operation ("get", "invoke", "delete")."""
        ref = validate.check_ref(raw, qualifier)
        s = self.settings
        if ref.region is not None and ref.region != s.region:
            raise LambdaError(
                404,
                "ResourceNotFoundException",
                f"Functions from '{ref.region}' are not reachable in this region ('{s.region}')",
            )
        if ref.account is not None and ref.account != s.account_id:
            raise LambdaError(403, "AccessDeniedException", "")
        qual = ref.qualifier
        if qualifier is not None:
            if qual is not None and qual != qualifier:
                raise invalid(
                    "The derived qualifier from the function name does not match the specified qualifier."
                )
            qual = qualifier
        base = self.arn(ref.name)
        if op == "delete" and qual is not None and qual != "$LATEST":
            if "$" in qual:  # "$latest": Lambda names the function itself
                raise not_found("Function", ref.name, base)
            if not qual.isdigit():
                raise invalid("Deletion of aliases is not currently supported.")
        rec = self.functions.get(ref.name)
        if rec is None or (qual is not None and qual != "$LATEST"):
            if qual is not None and not (op == "delete" and qual == "$LATEST"):
                base += f":{qual}"
            elif op == "invoke":
                base += ":$LATEST"
            raise not_found("Function", ref.name, base)
        return rec

    # ------------------------------------------------------------------ states

    def _transition(self, name: str) -> str | None:
        """"create" while a new function is Pending, "update" while an update is InProgress, else None."""
        found = self.transitions.get(name)
        if found is None:
            return None
        until, kind = found
        if time.monotonic() >= until:
            del self.transitions[name]
            return None
        return kind

    def pending_for(self, name: str) -> float:
        """Seconds until a function just created becomes Active (0 once it is)."""
        if self._transition(name) != "create":
            return 0.0
        return max(0.0, self.transitions[name][0] - time.monotonic())

    def revision_id(self, rec: FunctionRecord) -> str:
        """The RevisionId callers see: a transitional one until the change settles, then the stored
        one (so it changes when a function settles, as Lambda's does)."""
        if self._transition(rec.name) is None:
            return rec.revision_id
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{rec.revision_id}/transition"))

    def _begin(self, name: str, kind: str) -> None:
        if self.settings.settle_s > 0:
            self.transitions[name] = (time.monotonic() + self.settings.settle_s, kind)

    def _check_settled(self, rec: FunctionRecord) -> None:
        """Lambda refuses a change while the previous one is still being applied."""
        kind = self._transition(rec.name)
        if kind == "update":
            raise conflict(
                "The operation cannot be performed at this time. An update is in progress for resource: "
                f"{self.arn(rec.name)}"
            )
        if kind == "create":
            raise conflict(
                "The operation cannot be performed at this time. The function is currently in the "
                "following state: Pending"
            )

    # ------------------------------------------------------------------ shapes

    def configuration(self, rec: FunctionRecord) -> dict[str, Any]:
        """FunctionConfiguration with every member Lambda returns for a Zip function."""
        c = rec.config
        region = self.settings.region
        runtime = c["Runtime"]
        out: dict[str, Any] = {
            "FunctionName": rec.name,
            "FunctionArn": self.arn(rec.name),
            "Runtime": runtime,
            "Role": c["Role"],
            "Handler": c.get("Handler", ""),
            "CodeSize": rec.code_size,
            "Description": c.get("Description", ""),
            "Timeout": c["Timeout"],
            "MemorySize": c["MemorySize"],
            "LastModified": rec.last_modified,
            "CodeSha256": rec.code_sha256_b64,
            "Version": "$LATEST",
            "TracingConfig": {"Mode": c.get("TracingConfig", {}).get("Mode", "PassThrough")},
            "RevisionId": self.revision_id(rec),
            "PackageType": "Zip",
            "Architectures": c.get("Architectures", ["x86_64"]),
            "EphemeralStorage": {"Size": c.get("EphemeralStorage", {}).get("Size", 512)},
            "SnapStart": {"ApplyOn": c.get("SnapStart", {}).get("ApplyOn", "None"), "OptimizationStatus": "Off"},
            "RuntimeVersionConfig": {
                "RuntimeVersionArn": f"arn:aws:lambda:{region}::runtime:"
                + hashlib.sha256(runtime.encode()).hexdigest()
            },
            "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{rec.name}", **c.get("LoggingConfig", {})},
        }
        kind = self._transition(rec.name)
        if kind == "create":
            out.update(State="Pending", StateReason=CREATING, StateReasonCode="Creating")
        elif kind == "update":
            out.update(
                State="Active",
                LastUpdateStatus="InProgress",
                LastUpdateStatusReason=CREATING,
                LastUpdateStatusReasonCode="Creating",
            )
        else:
            out.update(State="Active", LastUpdateStatus="Successful")
        if "Environment" in c:
            out["Environment"] = {"Variables": c["Environment"]}
        if c.get("DeadLetterConfig"):
            out["DeadLetterConfig"] = c["DeadLetterConfig"]
        return out

    def get_function(self, rec: FunctionRecord) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Configuration": self.configuration(rec),
            "Code": {
                "RepositoryType": "S3",
                "Location": f"{self.settings.endpoint}/_ember/code/{rec.name}/{rec.code_sha256}.zip",
            },
        }
        if rec.reserved_concurrency is not None:
            out["Concurrency"] = {"ReservedConcurrentExecutions": rec.reserved_concurrency}
        return out

    # ------------------------------------------------------------------ operations

    def create(self, body: dict[str, Any]) -> FunctionRecord:
        ref = validate.check_create_name(body.get("FunctionName"))
        s = self.settings
        if ref.region is not None and ref.region != s.region:
            raise LambdaError(
                404,
                "ResourceNotFoundException",
                f"Functions from '{ref.region}' are not reachable in this region ('{s.region}')",
            )
        if ref.account is not None and ref.account != s.account_id:
            raise LambdaError(403, "AccessDeniedException", "")
        name = ref.name
        problems = validate.Problems()
        validate.check_role(body.get("Role"), problems)
        problems.raise_if_any()
        if body.get("PackageType", "Zip") != "Zip":
            raise invalid("ember runs Zip packages only (PackageType Image is not supported)")
        config: dict[str, Any] = {"Role": body["Role"], "MemorySize": 128, "Timeout": 3, "Description": ""}
        if "Runtime" not in body:
            raise invalid("Runtime is required for a Zip package")
        self._apply_config(config, body, creating=True)
        if name in self.functions:
            raise conflict(f"Function already exist: {name}")
        code = body.get("Code")
        if not isinstance(code, dict):
            raise invalid("Code is required")
        sha, size = self._store_code(code)
        rec = FunctionRecord(name, config, sha, size, 1, str(uuid.uuid4()), now_iso(), None)
        self.store.insert(rec)
        self._publish(rec)
        self._begin(name, "create")
        return rec

    def update_configuration(self, rec: FunctionRecord, body: dict[str, Any]) -> FunctionRecord:
        config = dict(rec.config)
        self._apply_config(config, body, creating=False)
        self._check_settled(rec)
        self._check_revision(rec, body)
        new = self._commit(rec, config=config)
        self._begin(new.name, "update")
        return new

    def update_code(self, rec: FunctionRecord, body: dict[str, Any]) -> FunctionRecord:
        config = None
        if "Architectures" in body:  # UpdateFunctionCode carries the architecture the code is built for
            problems = validate.Problems()
            validate.check_architectures(body["Architectures"], problems)
            problems.raise_if_any()
            config = {**rec.config, "Architectures": body["Architectures"]}
        self._check_settled(rec)
        self._check_revision(rec, body)
        if body.get("DryRun"):
            return rec
        sha, size = self._store_code(body)
        new = self._commit(rec, config=config, code=(sha, size))
        self._begin(new.name, "update")
        return new

    def delete(self, rec: FunctionRecord) -> None:
        self.store.delete(rec.name)
        del self.functions[rec.name]
        self.transitions.pop(rec.name, None)
        self.event_configs.pop(rec.name, None)
        for listener in self.listeners:
            listener.function_deleted(rec.name)

    def apply_remote(self, rec: FunctionRecord) -> None:
        """Take a record another cluster process wrote (ember.cluster.catalog)."""
        if rec.name in self.functions:
            self.store.update(rec)
        else:
            self.store.insert(rec)
        self._publish(rec)

    def put_concurrency(self, rec: FunctionRecord, body: dict[str, Any]) -> int:
        value = body.get("ReservedConcurrentExecutions")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise invalid("ReservedConcurrentExecutions must be an integer >= 0")
        error = reservation_error(self.account_limit, self.reserved_total - (rec.reserved_concurrency or 0) + value)
        if error is not None:
            raise LambdaError(400, "InvalidParameterValueException", error)
        rec.reserved_concurrency = value
        self.store.update(rec)
        self._publish(rec)
        return value

    def delete_concurrency(self, rec: FunctionRecord) -> None:
        rec.reserved_concurrency = None
        self.store.update(rec)
        self._publish(rec)

    def account_settings(self) -> dict[str, Any]:
        total = sum(r.code_size for r in self.functions.values())
        return {
            "AccountLimit": {
                "TotalCodeSize": 80530636800,
                "CodeSizeUnzipped": 262144000,
                "CodeSizeZipped": MAX_ZIP_BYTES,
                "ConcurrentExecutions": self.account_limit,
                "UnreservedConcurrentExecutions": self.account_limit - self.reserved_total,
            },
            "AccountUsage": {"TotalCodeSize": total, "FunctionCount": len(self.functions)},
        }

    # ------------------------------------------------------------------ asynchronous invocation

    def event_config(self, rec: FunctionRecord) -> dict[str, Any]:
        found = self.event_configs.get(rec.name)
        if found is None:
            raise LambdaError(
                404,
                "ResourceNotFoundException",
                f"The function {self.arn(rec.name)}:$LATEST doesn't have an EventInvokeConfig",
            )
        config, modified = found
        return {"LastModified": modified, "FunctionArn": f"{self.arn(rec.name)}:$LATEST", **config}

    def put_event_config(self, rec: FunctionRecord, body: dict[str, Any], merge: bool) -> dict[str, Any]:
        """PutFunctionEventInvokeConfig replaces, UpdateFunctionEventInvokeConfig merges."""
        current = self.event_configs.get(rec.name)
        config: dict[str, Any] = dict(current[0]) if merge and current else {}
        if "MaximumRetryAttempts" in body:
            value = body["MaximumRetryAttempts"]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2:
                raise invalid("MaximumRetryAttempts must be between 0 and 2")
            config["MaximumRetryAttempts"] = value
        if "MaximumEventAgeInSeconds" in body:
            value = body["MaximumEventAgeInSeconds"]
            if not isinstance(value, int) or isinstance(value, bool) or not 60 <= value <= 21600:
                raise invalid("MaximumEventAgeInSeconds must be between 60 and 21600")
            config["MaximumEventAgeInSeconds"] = value
        if "DestinationConfig" in body:
            dest = body["DestinationConfig"]
            if not isinstance(dest, dict) or set(dest) - {"OnSuccess", "OnFailure"}:
                raise invalid("DestinationConfig takes OnSuccess and OnFailure")
            merged = dict(config.get("DestinationConfig", {})) if merge else {}
            for key, value in dest.items():
                target = value.get("Destination") if isinstance(value, dict) else None
                if target:
                    self.check_target(target, f"DestinationConfig.{key}")
                    merged[key] = {"Destination": target}
                else:
                    merged.pop(key, None)
            config["DestinationConfig"] = merged
        config.setdefault("DestinationConfig", {})
        modified = time.time()
        self.store.put_event_config(rec.name, config, modified)
        self.event_configs[rec.name] = (config, modified)
        return self.event_config(rec)

    def delete_event_config(self, rec: FunctionRecord) -> None:
        self.event_config(rec)  # 404 when there is none
        self.store.delete_event_config(rec.name)
        del self.event_configs[rec.name]

    def retry_policy(self, name: str) -> tuple[RetryPolicy, dict[str, str]]:
        """What the async queue needs: retries, maximum age and where results go."""
        config = self.event_configs.get(name, ({}, 0.0))[0]
        policy = RetryPolicy(
            config.get("MaximumRetryAttempts", DEFAULT_MAX_RETRIES),
            float(config.get("MaximumEventAgeInSeconds", DEFAULT_MAX_AGE_S)),
        )
        dest = config.get("DestinationConfig", {})
        targets: dict[str, str] = {}
        if "OnSuccess" in dest:
            targets["on_success"] = dest["OnSuccess"]["Destination"]
        if "OnFailure" in dest:
            targets["on_failure"] = dest["OnFailure"]["Destination"]
        rec = self.functions.get(name)
        dlq = rec.config.get("DeadLetterConfig", {}).get("TargetArn") if rec else None
        if dlq:
            targets["dlq"] = dlq
        return policy, targets

    @staticmethod
    def check_target(arn: str, what: str) -> None:
        """Destinations and dead-letter targets are ember functions (by ARN)."""
        parts = arn.split(":") if isinstance(arn, str) else []
        if len(parts) not in (7, 8) or parts[:3] != ["arn", "aws", "lambda"] or parts[5] != "function":
            raise invalid(
                f"{what} must be the ARN of a Lambda function (ember delivers to functions only; "
                f"SQS, SNS and EventBridge targets are not supported): {arn!r}"
            )
        if not NAME_RE.match(parts[6]):
            raise invalid(f"{what}: invalid function name in {arn!r}")

    # ------------------------------------------------------------------ sandboxes

    def launch_spec(self, name: str, sandbox_id: int) -> LaunchSpec | None:
        rec = self.functions.get(name)
        if rec is None:
            return None
        c = rec.config
        code_dir = str(self.store.code_path(rec.code_sha256))
        runtime = c["Runtime"]
        region = self.settings.region
        runtime_dir = runtimes.NODE_CLIENT_DIR if runtime in NODE_RUNTIMES else sys.prefix
        # as Lambda sets them (its /var/lang and /var/runtime are ember's runtime dir; /opt is for layers)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/opt/bin",
            "LD_LIBRARY_PATH": f"/lib64:/usr/lib64:{runtime_dir}:{runtime_dir}/lib:{code_dir}:{code_dir}/lib:/opt/lib",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "LAMBDA_TASK_ROOT": code_dir,
            "LAMBDA_RUNTIME_DIR": runtime_dir,
            "_HANDLER": c.get("Handler", ""),
            "AWS_REGION": region,
            "AWS_DEFAULT_REGION": region,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": rec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(c["MemorySize"]),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{rec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": _log_stream(rec.revision_id, sandbox_id),
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        }
        if self.settings.role_credentials is not None:
            env.update(self.settings.role_credentials.for_role(c["Role"]))
        if runtime in PYTHON_RUNTIMES:
            env["PYTHONPATH"] = code_dir
            argv = [sys.executable, "-m", "awslambdaric", c["Handler"]]
        elif runtime in NODE_RUNTIMES:
            env["NODE_PATH"] = runtimes.node_path(runtime, code_dir)
            argv = runtimes.node_argv(int(c["MemorySize"]))
        else:
            argv = [f"{code_dir}/bootstrap"]
        env.update(c.get("Environment") or {})
        return LaunchSpec(argv, code_dir, env, self.arn(rec.name), int(c["MemorySize"]), float(c["Timeout"]))

    # ------------------------------------------------------------------ internals

    def _publish(self, rec: FunctionRecord) -> None:
        """Make `rec` what the invoke path sees, and tell the listeners."""
        self.functions[rec.name] = rec
        for listener in self.listeners:
            listener.function_put(rec)

    def _commit(
        self, rec: FunctionRecord, config: dict[str, Any] | None = None, code: tuple[str, int] | None = None
    ) -> FunctionRecord:
        new = FunctionRecord(
            rec.name,
            config if config is not None else rec.config,
            code[0] if code else rec.code_sha256,
            code[1] if code else rec.code_size,
            rec.revision + 1,
            str(uuid.uuid4()),
            now_iso(),
            rec.reserved_concurrency,
        )
        self.store.update(new)
        self._publish(new)
        return new

    def _check_revision(self, rec: FunctionRecord, body: dict[str, Any]) -> None:
        wanted = body.get("RevisionId")
        if wanted is not None and wanted != self.revision_id(rec):
            raise LambdaError(
                412,
                "PreconditionFailedException",
                "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/"
                "GetAlias API to retrieve the latest Revision Id",
            )

    def _store_code(self, code: dict[str, Any]) -> tuple[str, int]:
        if "ZipFile" not in code:
            if any(k in code for k in ("S3Bucket", "S3Key", "ImageUri")):
                raise invalid("ember accepts code as ZipFile only (S3 and image code are not supported)")
            raise invalid("Code.ZipFile is required")
        raw = code["ZipFile"]
        if not isinstance(raw, str):
            raise invalid("ZipFile must be base64-encoded")
        try:
            zip_bytes = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid("ZipFile must be base64-encoded") from exc
        if len(zip_bytes) > MAX_ZIP_BYTES:
            raise LambdaError(
                413, "RequestEntityTooLargeException", f"Zipped size must be smaller than {MAX_ZIP_BYTES} bytes"
            )
        return self.store.put_code(zip_bytes)

    @staticmethod
    def _apply_config(config: dict[str, Any], body: dict[str, Any], creating: bool) -> None:
        """Check every member as Lambda does (one ValidationException naming all that fail), then
        apply them."""
        problems = validate.Problems()
        if "Role" in body and not creating:
            validate.check_role(body["Role"], problems)
        if "Handler" in body:
            validate.check_handler(body["Handler"], problems)
        if "Description" in body:
            validate.check_description(body["Description"], problems)
        if "MemorySize" in body:  # the model's bounds, then the service's limit (below)
            validate.int_range(body["MemorySize"], "memorySize", 128, 32768, problems)
        if "Timeout" in body:
            validate.int_range(body["Timeout"], "timeout", 1, 5400, problems)
        if "Architectures" in body:
            validate.check_architectures(body["Architectures"], problems)
        if "EphemeralStorage" in body:
            size = body["EphemeralStorage"].get("Size") if isinstance(body["EphemeralStorage"], dict) else None
            validate.int_range(size, "ephemeralStorage.size", 512, 10240, problems)
        if "TracingConfig" in body:
            mode = body["TracingConfig"].get("Mode") if isinstance(body["TracingConfig"], dict) else None
            if mode not in ("Active", "PassThrough"):
                problems.add(mode, "tracingConfig.mode", "Member must satisfy enum value set: [Active, PassThrough]")
        if "SnapStart" in body:
            apply_on = body["SnapStart"].get("ApplyOn") if isinstance(body["SnapStart"], dict) else None
            if apply_on not in ("PublishedVersions", "None"):
                problems.add(
                    apply_on, "snapStart.applyOn", "Member must satisfy enum value set: [PublishedVersions, None]"
                )
        if "LoggingConfig" in body:
            validate.check_logging(body["LoggingConfig"], problems)
        problems.raise_if_any()
        validate.check_limit(body.get("MemorySize"), "MemorySize", MAX_MEMORY_MB)
        validate.check_limit(body.get("Timeout"), "Timeout", MAX_TIMEOUT_S)
        if "Runtime" in body:
            runtime = body["Runtime"]
            if runtime not in RUNTIMES:
                if runtime in validate.DEPRECATED_RUNTIMES:
                    raise validate.deprecated_runtime_error(runtime)
                if runtime not in validate.KNOWN_RUNTIMES:
                    raise validate.runtime_error(runtime)
                raise invalid(
                    f"Value {runtime} at 'runtime' failed to satisfy constraint: ember runs "
                    f"{', '.join(RUNTIMES)}"
                )
            config["Runtime"] = runtime
        for key in ("Handler", "Description", "MemorySize", "Timeout", "Architectures"):
            if key in body:
                config[key] = body[key]
        if "Role" in body and not creating:
            config["Role"] = body["Role"]
        if "EphemeralStorage" in body:
            config["EphemeralStorage"] = {"Size": body["EphemeralStorage"]["Size"]}
        if "TracingConfig" in body:
            config["TracingConfig"] = {"Mode": body["TracingConfig"]["Mode"]}
        if "SnapStart" in body:
            config["SnapStart"] = {"ApplyOn": body["SnapStart"]["ApplyOn"]}
        if "LoggingConfig" in body:
            config["LoggingConfig"] = validate.merge_logging(config.get("LoggingConfig", {}), body["LoggingConfig"])
        if "Environment" in body:
            env = body["Environment"]
            variables = env.get("Variables", {}) if isinstance(env, dict) else None
            if not isinstance(variables, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
            ):
                raise invalid("Environment.Variables must map strings to strings")
            bad = sorted(set(variables) & RESERVED_ENV)
            if bad:
                raise invalid(
                    "Lambda was unable to configure your environment variables because the environment "
                    "variables you have provided contains reserved keys that are currently not supported "
                    f"for modification. Reserved keys used in this request: {', '.join(bad)}"
                )
            for key in variables:
                if not re.match(r"^[a-zA-Z]([a-zA-Z0-9_])*$", key):
                    raise invalid(f"Environment variable name {key!r} is invalid")
            measured = orjson.dumps(variables).decode()
            if len(measured.encode()) > MAX_ENV_BYTES:
                raise invalid(
                    "Lambda was unable to configure your environment variables because the "
                    f"environment variables you have provided exceeded the 4KB limit. String measured: {measured}"
                )
            config["Environment"] = variables
        if "DeadLetterConfig" in body:
            dlc = body["DeadLetterConfig"]
            target = dlc.get("TargetArn") if isinstance(dlc, dict) else None
            if target:
                ControlPlane.check_target(target, "DeadLetterConfig.TargetArn")
                config["DeadLetterConfig"] = {"TargetArn": target}
            else:
                config.pop("DeadLetterConfig", None)
        if config.get("Runtime") in PYTHON_RUNTIMES + NODE_RUNTIMES and not config.get("Handler"):
            raise invalid(f"Handler is required for the {config['Runtime']} runtime")


def _log_stream(revision_id: str, sandbox_id: int) -> str:
    """Lambda's stream name: date, version, and an id unique to the execution environment."""
    unique = uuid.uuid5(uuid.NAMESPACE_OID, f"{revision_id}/{sandbox_id}").hex
    return f"{datetime.now(UTC):%Y/%m/%d}/[$LATEST]{unique}"

