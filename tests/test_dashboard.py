"""The web dashboard in a real headless browser (Debian's chromium through selenium and
chromium-driver): the page loads without script errors, shows a function once it is invoked, and
keeps updating (counts, sandboxes, charts)."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import create, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None  # type: ignore[assignment]

if webdriver is None or CHROMIUM is None or CHROMEDRIVER is None:
    missing = "selenium" if webdriver is None else "chromium" if CHROMIUM is None else "chromium-driver"
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the dashboard test needs {missing} (scripts/install-deps.sh installs it)")
    pytest.skip(f"{missing} is not installed", allow_module_level=True)

APP = """
def handler(event, context):
    return {"ok": True}
"""


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="ember-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-extensions", "--window-size=1280,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def text(driver, css: str) -> str | None:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else None


def polls(driver) -> int:
    return int(driver.find_element(By.ID, "status").get_attribute("data-polls") or 0)


def test_dashboard_shows_functions_and_updates(server, lam, browser) -> None:
    with urllib.request.urlopen(server.url + "/dashboard/dashboard.js") as resp:
        assert resp.headers["Content-Type"].startswith("application/javascript")
    browser.get(server.url + "/dashboard")  # redirects to /dashboard/
    assert browser.title == "ember dashboard"
    assert wait_for(lambda: polls(browser) >= 1, timeout=30)
    assert browser.find_element(By.ID, "no-functions").is_displayed()

    create(lam, "dash", APP)
    lam.invoke(FunctionName="dash", Payload=b"{}")
    row = 'tr[data-function="dash"]'
    assert wait_for(lambda: text(browser, f'{row} td[data-col="invocations"]') == "1", timeout=30)
    assert text(browser, f'{row} td[data-col="cold"]') == "1"
    assert text(browser, f'{row} td[data-col="idle"]') == "1"
    assert not browser.find_element(By.ID, "no-functions").is_displayed()
    sandbox = '#sandboxes tr[data-function="dash"] td[data-col="state"]'
    assert wait_for(lambda: text(browser, sandbox) == "idle", timeout=30)
    assert browser.find_elements(By.CSS_SELECTOR, '.fn-charts[data-function="dash"] canvas')

    # it keeps polling, and what it shows follows what happens
    seen = polls(browser)
    for _ in range(4):
        lam.invoke(FunctionName="dash", Payload=b"{}")
    assert wait_for(lambda: text(browser, f'{row} td[data-col="invocations"]') == "5", timeout=30)
    assert polls(browser) > seen
    assert text(browser, "#acct-invocations") == "5"
    # the invocations chart has drawn its line: pixels of the invocations colour (#5aa9e6)
    line_pixels = """
        const c = document.querySelector('.fn-charts[data-function="dash"] canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] > 200 && Math.abs(d[i] - 90) < 30 && Math.abs(d[i + 1] - 169) < 30
              && Math.abs(d[i + 2] - 230) < 30) n++;
        }
        return n;
        """
    assert wait_for(lambda: browser.execute_script(line_pixels) > 0, timeout=30)

    lam.delete_function(FunctionName="dash")
    assert wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, row), timeout=30)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
