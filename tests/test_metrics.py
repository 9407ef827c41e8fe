"""GET /metrics (Prometheus text) and GET /_ember/stats after known sequences of invokes: warm, cold,
throttled, failed and timed out, with exact counts; deleted functions' series disappear."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from botocore.exceptions import ClientError
from conftest import create, wait_for
from prometheus_client.parser import text_string_to_metric_families

from ember.observe.metrics import DURATION_BUCKETS, percentile

APP = """
import time
def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"ok": True}
"""


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(server.url + "/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def stats(server, **query: str) -> dict:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(f"{server.url}/_ember/stats?{q}") as resp:
        return json.loads(resp.read())


def test_metrics_count_warm_cold_throttled_failed_and_timed_out_exactly(server, lam) -> None:
    create(lam, "m", APP)
    create(lam, "busy", APP)
    create(lam, "slowpoke", APP, Timeout=1)
    lam.put_function_concurrency(FunctionName="busy", ReservedConcurrentExecutions=1)

    # m: one cold start, two warm successes, one warm function error
    for _ in range(3):
        assert "FunctionError" not in lam.invoke(FunctionName="m", Payload=b"{}")
    assert lam.invoke(FunctionName="m", Payload=json.dumps({"fail": True}))["FunctionError"] == "Unhandled"

    # busy: one long invocation holds its only reserved slot; two more are throttled meanwhile
    done = threading.Event()

    def hold() -> None:
        lam.invoke(FunctionName="busy", Payload=json.dumps({"sleep": 1.5}))
        done.set()

    t = threading.Thread(target=hold)
    t.start()
    assert wait_for(lambda: value(scrape(server), "ember_concurrent_executions", function="busy") == 1)
    during = scrape(server)
    assert value(during, "ember_sandboxes", function="busy", state="busy") == 1
    assert value(during, "ember_account_concurrent_executions") == 1
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            lam.invoke(FunctionName="busy", Payload=b"{}")
        assert exc.value.response["Error"]["Code"] == "TooManyRequestsException"
    t.join(30)
    assert done.is_set()

    # slowpoke: times out (an error, and its sandbox is discarded)
    resp = lam.invoke(FunctionName="slowpoke", Payload=json.dumps({"sleep": 5}))
    assert resp["FunctionError"] == "Unhandled"

    s = scrape(server)
    assert value(s, "ember_invocations_total", function="m") == 4
    assert value(s, "ember_errors_total", function="m") == 1
    assert value(s, "ember_cold_starts_total", function="m") == 1
    assert value(s, "ember_warm_starts_total", function="m") == 3
    assert value(s, "ember_duration_seconds_count", function="m") == 4
    assert value(s, "ember_duration_seconds_bucket", function="m", le="+Inf") == 4
    assert value(s, "ember_init_duration_seconds_count", function="m") == 1
    assert value(s, "ember_init_duration_seconds_sum", function="m") > 0
    for reason in (
        "ReservedFunctionConcurrentInvocationLimitExceeded",
        "ConcurrentInvocationLimitExceeded",
        "FunctionInvocationRateLimitExceeded",
    ):
        assert value(s, "ember_throttles_total", function="m", reason=reason) == 0
    assert value(s, "ember_sandboxes", function="m", state="idle") == 1
    assert value(s, "ember_sandboxes", function="m", state="busy") == 0
    assert value(s, "ember_concurrent_executions", function="m") == 0

    assert value(s, "ember_invocations_total", function="busy") == 1  # throttles are not invocations
    assert value(s, "ember_errors_total", function="busy") == 0
    assert (
        value(
            s,
            "ember_throttles_total",
            function="busy",
            reason="ReservedFunctionConcurrentInvocationLimitExceeded",
        )
        == 2
    )
    assert value(s, "ember_throttles_total", function="busy", reason="ConcurrentInvocationLimitExceeded") == 0
    assert value(s, "ember_reserved_concurrency", function="busy") == 1
    assert value(s, "ember_cold_starts_total", function="busy") == 1

    assert value(s, "ember_invocations_total", function="slowpoke") == 1
    assert value(s, "ember_errors_total", function="slowpoke") == 1
    assert value(s, "ember_duration_seconds_bucket", function="slowpoke", le="0.5") == 0
    assert value(s, "ember_duration_seconds_bucket", function="slowpoke", le="1.5") == 1

    assert value(s, "ember_account_invocations_total") == 6
    assert value(s, "ember_account_errors_total") == 2
    assert value(s, "ember_account_throttles_total") == 2
    assert value(s, "ember_account_cold_starts_total") == 3
    assert value(s, "ember_account_warm_starts_total") == 3
    assert value(s, "ember_account_concurrent_executions") == 0
    assert value(s, "ember_functions") == 3

    # the same figures in the stats document behind `ember top` and the dashboard
    doc = stats(server)
    by_name = {f["name"]: f for f in doc["functions"]}
    assert by_name["m"]["invocations"] == 4
    assert by_name["m"]["errors"] == 1
    assert (by_name["m"]["cold_starts"], by_name["m"]["warm_starts"]) == (1, 3)
    assert by_name["busy"]["throttles"] == 2
    assert by_name["m"]["sandboxes"] == {"idle": 1, "busy": 0, "starting": 0}
    assert by_name["m"]["p50_ms"] is not None and by_name["m"]["p99_ms"] >= by_name["m"]["p50_ms"]
    assert by_name["m"]["rps"] > 0
    assert doc["account"]["invocations"] == 6
    sandboxes = [sb for sb in doc["sandboxes"] if sb["function"] == "m"]
    assert len(sandboxes) == 1
    assert sandboxes[0]["state"] == "idle"
    assert sandboxes[0]["invocations"] == 4
    assert sandboxes[0]["age_s"] > 0


def test_label_cardinality_is_bounded_and_deleted_functions_disappear(server, lam) -> None:
    create(lam, "gone", APP)
    create(lam, "kept", APP)
    for name in ("gone", "gone", "kept"):
        lam.invoke(FunctionName=name, Payload=b"{}")
    before = scrape(server)
    assert value(before, "ember_invocations_total", function="gone") == 2
    labels = {k for _, labels in before for k, _ in labels}
    assert labels <= {"function", "reason", "state", "le"}  # never a request id

    lam.delete_function(FunctionName="gone")
    after = scrape(server)
    assert not [key for key in after if ("function", "gone") in key[1]]
    assert value(after, "ember_invocations_total", function="kept") == 1
    assert value(after, "ember_account_invocations_total") == 3  # account counters never go down

    # a function created again under the same name starts from zero
    create(lam, "gone", APP)
    again = scrape(server)
    assert value(again, "ember_invocations_total", function="gone") == 0
    assert value(again, "ember_sandboxes", function="gone", state="idle") == 0


def test_stats_series_and_validation(server, lam) -> None:
    create(lam, "s", APP)
    for _ in range(5):
        lam.invoke(FunctionName="s", Payload=b"{}")
    assert wait_for(lambda: sum(p["inv"] for p in stats(server, series="1")["series"]["s"]) > 0, timeout=10)
    doc = stats(server, series="1", window="30")
    points = doc["series"]["s"]
    assert all(
        {"t", "inv", "cold", "err", "thr", "p50", "p99", "idle", "busy", "starting"} <= p.keys()
        for p in points
    )
    assert doc["window_s"] == 30
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(server.url + "/_ember/stats?window=0")
    assert exc.value.code == 400


def test_percentile_interpolates_inside_buckets() -> None:
    buckets = [0] * (len(DURATION_BUCKETS) + 1)
    assert percentile(buckets, 0.5) is None
    i = DURATION_BUCKETS.index(0.01)  # (0.0075, 0.01]
    buckets[i] = 100
    assert percentile(buckets, 0.5) == pytest.approx(0.00875)
    assert percentile(buckets, 1.0) == pytest.approx(0.01)
    buckets[-1] = 1  # beyond the last bound: reported as the last bound
    assert percentile(buckets, 1.0) == DURATION_BUCKETS[-1]
