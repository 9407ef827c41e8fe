"""The `ember` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="ember: Lambda-compatible functions on your own machines."
)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9000, help="Port to listen on (0 picks a free one)."),
    data_dir: Path = typer.Option(Path(".ember"), "--data-dir", help="Where functions and code are kept."),
    account_concurrency: int = typer.Option(1000, "--account-concurrency", min=1, help="Account concurrency limit."),
    max_starting: int = typer.Option(4, "--max-starting", min=1, help="Sandboxes starting at once per function."),
    max_waiting: int = typer.Option(128, "--max-waiting", min=0, help="Queued invokes per function before 429."),
    keep_alive: str = typer.Option(
        "default", "--keep-alive", help="Keep-alive policy: default, hybrid, greedy-dual[-<N>g], fixed-<N>m."
    ),
    drain: float = typer.Option(30.0, "--drain", help="Seconds to let in-flight invokes finish on shutdown."),
    region: str = typer.Option("us-east-1", help="Region shown in ARNs and given to functions."),
    async_concurrency: int = typer.Option(
        32, "--async-concurrency", min=1, help="Asynchronous events running at once, in all."
    ),
    async_delay_scale: float = typer.Option(
        1.0, "--async-delay-scale", min=0.0001, help="Multiply async retry delays (tests shrink them)."
    ),
    auth_file: Annotated[
        Path | None,
        typer.Option("--auth", help="Require SigV4: a file of `ACCESS_KEY_ID SECRET_ACCESS_KEY` lines."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback --host without --auth.")
    ] = False,
    isolation: str = typer.Option(
        "auto",
        "--isolation",
        help="Sandbox isolation: auto (bwrap, else unshare, else none), bwrap, unshare (no pool), or none (warned).",
    ),
    pool: int = typer.Option(2, "--pool", min=0, help="Pre-started python runtimes kept ready (0: none)."),
    ephemeral_storage: int = typer.Option(
        512, "--ephemeral-storage", min=1, help="Size of each sandbox's /tmp, in MB."
    ),
    network: str = typer.Option(
        "egress",
        "--network",
        help="Isolated sandboxes' network: egress (outbound TCP/UDP and DNS; never the host's addresses or "
        "169.254.0.0/16) or none (a loopback only). A function can opt out with EMBER_NETWORK=none.",
    ),
    deny_private: Annotated[
        bool, typer.Option("--deny-private", help="Egress: also deny 10/8, 172.16/12 and 192.168/16.")
    ] = False,
    role: str = typer.Option(
        "all", "--role", help="all (one process, the default), or a cluster role: frontend, assigner, worker."
    ),
    etcd: str = typer.Option("", "--etcd", help="Cluster roles: etcd URL(s), e.g. http://127.0.0.1:2379."),
    node_id: str = typer.Option("", "--node-id", help="Cluster roles: this process's id (default: generated)."),
    partitions: int = typer.Option(4, "--partitions", min=1, help="Cluster: partitions (fixed by the first process)."),
    lease_ttl: float = typer.Option(2.0, "--lease-ttl", min=0.5, help="Cluster: etcd session TTL in seconds."),
    role_credentials: Annotated[
        Path | None,
        typer.Option(
            "--role-credentials",
            help="A JSON file mapping role ARNs (or \"*\") to the credentials functions with that role get.",
        ),
    ] = None,
    pass_credentials: Annotated[
        bool,
        typer.Option(
            "--pass-credentials", help="Functions whose role the file does not map get ember's own AWS_* credentials."
        ),
    ] = False,
    debug_verify: bool = typer.Option(
        False, "--debug-verify", help="Check the core's invariants after every transition (slow; for debugging)."
    ),
) -> None:
    """Serve the Lambda API and run functions."""
    from ember.core.keepalive import policy_from_name
    from ember.server import ServeOptions, run

    try:
        policy_from_name(keep_alive)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--keep-alive") from None
    from ember.api.auth import CredentialsError, bind_refusal, load_credentials

    credentials = None
    if auth_file is not None:
        try:
            credentials = load_credentials(auth_file)
        except CredentialsError as exc:
            typer.echo(f"ember: {exc}", err=True)
            raise typer.Exit(2) from None
    if role_credentials is not None:
        from ember.api.credentials import RoleCredentialsError, load_role_credentials

        try:
            load_role_credentials(role_credentials)
        except RoleCredentialsError as exc:
            typer.echo(f"ember: {exc}", err=True)
            raise typer.Exit(2) from None
    refusal = bind_refusal(host, credentials is not None, insecure)
    if refusal:
        typer.echo(refusal, err=True)
        raise typer.Exit(2)
    if role != "all" and not etcd:
        typer.echo("ember: --role needs --etcd URL", err=True)
        raise typer.Exit(2)
    if network not in ("egress", "none"):
        raise typer.BadParameter("expected egress or none", param_hint="--network")
    if role not in ("all", "frontend", "assigner", "worker"):
        raise typer.BadParameter("expected all, frontend, assigner or worker", param_hint="--role")
    options = ServeOptions(
        host=host,
        port=port,
        data_dir=data_dir,
        account_concurrency=account_concurrency,
        max_starting=max_starting,
        max_waiting=max_waiting,
        keep_alive=keep_alive,
        drain_s=drain,
        region=region,
        async_concurrency=async_concurrency,
        async_delay_scale=async_delay_scale,
        credentials=credentials,
        insecure=insecure,
        isolation=isolation,
        pool=pool,
        ephemeral_storage_mb=ephemeral_storage,
        role_credentials=role_credentials,
        pass_credentials=pass_credentials,
        network=network,
        deny_private=deny_private,
        debug_verify=debug_verify,
    )
    if role == "all":
        run(options)
    else:
        from ember.cluster.node import RoleOptions, run_role

        run_role(options, RoleOptions(role, etcd, node_id, partitions, lease_ttl))


@app.command()
def openapi() -> None:
    """Print the OpenAPI document of ember's HTTP API (also served at /openapi.json)."""
    import json

    from ember.api.openapi import document

    typer.echo(json.dumps(document(), indent=2))


@app.command()
def replay(
    trace: Annotated[Path, typer.Option("--trace", help="Directory of an Azure 2019 trace sample.")],
    sample: Annotated[str, typer.Option("--sample", help="N: reads N_inv.csv, N_run.csv, N_mem.csv.")],
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help="Repeatable: fixed-<N>m, hybrid, greedy-dual[-<N>g], default."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for results.md/.jsonl, tradeoff.png.")] = Path(
        "replay-out"
    ),
    init_s: Annotated[float, typer.Option("--init-s", min=0.0, help="Cold-start init time (s).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for arrivals and durations.")] = 1,
    half: Annotated[str, typer.Option("--half", help="all, even or odd functions by hash.")] = "all",
    minutes: Annotated[int | None, typer.Option("--minutes", min=1, help="Only the first N minutes.")] = None,
    budget_gb: Annotated[
        float | None, typer.Option("--budget-gb", help="greedy-dual budget (default: fixed-10m's mean).")
    ] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per policy per line.")] = False,
) -> None:
    """Replay a production trace through ember's real core with a simulated clock, per policy."""
    from ember.core.keepalive import policy_from_name
    from ember.sim.replay import markdown_table, run

    policy = policy or ["fixed-10m", "fixed-20m", "hybrid", "greedy-dual", "default"]
    for name in policy:
        try:
            policy_from_name(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--policy") from None
    if half not in ("all", "even", "odd"):
        raise typer.BadParameter("expected all, even or odd", param_hint="--half")
    results = run(trace, sample, policy, out, init_s, seed, half, minutes, budget_gb)
    if json_lines:
        for r in results:
            typer.echo(r.json_line())
    else:
        typer.echo(markdown_table(results), nl=False)
        typer.echo(f"written to {out}/ (results.md, results.jsonl, tradeoff.png)")


@app.command()
def version() -> None:
    """Print ember's version."""
    from ember import __version__

    typer.echo(__version__)


cluster_app = typer.Typer(help="Cluster mode: try it locally, see its state, inject faults.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    assigners: int = typer.Option(3, "--assigners", min=1),
    workers: int = typer.Option(3, "--workers", min=1),
    frontends: int = typer.Option(2, "--frontends", min=1),
    partitions: int = typer.Option(4, "--partitions", min=1),
    lease_ttl: float = typer.Option(2.0, "--lease-ttl", min=0.5),
    base: Path = typer.Option(Path(".ember-cluster"), "--dir", help="Data dirs and logs of every process."),
    isolation: str = typer.Option("auto", "--isolation", help="Workers' sandbox isolation: auto, bwrap, none."),
) -> None:
    """Start etcd and a local multi-process cluster; print the frontends' URLs; Ctrl-C stops it all."""
    import signal as _signal

    from ember_devtools.localcluster import LocalCluster

    cluster = LocalCluster(base, assigners, workers, frontends, partitions, lease_ttl, isolation)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT, _signal.SIGTERM})  # so sigwait gets them
    cluster.start()
    try:
        typer.echo(f"etcd       {cluster.etcd_url}")
        for proc in cluster.procs.values():
            typer.echo(f"{proc.role:<10} {proc.name:<4} pid {proc.pid:<8} {proc.url}")
        typer.echo("frontends: " + " ".join(cluster.frontend_urls()))
        typer.echo(f"status:    ember cluster status --etcd {cluster.etcd_url}")
        _signal.sigwait({_signal.SIGINT, _signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


@cluster_app.command("status")
def cluster_status(
    etcd: str = typer.Option(..., "--etcd", help="etcd URL of the cluster."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document."),
) -> None:
    """Leaders with their process ids and epochs, workers, sandboxes."""
    import asyncio
    import json

    from ember_devtools.localcluster import status

    doc = asyncio.run(status(etcd))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"etcd {doc['etcd']}, {len(doc['partitions'])} partitions, {doc['journaled_sandboxes']} journaled")
    for p in doc["partitions"]:
        typer.echo(f"  partition {p['partition']}: leader {p['leader']} (pid {p['pid']}) epoch {p['epoch']}")
    for a in doc["assigners"]:
        typer.echo(f"  assigner {a['id']} pid {a.get('pid')} {a['url']}")
    for w in doc["workers"]:
        sbs = w.get("sandboxes", [])
        states = {s["state"] for s in sbs}
        summary = ", ".join(f"{sum(1 for s in sbs if s['state'] == st)} {st}" for st in sorted(states)) or "none"
        typer.echo(f"  worker {w['id']} pid {w.get('pid')} incarnation {w['incarnation']} {w['url']}: "
                   f"sandboxes {summary}{' ERROR ' + w['error'] if 'error' in w else ''}")


@cluster_app.command("chaos")
def cluster_chaos(
    scenario: list[str] = typer.Option(
        [], "--scenario", help="Repeatable: leader-kill, leader-pause, worker-kill, worker-cut, frontend-kill, "
        "etcd-restart (default: all)."),
    duration: float = typer.Option(30.0, "--duration", min=5.0, help="Seconds of load per scenario."),
    rate: float = typer.Option(200.0, "--rate", min=1.0, help="Invokes per second."),
    netns: bool = typer.Option(True, "--netns/--no-netns", help="Each process in its own network namespace."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per scenario per line."),
) -> None:
    """Start a fresh local cluster per scenario, inject the fault under steady load, report what it cost."""
    import asyncio
    import json

    from ember_devtools.chaos import SCENARIOS, run

    chosen = scenario or list(SCENARIOS)
    for name in chosen:
        if name not in SCENARIOS:
            raise typer.BadParameter(f"unknown scenario {name!r}", param_hint="--scenario")
    results = asyncio.run(run(chosen, duration, rate, netns if netns else False))
    for res in results:
        if as_json:
            typer.echo(json.dumps(res))
        else:
            keys = ("outage_s", "lost", "duplicates", "leaked_sandboxes", "warm_pct_after")
            typer.echo(f"{res['scenario']}: " + ", ".join(f"{k}={res.get(k)}" for k in keys)
                       + (f" ERROR {res['error']}" if "error" in res else ""))


from ember.cli import commands as _client_commands  # noqa: E402 - deploy, invoke, ls, rm, logs, top

_client_commands.register(app)

if __name__ == "__main__":
    app()
