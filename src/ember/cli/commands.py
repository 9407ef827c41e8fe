"""ember's client commands: deploy, invoke, ls, rm, logs, top. Each talks to the server named by
--endpoint-url (default http://127.0.0.1:9000, or EMBER_ENDPOINT). A failure is one line on stderr,
`ember: ...`, and a non-zero exit code (1; 2 for bad arguments)."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ember.cli.client import (
    DEFAULT_ROLE,
    PROGRESS_MIN_BYTES,
    Client,
    ClientError,
    ProgressBody,
    endpoint_url,
    human_bytes,
    zip_dir,
)

F = TypeVar("F", bound=Callable[..., Any])

ENDPOINT_HELP = "ember's URL (default http://127.0.0.1:9000, or $EMBER_ENDPOINT)."


def _endpoint_option() -> Any:
    return typer.Option("--endpoint-url", envvar="EMBER_ENDPOINT", help=ENDPOINT_HELP, show_default=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"ember: {message}", err=True)
    return typer.Exit(code)


def one_line_errors(fn: F) -> F:
    @wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapped  # type: ignore[return-value]


def _client(endpoint: str | None) -> Client:
    return Client(endpoint_url(endpoint))


# ---------------------------------------------------------------------- deploy


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _settled(client: Client, name: str, timeout_s: float = 60.0) -> None:
    """Wait until the function's last update is no longer InProgress (Lambda refuses another)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conf = client.call("get_function_configuration", FunctionName=name)
        if conf.get("LastUpdateStatus") != "InProgress":
            return
        time.sleep(0.05)


def _upload(client: Client, operation: str, size: int, **params: Any) -> dict[str, Any]:
    """Call `operation`, with a progress bar on stderr while a large request body is sent."""
    if size < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return client.call(operation, **params)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("uploading"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task("upload", total=None)

    def before_send(request: Any, **_: Any) -> None:
        body = request.body
        if isinstance(body, bytes | bytearray) and len(body) >= PROGRESS_MIN_BYTES:
            progress.update(task, total=len(body), completed=0)
            request.body = ProgressBody(bytes(body), lambda n: progress.advance(task, n))

    events = client.lam.meta.events
    events.register("before-send.lambda", before_send, unique_id="ember-progress")
    try:
        with progress:
            return client.call(operation, **params)
    finally:
        events.unregister("before-send.lambda", unique_id="ember-progress")


@one_line_errors
def deploy(
    directory: Annotated[Path, typer.Argument(help="Folder whose files make the function's code.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Function name.")],
    runtime: Annotated[str, typer.Option("--runtime", "-r", help="e.g. python3.12, nodejs20.x, provided.al2023.")],
    handler: Annotated[str, typer.Option("--handler", help="e.g. app.handler (for provided: any label).")],
    memory: Annotated[int | None, typer.Option("--memory", help="Memory in MB (128-10240).")] = None,
    timeout: Annotated[int | None, typer.Option("--timeout", help="Timeout in seconds (1-900).")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="Environment variable KEY=VALUE (repeatable).")
    ] = None,
    role: Annotated[
        str, typer.Option("--role", help="Execution role ARN (recorded, not enforced).")
    ] = DEFAULT_ROLE,
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """Zip a folder and create the function, or update its code and configuration."""
    client = _client(endpoint)
    variables = _parse_env(env or [])
    zip_bytes, files = zip_dir(directory)
    size = len(zip_bytes) * 4 // 3  # base64 in the JSON body
    config: dict[str, Any] = {"Runtime": runtime, "Handler": handler}
    if memory is not None:
        config["MemorySize"] = memory
    if timeout is not None:
        config["Timeout"] = timeout
    if env:
        config["Environment"] = {"Variables": variables}
    try:
        client.call("get_function_configuration", FunctionName=name)
        exists = True
    except ClientError as exc:
        if not str(exc).startswith("ResourceNotFoundException"):
            raise
        exists = False
    if exists:
        _upload(client, "update_function_code", size, FunctionName=name, ZipFile=zip_bytes)
        _settled(client, name)  # as on Lambda, the next update waits for this one
        out = client.call("update_function_configuration", FunctionName=name, **config)
        verb = "updated"
    else:
        out = _upload(
            client,
            "create_function",
            size,
            FunctionName=name,
            Role=role,
            Code={"ZipFile": zip_bytes},
            **config,
        )
        verb = "created"
    typer.echo(
        f"{verb} {out['FunctionName']}: {out['Runtime']} {out.get('Handler', '')}, {out['MemorySize']} MB, "
        f"{out['Timeout']} s, {files} files, {human_bytes(len(zip_bytes))} zipped"
    )


# ---------------------------------------------------------------------- invoke, ls, rm


@one_line_errors
def invoke(
    name: Annotated[str, typer.Argument(help="Function name or ARN.")],
    payload: Annotated[
        str, typer.Option("--payload", "-p", help="The event, as JSON ('-' reads stdin).")
    ] = "{}",
    log: Annotated[
        bool, typer.Option("--log", help="Print the invocation's log tail (START … REPORT) to stderr.")
    ] = False,
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """Invoke a function synchronously and print its result."""
    if payload == "-":
        payload = sys.stdin.read()
    try:
        json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ClientError(f"--payload is not valid JSON: {exc}") from None
    client = _client(endpoint)
    params: dict[str, Any] = {"FunctionName": name, "Payload": payload.encode()}
    if log:
        params["LogType"] = "Tail"
    resp = client.call("invoke", **params)
    body = resp["Payload"].read()
    if log and resp.get("LogResult"):
        sys.stderr.write(base64.b64decode(resp["LogResult"]).decode("utf-8", "replace"))
        sys.stderr.flush()
    sys.stdout.write(body.decode("utf-8", "replace") + "\n")
    sys.stdout.flush()
    if resp.get("FunctionError"):
        try:
            doc = json.loads(body)
            detail = f"{doc.get('errorType', 'Error')}: {doc.get('errorMessage', '')}".strip()
        except (ValueError, AttributeError):
            detail = resp["FunctionError"]
        raise ClientError(f"{name} failed: {detail}")


@one_line_errors
def ls(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the functions' configurations as JSON.")
    ] = False,
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """List functions."""
    client = _client(endpoint)
    functions: list[dict[str, Any]] = []
    marker = None
    while True:
        page = client.call("list_functions", **({"Marker": marker} if marker else {}))
        functions += page.get("Functions", [])
        marker = page.get("NextMarker")
        if not marker:
            break
    if as_json:
        typer.echo(json.dumps(functions, indent=2, default=str))
        return
    if not functions:
        typer.echo("no functions", err=True)
        return
    rows = [("NAME", "RUNTIME", "HANDLER", "MEMORY", "TIMEOUT", "CODE", "LAST MODIFIED")]
    for f in functions:
        rows.append(
            (
                f["FunctionName"],
                f.get("Runtime", ""),
                f.get("Handler", ""),
                f"{f['MemorySize']} MB",
                f"{f['Timeout']} s",
                human_bytes(f.get("CodeSize", 0)),
                str(f.get("LastModified", ""))[:19].replace("T", " "),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@one_line_errors
def rm(
    names: Annotated[list[str], typer.Argument(help="Function names.")],
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """Delete functions (their sandboxes stop, their logs go)."""
    client = _client(endpoint)
    for name in names:
        client.call("delete_function", FunctionName=name)
        typer.echo(f"deleted {name}")


# ---------------------------------------------------------------------- logs, top


def _print_event(raw: bytes, as_json: bool) -> None:
    raw = raw.strip()
    if not raw:
        return  # a heartbeat
    if as_json:
        sys.stdout.write(raw.decode() + "\n")
        return
    ev = json.loads(raw)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ev["ts"] / 1000)) + f".{ev['ts'] % 1000:03d}Z"
    stream = ev.get("stream", "")
    short = stream.rsplit("]", 1)[-1][:8] if "]" in stream else stream[-8:]
    for line in ev.get("message", "").replace("\r", "\n").split("\n"):
        sys.stdout.write(f"{ts} {short} {line}\n")


@one_line_errors
def logs(
    name: Annotated[str, typer.Argument(help="Function name.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events as they come.")
    ] = False,
    since: Annotated[
        str, typer.Option("--since", help="From when: 30s, 10m, 2h, 1d, or an ISO 8601 time.")
    ] = "10m",
    stream: Annotated[
        str | None, typer.Option("--stream", help="Only this log stream (one sandbox).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as JSON lines.")] = False,
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """Print a function's logs (START / END / REPORT and what it printed), like `aws logs tail`."""
    from ember.observe.funclogs import parse_since

    try:
        since_ms = parse_since(since)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    client = _client(endpoint)
    query = {"since": str(since_ms)}
    if stream:
        query["stream"] = stream
    if follow:
        query["follow"] = "1"
        for raw in client.stream_lines(f"/_ember/logs/{name}", query):
            _print_event(raw, as_json)
            sys.stdout.flush()
        return
    for raw in client.stream_lines(f"/_ember/logs/{name}", query):
        _print_event(raw, as_json)


@one_line_errors
def top(
    interval: Annotated[
        float, typer.Option("--interval", "-i", min=0.2, help="Seconds between refreshes.")
    ] = 1.0,
    sort: Annotated[
        str, typer.Option("--sort", "-s", help="rps, p50, p99, errors, throttles, sandboxes, name.")
    ] = "rps",
    window: Annotated[
        float, typer.Option("--window", min=1, max=300, help="Seconds that rates cover.")
    ] = 10.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """A live view of functions: requests/s, p50 / p99, warm %, sandboxes, throttles, errors."""
    from rich.console import Console

    from ember.cli import top as top_view

    if sort not in top_view.SORT_KEYS:
        raise fail(f"--sort must be one of {', '.join(top_view.SORT_KEYS)}", 2)
    console = Console(width=None if sys.stdout.isatty() else 80)
    top_view.run(_client(endpoint), interval, sort, window, once, console)


@one_line_errors
def queues(
    as_json: Annotated[bool, typer.Option("--json", help="Print the queue statistics as JSON.")] = False,
    endpoint: Annotated[str | None, _endpoint_option()] = None,
) -> None:
    """Asynchronous invocation queues: depth, oldest event's age, retries and drops per function."""
    stats = _client(endpoint).get_json("/_ember/queues")
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    typer.echo(
        f"accepted {stats['accepted']}  succeeded {stats['succeeded']}  queued {stats['depth']}  "
        f"running {stats['inflight']}  retries {stats['retries']}  dropped {stats['dropped']}"
    )
    rows = [("FUNCTION", "READY", "DELAYED", "RUNNING", "OLDEST", "DROPPED")]
    for name, q in sorted(stats["functions"].items()):
        rows.append(
            (
                name,
                str(q["ready"]),
                str(q["delayed"]),
                str(q["inflight"]),
                f"{q['oldest_age_s']:.1f} s",
                str(q.get("dropped", 0)),
            )
        )
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def register(app: typer.Typer) -> None:
    for fn in (deploy, invoke, ls, rm, logs, top, queues):
        app.command()(fn)
