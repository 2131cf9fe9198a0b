"""The document Q&A page in a real headless Chromium against the real server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.docfixtures import make_pdf
from tests.e2e.conftest import Server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromium-driver are needed (scripts/test installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(2)
    yield driver
    driver.quit()


def test_create_upload_ask_and_open_a_citation(server: Server, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    httpx.delete(f"{server.url}/v1/collections/webdocs")
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text.replace(server.url, "") and "https://" not in page.text  # no CDN

    pdf = tmp_path / "library.pdf"
    pdf.write_bytes(make_pdf(["Opening hours", "The city library opens at 9 am on weekdays."]))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"\x89PNG not text")

    wait = WebDriverWait(browser, 60)
    browser.get(f"{server.url}/")
    browser.find_element(By.ID, "new-name").send_keys("webdocs")
    browser.find_element(By.ID, "create").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "current"), "webdocs"))
    browser.find_element(By.ID, "files").send_keys(f"{pdf}\n{bad}")
    browser.find_element(By.ID, "upload").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#upload-results li")) == 2)
    results = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#upload-results li")]
    assert results[0].startswith("library.pdf: ingested") and "failed" in results[1]

    browser.find_element(By.ID, "question").send_keys("When does the city library open on weekdays?")
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#citations a.cite"))
    assert "9" in browser.find_element(By.ID, "answer").text
    browser.find_element(By.CSS_SELECTOR, "#citations a.cite").click()
    passage = wait.until(ec.visibility_of_element_located((By.ID, "passage")))
    assert "library.pdf, page 2" in passage.text
    assert "9 am on weekdays" in browser.find_element(By.ID, "passage-text").text
    browser.save_screenshot(str(tmp_path / "page.png"))


def test_with_keys_the_page_asks_for_one_and_works_with_it(  # type: ignore[no-untyped-def]
    data_dir: Path, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.e2e.conftest import fresh_data_dir, start_server, stop_server
    from tests.e2e.test_gateway import cli

    data = fresh_data_dir(data_dir, tmp_path / "data")
    cli(data, "tenants", "create", "web")
    key = cli(data, "keys", "create", "--tenant", "web").stdout.strip()
    server = start_server(data, tmp_path / "server.log")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"{server.url}/")
        wait.until(ec.text_to_be_present_in_element((By.ID, "col-error"), "Missing API key"))
        browser.find_element(By.ID, "api-key").send_keys(key + Keys.TAB)  # change event: reload with the key
        wait.until(lambda d: d.find_element(By.ID, "col-error").text == "")
        browser.find_element(By.ID, "new-name").send_keys("keyed")
        browser.find_element(By.ID, "create").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "collections"), "keyed"))
        listed = httpx.get(f"{server.url}/v1/collections", headers={"Authorization": f"Bearer {key}"}).json()
        assert [c["name"] for c in listed["data"]] == ["keyed"]
    finally:
        stop_server(server)
