"""Headless Chromium for the web page's tests (Debian's chromium + chromedriver, via Selenium).

`make test` installs the browser with apt-get; where it is missing the modules that need it skip,
saying so. `available()` says whether it is there; `chromium()` starts one."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = (f"chromium or chromedriver is missing ({CHROMIUM}, {CHROMEDRIVER}) and could not be installed: "
           "`make test` installs them with apt-get (packages chromium chromium-driver)")


def available() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 900) -> Iterator:
    """A selenium driver for a fresh headless Chromium profile, closed (profile removed) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nanofast-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Runs as root with no network: no sandbox, no GPU, nothing that phones home.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_greedy(driver) -> None:
    """The page's temperature field set to 0 (greedy answers, comparable with the engine's)."""
    from selenium.webdriver.common.by import By

    temperature = driver.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")


def open_page(driver, url: str, model_id: str) -> None:
    """The chat page at `url`, loaded (its model card fetched: `model_id` shown), answering greedily."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(1200, 900)
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == model_id)
    set_greedy(driver)
