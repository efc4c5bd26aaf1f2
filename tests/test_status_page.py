"""The status page at ``/`` in a real browser: Playwright driving Debian's Chromium.

Watched as an operator would: a GC on a seeded table runs while the page is open (its numbers and
its chart advance, then it is complete with the exact count), a node whose server is stopped shows
its 1014, a service with a token asks for it and sends it as a header only. Skipped, with the
reason, only when no browser can be launched (``apt-get install chromium``; see ``.ci/run``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.config import GcOptions
from engine.migrate import upgrade
from engine.service import nodes
from engine.service.settings import ServiceSettings
from engine.service.triggers import Cron
from tests.api_support import GC_PATH, garbage_left, running_service
from tests.data import fill
from tests.polling import wait_until

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "page-t0ken"
OVERVIEW = "/v1/overview"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium (else Playwright's own, if installed); closed with the module."""
    with playwright_api.sync_playwright() as driver:
        try:
            launched = driver.chromium.launch(executable_path=str(CHROMIUM) if CHROMIUM.exists() else None)
        except playwright_api.Error as exc:
            pytest.skip(f"no browser can be launched (apt-get install chromium): {str(exc).splitlines()[0]}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def number(text: str | None) -> int:
    """``12,345`` as shown, into 12345."""
    return int(re.sub(r"[^\d]", "", text or "") or 0)


def test_a_running_gc_advances_on_the_page_then_shows_complete_with_its_exact_count(page, conn, dsn):
    garbage = [i % 3 != 0 for i in range(9_000)]
    fill(conn, garbage)
    settings = ServiceSettings(nodes=nodes.single(dsn), poll_s=0.2, defaults=GcOptions(
        max_seconds=60, batch_size=150, sleep=0.1, max_app_latency_ms=1000.0))
    with running_service(settings) as url:
        page.goto(url + "/")
        card = page.locator("section.node[data-node='postgresql']")
        assert card.get_attribute("data-status", timeout=10_000) == "idle"

        assert httpx.put(url + GC_PATH).status_code == 200
        page.wait_for_selector("section.node[data-status='running'] svg[data-points]", timeout=15_000)
        deleted = card.locator("[data-field='deleted']")
        chart = card.locator("svg[data-field='chart']")
        first = wait_until(lambda: number(deleted.text_content()), what="rows deleted on the page")
        first_points = int(chart.get_attribute("data-points") or 0)
        wait_until(lambda: number(deleted.text_content()) > first and card.get_attribute("data-status")
                   == "running", timeout_s=10, what="the count to advance while running")
        wait_until(lambda: int(chart.get_attribute("data-points") or 0) > first_points
                   and card.get_attribute("data-status") == "running", timeout_s=10,
                   what="the chart to grow while running")
        assert card.locator("polyline.rows").count() == 1 and card.locator("polyline.wal").count() == 1
        assert re.fullmatch(r"[\d,]+ rows/s", card.locator("[data-field='rate']").text_content() or "")
        assert "key walk" in (card.locator("[data-field='strategy']").text_content() or "")
        assert "of 1000.0 ms budget" in (card.locator("[data-field='p99']").text_content() or "")

        page.wait_for_selector("section.node[data-status='complete']", timeout=30_000)
        assert number(deleted.text_content()) == sum(garbage)
        assert (card.locator("[data-field='left']").text_content(),
                card.locator("[data-field='eta']").text_content()) == ("0", "done")
        newest = card.locator("table.runs tbody tr").first
        assert newest.get_attribute("data-status") == "complete"
        assert number(newest.locator("td").nth(2).text_content()) == sum(garbage)
        assert card.locator("[data-field='outbox']").text_content() == "webhooks waiting: 0"
    assert garbage_left(dsn) == 0


def test_a_node_whose_server_stops_shows_its_1014_beside_the_others(page, dsn, private_server):
    stopping = private_server.start()  # a server of its own: stopping it touches nobody else's databases
    upgrade(stopping)
    settings = ServiceSettings(nodes=nodes.build_nodes({"wacore1": dsn, "wacore2": stopping}),
                               multiconnect=True, run_worker=False, connect_timeout_s=1.0)
    with running_service(settings) as url:
        page.goto(url + "/")
        stopped = page.locator("section.node[data-node='wacore2']")
        assert stopped.get_attribute("data-status", timeout=10_000) == "idle"

        private_server.stop()

        page.wait_for_selector("section.node[data-node='wacore2'][data-status='unreachable']", timeout=15_000)
        error = stopped.locator("[data-field='error']")
        assert error.is_visible()
        address = nodes.build_nodes({"wacore2": stopping})[0].address
        shown = error.text_content() or ""
        assert shown.startswith("1014 Internal error: "), shown
        assert shown.endswith(f". Please check if wacore2 is running: {address}"), shown
        assert page.locator("section.node[data-node='wacore1']").get_attribute("data-status") == "idle"


def test_with_a_token_the_page_asks_for_it_and_sends_it_only_as_a_header(page, dsn):
    daily = Cron("0 3 * * *")
    settings = ServiceSettings(nodes=nodes.single(dsn), token=TOKEN, schedule=daily)
    sent: list[Any] = []
    page.on("request", lambda request: sent.append(request))
    with running_service(settings) as url:
        page.goto(url + "/")
        form = page.locator("#token-form")
        form.wait_for(state="visible", timeout=10_000)
        assert page.locator("section.node").count() == 0

        page.fill("#token", "not-the-token")
        page.click("#token-form button")
        page.wait_for_selector("#token-error:text('That token was refused.')", timeout=10_000)

        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("section.node[data-node='postgresql'][data-status='idle']", timeout=10_000)
        assert form.is_hidden()
        scheduled = page.locator("header [data-field='schedule']").text_content() or ""
        assert scheduled.endswith(f"({daily.describe()})"), scheduled
        assert page.evaluate("sessionStorage.getItem('msggc-token')") == TOKEN
        assert page.evaluate("localStorage.length") == 0
    assert all(TOKEN not in request.url for request in sent)
    authorized = [r for r in sent if r.url.endswith(OVERVIEW) and r.headers.get("authorization")]
    assert authorized and authorized[-1].headers["authorization"] == f"Bearer {TOKEN}"
