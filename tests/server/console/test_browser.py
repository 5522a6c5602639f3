"""The console in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium; no browser is downloaded).

One operator's session, in order: sign in, upload a package, watch a task's counters move live
while the fleet simulator upgrades its devices against the same server, pause a task, open a
failed device's page, switch the language; then a viewer is refused a change. A staged
campaign: its form and dry run, its stage counters moving live while the simulator upgrades the
first stage on a partly defective package, the pause, and a failed device's timeline. With
``CONSOLE_SCREENSHOTS=DIR`` the pages are saved there (the README's screenshots).

Without Chromium the tests skip, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from onenet_ota.device import Credentials, DeviceConfig, OtaClient
from onenet_ota.protocol.status import StatusCode
from onenet_ota.server.console import PREFIX
from tests.server.console.conftest import ADMIN, KEY, Platform, product, task

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    JavascriptException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WAIT = 30.0  # seconds a page may take to show what the test waits for; not a timing check


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if CHROMIUM is None or DRIVER is None:
        _unavailable("Debian's chromium and chromium-driver are not installed")
    assert CHROMIUM is not None
    assert DRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, condition: Callable[[WebDriver], object], what: str) -> None:
    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        body = _text(driver, "task-devices-part") or driver.page_source
        pytest.fail(f"the page never showed {what}: {driver.current_url}\n{body[-1500:]}")


def _text(driver: WebDriver, element_id: str, by: str = By.ID) -> str:
    # htmx replaces the live fragment as events arrive, and a click may reload the page: an
    # element found by one driver call may be gone by the next (Chromium then says "stale
    # element" or "node does not belong to the document"), so find and read it in one script.
    if by == By.ID:
        script = "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';"
    else:
        script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';"
    for _ in range(20):
        try:
            # innerText parts a table's cells with tabs where WebDriver's text has spaces
            return str(driver.execute_script(script, element_id)).replace("\t", " ")
        except (StaleElementReferenceException, JavascriptException):
            continue  # the page was navigating away while the script ran
    return ""


def _shot(driver: WebDriver, name: str) -> None:
    target = os.environ.get("CONSOLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(target) / f"console-{name}.png"))


def _sign_in(driver: WebDriver, url: str, secret: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{url}{PREFIX}/")
    _wait(driver, lambda d: d.find_elements(By.ID, "token"), "the sign-in form")
    driver.find_element(By.ID, "token").send_keys(secret)
    driver.find_element(By.ID, "sign-in").click()
    _wait(driver, lambda d: d.find_elements(By.ID, "who"), "the signed-in operator")


def _report_failure(platform: Platform, pid: str, dev_id: int) -> None:
    """The device fetches its task and reports an md5 mismatch, as a real device would."""
    config = DeviceConfig(
        credentials=Credentials.from_access_key(pid, KEY), dev_id=str(dev_id), version="1.0"
    )
    with OtaClient(config, base_url=platform.url) as client:
        client.post_version()
        offered = client.check_task()
        client.report_status(offered.token, 101)
        client.report_status(offered.token, StatusCode.UPGRADE_MD5_MISMATCH)


def test_an_operators_session(platform: Platform, browser: WebDriver, tmp_path: Path) -> None:
    url = platform.url
    pid = product(platform.api, name="水表 meters")
    _sign_in(browser, url, ADMIN)
    _shot(browser, "overview")

    # Upload a package, with the progress bar, and see it listed with its hashes.
    browser.get(f"{url}{PREFIX}/packages")
    firmware = tmp_path / "fw-2.0.bin"
    firmware.write_bytes(os.urandom(3000))
    browser.find_element(By.ID, "pkg-target").send_keys("2.0")
    browser.find_element(By.ID, "pkg-file").send_keys(str(firmware))
    browser.find_element(By.ID, "upload-button").click()
    _wait(browser, lambda d: "fw-2.0.bin" in _text(d, "packages"), "the uploaded package")
    package = platform.api.get("/packages").json()["items"][0]
    assert package["size"] == 3000
    assert package["md5"] in _text(browser, "packages")
    _shot(browser, "packages")

    # A task of 20 devices, watched live while the simulator upgrades them.
    dev_ids = [
        platform.api.post("/devices", json={"pid": pid, "name": f"m{i:02}"}).json()["dev_id"]
        for i in range(20)
    ]
    created = platform.api.post("/tasks", json={"package_id": package["id"], "dev_ids": dev_ids})
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    browser.get(f"{url}{PREFIX}/tasks/{task_id}")
    _wait(browser, lambda d: _text(d, "count-to_be_upgraded") == "20", "20 devices waiting")
    # A mark on the page: if it is still there at the end, the counters moved without a reload.
    browser.execute_script("window.onenetMark = 'unchanged page';")
    simulator = subprocess.Popen(
        [
            sys.executable, "-m", "onenet_ota", "simulate",
            "--server", url, "--task", str(task_id), "--allow-real-devices",
            "--devices", "20", "--chunk-size", "1024", "--ramp-up", "2",
        ],
        env={**os.environ, "ONENET_OTA_ADMIN_TOKEN": ADMIN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while _text(browser, "count-succeeded") != "20" and time.monotonic() < deadline:
            seen.add(_text(browser, "count-succeeded"))
            time.sleep(0.05)
        output, _ = simulator.communicate(timeout=120)
    finally:
        simulator.kill()
    assert simulator.returncode == 0, output.decode(errors="replace")[-3000:]
    _wait(browser, lambda d: _text(d, "count-succeeded") == "20", "20 devices succeeded")
    _wait(
        browser,
        lambda d: _text(d, "task-devices").count(" succeeded 100%") == 20,
        "every device's row succeeded",
    )
    assert browser.execute_script("return window.onenetMark;") == "unchanged page"
    assert "0" in seen  # the counter was seen before the devices finished, then moved to 20
    _shot(browser, "task")

    # Pause another task from its page.
    other_task, _other_devices = task(platform.api, pid, devices=2)
    browser.get(f"{url}{PREFIX}/tasks/{other_task}")
    browser.find_element(By.ID, "task-pause").click()
    _wait(browser, lambda d: _text(d, "count-paused") == "2", "the paused devices")
    assert platform.api.get(f"/tasks/{other_task}").json()["status"] == "paused"

    # A failed device's page shows the code with its name.
    third_task, third_devices = task(platform.api, pid, devices=1)
    platform.api.post(f"/tasks/{other_task}/cancel")
    _report_failure(platform, pid, third_devices[0])
    browser.get(f"{url}{PREFIX}/tasks/{third_task}")
    _wait(browser, lambda d: "205" in _text(d, "failure-reasons"), "the failures by reason")
    # Follow the device's link. The live part of the page is replaced as events arrive, so the
    # link is read (again, if it went stale) rather than clicked.
    link = ""
    for _ in range(20):
        try:
            link = str(
                browser.find_element(By.CSS_SELECTOR, "#failure-reasons a").get_attribute("href")
            )
            break
        except StaleElementReferenceException:
            continue
    assert link.endswith(f"{PREFIX}/devices/{third_devices[0]}")
    browser.get(link)
    _wait(browser, lambda d: "205" in _text(d, "history"), "the failure code")
    assert "md5" in _text(browser, "history").lower()
    _shot(browser, "device")

    # Switch the language.
    browser.find_element(By.ID, "lang-zh_Hans").click()
    _wait(browser, lambda d: "概览" in _text(d, "nav", By.TAG_NAME), "Chinese")
    _shot(browser, "device-zh")
    browser.find_element(By.ID, "lang-en").click()
    _wait(browser, lambda d: "Overview" in _text(d, "nav", By.TAG_NAME), "English")

    # Sign out.
    browser.find_element(By.ID, "sign-out").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "token"), "the sign-in form again")


def test_a_viewer_is_refused_a_change(platform: Platform, browser: WebDriver) -> None:
    pid = product(platform.api)
    task_id, _ = task(platform.api, pid, devices=2)
    _sign_in(browser, platform.url, platform.viewer)
    browser.get(f"{platform.url}{PREFIX}/tasks/{task_id}")
    _wait(browser, lambda d: _text(d, "count-to_be_upgraded") == "2", "the task's devices")
    assert browser.find_elements(By.ID, "task-pause") == []
    # Without the button, a viewer could still send the request by hand: the server refuses it.
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", headers: {"X-CSRF-Token": document.body.dataset.csrf}})
            .then(r => done(r.status), () => done(-1));
        """,
        f"{PREFIX}/tasks/{task_id}/pause",
    )
    assert status == 403
    assert platform.api.get(f"/tasks/{task_id}").json()["status"] == "active"
    reply = httpx2.get(f"{platform.url}{PREFIX}/tasks/{task_id}", follow_redirects=False)
    assert reply.status_code == 303  # and no page works without a session


def _click(driver: WebDriver, element_id: str) -> None:
    # A button inside the live part may be replaced between finding and clicking it.
    for _ in range(20):
        try:
            driver.find_element(By.ID, element_id).click()
            return
        except StaleElementReferenceException:
            continue
    pytest.fail(f"could not click {element_id}")


def _fill(driver: WebDriver, values: dict[str, str]) -> None:
    for element_id, value in values.items():
        field = driver.find_element(By.ID, element_id)
        field.clear()
        if value:
            field.send_keys(value)


def test_a_staged_campaign(platform: Platform, browser: WebDriver) -> None:
    """An operator creates a two-stage campaign after its dry run, starts it, watches its first
    stage's counters move while the simulator upgrades the stage's devices (some on a defective
    package), pauses it and opens a failed device's timeline."""
    url = platform.url
    api = platform.api
    pid = product(api, name="水表 meters")
    for i in range(20):
        assert api.post("/devices", json={"pid": pid, "name": f"w{i:02}"}).status_code == 201
    package = api.post(
        "/packages",
        params={"pid": pid, "type": "1", "target": "2.0", "file_name": "fw-2.0.bin"},
        content=os.urandom(3000),
    )
    assert package.status_code == 201, package.text
    _sign_in(browser, url, platform.operator)

    # The form, its dry run, then the draft.
    browser.get(f"{url}{PREFIX}/campaigns/new")
    _fill(
        browser,
        {
            "c-name": "canary 金丝雀",
            "s1_share": "10",
            "s1_soak": "3600",
            "s1_success": "50",
            "s1_ceiling": "",
            "s2_share": "rest",
            "s2_ceiling": "",
            "s3_share": "",
        },
    )
    browser.find_element(By.ID, "campaign-preview").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "preview"), "the dry run")
    assert _text(browser, "preview-stage-0").split()[:3] == ["stage", "1", "10"]
    assert _text(browser, "preview-stage-1").split()[:3] == ["stage", "2", "10"]
    assert api.get("/campaigns").json()["items"] == []  # the dry run created nothing
    _shot(browser, "campaign-new")
    browser.find_element(By.ID, "campaign-create").click()
    _wait(browser, lambda d: _text(d, "campaign-state") == "draft", "the draft campaign")
    (campaign,) = api.get("/campaigns").json()["items"]
    assert browser.find_elements(By.ID, "preview-stage-0")  # who each stage takes
    _click(browser, "campaign-start")
    _wait(browser, lambda d: _text(d, "stage-0-open") == "10", "stage 1's ten devices")
    _wait(browser, lambda d: _text(d, "campaign-state") == "running", "the running campaign")
    (task_row,) = api.get("/tasks", params={"package_id": package.json()["id"]}).json()["items"]

    # One device reports an MD5 mismatch by itself (so the stage has a failure whatever the
    # simulator draws); the simulator upgrades the other nine, about three in ten of them on a
    # defective package.
    first = api.get(f"/tasks/{task_row['id']}/devices", params={"limit": 1}).json()["items"][0]
    browser.execute_script("window.onenetMark = 'unchanged page';")
    _report_failure(platform, pid, int(first["dev_id"]))
    _wait(browser, lambda d: _text(d, "stage-0-failed_package") == "1", "the first failure")
    simulator = subprocess.Popen(
        [
            sys.executable, "-m", "onenet_ota", "simulate",
            "--server", url, "--task", str(task_row["id"]), "--allow-real-devices",
            "--devices", "9", "--chunk-size", "1024", "--ramp-up", "2",
            "--defective-rate", "0.3", "--seed", "3",
        ],
        env={**os.environ, "ONENET_OTA_ADMIN_TOKEN": ADMIN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 120
        while _text(browser, "stage-0-open") != "0" and time.monotonic() < deadline:
            seen.add(_text(browser, "stage-0-succeeded"))
            time.sleep(0.05)
        output, _ = simulator.communicate(timeout=120)
    finally:
        simulator.kill()
    log = output.decode(errors="replace")[-3000:]
    _wait(browser, lambda d: _text(d, "stage-0-open") == "0", "every device of stage 1 done")
    succeeded = int(_text(browser, "stage-0-succeeded"))
    failed = int(_text(browser, "stage-0-failed_package"))
    assert succeeded + failed == 10, log
    assert failed >= 1, log  # package failures, the defective package's among them
    assert "0" in seen  # the counter was seen before the devices finished, then moved
    assert browser.execute_script("return window.onenetMark;") == "unchanged page"
    detail = api.get(f"/campaigns/{campaign['id']}").json()
    assert detail["stages"][0]["counts"]["succeeded"] == succeeded
    _wait(browser, lambda d: _text(d, "campaign-failures"), "the failures by reason")
    _shot(browser, "campaign")

    # Pause it from its page.
    _click(browser, "campaign-pause")
    _wait(browser, lambda d: _text(d, "campaign-state") == "paused", "the paused campaign")
    assert api.get(f"/campaigns/{campaign['id']}").json()["state"] == "paused"
    # The state and the actions are separate parts of the page, each replaced as it changes.
    _wait(browser, lambda d: d.find_elements(By.ID, "campaign-resume"), "the resume button")

    # A failed device's timeline, through the failures' link.
    link = ""
    for _ in range(20):
        try:
            found = browser.find_element(By.CSS_SELECTOR, "#campaign-failures a")
            link = str(found.get_attribute("href"))
            break
        except StaleElementReferenceException:
            continue
    assert f"{PREFIX}/devices/" in link
    browser.get(link)
    _wait(browser, lambda d: "upgrade failed" in _text(d, "timeline"), "the failure's code")
    timeline = _text(browser, "timeline")
    assert "205" in timeline or "206" in timeline
    assert "classic" in timeline
    _shot(browser, "timeline")
    browser.find_element(By.ID, "lang-zh_Hans").click()
    _wait(browser, lambda d: "升级失败" in _text(d, "timeline"), "the timeline in Chinese")
    _shot(browser, "timeline-zh")
    browser.get(f"{url}{PREFIX}/campaigns/{campaign['id']}")
    _wait(browser, lambda d: _text(d, "campaign-state") == "已暂停", "the campaign in Chinese")
    _shot(browser, "campaign-zh")


def test_a_key_is_shown_to_an_operator_who_asks_and_never_to_a_viewer(
    platform: Platform, browser: WebDriver
) -> None:
    pid = product(platform.api)
    page = f"{platform.url}{PREFIX}/products/{pid}"
    _sign_in(browser, platform.url, platform.viewer)
    browser.get(page)
    _wait(browser, lambda d: d.find_elements(By.ID, "access-key-hidden"), "the hidden key")
    assert browser.find_elements(By.ID, "reveal-key") == []
    assert KEY not in browser.page_source
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", headers: {"X-CSRF-Token": document.body.dataset.csrf}})
            .then(r => done(r.status), () => done(-1));
        """,
        f"{PREFIX}/products/{pid}/reveal-key",
    )
    assert status == 403
    assert platform.api.get("/audit", params={"action": "product.reveal_key"}).json()["items"] == []

    _sign_in(browser, platform.url, platform.operator)
    browser.get(page)
    browser.find_element(By.ID, "reveal-key").click()
    _wait(browser, lambda d: _text(d, "access-key") == KEY, "the revealed key")
    _shot(browser, "product-key")
    entries = platform.api.get("/audit", params={"action": "product.reveal_key"}).json()["items"]
    assert [(e["actor"], e["target"]) for e in entries] == [("operator-token", f"product:{pid}")]


def test_a_scheduled_campaign_and_a_device_added_from_its_page(
    platform: Platform, browser: WebDriver
) -> None:
    """An operator creates a campaign with a start time, a deadline, a dispatch rate and dynamic
    membership in the form, sees them on its page, and adds a device there."""
    url = platform.url
    api = platform.api
    pid = product(api, name="gateways")
    dev_ids = [
        api.post("/devices", json={"pid": pid, "name": f"g{i}"}).json()["dev_id"] for i in range(3)
    ]
    api.put(f"/devices/{dev_ids[0]}/labels", json={"labels": {"site": "a"}})
    package = api.post(
        "/packages",
        params={"pid": pid, "type": "1", "target": "2.0", "file_name": "fw-2.0.bin"},
        content=os.urandom(1000),
    )
    assert package.status_code == 201, package.text
    _sign_in(browser, url, platform.operator)
    browser.get(f"{url}{PREFIX}/campaigns/new")
    _fill(
        browser,
        {
            "c-name": "scheduled",
            "c-labels": "site=a",
            "s1_share": "rest",
            "s2_share": "",
            "s3_share": "",
        },
    )
    # A datetime-local field takes keys in the browser's locale order; its value is ISO.
    for element_id, value in (("c-start_time", "2031-05-01T09:15"), ("c-deadline", "")):
        browser.execute_script(
            "document.getElementById(arguments[0]).value = arguments[1];", element_id, value
        )
    _fill(browser, {"c-per_minute": "12"})
    browser.find_element(By.ID, "c-dynamic").click()
    browser.find_element(By.ID, "campaign-create").click()
    _wait(browser, lambda d: _text(d, "campaign-state") == "draft", "the draft campaign")
    (made,) = api.get("/campaigns").json()["items"]
    assert (made["start_time"], made["deadline"]) == (1935393300, None)  # 2031-05-01 09:15 UTC
    assert (made["rate"]["per_minute"], made["dynamic"]) == (12, True)
    schedule = _text(browser, "campaign-schedule")
    assert "2031-05-01 09:15" in schedule, schedule
    assert "12 per minute" in schedule, schedule

    browser.find_element(By.ID, "c-add-ids").send_keys(f"{dev_ids[2]}")
    browser.find_element(By.ID, "campaign-add").click()
    _wait(browser, lambda d: _text(d, "campaign-population") == "2", "the added device")
    assert api.get(f"/campaigns/{made['id']}").json()["population"] == 2
    _shot(browser, "campaign-scheduled")
