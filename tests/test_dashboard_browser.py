"""Browser tests: the dashboard in real headless Chromium against the real service.

The service runs as the operator starts it (the console command, embedded
NATS, domain logging on); webhooks go to real HTTP backends on loopback.
Playwright drives Debian's chromium (/usr/bin/chromium), which .ci/run installs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.harness import CliService, cli_service

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Chromium's own background connections would be refused by a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Long enough for a redelivery cycle (ack_wait 2 s) on a loaded machine.
UI_TIMEOUT_MS = 15_000
expect.set_options(timeout=UI_TIMEOUT_MS)


class _Backend(BaseHTTPRequestHandler):
    status = 200

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _FailingBackend(_Backend):
    status = 503


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliService]:
    work = tmp_path_factory.mktemp("dashboard")
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (_Backend, _FailingBackend)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ok, failing = (f"http://127.0.0.1:{server.server_address[1]}/webhook" for server in servers)
    try:
        with cli_service(
            work,
            "nats: {ack_wait_seconds: 2, max_deliveries: 3}\n"
            "forwarding: {timeout_seconds: 1}\n"
            f"routes:\n  - {{domain: vietanh.cloudgo.vn, endpoints: ['{ok}']}}\n"
            f"  - {{domain: dead.example.vn, endpoints: ['{failing}']}}\n",
        ) as running:
            yield running
    finally:
        for server in servers:
            server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium package (.ci/run does)")
    # trio-asyncio (imported by the service's code) replaces asyncio's loop
    # policy; playwright's sync API needs a plain asyncio loop of its own.
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, service: CliService) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(service.url)
    yield page
    context.close()


def call(domain: str, call_id: str) -> dict:
    return {"domain": domain, "call_id": call_id, "direction": "inbound", "state": "missed", "status": "busy-line"}


def test_statistics_and_events_update_live_without_reload(page: Page, service: CliService):
    delivered = page.locator('[data-stat="total_successful"]')
    expect(page.get_by_test_id("service-status")).to_have_text("NATS connected")
    before = int(delivered.inner_text().replace(",", "") or 0) if delivered.inner_text() != "–" else 0
    page.evaluate("window.__sameDocument = true")
    for n in range(3):
        service.post(call("vietanh.cloudgo.vn", f"live-{n}"))
    expect(delivered).to_have_text(str(before + 3))
    expect(page.locator('.card[data-call-id="live-2"]')).to_be_visible()
    assert page.evaluate("window.__sameDocument") is True  # no reload happened


def test_failed_event_shows_whether_it_will_be_retried(page: Page, service: CliService):
    service.post(call("dead.example.vn", "doomed"))
    cards = page.locator('.card[data-call-id="doomed"]')
    expect(cards.locator('[data-retry="will-retry"]').first).to_contain_text("attempt 1 of 3")
    expect(cards.locator('[data-retry="given-up"]')).to_contain_text("Given up · attempt 3 of 3")
    expect(cards.first.locator(".error-text")).to_contain_text("HTTP 503")


def test_filters_narrow_the_list(page: Page, service: CliService):
    service.post(call("vietanh.cloudgo.vn", "filter-ok"))
    service.post(call("dead.example.vn", "filter-bad"))
    expect(page.locator('.card[data-call-id="filter-bad"]').first).to_be_visible()
    expect(page.locator('.card[data-call-id="filter-ok"]')).to_be_visible()

    page.get_by_test_id("domain-filter").select_option("vietanh.cloudgo.vn")
    expect(page.locator('.domain-group[data-domain="dead.example.vn"]')).to_have_count(0)
    expect(page.locator('.card[data-call-id="filter-ok"]')).to_be_visible()

    page.get_by_test_id("domain-filter").select_option("")
    page.get_by_test_id("type-filter").select_option("failed")
    expect(page.locator('.card[data-kind="successful"]')).to_have_count(0)
    expect(page.locator('.card[data-call-id="filter-bad"]').first).to_be_visible()


def test_log_files_toggle_and_date_picker_show_history(page: Page, service: CliService):
    service.post(call("vietanh.cloudgo.vn", "history-1"))
    expect(page.locator('.card[data-call-id="history-1"]')).to_be_visible()
    expect(page.get_by_text("Đọc từ log files")).to_be_visible()  # the original label stays beside the English one

    # Regression: a domain picked while the log files' domains were loading was
    # picked among the live view's, then lost when they arrived.
    picker_disabled_while_loading = []

    def loading(route: Route) -> None:
        picker_disabled_while_loading.append(page.get_by_test_id("domain-filter").is_disabled())
        route.continue_()

    page.route("**/api/logs/domains", loading)
    page.locator("label.switch").click()
    expect(page.get_by_test_id("date-filter")).to_be_visible()
    page.get_by_test_id("domain-filter").select_option(label="vietanh.cloudgo.vn")
    assert picker_disabled_while_loading == [True]
    dates = service.get("/api/logs/domains")["domains"]
    [logged] = [d for d in dates if d["domain"] == "vietanh.cloudgo.vn"]
    expect(page.get_by_test_id("date-filter").locator("option")).to_have_count(len(logged["dates"]))
    assert page.get_by_test_id("date-filter").input_value() == logged["dates"][0]
    expect(page.locator('.card[data-call-id="history-1"]')).to_be_visible()
    expect(page.locator("#source-note")).to_have_text("History: read from the log files")


def test_reload_button_reloads_and_shows_the_result(page: Page, service: CliService):
    expect(page.get_by_test_id("routes").locator("li")).to_have_count(2)
    page.get_by_test_id("reload").click()
    expect(page.get_by_test_id("reload-result")).to_have_text("Configuration reloaded successfully (2)")


def test_vietnamese_switch(page: Page, service: CliService):
    page.get_by_role("button", name="VI").click()
    expect(page.locator(".tile-label").first).to_have_text("Đã chuyển")
    expect(page.get_by_test_id("service-status")).to_have_text("NATS đã kết nối")
    page.reload()  # the choice is remembered
    expect(page.locator(".tile-label").first).to_have_text("Đã chuyển")
    page.get_by_role("button", name="EN").click()
    expect(page.locator(".tile-label").first).to_have_text("Delivered")


def test_phone_width_has_no_horizontal_scroll(browser: Browser, service: CliService):
    context = browser.new_context(viewport={"width": 390, "height": 800})
    page = context.new_page()
    page.goto(service.url)
    expect(page.locator(".card").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    context.close()


def test_dead_letter_is_listed_with_a_replay_button(page: Page, service: CliService):
    event_id = service.post(call("dead.example.vn", "to-replay"))["event_id"]
    letter = page.locator(f'[data-testid="dead-letters"] li[data-event-id="{event_id}"]')
    expect(letter).to_contain_text("to-replay · dead.example.vn")
    expect(letter).to_contain_text("HTTP 503")
    letter.get_by_role("button", name="Replay").click()
    # Replayed: the event goes through its attempts again, so it leaves the list…
    expect(letter).to_have_count(0)
    # …and, its endpoint still failing, comes back as a dead letter after its new attempts.
    expect(letter).to_have_count(1)


def test_backlogs_show_against_the_quota_and_unrouted_domains_wait_in_view(page: Page, service: CliService):
    service.post(call("waiting.example.vn", "no-route-yet"))
    unrouted = page.locator('[data-testid="unrouted"] li[data-domain="waiting.example.vn"]')
    expect(unrouted).to_contain_text("1 waiting, oldest")
    route = page.locator('[data-testid="routes"] li[data-domain="vietanh.cloudgo.vn"]')
    expect(route.locator(".route-backlog")).to_contain_text("waiting of 100,000")
