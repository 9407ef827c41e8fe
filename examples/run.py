"""`make run`: start ember, deploy the sample function `hello`, and say how to invoke it.

Deploys over ember's own Lambda API with plain HTTP (no AWS SDK needed), then keeps serving until
Ctrl-C, which stops ember cleanly.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sample_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(HERE / "hello" / "app.py", "app.py")
    return buf.getvalue()


def call(url: str, method: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        url, method=method, data=json.dumps(body).encode() if body is not None else None
    )
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read() or b"{}")


def deploy(endpoint: str) -> None:
    code = base64.b64encode(sample_zip()).decode()
    try:
        call(f"{endpoint}/2015-03-31/functions/hello/code", "PUT", {"ZipFile": code})
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        call(
            f"{endpoint}/2015-03-31/functions",
            "POST",
            {
                "FunctionName": "hello",
                "Runtime": "python3.12",
                "Handler": "app.handler",
                "Role": "arn:aws:iam::000000000000:role/ember-sample",
                "Code": {"ZipFile": code},
            },
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--data-dir", default=".ember")
    args = parser.parse_args()
    server = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", "--port", str(args.port), "--data-dir", args.data_dir],
        stdout=subprocess.PIPE,
        text=True,
    )
    signal.signal(signal.SIGINT, lambda *_: server.send_signal(signal.SIGINT))
    signal.signal(signal.SIGTERM, lambda *_: server.send_signal(signal.SIGTERM))
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    if not line.startswith("ember listening on "):
        server.kill()
        print("ember did not start", file=sys.stderr)
        return 1
    endpoint = line.removeprefix("ember listening on ").split()[0]  # then " (auth off)"
    print(line, flush=True)
    deploy(endpoint)
    print(
        f"""
Deployed the sample function `hello` (examples/hello/app.py). Invoke it (any credentials do;
with none configured: export AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_DEFAULT_REGION=us-east-1):

  aws lambda invoke --endpoint-url {endpoint} --function-name hello \\
      --payload '{{"name": "you"}}' out.json && cat out.json

or with boto3:

  boto3.client("lambda", endpoint_url="{endpoint}", region_name="us-east-1").invoke(FunctionName="hello")

Ctrl-C stops ember.""",
        flush=True,
    )
    return server.wait()


if __name__ == "__main__":
    sys.exit(main())
