"""CloudWatch Logs' API on ember's endpoint (ember.api.cwlogs): boto3's `logs` client and the AWS CLI
read a function's START / END / REPORT lines as log group /aws/lambda/NAME, one stream per sandbox,
with CloudWatch's pagination, tokens and errors; with `--auth`, calls are signed for service `logs`.

The venv's AWS CLI is v1 (PyPI has no v2), which has no `aws logs tail` (a v2 command). Its exact
call sequence (FilterLogEvents with logGroupName, interleaved, startTime = now - 10m, paginated; with
--follow, the same call repeated with the newest timestamp seen, deduplicated by eventId) is
replayed with boto3 here; `aws logs filter-log-events` / `get-log-events` / `describe-*` run through
the real v1 CLI. (The real v2 `aws logs tail [--follow]` was checked by hand against a v2 build:
docs/decisions/0010-cloudwatch-logs-api.md.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import EmberServer, create, wait_for

from ember.api.logpattern import PatternError, compile_pattern

KEY, SECRET = "AKIDEXAMPLE", "secret"
GROUP = "/aws/lambda/talk"
TALK = """
import json, os, time
print("init says hi")
def handler(event, context):
    print("handling", event.get("n"))
    print(json.dumps({"level": event.get("level", "INFO"), "n": event.get("n"), "ok": True}))
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return {"stream": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"], "rid": context.aws_request_id}
"""


def logs_client(srv: EmberServer, key: str = KEY, secret: str = SECRET, region: str = "us-east-1"):
    return boto3.client(
        "logs",
        endpoint_url=srv.url,
        region_name=region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 0}, read_timeout=60),
    )


def invoke(lam, name: str, **event: object) -> dict:
    return json.loads(lam.invoke(FunctionName=name, Payload=json.dumps(event))["Payload"].read())


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def stored_lines(srv: EmberServer, name: str) -> list[str]:
    """What ember's own log route holds, split into CloudWatch's one event a line."""
    with urllib.request.urlopen(f"{srv.url}/_ember/logs/{name}?limit=0") as resp:
        docs = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    return [line for d in docs for line in d["message"].split("\n")]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    s = EmberServer(tmp_path_factory.mktemp("cwlogs") / "data").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def talk(srv: EmberServer) -> dict:
    """Function `talk`: three invocations in one sandbox, then two at once (a second stream)."""
    lam = srv.client()
    create(lam, "talk", TALK)
    for name in ("other-a", "other-b", "Other-C"):
        create(lam, name, TALK)
    first = [invoke(lam, "talk", n=i, level="ERROR" if i == 1 else "INFO") for i in range(3)]
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(invoke(lam, "talk", n=10 + i, sleep=0.5)))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rids = [r["rid"] for r in first + results]
    streams = {r["stream"] for r in first + results}
    assert len(streams) >= 2  # the two at once cannot share a sandbox
    logs = logs_client(srv)
    assert wait_for(
        lambda: sum("REPORT" in e["message"] for e in logs.filter_log_events(logGroupName=GROUP)["events"]) == 5
    )
    return {"rids": rids, "streams": streams, "first_stream": first[0]["stream"]}


# ---------------------------------------------------------------------- DescribeLogGroups


def test_describe_log_groups_prefix_pattern_and_pagination(srv, talk) -> None:
    logs = logs_client(srv)
    names = [g["logGroupName"] for g in logs.describe_log_groups()["logGroups"]]
    assert names == sorted(f"/aws/lambda/{n}" for n in ("talk", "other-a", "other-b", "Other-C"))
    group = next(g for g in logs.describe_log_groups()["logGroups"] if g["logGroupName"] == GROUP)
    assert group["arn"] == f"arn:aws:logs:us-east-1:000000000000:log-group:{GROUP}:*"
    assert group["logGroupArn"] == f"arn:aws:logs:us-east-1:000000000000:log-group:{GROUP}"
    assert group["storedBytes"] > 0 and group["creationTime"] > 0
    got = logs.describe_log_groups(logGroupNamePrefix="/aws/lambda/other")["logGroups"]
    assert [g["logGroupName"] for g in got] == ["/aws/lambda/other-a", "/aws/lambda/other-b"]
    got = logs.describe_log_groups(logGroupNamePattern="other")["logGroups"]  # case-insensitive substring
    assert len(got) == 3
    # pagination: one a page, every group once, in order
    page = logs.describe_log_groups(limit=1)
    assert len(page["logGroups"]) == 1 and "nextToken" in page
    pages = list(logs.get_paginator("describe_log_groups").paginate(PaginationConfig={"PageSize": 1}))
    assert [g["logGroupName"] for p in pages for g in p["logGroups"]] == names
    assert len(pages) == 4 and "nextToken" not in pages[-1]
    with pytest.raises(ClientError) as exc:
        logs.describe_log_groups(logGroupNamePrefix="/aws", logGroupNamePattern="x")
    assert error_code(exc) == "InvalidParameterException"
    with pytest.raises(ClientError) as exc:
        logs.describe_log_groups(nextToken="not-a-token")
    assert error_code(exc) == "InvalidParameterException"
    assert logs.describe_log_groups(logGroupNamePrefix="/aws/ecs")["logGroups"] == []


# ---------------------------------------------------------------------- DescribeLogStreams


def test_describe_log_streams_order_limit_and_pagination(srv, talk) -> None:
    logs = logs_client(srv)
    streams = logs.describe_log_streams(logGroupName=GROUP)["logStreams"]
    assert [s["logStreamName"] for s in streams] == sorted(talk["streams"])
    for s in streams:
        assert s["firstEventTimestamp"] <= s["lastEventTimestamp"]
        assert s["arn"].endswith(f"log-group:{GROUP}:log-stream:{s['logStreamName']}")
    by_last = logs.describe_log_streams(logGroupName=GROUP, orderBy="LastEventTime", descending=True)
    lasts = [s["lastEventTimestamp"] for s in by_last["logStreams"]]
    assert lasts == sorted(lasts, reverse=True)
    desc = logs.describe_log_streams(logGroupName=GROUP, descending=True)["logStreams"]
    assert [s["logStreamName"] for s in desc] == sorted(talk["streams"], reverse=True)
    for kw in ({}, {"orderBy": "LastEventTime", "descending": True}, {"descending": True}):
        whole = [s["logStreamName"] for s in logs.describe_log_streams(logGroupName=GROUP, **kw)["logStreams"]]
        got, token = [], None
        for _ in range(10):
            more = {"nextToken": token} if token else {}
            page = logs.describe_log_streams(logGroupName=GROUP, limit=1, **kw, **more)
            assert len(page["logStreams"]) == 1, kw
            got.append(page["logStreams"][0]["logStreamName"])
            token = page.get("nextToken")
            if token is None:
                break
        assert got == whole, kw
    prefix = talk["first_stream"][:-20]
    assert len(logs.describe_log_streams(logGroupName=GROUP, logStreamNamePrefix=prefix)["logStreams"]) >= 1
    assert logs.describe_log_streams(logGroupName=GROUP, logStreamNamePrefix="1999/")["logStreams"] == []
    # by ARN, as logGroupIdentifier
    arn = f"arn:aws:logs:us-east-1:000000000000:log-group:{GROUP}"
    assert len(logs.describe_log_streams(logGroupIdentifier=arn)["logStreams"]) == len(talk["streams"])
    with pytest.raises(ClientError) as exc:
        logs.describe_log_streams(logGroupName=GROUP, orderBy="LastEventTime", logStreamNamePrefix="2")
    assert error_code(exc) == "InvalidParameterException"
    with pytest.raises(ClientError) as exc:
        logs.describe_log_streams(logGroupName="/aws/lambda/nope")
    assert error_code(exc) == "ResourceNotFoundException"
    assert "log group does not exist" in str(exc.value)
    with pytest.raises(ClientError) as exc:  # a token of the other order
        token = logs.describe_log_streams(logGroupName=GROUP, limit=1)["nextToken"]
        logs.describe_log_streams(logGroupName=GROUP, limit=1, orderBy="LastEventTime", nextToken=token)
    assert error_code(exc) == "InvalidParameterException"


# ---------------------------------------------------------------------- GetLogEvents


def test_get_log_events_head_tail_tokens_and_time_range(srv, talk) -> None:
    logs = logs_client(srv)
    stream = talk["first_stream"]
    full = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, startFromHead=True)
    msgs = [e["message"] for e in full["events"]]
    assert msgs[0] == "init says hi\n"
    rid0 = talk["rids"][0]
    assert msgs[1] == f"START RequestId: {rid0} Version: $LATEST\n"
    assert msgs[2] == "handling 0\n"
    assert msgs[4] == f"END RequestId: {rid0}\n"
    assert msgs[5].startswith(f"REPORT RequestId: {rid0}\tDuration: ") and msgs[5].endswith("\n")
    assert all(m.endswith("\n") for m in msgs)
    stamps = [e["timestamp"] for e in full["events"]]
    assert stamps == sorted(stamps)
    # the default reads from the tail: the newest `limit`, oldest first
    tail = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, limit=2)
    assert [e["message"] for e in tail["events"]] == msgs[-2:]
    # forward from the head, two at a time, until the token comes back unchanged (as in CloudWatch)
    got, token = [], None
    for _ in range(100):
        kw = {"nextToken": token} if token else {"startFromHead": True}
        page = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, limit=2, **kw)
        got += [e["message"] for e in page["events"]]
        if page["nextForwardToken"] == token:
            assert page["events"] == []
            break
        token = page["nextForwardToken"]
    assert got == msgs
    # backward from the tail, until the backward token comes back unchanged
    got, token = [], None
    for _ in range(100):
        kw = {"nextToken": token} if token else {}
        page = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, limit=3, **kw)
        got = [e["message"] for e in page["events"]] + got
        if page["nextBackwardToken"] == token:
            break
        token = page["nextBackwardToken"]
    assert got == msgs
    # after the end, a backward token reads what came before the end again
    page = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, nextToken=full["nextForwardToken"])
    assert page["events"] == [] and page["nextForwardToken"] == full["nextForwardToken"]
    back = logs.get_log_events(
        logGroupName=GROUP, logStreamName=stream, nextToken=page["nextBackwardToken"], limit=1
    )
    assert [e["message"] for e in back["events"]] == msgs[-1:]
    # time range: [startTime, endTime)
    t_last = stamps[-1]
    ranged = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, startTime=t_last, startFromHead=True)
    assert ranged["events"] and all(e["timestamp"] == t_last for e in ranged["events"])
    before = logs.get_log_events(logGroupName=GROUP, logStreamName=stream, endTime=t_last, startFromHead=True)
    assert all(e["timestamp"] < t_last for e in before["events"])
    assert len(before["events"]) + len(ranged["events"]) == len(msgs)
    # errors
    with pytest.raises(ClientError) as exc:
        logs.get_log_events(logGroupName=GROUP, logStreamName="2026/01/01/[$LATEST]nope")
    assert error_code(exc) == "ResourceNotFoundException" and "log stream" in str(exc.value)
    with pytest.raises(ClientError) as exc:
        logs.get_log_events(logGroupName="/aws/lambda/nope", logStreamName=stream)
    assert error_code(exc) == "ResourceNotFoundException" and "log group" in str(exc.value)
    for bad in ("x/1-2-3-4", "f/1-2-3", "f/a-b-c-d", "b/"):
        with pytest.raises(ClientError) as exc:
            logs.get_log_events(logGroupName=GROUP, logStreamName=stream, nextToken=bad)
        assert error_code(exc) == "InvalidParameterException", bad


# ---------------------------------------------------------------------- FilterLogEvents


def test_filter_log_events_streams_patterns_and_pagination(srv, talk) -> None:
    logs = logs_client(srv)
    everything = logs.filter_log_events(logGroupName=GROUP)
    evs = everything["events"]
    assert "nextToken" not in everything
    assert sorted(e["message"][:-1] for e in evs) == sorted(stored_lines(srv, "talk"))  # one event a line
    assert {e["logStreamName"] for e in evs} == talk["streams"]
    assert [e["timestamp"] for e in evs] == sorted(e["timestamp"] for e in evs)
    assert len({e["eventId"] for e in evs}) == len(evs)
    rids = talk["rids"]
    for word in ("START", "END", "REPORT"):
        got = [e["message"] for e in evs if e["message"].startswith(word + " RequestId: ")]
        assert sorted(m.split()[2] for m in got) == sorted(rids), word

    def messages(**kw: object) -> list[str]:
        return [e["message"] for e in logs.filter_log_events(logGroupName=GROUP, **kw)["events"]]

    assert len(messages(filterPattern="REPORT")) == 5
    assert len(messages(filterPattern='"Billed Duration"')) == 5
    assert len(messages(filterPattern='"Init Duration"')) == len(talk["streams"])  # a cold start a sandbox
    assert len(messages(filterPattern="?START ?END")) == 10
    assert len(messages(filterPattern="RequestId -REPORT")) == 10
    assert len(messages(filterPattern="1 handling")) == 3  # both terms, anywhere: handling 1, 10, 11
    assert messages(filterPattern='"1 handling"') == []  # a phrase, as written
    assert messages(filterPattern='"handling 0"') == ["handling 0\n"]
    assert sorted(messages(filterPattern="%handling 1[01]%")) == ["handling 10\n", "handling 11\n"]
    errors = messages(filterPattern='{ $.level = "ERROR" }')
    assert [json.loads(m)["n"] for m in errors] == [1]
    assert len(messages(filterPattern="{ $.n >= 10 && $.ok IS TRUE }")) == 2
    assert len(messages(filterPattern='{ ($.n = 0 || $.n = 2) && $.level = "INF*" }')) == 2
    assert len(messages(filterPattern="{ $.missing NOT EXISTS }")) == 5
    # streams
    one = talk["first_stream"]
    assert {e["logStreamName"] for e in logs.filter_log_events(logGroupName=GROUP, logStreamNames=[one])["events"]} == {
        one
    }
    assert logs.filter_log_events(logGroupName=GROUP, logStreamNamePrefix="1999/")["events"] == []
    # time range
    t_mid = evs[len(evs) // 2]["timestamp"]
    later = logs.filter_log_events(logGroupName=GROUP, startTime=t_mid)["events"]
    earlier = logs.filter_log_events(logGroupName=GROUP, endTime=t_mid)["events"]
    assert all(e["timestamp"] >= t_mid for e in later) and all(e["timestamp"] < t_mid for e in earlier)
    assert len(later) + len(earlier) == len(evs)
    # pagination: limit 3 a page, every event once, in order
    pages = list(
        logs.get_paginator("filter_log_events").paginate(
            logGroupName=GROUP, interleaved=True, PaginationConfig={"PageSize": 3}
        )
    )
    assert all(len(p["events"]) <= 3 for p in pages) and len(pages) == -(-len(evs) // 3)
    assert [e["eventId"] for p in pages for e in p["events"]] == [e["eventId"] for e in evs]
    # errors, in CloudWatch Logs' shape
    cases = [
        ({"logGroupName": "/aws/lambda/nope"}, "ResourceNotFoundException"),
        ({"logGroupName": "/aws/ecs/talk"}, "ResourceNotFoundException"),
        ({"logGroupName": GROUP, "filterPattern": "[ip, user]"}, "InvalidParameterException"),
        ({"logGroupName": GROUP, "filterPattern": "{ $.n = }"}, "InvalidParameterException"),
        ({"logGroupName": GROUP, "filterPattern": '"unterminated'}, "InvalidParameterException"),
        ({"logGroupName": GROUP, "logStreamNames": [one], "logStreamNamePrefix": "x"}, "InvalidParameterException"),
        ({"logGroupName": GROUP, "nextToken": "n/garbage"}, "InvalidParameterException"),
        ({"logGroupName": GROUP, "startTime": 10, "endTime": 5}, "InvalidParameterException"),
        ({"logGroupName": GROUP, "logGroupIdentifier": GROUP}, "InvalidParameterException"),
        ({}, "InvalidParameterException"),
    ]
    for kw, code in cases:
        with pytest.raises(ClientError) as exc:
            logs.filter_log_events(**kw)
        assert error_code(exc) == code, kw
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400, kw
    # bad input lost nothing: the same events are still there
    assert [e["eventId"] for e in logs.filter_log_events(logGroupName=GROUP)["events"]] == [
        e["eventId"] for e in evs
    ]


def _post(srv: EmberServer, body: bytes, target: str | None) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": "application/x-amz-json-1.1"}
    if target is not None:
        headers["X-Amz-Target"] = target
    req = urllib.request.Request(srv.url + "/", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def test_malformed_requests_are_refused_in_cloudwatch_shape(srv, talk) -> None:
    cases = [
        (b"{not json", "Logs_20140328.FilterLogEvents", "SerializationException"),
        (b"[1, 2]", "Logs_20140328.FilterLogEvents", "SerializationException"),
        (b'{"logGroupName": 7}', "Logs_20140328.FilterLogEvents", "InvalidParameterException"),
        (b'{"logGroupName": "/aws/lambda/talk", "limit": "9"}', "Logs_20140328.FilterLogEvents",
         "InvalidParameterException"),
        (b'{"logGroupName": "/aws/lambda/talk", "limit": 0}', "Logs_20140328.FilterLogEvents",
         "InvalidParameterException"),
        (b'{"logGroupName": "/aws/lambda/talk", "startTime": true}', "Logs_20140328.FilterLogEvents",
         "InvalidParameterException"),
        (b'{"logGroupName": "/aws/lambda/talk", "logStreamNames": []}', "Logs_20140328.FilterLogEvents",
         "InvalidParameterException"),
        (b'{"logGroupName": "/aws/lambda/talk"}', "Logs_20140328.GetLogEvents", "InvalidParameterException"),
        (b'{"logGroupName": "/aws/lambda/talk", "orderBy": "Size"}', "Logs_20140328.DescribeLogStreams",
         "InvalidParameterException"),
        (b'{"limit": 51}', "Logs_20140328.DescribeLogGroups", "InvalidParameterException"),
        (b"{}", "Logs_20140328.PutLogEvents", "UnknownOperationException"),
    ]  # fmt: skip
    for body, target, code in cases:
        status, headers, raw = _post(srv, body, target)
        doc = json.loads(raw)
        assert (status, doc["__type"]) == (400, code), (body, target, doc)
        assert doc["message"] and headers["Content-Type"].startswith("application/x-amz-json-1.1")
    # POST / that is not a CloudWatch Logs call is the Lambda API's unknown operation, as before
    status, headers, raw = _post(srv, b"{}", None)
    assert status == 404 and headers["x-amzn-ErrorType"] == "UnknownOperationException"
    status, headers, raw = _post(srv, b"{}", "DynamoDB_20120810.ListTables")
    assert status == 404 and headers["x-amzn-ErrorType"] == "UnknownOperationException"
    # a body that is not JSON 1.1's content type is still read (botocore always sends it)
    status, _, raw = _post(srv, b"", "Logs_20140328.DescribeLogGroups")
    assert status == 200 and json.loads(raw)["logGroups"]


# ---------------------------------------------------------------------- aws logs tail's calls


def _detailed(event: dict) -> str:
    """`aws logs tail`'s default (detailed) format, without colour."""
    when = datetime.fromtimestamp(event["timestamp"] / 1000, UTC).isoformat(timespec="microseconds")
    return f"{when} {event['logStreamName']} {event['message'].rstrip()}"


def test_aws_logs_tail_call_sequence_prints_start_end_report(srv, talk) -> None:
    """What `aws logs tail /aws/lambda/talk` does (awscli v2's customizations/logs/tail.py)."""
    logs = logs_client(srv)
    since = int((time.time() - 600) * 1000)
    pages = logs.get_paginator("filter_log_events").paginate(
        logGroupName=GROUP, interleaved=True, startTime=since
    )
    out = [_detailed(e) for p in pages for e in p["events"]]
    rid = talk["rids"][0]
    for line in (f"START RequestId: {rid} Version: $LATEST", f"END RequestId: {rid}"):
        assert any(o.endswith(f"{talk['first_stream']} {line}") for o in out), line
    assert any(f" REPORT RequestId: {rid}\tDuration: " in o for o in out)


def test_aws_logs_tail_follow_call_sequence_sees_new_invocations_once(srv, talk) -> None:
    """`aws logs tail --follow`: FilterLogEvents, then again from the newest timestamp seen
    (events at that timestamp come again and are dropped by eventId), every few seconds."""
    logs = logs_client(srv)
    lam = srv.client()
    kwargs: dict = {"logGroupName": GROUP, "interleaved": True, "startTime": int((time.time() - 600) * 1000)}
    seen: dict[int, set[str]] = defaultdict(set)
    printed: list[str] = []

    def poll() -> None:
        while True:
            resp = logs.filter_log_events(**kwargs)
            for e in resp["events"]:
                if e["eventId"] not in seen[e["timestamp"]]:
                    seen[e["timestamp"]].add(e["eventId"])
                    printed.append(e["message"])
            if seen:
                newest = max(seen)
                for ts in [t for t in seen if t != newest]:
                    del seen[ts]
            if "nextToken" in resp:
                kwargs["nextToken"] = resp["nextToken"]
            else:
                if seen:
                    kwargs["startTime"] = max(seen)
                kwargs.pop("nextToken", None)
                return

    poll()
    before = len(printed)
    assert sum(m.startswith("REPORT ") for m in printed) == 5
    rids = [invoke(lam, "talk", n=20 + i)["rid"] for i in range(2)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(m.startswith("REPORT ") for m in printed) < 7:
        time.sleep(0.2)
        poll()
    new = printed[before:]
    for rid in rids:
        assert new.count(f"START RequestId: {rid} Version: $LATEST\n") == 1
        assert new.count(f"END RequestId: {rid}\n") == 1
        assert sum(m.startswith(f"REPORT RequestId: {rid}\t") for m in new) == 1
    poll()
    poll()
    assert len(printed) == before + len(new)  # polling again prints nothing twice


# ---------------------------------------------------------------------- the AWS CLI


def _aws_env(tmp_path: Path, key: str = KEY, secret: str = SECRET) -> dict[str, str]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_MAX_ATTEMPTS": "1",
    }
    env.pop("AWS_PROFILE", None)
    return env


def _aws(srv: EmberServer, tmp_path: Path, *args: str, key: str = KEY, secret: str = SECRET, cli: str = ""):
    aws = cli or str(Path(sys.executable).with_name("aws"))
    return subprocess.run(
        [aws, "logs", *args, "--endpoint-url", srv.url],
        env=_aws_env(tmp_path, key, secret), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _cli_v2(tmp_path: Path) -> str | None:
    """An AWS CLI that has `logs tail` (v2): $EMBER_AWSCLI_V2, else `aws` on PATH, else the venv's."""
    for cli in (os.environ.get("EMBER_AWSCLI_V2"), shutil.which("aws"), str(Path(sys.executable).with_name("aws"))):
        if not cli:
            continue
        probe = subprocess.run(
            [cli, "logs", "tail", "help"], env=_aws_env(tmp_path), capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return cli
    return None


def _check_cli(srv: EmberServer, tmp_path: Path, name: str, rid: str, **creds: str) -> None:
    group = f"/aws/lambda/{name}"
    done = _aws(srv, tmp_path, "filter-log-events", "--log-group-name", group, "--output", "json", **creds)
    assert done.returncode == 0, done.stderr
    msgs = [e["message"] for e in json.loads(done.stdout)["events"]]
    assert f"START RequestId: {rid} Version: $LATEST\n" in msgs
    assert f"END RequestId: {rid}\n" in msgs
    assert any(m.startswith(f"REPORT RequestId: {rid}\tDuration: ") for m in msgs)
    done = _aws(srv, tmp_path, "describe-log-streams", "--log-group-name", group, "--output", "json", **creds)
    assert done.returncode == 0, done.stderr
    stream = json.loads(done.stdout)["logStreams"][0]["logStreamName"]
    done = _aws(
        srv, tmp_path, "get-log-events", "--log-group-name", group, "--log-stream-name", stream,
        "--start-from-head", "--output", "text", "--query", "events[].message", **creds,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"START RequestId: {rid} Version: $LATEST" in done.stdout and "REPORT RequestId" in done.stdout
    done = _aws(srv, tmp_path, "describe-log-groups", "--output", "json", **creds)
    assert done.returncode == 0 and group in done.stdout, done.stderr
    done = _aws(srv, tmp_path, "filter-log-events", "--log-group-name", "/aws/lambda/none", **creds)
    assert done.returncode != 0 and "ResourceNotFoundException" in done.stderr


def test_aws_cli_reads_an_invocations_log(srv, talk, tmp_path: Path) -> None:
    lam = srv.client()
    create(lam, "clilog", TALK)
    rid = invoke(lam, "clilog", n=1)["rid"]
    logs = logs_client(srv)
    assert wait_for(lambda: logs.filter_log_events(logGroupName="/aws/lambda/clilog", filterPattern="REPORT")["events"])
    _check_cli(srv, tmp_path, "clilog", rid)


# ---------------------------------------------------------------------- with --auth


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    d = tmp_path_factory.mktemp("cwauth")
    creds = d / "credentials"
    creds.write_text(f"{KEY} {SECRET}\n")
    s = EmberServer(d / "data", "--auth", str(creds)).start()
    yield s
    s.stop()


def test_with_auth_logs_calls_are_signed_for_service_logs(authed, tmp_path: Path) -> None:
    lam = authed.client()
    create(lam, "secure", TALK)
    rid = invoke(lam, "secure", n=1)["rid"]
    logs = logs_client(authed)
    assert wait_for(lambda: logs.filter_log_events(logGroupName="/aws/lambda/secure", filterPattern="REPORT")["events"])
    assert [g["logGroupName"] for g in logs.describe_log_groups()["logGroups"]] == ["/aws/lambda/secure"]
    assert logs_client(authed, region="eu-west-1").describe_log_groups()["logGroups"]
    _check_cli(authed, tmp_path, "secure", rid)
    # refusals, in CloudWatch Logs' shape
    with pytest.raises(ClientError) as exc:
        logs_client(authed, secret="wrong").describe_log_groups()
    assert error_code(exc) == "InvalidSignatureException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as exc:
        logs_client(authed, key="AKIDUNKNOWN").filter_log_events(logGroupName="/aws/lambda/secure")
    assert error_code(exc) == "UnrecognizedClientException"
    status, _, raw = _post(authed, b"{}", "Logs_20140328.DescribeLogGroups")
    assert status == 400 and json.loads(raw)["__type"] == "MissingAuthenticationTokenException"
    done = _aws(authed, tmp_path, "describe-log-groups", secret="wrong")
    assert done.returncode != 0 and "InvalidSignatureException" in done.stderr
    # a signature scoped to the wrong service is refused both ways
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    def signed(service: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        req = AWSRequest(method="POST", url=authed.url + path, data=body, headers=headers)
        SigV4Auth(Credentials(KEY, SECRET), service, "us-east-1").add_auth(req)
        r = urllib.request.Request(req.url, data=body, method="POST", headers=dict(req.headers.items()))
        try:
            with urllib.request.urlopen(r, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    logs_headers = {"X-Amz-Target": "Logs_20140328.DescribeLogGroups", "Content-Type": "application/x-amz-json-1.1"}
    status, raw = signed("lambda", "/", b"{}", logs_headers)
    assert status == 400 and json.loads(raw)["__type"] == "InvalidSignatureException"
    assert "'logs'" in json.loads(raw)["message"]
    status, raw = signed("logs", "/", b"{}", logs_headers)
    assert status == 200
    status, raw = signed("logs", "/2015-03-31/functions/secure/invocations", b"{}", {})
    assert status == 403 and "'lambda'" in json.loads(raw)["message"]


# ---------------------------------------------------------------------- patterns, without a server


def test_filter_pattern_subset() -> None:
    def m(pattern: str, message: str) -> bool:
        pred = compile_pattern(pattern)
        return True if pred is None else pred(message)

    assert compile_pattern(None) is None and compile_pattern("") is None and compile_pattern('""') is None
    assert m("ERROR", "an ERROR here") and not m("ERROR", "an error here")
    assert m("ERROR disk", "disk ERROR") and not m("ERROR disk", "ERROR only")
    assert m('"timed out after"', 'Task timed out after 3.00 seconds') and not m('"timed after"', "timed out after")
    assert m('"say \\"hi\\""', 'they say "hi"')
    assert m("?ERROR ?WARN", "WARN x") and m("?ERROR ?WARN", "ERROR") and not m("?ERROR ?WARN", "INFO")
    assert m("ERROR -retry", "ERROR") and not m("ERROR -retry", "ERROR retry")
    assert m("%[0-9]{3} ms%", "took 123 ms") and not m("%^took%", "it took")
    assert m('{ $.a = "x" }', '{"a": "x"}') and not m('{ $.a = "x" }', '{"a": "y"}')
    assert m("{ $.a = x }", '{"a": "x"}')  # a bare word is a string
    assert not m('{ $.a = "x" }', "not json") and not m('{ $.a = "x" }', '["x"]')
    assert m("{ $.a.b[1] = 2 }", '{"a": {"b": [1, 2]}}') and not m("{ $.a.b[5] = 2 }", '{"a": {"b": [1]}}')
    assert m("{ $.n > 1.5 }", '{"n": 2}') and not m("{ $.n > 1.5 }", '{"n": "2"}')
    assert m("{ $.n != 1 }", '{"n": 2}') and not m("{ $.n != 1 }", "{}")
    assert m('{ $.s = "ab*" }', '{"s": "abc"}') and not m('{ $.s = "ab*" }', '{"s": "xabc"}')
    assert m("{ $.ok IS TRUE }", '{"ok": true}') and not m("{ $.ok IS TRUE }", '{"ok": 1}')
    assert m("{ $.v IS NULL }", '{"v": null}') and m("{ $.v NOT EXISTS }", "{}")
    assert m("{ $.a = 1 || $.b = 2 && $.c = 3 }", '{"a": 1}')  # && binds tighter
    assert not m("{ ($.a = 1 || $.b = 2) && $.c = 3 }", '{"a": 1}')
    for bad in ("[a, b]", "{ $.a = }", "{ $.a", "{ a = 1 }", '{ $.a > "x" }', '"open', "%(%", "{ }", "x" * 1025):
        with pytest.raises(PatternError):
            compile_pattern(bad)


# ---------------------------------------------------------------------- fuzzing


MEMBERS = {
    "DescribeLogGroups": ["logGroupNamePrefix", "logGroupNamePattern", "logGroupIdentifiers", "limit", "nextToken",
                          "includeLinkedAccounts", "logGroupClass"],
    "DescribeLogStreams": ["logGroupName", "logGroupIdentifier", "logStreamNamePrefix", "orderBy", "descending",
                           "limit", "nextToken"],
    "GetLogEvents": ["logGroupName", "logGroupIdentifier", "logStreamName", "startTime", "endTime", "limit",
                     "startFromHead", "nextToken", "unmask"],
    "FilterLogEvents": ["logGroupName", "logGroupIdentifier", "logStreamNames", "logStreamNamePrefix", "startTime",
                        "endTime", "filterPattern", "limit", "nextToken", "interleaved"],
}  # fmt: skip


def test_fuzzed_requests_never_fail_the_server(srv, talk) -> None:
    """Any JSON object of known and odd members, of any types: a 200 or a 400 in CloudWatch Logs'
    shape, never a 5xx; the log is unchanged afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    logs = logs_client(srv)
    before = [e["eventId"] for e in logs.filter_log_events(logGroupName=GROUP)["events"]]
    stream = talk["first_stream"]
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
        st.sampled_from([GROUP, "/aws/lambda/nope", stream, "f/1-1-1-1", "b/0-0-0-0", "n/1-2-3-4", "REPORT",
                         '{ $.n > 1 }', "[a]", "LastEventTime", "LogStreamName", "", "arn:aws:logs:x:y:log-group:"
                         + GROUP + ":*"]),
        st.text(max_size=40),
    )  # fmt: skip
    values = st.one_of(
        scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=5), scalars, max_size=2)
    )

    @st.composite
    def request(draw) -> tuple[str, dict]:
        op = draw(st.sampled_from(sorted(MEMBERS)))
        keys = draw(st.lists(st.sampled_from([*MEMBERS[op], "bogus"]), max_size=5, unique=True))
        return op, {k: draw(values) for k in keys}

    @given(request())
    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(req: tuple[str, dict]) -> None:
        op, body = req
        status, _, raw = _post(srv, json.dumps(body).encode(), f"Logs_20140328.{op}")
        doc = json.loads(raw)
        assert status in (200, 400), (op, body, status, doc)
        if status == 400:
            assert doc["__type"] in (
                "InvalidParameterException", "ResourceNotFoundException", "SerializationException"
            ), (op, body, doc)  # fmt: skip

    check()
    assert [e["eventId"] for e in logs.filter_log_events(logGroupName=GROUP)["events"]] == before
