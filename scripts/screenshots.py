"""Make the README's screenshots (docs/img/dashboard.png, docs/img/top.png): start ember, deploy a
few sample functions, drive some traffic (warm, cold, throttled, failing), then capture the dashboard
with headless chromium (selenium + chromium-driver) and one frame of `ember top` (rich's SVG export,
rendered by the same browser).

    .venv/bin/python scripts/screenshots.py [--seconds 40]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import boto3
from botocore.config import Config
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"

FUNCTIONS = {
    "api": "def handler(event, context):\n    return {'ok': True}\n",
    "thumbnail": (
        "import random, time\n"
        "def handler(event, context):\n    time.sleep(random.uniform(0.02, 0.12))\n    return {'w': 128}\n"
    ),
    "reports": "import time\ndef handler(event, context):\n    time.sleep(0.4)\n    return 'done'\n",
    "flaky": (
        "import random\n"
        "def handler(event, context):\n"
        "    if random.random() < 0.1:\n        raise RuntimeError('upstream timeout')\n"
        "    return 'ok'\n"
    ),
}


def zipped(source: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", source)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40.0)
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    data = Path(tempfile.mkdtemp(prefix="ember-shots-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", "--port", "0", "--data-dir", str(data / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[3]
    stop = threading.Event()
    try:
        lam = boto3.client(
            "lambda", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x",
            aws_secret_access_key="x", config=Config(retries={"max_attempts": 0}, max_pool_connections=32),
        )  # fmt: skip
        for name, src in FUNCTIONS.items():
            lam.create_function(
                FunctionName=name, Runtime="python3.12", Handler="app.handler",
                Role="arn:aws:iam::000000000000:role/x", Code={"ZipFile": zipped(src)},
            )  # fmt: skip
        lam.put_function_concurrency(FunctionName="reports", ReservedConcurrentExecutions=1)

        def drive(name: str, pause: float) -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # throttles are part of the picture
                    lam.invoke(FunctionName=name, Payload=b"{}")
                time.sleep(pause * random.uniform(0.5, 1.5))

        plan = [("api", 0.02)] * 3 + [("thumbnail", 0.05)] * 3 + [("reports", 0.2)] * 2 + [("flaky", 0.1)]
        threads = [threading.Thread(target=drive, args=p, daemon=True) for p in plan]
        for t in threads:
            t.start()
        time.sleep(args.seconds)

        IMG.mkdir(parents=True, exist_ok=True)
        profile = tempfile.mkdtemp(prefix="ember-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for a in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--window-size=1280,1180", "--hide-scrollbars", f"--user-data-dir={profile}",
        ):  # fmt: skip
            opts.add_argument(a)
        driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        try:
            driver.get(url + "/dashboard/")
            time.sleep(3.5)
            driver.save_screenshot(str(IMG / "dashboard.png"))

            # one frame of `ember top`, as an 80-column terminal shows it
            from ember.cli.client import Client
            from ember.cli.top import render

            console = Console(record=True, width=80, force_terminal=True, color_system="truecolor")
            doc = Client(url).get_json("/_ember/stats")
            console.print(render(doc, url, "rps"))
            svg = data / "top.svg"
            console.save_svg(str(svg), title="ember top")
            driver.set_window_size(1000, 420)
            driver.get(svg.as_uri())
            time.sleep(0.5)
            driver.save_screenshot(str(IMG / "top.png"))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(data, ignore_errors=True)
    print(f"wrote {IMG / 'dashboard.png'} and {IMG / 'top.png'}")


if __name__ == "__main__":
    main()
