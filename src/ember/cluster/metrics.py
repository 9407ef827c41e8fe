"""`GET /metrics` for every cluster role: the role's counters in Prometheus text format.

Each cluster component counts what it refuses, drops or gives up on at its bounds (back-pressure
refusals, full queues, messages dropped past a bound, watch overflows) in plain integers, and says
so through `counters() -> dict[str, int]`. This module turns such a callable into metric families at
scrape time (a custom Collector over a per-app CollectorRegistry), so counting costs the invoke path
one integer addition and nothing else.

Names: counter `name` becomes `ember_cluster_<name>_total`, gauge `name` becomes
`ember_cluster_<name>`, each with one label `role="frontend"|"assigner"|"worker"`. Labels are bounded
(one value per process); never a request id or a function name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "ember_cluster_"
ROLES = ("frontend", "assigner", "worker")
_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")

Counters = Callable[[], dict[str, int]]


class RoleCollector:
    """The counters (and optional gauges) of one role, read at every scrape."""

    def __init__(self, role: str, counters: Counters, gauges: Counters | None = None) -> None:
        assert role in ROLES, f"unknown role {role!r}"
        self.role = role
        self.counters = counters
        self.gauges = gauges

    def describe(self) -> list[Any]:
        return []  # names are only known at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        for name, value in sorted(self.counters().items()):
            assert _NAME.match(name), f"counter name {name!r} is not a metric name"
            assert value >= 0, f"counter {name} is negative: {value}"
            base = name.removesuffix("_total")
            fam = CounterMetricFamily(PREFIX + base, f"{base.replace('_', ' ')} (cluster {self.role})",
                                      labels=["role"])
            fam.add_metric([self.role], value)
            yield fam
        if self.gauges is not None:
            for name, value in sorted(self.gauges().items()):
                assert _NAME.match(name), f"gauge name {name!r} is not a metric name"
                fam_g = GaugeMetricFamily(PREFIX + name, f"{name.replace('_', ' ')} (cluster {self.role})",
                                          labels=["role"])
                fam_g.add_metric([self.role], value)
                yield fam_g


def registry(role: str, counters: Counters, gauges: Counters | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RoleCollector(role, counters, gauges))
    return reg


def routes(app: web.Application, role: str, counters: Counters, gauges: Counters | None = None) -> None:
    """Serve GET /metrics on `app`: `counters()` (and `gauges()`) with the label role=`role`."""
    reg = registry(role, counters, gauges)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(reg), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)


__all__ = ["PREFIX", "RoleCollector", "registry", "routes"]
