"""The `ember` command."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ember: Lambda-compatible functions on your own machines.")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9000, help="Port to listen on (0 picks a free one)."),
    data_dir: Path = typer.Option(Path(".ember"), "--data-dir", help="Where functions and code are kept."),
    account_concurrency: int = typer.Option(1000, "--account-concurrency", min=1, help="Account concurrency limit."),
    max_starting: int = typer.Option(4, "--max-starting", min=1, help="Sandboxes starting at once per function."),
    max_waiting: int = typer.Option(128, "--max-waiting", min=0, help="Queued invokes per function before 429."),
    keep_alive: str = typer.Option("default", "--keep-alive", help="Keep-alive policy: default, fixed-<N>m."),
    drain: float = typer.Option(30.0, "--drain", help="Seconds to let in-flight invokes finish on shutdown."),
    region: str = typer.Option("us-east-1", help="Region shown in ARNs and given to functions."),
) -> None:
    """Serve the Lambda API and run functions."""
    from ember.core.keepalive import policy_from_name
    from ember.server import ServeOptions, run

    try:
        policy_from_name(keep_alive)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keep-alive") from None
    run(
        ServeOptions(
            host=host,
            port=port,
            data_dir=data_dir,
            account_concurrency=account_concurrency,
            max_starting=max_starting,
            max_waiting=max_waiting,
            keep_alive=keep_alive,
            drain_s=drain,
            region=region,
        )
    )


@app.command()
def version() -> None:
    """Print ember's version."""
    from ember import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
