"""Function logs (per function, per sandbox stream, START / END / REPORT, bounded, kept across a
restart, readable and followable with `ember logs`) and ember's own structured log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import EMBER, EmberServer, create, wait_for

from ember.observe.funclogs import LogStore, parse_since
from ember.observe.reqctx import RequestIdFilter, request_id_var
from ember.sandbox.process import Invocation
from ember.server import JsonFormatter

PRINTS = """
import os, time
print("init says hi")
def handler(event, context):
    print("handling", event.get("n"))
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"stream": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"], "rid": context.aws_request_id}
"""

REPORT = re.compile(
    r"REPORT RequestId: (?P<rid>[0-9a-f-]+)\tDuration: (?P<d>[0-9.]+) ms\t"
    r"Billed Duration: (?P<b>\d+) ms\tMemory Size: (?P<mem>\d+) MB\t"
    r"Max Memory Used: (?P<used>\d+) MB\t(Init Duration: (?P<init>[0-9.]+) ms\t)?"
)


def ember_cli(server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMBER, *args, "--endpoint-url", server.url], capture_output=True, text=True, timeout=timeout
    )


def events(server, name: str, **query: str) -> list[dict]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(f"{server.url}/_ember/logs/{name}?{q}") as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def test_invocation_logs_have_start_end_report_in_the_sandbox_stream(server, lam) -> None:
    create(lam, "talk", PRINTS, MemorySize=256)
    outs = [
        json.loads(lam.invoke(FunctionName="talk", Payload=json.dumps({"n": i}))["Payload"].read())
        for i in range(3)
    ]
    stream = outs[0]["stream"]
    assert {o["stream"] for o in outs} == {stream}

    result = ember_cli(server, "logs", "talk", "--json")
    assert result.returncode == 0, result.stderr
    evs = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(e["stream"] == stream for e in evs)
    assert evs[0]["request_id"] is None and evs[0]["message"] == "init says hi"
    invs = [e for e in evs if e["request_id"]]
    assert [e["request_id"] for e in invs] == [o["rid"] for o in outs]
    for i, e in enumerate(invs):
        lines = e["message"].split("\n")
        assert lines[0] == f"START RequestId: {outs[i]['rid']} Version: $LATEST"
        assert lines[1] == f"handling {i}"
        assert lines[2] == f"END RequestId: {outs[i]['rid']}"
        m = REPORT.fullmatch(lines[3])
        assert m, lines[3]
        assert m["rid"] == outs[i]["rid"]
        assert int(m["b"]) >= float(m["d"])
        assert m["mem"] == "256"
        assert int(m["used"]) > 0
        assert (m["init"] is not None) == (i == 0)  # Init Duration on the cold invocation only
    assert [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)

    # the text form, as `aws logs tail` prints it
    text = ember_cli(server, "logs", "talk")
    assert text.returncode == 0, text.stderr
    assert f"START RequestId: {outs[2]['rid']}" in text.stdout
    assert "handling 1" in text.stdout


def test_each_sandbox_has_its_own_stream(server, lam) -> None:
    create(lam, "pair", PRINTS)
    results: list[dict] = []

    def call(i: int) -> None:
        resp = lam.invoke(FunctionName="pair", Payload=json.dumps({"n": i, "sleep": 1.0}))
        results.append(json.loads(resp["Payload"].read()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    streams = {r["stream"] for r in results}
    assert len(streams) == 2
    with urllib.request.urlopen(f"{server.url}/_ember/logs/pair/streams") as resp:
        doc = json.loads(resp.read())
    assert doc["logGroupName"] == "/aws/lambda/pair"
    assert {s["stream"] for s in doc["logStreams"]} == streams
    for r in results:
        mine = events(server, "pair", stream=r["stream"])
        assert [e["request_id"] for e in mine if e["request_id"]] == [r["rid"]]


def test_since_follow_and_unknown_function(server, lam) -> None:
    create(lam, "tail", PRINTS)
    lam.invoke(FunctionName="tail", Payload=b"{}")
    future = str(int(time.time() * 1000) + 60_000)
    assert events(server, "tail", since=future) == []
    assert ember_cli(server, "logs", "tail", "--since", "1h").stdout.count("START RequestId") == 1

    follower = subprocess.Popen(
        [*EMBER, "logs", "tail", "--follow", "--json", "--since", "1s", "--endpoint-url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.0)  # let it connect (a later event must still arrive; earlier ones are not asked for)
        rid = json.loads(lam.invoke(FunctionName="tail", Payload=json.dumps({"n": 7}))["Payload"].read())[
            "rid"
        ]
        got: list[dict] = []
        reader = threading.Thread(
            target=lambda: got.extend(
                json.loads(line)
                for line in iter(follower.stdout.readline, "")
                if '"request_id":"' + rid in line
            ),
            daemon=True,
        )
        reader.start()
        assert wait_for(lambda: bool(got), timeout=20), follower.stderr
        assert "handling 7" in got[0]["message"]
    finally:
        follower.terminate()
        follower.wait(10)

    missing = ember_cli(server, "logs", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "ember: ResourceNotFoundException: Function not found: "
        "arn:aws:lambda:us-east-1:000000000000:function:nope"
    ]
    bad = ember_cli(server, "logs", "tail", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "invalid time" in bad.stderr


def test_init_failure_output_is_kept_and_logs_survive_a_restart(tmp_path: Path) -> None:
    srv = EmberServer(tmp_path / "data").start()
    try:
        lam = srv.client()
        create(lam, "broken", 'print("about to fail")\nraise ImportError("no such thing")\n')
        resp = lam.invoke(FunctionName="broken", Payload=b"{}")
        assert resp["FunctionError"] == "Unhandled"
        create(lam, "fine", PRINTS)
        rid = json.loads(lam.invoke(FunctionName="fine", Payload=b"{}")["Payload"].read())["rid"]
        assert wait_for(
            lambda: any("no such thing" in e["message"] for e in events(srv, "broken")), timeout=10
        )
        assert any("about to fail" in e["message"] for e in events(srv, "broken"))
    finally:
        assert srv.stop() == 0
    srv2 = EmberServer(tmp_path / "data").start()
    try:
        assert [e["request_id"] for e in events(srv2, "fine") if e["request_id"]] == [rid]
    finally:
        srv2.stop()


def test_ember_logs_request_scoped_lines_as_json_with_request_id(server, lam) -> None:
    create(lam, "late", PRINTS, Timeout=1)
    resp = lam.invoke(FunctionName="late", Payload=json.dumps({"sleep": 3}))
    assert resp["FunctionError"] == "Unhandled"
    rid = resp["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]

    def timed_out_line() -> dict | None:
        for line in server.stderr().splitlines():
            doc = json.loads(line)  # every line is JSON (stderr is not a terminal)
            if doc["message"] == "invocation timed out":
                return doc
        return None

    assert wait_for(lambda: timed_out_line() is not None, timeout=10)
    doc = timed_out_line()
    assert doc["request_id"] == rid
    assert doc["function"] == "late"
    assert doc["level"] == "info" and doc["logger"] == "ember.sandbox.host" and doc["time"].endswith("Z")


def test_request_id_filter_tags_records_logged_during_a_request() -> None:
    record = logging.LogRecord("ember.x", logging.INFO, __file__, 1, "hello", (), None)
    f = RequestIdFilter()
    f.filter(record)
    assert not hasattr(record, "request_id")

    async def in_request() -> logging.LogRecord:
        request_id_var.set("rid-1")
        rec = logging.LogRecord("ember.x", logging.INFO, __file__, 1, "inside", (), None)
        f.filter(rec)
        return rec

    rec = asyncio.run(in_request())
    assert json.loads(JsonFormatter().format(rec))["request_id"] == "rid-1"
    assert request_id_var.get() is None  # scoped to the request's task


# ---------------------------------------------------------------------- LogStore on its own


def _fake_proc(sid: int) -> SimpleNamespace:
    return SimpleNamespace(
        spec=SimpleNamespace(
            env={"AWS_LAMBDA_LOG_STREAM_NAME": f"2026/01/01/[$LATEST]{sid:032x}"}, memory_mb=128
        ),
        ref=SimpleNamespace(id=sid),
        init_log=bytearray(),
        exited=SimpleNamespace(is_set=lambda: True),
        pid=0,
        spawned_at=time.perf_counter(),
        max_memory_mb=lambda: 0,
    )


def _inv(i: int, proc: SimpleNamespace, size: int = 900) -> Invocation:
    loop = asyncio.new_event_loop()
    inv = Invocation(f"req-{i:06d}", b"{}", loop.create_future())
    loop.close()
    inv.proc = proc
    inv.started = time.perf_counter()
    inv.ended = inv.started + 0.001
    inv.log += b"x" * size + b"\n"
    return inv


def test_log_store_is_bounded_per_function_and_forgets_deleted_functions(tmp_path: Path) -> None:
    live = {"f", "g"}
    store = LogStore(tmp_path / "logs", lambda: live, max_bytes=64 * 1024, segment_bytes=16 * 1024)
    proc = _fake_proc(1)
    for i in range(400):  # ~400 KB of logs for a 64 KB bound
        store.record("f", _inv(i, proc))
        if i % 25 == 0:
            store.flush()
    store.record("g", _inv(0, _fake_proc(2)))
    store.flush()
    files = list((tmp_path / "logs" / "f").glob("*.jsonl"))
    on_disk = sum(f.stat().st_size for f in files)
    assert on_disk <= 64 * 1024 + 16 * 1024 + 30 * 1100  # the bound, plus the open segment's last batch
    kept = [json.loads(line)["request_id"] for line in store.read("f", limit=0)]
    assert kept[-1] == "req-000399"  # the newest are kept, the oldest dropped
    assert "req-000000" not in kept
    assert kept == sorted(kept)

    reopened = LogStore(tmp_path / "logs", lambda: live)
    assert [json.loads(line)["request_id"] for line in reopened.read("f", limit=0)] == kept

    live.discard("f")
    store.gc()
    assert not (tmp_path / "logs" / "f").exists()
    assert (tmp_path / "logs" / "g").exists()


def test_parse_since() -> None:
    now = 1_700_000_000.0
    assert parse_since("10m", now) == int((now - 600) * 1000)
    assert parse_since("2h", now) == int((now - 7200) * 1000)
    assert parse_since("1700000000000", now) == 1_700_000_000_000
    assert parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000_000
    with pytest.raises(ValueError):
        parse_since("soon", now)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_max_memory_used_is_read_from_the_sandbox_peak(server, lam) -> None:
    create(
        lam,
        "hog",
        """
        def handler(event, context):
            blob = bytearray(event["mb"] * 1024 * 1024)
            for i in range(0, len(blob), 4096):
                blob[i] = 1
            return len(blob)
        """,
        MemorySize=512,
    )
    lam.invoke(FunctionName="hog", Payload=json.dumps({"mb": 1}))
    lam.invoke(FunctionName="hog", Payload=json.dumps({"mb": 120}))
    assert wait_for(lambda: len([e for e in events(server, "hog") if e["request_id"]]) == 2, timeout=10)
    used = [int(REPORT.search(e["message"])["used"]) for e in events(server, "hog") if e["request_id"]]
    assert used[1] >= 120
