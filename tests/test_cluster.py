"""Cluster mode end to end: a real etcd and real `ember serve --role ...` processes on this machine.

boto3 talks to the frontends as to Lambda; the faults are real signals to real processes, under a
steady load from the chaos harness, with a sink function that records every execution.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from conftest import create, make_zip, wait_for

from ember.cluster import layout
from ember_devtools import chaos
from ember_devtools.localcluster import LocalCluster, status

if shutil.which("etcd") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("etcd is not installed (scripts/install-deps.sh installs etcd-server)")
    pytest.skip("etcd is not installed (apt-get install etcd-server)", allow_module_level=True)


def client(url: str):
    return boto3.client(
        "lambda", endpoint_url=url, region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret", config=Config(retries={"max_attempts": 0}, read_timeout=60,
                                                      max_pool_connections=32))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(base, assigners=2, workers=2, frontends=2, partitions=2, lease_ttl=2.0, isolation="auto")
    c.start()
    try:
        yield c
    finally:
        c.stop()
    assert not [p.name for p in c.procs.values() if p.alive], "a cluster process outlived stop()"


def test_the_lambda_api_works_through_any_frontend(cluster: LocalCluster) -> None:
    f1, f2 = (client(u) for u in cluster.frontend_urls())
    create(f1, "echo", "def handler(event, context):\n    return {'v': 1, 'event': event}\n")
    assert wait_for(lambda: _exists(f2, "echo"), 10.0), "the second frontend never saw the function"
    out = f2.invoke(FunctionName="echo", Payload=b'{"a": 1}')
    assert out["StatusCode"] == 200 and "FunctionError" not in out
    assert out["Payload"].read() == b'{"v": 1, "event": {"a": 1}}'
    # new code: the next invoke runs it (the old sandboxes are retired, never handed out); as on AWS, an
    # update waits until the function is Active
    f1.get_waiter("function_active_v2").wait(FunctionName="echo", WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    f1.update_function_code(FunctionName="echo", ZipFile=make_zip({"app.py": "def handler(e, c):\n    return 2\n"}))
    assert wait_for(lambda: f2.get_function(FunctionName="echo")["Configuration"]["CodeSize"] < 200, 10.0)
    assert f2.invoke(FunctionName="echo", Payload=b"{}")["Payload"].read() == b"2"
    # a function error travels back in Lambda's shape
    create(f1, "boom", "def handler(event, context):\n    raise ValueError('no')\n")
    err = f1.invoke(FunctionName="boom", Payload=b"{}")
    assert err["FunctionError"] == "Unhandled" and b"ValueError" in err["Payload"].read()
    # an init failure reaches the caller as on one node: a function error with the runtime's message
    create(f1, "broken", "import no_such_module\ndef handler(event, context):\n    return 1\n")
    bad = f2.invoke(FunctionName="broken", Payload=b"{}")
    assert bad["FunctionError"] == "Unhandled" and b"no_such_module" in bad["Payload"].read()
    # status: every partition has a leader with a process id and an epoch; workers report sandboxes
    doc = asyncio.run(status(cluster.etcd_url))
    assert len(doc["partitions"]) == 2
    assert all(p["leader"] in ("a1", "a2") and p["pid"] and p["epoch"] for p in doc["partitions"])
    assert sum(len(w["sandboxes"]) for w in doc["workers"]) >= 1
    f2.delete_function(FunctionName="echo")
    assert wait_for(lambda: not _exists(f1, "echo"), 10.0)
    with pytest.raises(f1.exceptions.ResourceNotFoundException):
        f1.invoke(FunctionName="echo", Payload=b"{}")


def test_reserved_concurrency_is_exact_across_frontends(cluster: LocalCluster) -> None:
    f1, f2 = (client(u) for u in cluster.frontend_urls())
    create(f1, "slow", "import time\ndef handler(event, context):\n    time.sleep(2)\n    return 'done'\n",
           Timeout=10)
    f1.put_function_concurrency(FunctionName="slow", ReservedConcurrentExecutions=2)
    assert wait_for(lambda: f2.get_function(FunctionName="slow").get("Concurrency", {}).get(
        "ReservedConcurrentExecutions") == 2, 10.0)
    results: list[str] = []

    def one(lam) -> None:
        try:
            results.append(lam.invoke(FunctionName="slow", Payload=b"{}")["Payload"].read().decode())
        except lam.exceptions.TooManyRequestsException:
            results.append("throttled")

    threads = [threading.Thread(target=one, args=(f1 if i % 2 else f2,)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert sorted(results) == ['"done"', '"done"', "throttled", "throttled", "throttled", "throttled"]


def test_a_worker_restart_is_noticed_and_its_sandboxes_written_off(cluster: LocalCluster) -> None:
    f1 = client(cluster.frontend_urls()[0])
    create(f1, "hold", "def handler(event, context):\n    return 'ok'\n")
    for _ in range(3):
        assert f1.invoke(FunctionName="hold", Payload=b"{}")["StatusCode"] == 200
    doc = asyncio.run(status(cluster.etcd_url))
    victim = next(w["id"] for w in doc["workers"] if any(s["function"] == "hold" for s in w["sandboxes"]))
    cluster.signal(victim, signal.SIGKILL)
    cluster.reap(victim)
    p = layout.partition_of("hold", cluster.partitions)

    def journal_clean() -> bool:
        d = asyncio.run(status(cluster.etcd_url))
        journaled = d["journaled_sandboxes"]
        alive = sum(len(w.get("sandboxes", [])) for w in d["workers"] if w["id"] != victim)
        return journaled == alive and d["partitions"][p]["leader"] is not None

    assert wait_for(journal_clean, 15.0, 0.2), "the dead worker's sandboxes stayed in the journal"
    cluster.launch(cluster.procs[victim])
    cluster.wait_started(cluster.procs[victim])
    assert f1.invoke(FunctionName="hold", Payload=b"{}")["Payload"].read() == b'"ok"'


def _exists(lam, name: str) -> bool:
    try:
        lam.get_function(FunctionName=name)
        return True
    except lam.exceptions.ResourceNotFoundException:
        return False


# ---------------------------------------------------------------------- faults under load


@pytest.mark.parametrize("scenario", ["leader-kill", "leader-pause"])
def test_leader_faults_lose_nothing_run_nothing_twice_leak_nothing(scenario: str, tmp_path: Path) -> None:
    res = asyncio.run(chaos.run_scenario(scenario, tmp_path, duration=12.0, rate=60.0))
    assert res["requests"] == res["ok"] + res["lost"] + res["throttled"] + res["shed"]
    assert res["executions"] > 0
    assert res["lost"] == 0, res
    assert res["throttled"] == 0, res
    assert res["duplicates"] == 0, res
    assert res["leaked_sandboxes"] == 0, res


def test_a_worker_death_ends_every_invocation_and_runs_none_twice(tmp_path: Path) -> None:
    res = asyncio.run(chaos.run_scenario("worker-kill", tmp_path, duration=12.0, rate=60.0, sleep_s=0.2))
    # in-flight invocations on the dead worker end with an error (they may have run: never re-sent)
    assert res["requests"] == res["ok"] + res["lost"] + res["throttled"] + res["shed"]
    assert all(k in ("-502", "-200") for k in res["errors"]), res["errors"]
    assert res["removed_after_s"] is not None, "the dead worker's sandboxes never left the journal"
    assert res["duplicates"] == 0, res
    assert res["leaked_sandboxes"] == 0, res
