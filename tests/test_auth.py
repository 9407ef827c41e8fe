"""`ember serve --auth FILE`: SigV4 on every Lambda API request, checked with botocore's signer.
boto3 and the AWS CLI with the right keys work unchanged; a wrong secret, an unknown key, no
signature, a tampered body or a skewed clock is a 403 in Lambda's shape. Without --auth ember
stays on loopback and says so."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from conftest import EMBER, ROLE, EmberServer, create, make_zip
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ember.api.auth import CredentialsError, bind_refusal, is_loopback, load_credentials

KEY, SECRET = "AKIDEXAMPLE", "secret"  # what EmberServer.client() signs with
OTHER_KEY, OTHER_SECRET = "AKIDSECOND", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
HELLO = "def handler(event, context):\n    return {'got': event}\n"


@pytest.fixture(scope="module")
def creds_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "credentials"
    path.write_text(
        f"# ember credentials\n\n{KEY} {SECRET}\n  # indented comment\n{OTHER_KEY}\t{OTHER_SECRET}\n"
    )
    return path


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory, creds_file: Path) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path_factory.mktemp("authed") / "data", "--auth", str(creds_file)).start()
    yield srv
    srv.stop()


def _signed(
    srv: EmberServer,
    method: str,
    path: str,
    body: bytes = b"",
    key: str = KEY,
    secret: str = SECRET,
    when: dt.datetime | None = None,
    headers: dict[str, str] | None = None,
) -> AWSRequest:
    req = AWSRequest(method=method, url=srv.url + path, data=body, headers=headers or {})
    signer = SigV4Auth(Credentials(key, secret), "lambda", "us-east-1")
    if when is None:
        signer.add_auth(req)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            signer.add_auth(req)
    return req


def _send(req: AWSRequest, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    data = req.body if body is None else body
    r = urllib.request.Request(
        req.url, data=data or None, method=req.method, headers=dict(req.headers.items())
    )
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def _denied(result: tuple[int, dict[str, str], bytes], error_type: str) -> str:
    status, headers, body = result
    assert status == 403, (status, body)
    assert headers.get("x-amzn-ErrorType") == error_type, (headers, body)
    assert headers.get("x-amzn-RequestId")
    return json.loads(body)["message"]


# ---------------------------------------------------------------------- the happy path


def test_startup_line_says_auth_is_on(authed) -> None:
    assert authed.ready_line == f"ember listening on {authed.url} (auth on: SigV4, 2 keys)"


def test_boto3_with_the_right_keys_works_unchanged(authed) -> None:
    lam = authed.client()
    out = create(lam, "authfn", HELLO)
    arn = out["FunctionArn"]
    assert lam.get_function(FunctionName="authfn")["Configuration"]["FunctionArn"] == arn
    # names that botocore percent-encodes in the path (':' and '$') and in the query
    for kw in (
        {"FunctionName": arn},
        {"FunctionName": f"{arn}:$LATEST"},
        {"FunctionName": "authfn", "Qualifier": "$LATEST"},
        {"FunctionName": "000000000000:function:authfn"},
    ):
        got = lam.invoke(Payload=json.dumps({"kw": list(kw)}).encode(), **kw)
        assert json.loads(got["Payload"].read()) == {"got": {"kw": list(kw)}}, kw
    assert lam.get_function_configuration(FunctionName=arn, Qualifier="$LATEST")["FunctionName"] == "authfn"
    page = lam.list_functions(MaxItems=1)
    assert [f["FunctionName"] for f in page["Functions"]] == ["authfn"]
    lam.put_function_concurrency(FunctionName="authfn", ReservedConcurrentExecutions=2)
    assert lam.get_function_concurrency(FunctionName="authfn")["ReservedConcurrentExecutions"] == 2
    lam.update_function_configuration(FunctionName="authfn", Description="with spaces & symbols: é/+=")
    assert lam.get_account_settings()["AccountUsage"]["FunctionCount"] == 1
    # a bigger body (read once by the auth check, then by the handler)
    big = {"blob": "x" * 2_000_000}
    assert json.loads(
        lam.invoke(FunctionName="authfn", Payload=json.dumps(big).encode())["Payload"].read()
    ) == {"got": big}
    # a second key from the file works too
    import boto3

    other = boto3.client(
        "lambda", endpoint_url=authed.url, region_name="eu-west-1",
        aws_access_key_id=OTHER_KEY, aws_secret_access_key=OTHER_SECRET,
    )  # fmt: skip
    assert other.get_function(FunctionName="authfn")["Configuration"]["FunctionName"] == "authfn"


def _aws(srv: EmberServer, tmp_path: Path, *args: str, key: str = KEY, secret: str = SECRET):
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
    aws = Path(sys.executable).with_name("aws")
    return subprocess.run(
        [str(aws), "lambda", "--endpoint-url", srv.url, *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_aws_cli_with_the_right_keys_works_and_wrong_ones_fail(authed, tmp_path: Path) -> None:
    lam = authed.client()
    create(lam, "clifn", HELLO)
    out = tmp_path / "out.json"
    arn = "arn:aws:lambda:us-east-1:000000000000:function:clifn:$LATEST"
    done = _aws(authed, tmp_path, "invoke", "--function-name", arn, "--payload", '{"cli": 1}', str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == {"got": {"cli": 1}}
    done = _aws(authed, tmp_path, "list-functions", "--max-items", "5")
    assert done.returncode == 0, done.stderr
    assert "clifn" in done.stdout
    done = _aws(authed, tmp_path, "list-functions", secret="wrong")
    assert done.returncode != 0 and "InvalidSignatureException" in done.stderr, done.stderr
    done = _aws(authed, tmp_path, "list-functions", key="AKIDUNKNOWN")
    assert done.returncode != 0 and "UnrecognizedClientException" in done.stderr, done.stderr


# ---------------------------------------------------------------------- refusals


def test_wrong_secret_unknown_key_and_no_signature_are_403(authed) -> None:
    lam_bad = authed.client()
    lam_bad._request_signer._credentials = Credentials(KEY, "not-the-secret")  # type: ignore[attr-defined]
    with pytest.raises(lam_bad.exceptions.ClientError) as exc:
        lam_bad.list_functions()
    assert exc.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    msg = _denied(
        _send(_signed(authed, "GET", "/2015-03-31/functions", key="AKIDNOBODY")),
        "UnrecognizedClientException",
    )
    assert msg == "The security token included in the request is invalid."
    _denied(
        _send(_signed(authed, "GET", "/2015-03-31/functions", secret="nope")), "InvalidSignatureException"
    )
    for path in ("/2015-03-31/functions", "/2015-03-31/functions/x/invocations", "/no/such/route"):
        method = "POST" if path.endswith("invocations") else "GET"
        _denied(
            _send(AWSRequest(method=method, url=authed.url + path, data=b"{}")),
            "MissingAuthenticationTokenException",
        )
    garbage = AWSRequest(
        method="GET", url=authed.url + "/2015-03-31/functions", headers={"Authorization": "Basic eDp5"}
    )
    _denied(_send(garbage), "IncompleteSignatureException")
    scope_only = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/lambda/aws4_request"
    partial = AWSRequest(
        method="GET", url=authed.url + "/2015-03-31/functions", headers={"Authorization": scope_only}
    )
    _denied(_send(partial), "IncompleteSignatureException")


def test_skewed_clocks_are_403_within_five_minutes_are_fine(authed) -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    for skew in (dt.timedelta(minutes=-4), dt.timedelta(minutes=4)):
        status, _, body = _send(_signed(authed, "GET", "/2015-03-31/functions", when=now + skew))
        assert status == 200, body
    msg = _denied(
        _send(_signed(authed, "GET", "/2015-03-31/functions", when=now - dt.timedelta(minutes=6))),
        "InvalidSignatureException",
    )
    assert msg.startswith("Signature expired:")
    msg = _denied(
        _send(_signed(authed, "GET", "/2015-03-31/functions", when=now + dt.timedelta(minutes=6))),
        "InvalidSignatureException",
    )
    assert msg.startswith("Signature not yet current:")


def test_tampering_after_signing_is_403(authed) -> None:
    lam = authed.client()
    create(lam, "tamper", HELLO)
    path = "/2015-03-31/functions/tamper/invocations"
    req = _signed(authed, "POST", path, b'{"amount": 1}')
    _denied(_send(req, b'{"amount": 9}'), "InvalidSignatureException")  # another body
    req = _signed(authed, "POST", path, b'{"amount": 1}')
    req.url = authed.url + "/2015-03-31/functions/other/invocations"  # another path
    _denied(_send(req), "InvalidSignatureException")
    req = _signed(authed, "GET", "/2015-03-31/functions?MaxItems=1")
    req.url = authed.url + "/2015-03-31/functions?MaxItems=2"  # another query
    _denied(_send(req), "InvalidSignatureException")
    req = _signed(authed, "POST", path, b"{}", headers={"X-Amz-Log-Type": "None"})
    req.headers.replace_header("X-Amz-Log-Type", "Tail")  # a signed header
    _denied(_send(req), "InvalidSignatureException")
    declared = {"X-Amz-Content-SHA256": hashlib.sha256(b"{}").hexdigest()}
    req = _signed(authed, "POST", path, b"{}", headers=declared)
    status, _, _ = _send(req)
    assert status == 200
    req = _signed(authed, "POST", path, b'{"a": 1}', headers=declared)  # declares another body's hash
    _denied(_send(req), "InvalidSignatureException")
    req = _signed(authed, "POST", path, b"{}")
    req.headers["Host"] = "["  # no URL can hold it
    _denied(_send(req), "InvalidSignatureException")


def test_oversized_bodies_are_refused_without_reading_them_all(authed) -> None:
    req = _signed(
        authed, "POST", "/2015-03-31/functions/tamper/invocations", b"[" + b"1," * 3_500_000 + b"1]"
    )
    status, headers, _ = _send(req)
    assert status == 413 and headers["x-amzn-ErrorType"] == "RequestTooLargeException"


def test_health_openapi_and_code_location_stay_open(authed) -> None:
    for path in ("/health", "/openapi.json"):
        with urllib.request.urlopen(authed.url + path, timeout=30) as resp:
            assert resp.status == 200
    lam = authed.client()
    zip_bytes = make_zip({"app.py": HELLO})
    lam.create_function(
        FunctionName="openloc",
        Runtime="python3.12",
        Handler="app.handler",
        Role=ROLE,
        Code={"ZipFile": zip_bytes},
    )
    location = lam.get_function(FunctionName="openloc")["Code"]["Location"]
    with urllib.request.urlopen(location, timeout=30) as resp:  # like S3's pre-signed URL
        assert resp.read() == zip_bytes


# ---------------------------------------------------------------------- without --auth


def test_without_auth_the_startup_line_says_so(server) -> None:
    assert server.ready_line == f"ember listening on {server.url} (auth off)"


def test_non_loopback_bind_without_auth_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [*EMBER, "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stderr
    assert done.stderr.strip().count("\n") == 0  # one line
    assert not (tmp_path / "d").exists()


def test_insecure_allows_a_non_loopback_bind(tmp_path: Path) -> None:
    argv = [*EMBER, "serve", "--host", "0.0.0.0", "--port", "0", "--insecure"]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ember listening on http://0.0.0.0:") and "(auth off)" in line, line
    finally:
        proc.terminate()
        proc.wait(60)


def test_loopback_rules() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host) and bind_refusal(host, auth=False, insecure=False) is None, host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "localhost.example.com"):
        assert not is_loopback(host), host
        assert bind_refusal(host, auth=False, insecure=False)
        assert bind_refusal(host, auth=True, insecure=False) is None
        assert bind_refusal(host, auth=False, insecure=True) is None


def test_credentials_file_format(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("# comment\n\nA1 s1\n   A2    s2   \n#A3 s3\n")
    assert load_credentials(path) == {"A1": "s1", "A2": "s2"}
    for bad, why in (
        ("A1\n", "got 1 fields"),
        ("A1 s1 extra\n", "got 3 fields"),
        ("A1 s1\nA1 s2\n", "appears twice"),
        ("# nothing\n", "no credentials"),
        ("A/1 s1\n", "without '/'"),
    ):
        path.write_text(bad)
        with pytest.raises(CredentialsError, match=why):
            load_credentials(path)
    path.write_text("A1\n")
    done = subprocess.run(
        [*EMBER, "serve", "--auth", str(path), "--port", "0", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and f"{path}:1:" in done.stderr


# ---------------------------------------------------------------------- hostile headers


_printable = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=200)


@given(
    authorization=st.one_of(
        _printable,
        st.builds(
            lambda cred, signed, sig: (
                f"AWS4-HMAC-SHA256 Credential={cred}, SignedHeaders={signed}, Signature={sig}"
            ),
            st.one_of(_printable, st.just(f"{KEY}/20240101/us-east-1/lambda/aws4_request")),
            st.one_of(_printable, st.just("host;x-amz-date")),
            _printable,
        ),
    ),
    date_header=st.one_of(st.none(), _printable, st.just("Fri, 31 Dec 9999 23:59:59 -0100")),
    amz_date=st.one_of(st.none(), _printable, st.just("99991231T235959Z"), st.just("00010101T000000Z")),
)
@settings(max_examples=300, deadline=None, database=None)
def test_any_authorization_header_is_a_403_never_a_crash(authorization, date_header, amz_date) -> None:
    from aiohttp.test_utils import make_mocked_request

    from ember.api.auth import Verifier
    from ember.api.errors import LambdaError

    headers = {"Authorization": authorization, "Host": "127.0.0.1"}
    if date_header is not None:
        headers["Date"] = date_header
    if amz_date is not None:
        headers["X-Amz-Date"] = amz_date
    request = make_mocked_request("GET", "/2015-03-31/functions", headers=headers)
    with pytest.raises(LambdaError) as exc:
        Verifier({KEY: SECRET}).check_headers(request)
    assert exc.value.status == 403


@given(
    path=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80),
    host=_printable,
    body=st.binary(max_size=64),
    signature=st.one_of(st.just("0" * 64), _printable),
)
@settings(max_examples=200, deadline=None, database=None)
def test_any_request_target_is_checked_without_crashing(path, host, body, signature) -> None:
    from aiohttp.test_utils import make_mocked_request

    from ember.api.auth import Verifier
    from ember.api.errors import LambdaError

    target = "/" + path
    try:
        request = make_mocked_request("POST", target, headers={"Host": host})
    except ValueError:  # yarl refuses to build this URL at all (a port that is not a number): no request
        assume(False)
    try:
        Verifier({KEY: SECRET}).check_signature(request, body, SECRET, "20240101T000000Z",
                                                 ["20240101", "us-east-1", "lambda", "aws4_request"],
                                                 ["host"], signature)  # fmt: skip
    except LambdaError as exc:
        assert exc.status == 403
    else:
        raise AssertionError("a made-up signature was accepted")


def test_query_signed_as_botocore_sends_it_or_canonically(authed) -> None:
    # ember's own client (and anything that signs a URL built with urlencode) sends '+' for spaces
    # and signs the query as sent; the SDKs sign the canonical re-encoding: both are accepted
    req = _signed(authed, "GET", "/2015-03-31/functions?Marker=&MaxItems=5&x=a+b%2Fc")
    assert _send(req)[0] == 200
    req = AWSRequest(
        method="GET", url=authed.url + "/2015-03-31/functions", params={"MaxItems": "5", "x": "a b/c"}
    )
    SigV4Auth(Credentials(KEY, SECRET), "lambda", "us-east-1").add_auth(req)
    req.url = req.prepare().url  # the query as urllib would send it, signed in canonical form
    req.params = {}
    assert _send(req)[0] == 200
