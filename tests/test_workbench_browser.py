"""The labelers' workbench in a real browser: Debian's Chromium, headless, driven by Selenium
through Debian's chromedriver (installed once by scripts/browser_tools.sh), against a real
feedback gateway and broker.

One browser session serves the module. A wrong key is refused; Alice ranks a task with the
mouse (drag and drop, a tie, flags, quality scores) and the comparison read back from Kafka
has the task's generation ids, her ranks and her judgements; Bob does the same task with the
keyboard alone, writes a demonstration, and sees his agreement with Alice. A screenshot of
the task page is kept (path printed).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from rlhf import topics
from rlhf.kafka_local import LocalKafka
from rlhf.v1 import events_pb2
from services.feedback.workbench.config import WorkbenchConfig
from services.feedback.workbench.ledger import pair_agreement
from services.feedback.workbench.routes import idempotency_key
from tests.conftest import start_broker
from tests.test_feedback_gateway import read_events
from tests.test_workbench_api import (
    labeler_id,
    publish,
    queued,
    served,
    start_workbench_gateway,
)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("RLHF_TEST_ARTIFACTS", ROOT / ".rlhf" / "artifacts"))
KEYS = "alice-key feedback; bob-key feedback; reader-key infer"
WAIT_S = 60.0
FLAG = events_pb2.ResponseFlag.Value
PARIS = "Paris is the capital of France."
SEINE = "France's capital: Paris, on the Seine."
LYON = "I think it is Lyon."
PHONE = "Call 555-0100 to ask."
LARGE = "Capital cities are large."


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    kafka = start_broker(tmp_path_factory.mktemp("workbench-browser-kafka"))
    yield kafka
    kafka.stop()


@pytest.fixture(scope="module")
def workbench(broker: LocalKafka) -> Iterator[str]:
    """The gateway's workbench URL; every task is ranked by two labelers (agreement)."""
    runtime, url = start_workbench_gateway(
        broker.bootstrap_servers, WorkbenchConfig(overlap=1.0), KEYS
    )
    yield f"{url}/workbench/"
    runtime.stop_in_thread()


@pytest.fixture(scope="module")
def browser(workbench: str) -> Iterator[WebDriver]:
    """One headless Chromium for the module, closed before the gateway stops."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "browser_tools.sh")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tools = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    options = webdriver.ChromeOptions()
    options.binary_location = tools["BROWSER_BIN"]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400", "--lang=en-US"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=tools["CHROMEDRIVER_BIN"])
    )
    driver.implicitly_wait(0)
    yield driver
    driver.get("about:blank")  # the page stops asking the gateway
    # No script error in the whole session (refused keys show up as 401/403 responses only).
    errors = [
        entry["message"] for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "the server responded with a status of 40" not in entry["message"]
    ]  # fmt: skip
    driver.quit()
    assert errors == []


def wait(driver: WebDriver, condition: Any, what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for {what}; the page says {status!r}") from None


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def visible(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_element(By.ID, element_id).is_displayed())


def card(driver: WebDriver, generation_id: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-generation-id="{generation_id}"]')


def shown_order(driver: WebDriver) -> list[str]:
    return [
        c.get_attribute("data-generation-id")
        for c in driver.find_elements(By.CSS_SELECTOR, ".card")
    ]


def board(driver: WebDriver) -> dict[str, int]:
    """generation id -> rank, as the page shows it."""
    ranks = {}
    for tier in driver.find_elements(By.CSS_SELECTOR, ".tier"):
        for c in tier.find_elements(By.CSS_SELECTOR, ".card"):
            ranks[c.get_attribute("data-generation-id")] = int(tier.get_attribute("data-rank"))
    return ranks


def drag(driver: WebDriver, generation_id: str, zone: str) -> None:
    """Drags a response by its handle with the mouse and drops it on ``zone`` (a CSS selector),
    found once the drag started: the gaps between rows open up while dragging."""
    handle = card(driver, generation_id).find_element(By.CSS_SELECTOR, ".handle")
    ActionChains(driver, duration=50).click_and_hold(handle).move_by_offset(0, 8).perform()
    target = driver.find_element(By.CSS_SELECTOR, zone)
    ActionChains(driver, duration=50).move_to_element(target).release().perform()


def open_fresh(driver: WebDriver, url: str) -> None:
    """The page with nobody signed in (session storage cleared). The storage is cleared from
    the stylesheet, a document of the same origin running no script: a page still signing in
    with a stored key would store it again once its request returned."""
    driver.get(url + "workbench.css")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url)
    wait(driver, lambda d: visible(d, "sign-in"), "the sign-in form")


def stored_comparison(bootstrap: str, key: str) -> list[events_pb2.ComparisonEvent]:
    found = []
    for record in read_events(bootstrap, [topics.COMPARISONS]):
        value = record.value
        if isinstance(value, events_pb2.ComparisonEvent) and value.idempotency_key == key:
            found.append(value)
    return found


@pytest.fixture(scope="module")
def task_texts(broker: LocalKafka, workbench: str) -> dict[str, str]:
    """One served request with K = 5 responses: the task both labelers rank."""
    run = uuid.uuid4().hex[:6]
    texts = [PARIS, LYON, SEINE, PHONE, LARGE]
    generation = served(f"[{run}] What is the capital of France?", texts, version="policy-v9")
    publish(broker.bootstrap_servers, generation)
    queued(
        workbench.removesuffix("/workbench/"), "alice-key", f"[{run}]", 1
    )  # read by the gateway (it reads in the background)
    return {s.generation_id: s.text for s in generation.samples}


def test_a_wrong_key_is_refused(browser: WebDriver, workbench: str) -> None:
    open_fresh(browser, workbench)
    for key, reason in (("not-a-key", "invalid API key"), ("reader-key", "lacks scope 'feedback'")):
        field = browser.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(key, Keys.ENTER)
        wait(browser, lambda d, r=reason: r in text_of(d, "sign-in-error"), f"refusal of {key}")
        assert text_of(browser, "sign-in-error").startswith("Key refused")
        assert not visible(browser, "task") and not visible(browser, "stats")
        assert browser.execute_script("return sessionStorage.length") == 0


def test_rank_with_the_mouse_a_tie_and_flags_then_read_it_back_from_kafka(
    browser: WebDriver, workbench: str, broker: LocalKafka, task_texts: dict[str, str]
) -> None:
    open_fresh(browser, workbench)
    browser.find_element(By.ID, "api-key").send_keys("alice-key", Keys.ENTER)
    wait(
        browser, lambda d: visible(d, "task") and set(shown_order(d)) == set(task_texts), "the task"
    )
    task_id = browser.find_element(By.ID, "task").get_attribute("data-task-id")
    gid = {text: g for g, text in task_texts.items()}
    paris, seine, lyon = gid[PARIS], gid[SEINE], gid[LYON]
    phone, large = gid[PHONE], gid[LARGE]
    # Whatever order the page shows, build the ranking top down: the first response of each
    # row dropped into the gap below the rows built so far, the others onto their row (a tie).
    target = [[paris, seine], [large], [lyon], [phone]]
    for row, members in enumerate(target):
        drag(browser, members[0], f'.gap[data-position="{row}"]')
        wait(browser, lambda dr, g=members[0], r=row: board(dr)[g] == r + 1, "a new row")
        for other in members[1:]:
            drag(browser, other, f'.tier[data-rank="{row + 1}"]')
            wait(browser, lambda dr, g=other, r=row: board(dr)[g] == r + 1, "a tie")
    expected = {paris: 1, seine: 1, large: 2, lyon: 3, phone: 4}
    assert board(browser) == expected
    # Quick judgements: quality scores and flags (one of them under "More flags").
    for g, quality in ((paris, "7"), (seine, "6"), (lyon, "2")):
        Select(card(browser, g).find_element(By.CSS_SELECTOR, "select.quality")).select_by_value(
            quality
        )
    card(browser, lyon).find_element(By.CSS_SELECTOR, '[data-flag="HALLUCINATION"]').click()
    card(browser, phone).find_element(By.CSS_SELECTOR, '[data-flag="CONTAINS_PII"]').click()
    card(browser, phone).find_element(
        By.CSS_SELECTOR, '[data-flag="FAILS_TO_FOLLOW_INSTRUCTION"]'
    ).click()
    card(browser, large).find_element(By.CSS_SELECTOR, ".more-flags summary").click()
    card(browser, large).find_element(By.CSS_SELECTOR, '[data-flag="EXPRESSES_OPINION"]').click()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "workbench-task.png"
    assert browser.save_screenshot(str(shot))
    print(f"\nworkbench task page screenshot: {shot}")

    # A double click sends one submission; the page moves on once Kafka acked.
    ActionChains(browser).double_click(browser.find_element(By.ID, "submit")).perform()
    wait(
        browser, lambda dr: "Stored" in text_of(dr, "status") or not visible(dr, "task"), "the ack"
    )
    wait(browser, lambda dr: text_of(dr, "today") == "1", "today's count")

    key = idempotency_key(task_id, labeler_id("alice-key"), "ranking")
    [event] = stored_comparison(broker.bootstrap_servers, key)  # exactly one record
    assert event.labeler_id == labeler_id("alice-key")
    assert {r.generation_id: r.rank for r in event.responses} == expected
    assert {r.generation_id: r.text for r in event.responses} == task_texts
    assert {r.model_version for r in event.responses} == {"policy-v9"}
    quality = {r.generation_id: r.quality for r in event.responses}
    assert quality == {paris: 7, seine: 6, large: 0, lyon: 2, phone: 0}
    flags = {r.generation_id: sorted(r.flags) for r in event.responses}
    assert flags == {
        paris: [], seine: [],
        large: [FLAG("RESPONSE_FLAG_EXPRESSES_OPINION")],
        lyon: [FLAG("RESPONSE_FLAG_HALLUCINATION")],
        phone: sorted([FLAG("RESPONSE_FLAG_CONTAINS_PII"), FLAG("RESPONSE_FLAG_FAILS_TO_FOLLOW_INSTRUCTION")]),
    }  # fmt: skip


def keys(driver: WebDriver, *sequence: str) -> None:
    """Key presses to whatever has the focus: the keyboard alone, no pointer."""
    ActionChains(driver).send_keys(*sequence).perform()


def focused(driver: WebDriver) -> WebElement:
    return driver.switch_to.active_element


def tab_to(driver: WebDriver, matches: Any, what: str, limit: int = 80) -> None:
    for _ in range(limit):
        if matches(focused(driver)):
            return
        keys(driver, Keys.TAB)
    raise AssertionError(f"Tab never reached {what}")


def test_the_keyboard_alone_ranks_judges_and_demonstrates(
    browser: WebDriver, workbench: str, broker: LocalKafka, task_texts: dict[str, str]
) -> None:
    open_fresh(browser, workbench)
    assert focused(browser).get_attribute("id") == "api-key"  # autofocus
    keys(browser, "bob-key", Keys.ENTER)
    wait(
        browser, lambda d: visible(d, "task") and set(shown_order(d)) == set(task_texts), "the task"
    )
    task_id = browser.find_element(By.ID, "task").get_attribute("data-task-id")
    a, b, c, d, e = shown_order(browser)
    # The first card has the focus. Each ↓ is one step: tie with b, alone below b, tie with c.
    assert focused(browser).get_attribute("data-generation-id") == a
    keys(browser, Keys.ARROW_DOWN)
    assert board(browser) == {b: 1, a: 1, c: 2, d: 3, e: 4}
    keys(browser, Keys.ARROW_DOWN, Keys.ARROW_DOWN)
    assert board(browser) == {b: 1, c: 2, a: 2, d: 3, e: 4}
    assert focused(browser).get_attribute("data-generation-id") == a  # the focus follows
    # Tab to e's card, then ↑ twice: tie with d, then alone above d.
    tab_to(browser, lambda el: el.get_attribute("data-generation-id") == e, "e's card")
    keys(browser, Keys.ARROW_UP, Keys.ARROW_UP)
    expected = {b: 1, c: 2, a: 2, e: 3, d: 4}
    assert board(browser) == expected
    assert "rank 3" in text_of(browser, "status")
    # Into e's own controls: quality by typing a digit, the first flag by Space.
    keys(browser, Keys.TAB)
    assert "quality" in focused(browser).get_attribute("class")
    keys(browser, "3")
    keys(browser, Keys.TAB, Keys.SPACE)
    first_flag = focused(browser).get_attribute("data-flag")
    assert first_flag == "FAILS_TO_FOLLOW_INSTRUCTION"
    tab_to(browser, lambda el: el.get_attribute("id") == "demonstration", "the demonstration")
    keys(browser, "Paris is the capital of France.")
    ActionChains(browser).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(
        Keys.CONTROL
    ).perform()
    wait(browser, lambda dr: text_of(dr, "today") == "1", "today's count")

    bob = labeler_id("bob-key")
    [event] = stored_comparison(broker.bootstrap_servers, idempotency_key(task_id, bob, "ranking"))
    assert {r.generation_id: r.rank for r in event.responses} == expected
    assert {r.generation_id: r.quality for r in event.responses}[e] == 3
    assert [list(r.flags) for r in event.responses if r.generation_id == e] == [
        [FLAG("RESPONSE_FLAG_FAILS_TO_FOLLOW_INSTRUCTION")]
    ]
    demos = [
        r.value for r in read_events(broker.bootstrap_servers, [topics.DEMONSTRATIONS])
        if r.value.idempotency_key == idempotency_key(task_id, bob, "demonstration")  # type: ignore[attr-defined]
    ]  # fmt: skip
    assert [(x.response, x.labeler_id) for x in demos] == [("Paris is the capital of France.", bob)]  # type: ignore[attr-defined]

    # Both ranked this task: Bob's agreement with Alice is on the page, as the paper defines it.
    [alice] = stored_comparison(
        broker.bootstrap_servers, idempotency_key(task_id, labeler_id("alice-key"), "ranking")
    )
    shared = pair_agreement(
        {r.generation_id: r.rank for r in alice.responses},
        {r.generation_id: r.rank for r in event.responses},
    )
    assert shared.compared > 0
    want = f"{100 * shared.agreed / shared.compared:.1f} % of {shared.compared} comparisons"
    wait(browser, lambda dr: text_of(dr, "agreement") == want, f"agreement {want}")
    # Both labels are in: the task is done, the queue is empty.
    wait(browser, lambda dr: visible(dr, "empty"), "the empty queue")
    assert "Nothing to label" in text_of(browser, "empty-note")
