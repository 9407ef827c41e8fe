"""Hostile input: zips that try to escape, explode or confuse the extractor, and malformed HTTP
(oversized headers and names, invalid UTF-8, wrong content types). Each is refused with a clear
4xx in Lambda's shape, and nothing is written outside the function's code directory, nor left
behind half-extracted."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import ROLE, EmberServer, make_zip

CAP = 1024 * 1024  # the server's unzipped-size cap in these tests (EMBER_MAX_UNZIPPED_BYTES)
HELLO = "def handler(event, context):\n    return {'ok': True}\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    root = tmp_path_factory.mktemp("hostile")
    old = os.environ.get("EMBER_MAX_UNZIPPED_BYTES")
    os.environ["EMBER_MAX_UNZIPPED_BYTES"] = str(CAP)
    try:
        srv = EmberServer(root / "data").start()
    finally:
        if old is None:
            del os.environ["EMBER_MAX_UNZIPPED_BYTES"]
        else:
            os.environ["EMBER_MAX_UNZIPPED_BYTES"] = old
    yield srv
    srv.stop()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(srv: EmberServer, zip_bytes: bytes, name: str, expect: str = "InvalidParameterValueException"):
    """Create a function from `zip_bytes`: it must fail with `expect` (4xx), and leave the data dir's
    surroundings and its code dir exactly as they were (no stray file, no partial extraction)."""
    root = srv.data_dir.parent
    before = _tree(root)
    with pytest.raises(ClientError) as exc:
        srv.client().create_function(
            FunctionName=name, Runtime="python3.12", Handler="app.handler", Role=ROLE,
            Code={"ZipFile": zip_bytes},
        )  # fmt: skip
    err = exc.value.response
    assert err["Error"]["Code"] == expect, err
    assert 400 <= err["ResponseMetadata"]["HTTPStatusCode"] < 500
    after = _tree(root)
    # only the server's own log and SQLite files may change
    new = {p for p in after - before if not p.endswith((".log", "-wal", "-shm", ".db"))}
    assert not new, f"written: {sorted(new)}"
    assert not [p for p in after if ".extract-" in p]
    return err["Error"]["Message"]


def _patch(data: bytes, old: bytes, new: bytes, count: int = -1) -> bytes:
    assert len(old) == len(new) and old in data
    return data.replace(old, new, count)


def _deflated(name: str, body: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, body)
    return buf.getvalue()


def _set_sizes(data: bytes, size: int) -> bytes:
    """Make every entry claim an uncompressed size of `size` (local and central headers)."""
    out = bytearray(data)
    pos = 0
    while (pos := out.find(b"PK\x03\x04", pos)) >= 0:
        struct.pack_into("<I", out, pos + 22, size)
        pos += 4
    pos = 0
    while (pos := out.find(b"PK\x01\x02", pos)) >= 0:
        struct.pack_into("<I", out, pos + 24, size)
        pos += 4
    return bytes(out)


# ---------------------------------------------------------------------- zip bombs


def test_zip_bomb_with_honest_sizes_is_refused_before_writing(hostile) -> None:
    bomb = _deflated("app.py", b"0" * (CAP + 1))
    assert len(bomb) < CAP // 100  # highly compressible
    assert "Unzipped size" in _refused(hostile, bomb, "bomb1")


def test_zip_bomb_spread_over_many_entries_is_refused(hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(8):
            z.writestr(f"part{i}.bin", b"\0" * (CAP // 6))
    assert "Unzipped size" in _refused(hostile, buf.getvalue(), "bomb2")


def test_zip_bomb_with_lying_sizes_is_refused(hostile) -> None:
    # the headers claim 100 bytes; the deflate stream expands to 4 x the cap
    liar = _set_sizes(_deflated("app.py", b"A" * (4 * CAP)), 100)
    _refused(hostile, liar, "bomb3")


def test_overlapping_entries_cannot_multiply_a_kernel(hostile) -> None:
    # many central-directory entries pointing at one local entry (a non-recursive zip bomb)
    one = _deflated("k.bin", b"\0" * (CAP // 3))
    cd_at = one.find(b"PK\x01\x02")
    eocd_at = one.find(b"PK\x05\x06")
    local, cd, eocd = one[:cd_at], one[cd_at:eocd_at], bytearray(one[eocd_at:])
    copies = [cd.replace(b"k.bin", f"k{i}.bn".encode()) for i in range(6)]
    cds = b"".join(copies)
    struct.pack_into("<HHII", eocd, 8, len(copies), len(copies), len(cds), len(local))
    _refused(hostile, local + cds + bytes(eocd), "bomb5")


# ---------------------------------------------------------------------- escaping the directory


@pytest.mark.parametrize(
    "entry",
    [
        "../evil.py",
        "a/../../evil.py",
        "../../../../../../tmp/ember-evil.py",
        "/tmp/ember-evil-abs.py",
        "C:/evil.py",
    ],
)
def test_entries_pointing_outside_are_refused(hostile, entry: str) -> None:
    zip_bytes = make_zip({"app.py": HELLO, entry: "print('pwned')\n"})
    _refused(hostile, zip_bytes, "escape")
    assert not Path("/tmp/ember-evil.py").exists() and not Path("/tmp/ember-evil-abs.py").exists()


@pytest.mark.parametrize("target", ["/etc", "../../..", "app.py"])
def test_symlinks_are_refused_wherever_they_point(hostile, target: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", HELLO)
        link = zipfile.ZipInfo("link")
        link.external_attr = (0o120777) << 16  # S_IFLNK
        z.writestr(link, target)
        z.writestr("link/passwd", "through the link\n")
    assert "symbolic link" in _refused(hostile, buf.getvalue(), "symlink")


# ---------------------------------------------------------------------- counts, names, structure


def test_huge_file_count_is_refused(hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(20_001):
            z.writestr(zipfile.ZipInfo(f"{i:x}"), b"")
    data = buf.getvalue()
    assert "entries" in _refused(hostile, data, "many")
    # an end record that lies about the count changes nothing
    eocd = bytearray(data[data.rfind(b"PK\x05\x06") :])
    struct.pack_into("<HH", eocd, 8, 1, 1)
    liar = data[: data.rfind(b"PK\x05\x06")] + bytes(eocd)
    assert "entries" in _refused(hostile, liar, "many2")


def _named(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", HELLO)
        z.writestr(zipfile.ZipInfo(name), "x")  # a non-ASCII name sets the UTF-8 flag (0x800)
    return buf.getvalue()


def test_invalid_utf8_and_nul_in_names_are_refused(hostile) -> None:
    bad_utf8 = _patch(_named("bad\u00e9.py"), b"bad\xc3\xa9", b"bad\xff\xfe")
    assert "unzip" in _refused(hostile, bad_utf8, "utf8")
    nul = _patch(_named("nulXname.py/../../evil.py"), b"nulXname", b"nul\x00name")
    assert "invalid name" in _refused(hostile, nul, "nul")


@pytest.mark.parametrize(
    "name,why",
    [
        ("d" * 300 + ".py", "longer than 255"),
        ("/".join(["d"] * 100) + "/x.py", "deeper"),
        ("/".join(["d" * 200] * 6) + "/x.py", "longer than 1024"),
    ],
)
def test_oversized_entry_names_are_refused(hostile, name: str, why: str) -> None:
    assert why in _refused(hostile, _named(name), "longname")


def test_file_and_directory_of_one_name_are_refused(hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", HELLO)
        z.writestr("lib", "a file")
        z.writestr("lib/mod.py", "x = 1\n")
    assert "collides" in _refused(hostile, buf.getvalue(), "collide1")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", HELLO)
        z.writestr(zipfile.ZipInfo("lib/"), b"")
        z.writestr("lib", "a file where a directory is")
    assert "collides" in _refused(hostile, buf.getvalue(), "collide2")


def test_corrupt_and_encrypted_entries_are_refused(hostile) -> None:
    good = _deflated("app.py", HELLO.encode() * 50)
    start = good.find(b"app.py") + len("app.py")
    corrupt = good[:start] + bytes(b ^ 0x5A for b in good[start : start + 40]) + good[start + 40 :]
    _refused(hostile, corrupt, "corrupt")
    encrypted = bytearray(_named("secret.py"))
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = 0
        while (pos := encrypted.find(sig, pos)) >= 0:
            encrypted[pos + off] |= 1
            pos += 4
    _refused(hostile, bytes(encrypted), "encrypted")
    _refused(hostile, b"PK\x03\x04 not really a zip", "notzip")


def test_a_normal_zip_still_works_and_stays_inside(hostile) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("pkg/"), b"")
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/deep/er/mod.py", "VALUE = 7\n")
        z.writestr("./app.py", "from pkg.deep.er.mod import VALUE\ndef handler(e, c):\n    return VALUE\n")
    lam = hostile.client()
    out = lam.create_function(
        FunctionName="normal", Runtime="python3.12", Handler="app.handler", Role=ROLE,
        Code={"ZipFile": buf.getvalue()},
    )  # fmt: skip
    assert json.loads(lam.invoke(FunctionName="normal")["Payload"].read()) == 7
    extracted = hostile.data_dir / "code" / base64.b64decode(out["CodeSha256"]).hex()
    assert (extracted / "pkg" / "deep" / "er" / "mod.py").is_file()
    assert sorted(p.name for p in extracted.iterdir() if p.name != "__pycache__") == ["app.py", "pkg"]


# ---------------------------------------------------------------------- malformed HTTP


def _raw(srv: EmberServer, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _lambda_error(status: int, headers: dict, body: bytes, code: str) -> str:
    assert 400 <= status < 500, (status, body)
    assert headers.get("x-amzn-ErrorType") == code, (headers, body)
    doc = json.loads(body)
    return doc.get("message") or doc["Message"]  # the member Lambda's model names for that exception


def test_oversized_headers_and_request_lines_are_a_clear_4xx(hostile) -> None:
    status, _, body = _raw(hostile, "GET", "/2015-03-31/functions", headers={"X-Big": "a" * 20_000})
    assert status in (400, 431), (status, body)
    many = {f"X-H{i}": "v" for i in range(200)}
    status, _, _ = _raw(hostile, "GET", "/2015-03-31/functions", headers=many)
    assert 200 <= status < 500  # many small headers are fine
    status, _, body = _raw(hostile, "GET", "/2015-03-31/functions/" + "f" * 20_000)
    assert status in (400, 414, 431), (status, body)


def test_over_long_function_names_answer_as_lambda(hostile) -> None:
    # as Lambda: a name that fits the pattern and 256 characters is looked up (and not found);
    # a longer one is a ValidationException
    for path, code in (
        ("/2015-03-31/functions/" + "f" * 65, "ResourceNotFoundException"),
        ("/2015-03-31/functions/" + "f" * 3000 + "/invocations", "ValidationException"),
        ("/2015-03-31/functions/arn:aws:lambda:us-east-1:000000000000:function:" + "f" * 200,
         "ResourceNotFoundException"),
    ):  # fmt: skip
        method = "POST" if path.endswith("/invocations") else "GET"
        status, headers, body = _raw(hostile, method, path)
        _lambda_error(status, headers, body, code)
    lam = hostile.client()
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.create_function(
            FunctionName="f" * 65, Runtime="python3.12", Handler="app.handler", Role=ROLE,
            Code={"ZipFile": make_zip({"app.py": HELLO})},
        )  # fmt: skip


def test_invalid_utf8_is_a_clear_400(hostile) -> None:
    lam = hostile.client()
    lam.create_function(
        FunctionName="utf8body", Runtime="python3.12", Handler="app.handler", Role=ROLE,
        Code={"ZipFile": make_zip({"app.py": HELLO})},
    )  # fmt: skip
    bad = b'{"key": "\xff\xfe"}'
    for method, path in (
        ("POST", "/2015-03-31/functions/utf8body/invocations"),
        ("POST", "/2015-03-31/functions"),
        ("PUT", "/2015-03-31/functions/utf8body/configuration"),
    ):
        status, headers, body = _raw(hostile, method, path, bad, {"Content-Type": "application/json"})
        _lambda_error(status, headers, body, "InvalidRequestContentException")
    # in the path: percent-encoded bytes that are not UTF-8, and raw ones
    for path in ("/2015-03-31/functions/%FF%FE/invocations", "/2015-03-31/functions/a%00b"):
        status, headers, body = _raw(hostile, "POST" if "invocations" in path else "GET", path)
        assert 400 <= status < 500 and headers.get("x-amzn-ErrorType"), (status, body)
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=30) as sock:
        sock.sendall(b"GET /2015-03-31/functions/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1].startswith(b"4"), status_line
    # in a header ember decodes
    path = "/2015-03-31/functions/utf8body/invocations"
    status, headers, body = _raw(hostile, "POST", path, b"{}", {"X-Amz-Client-Context": "\xff\xfe"})
    _lambda_error(status, headers, body, "InvalidParameterValueException")


def test_content_type_is_ignored_but_the_body_must_be_a_json_object(hostile) -> None:
    # Like Lambda, the control plane reads JSON whatever the Content-Type says; a body that is not
    # a JSON object (a form, XML, a JSON array) is a 400 InvalidRequestContentException.
    for ctype, body in (
        ("application/x-www-form-urlencoded", b"FunctionName=x&Role=y"),
        ("application/xml", b"<CreateFunction/>"),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--"),
        ("application/json", b"[1, 2]"),
    ):
        status, headers, raw = _raw(hostile, "POST", "/2015-03-31/functions", body, {"Content-Type": ctype})
        _lambda_error(status, headers, raw, "InvalidRequestContentException")
    # a JSON body under another content type (curl -d, urllib) is read as JSON
    status, headers, raw = _raw(
        hostile, "PUT", "/2017-10-31/functions/nosuch/concurrency", b'{"ReservedConcurrentExecutions": 1}',
        {"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    _lambda_error(status, headers, raw, "ResourceNotFoundException")
