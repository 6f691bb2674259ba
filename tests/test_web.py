"""The live page, in a real headless Chromium against a real server.

Chromium is Debian's (``apt-get install chromium``), driven by Playwright's Python package
through ``executable_path``: Playwright's own browser download needs the internet. Without
a browser these tests skip, unless ``WSTALLY_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes
that a failure. A failing test saves a screenshot of every page it opened, and prints the
pages' console, in its ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from helpers import OpenClient, ServerFactory, http_get, within
from wstally import web
from wstally.client.events import Event, Item, Updates
from wstally.client.session import Session
from wstally.server import TallyServer

if TYPE_CHECKING or importlib.util.find_spec("playwright") is not None:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright
    from playwright.async_api import expect as playwright_expect

CHROMIUM = os.environ.get("WSTALLY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = "<img src=x onerror=alert(1)>"

# JSON.parse without the reviver's source text (as in Chromium before 114 and older Firefox
# and Safari): the page must fall back to its own exact parsing.
NO_SOURCE_TEXT = """
(() => {
  const parse = JSON.parse;
  JSON.parse = function (text, reviver) {
    if (reviver === undefined) return parse(text);
    return parse(text, function (key, value) { return reviver.call(this, key, value); });
  };
})();
"""

# Records what the Content-Security-Policy refused (init scripts are not subject to it).
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(event.violatedDirective + " " + event.blockedURI);
});
"""


def _no_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set WSTALLY_CHROMIUM)"
    return None


@dataclass
class Tab:
    """One page in its own browser context (so its own localStorage: its own client id)."""

    context: BrowserContext
    page: Page
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    async def expect_text(self, selector: str, text: str) -> None:
        await playwright_expect(self.page.locator(selector)).to_have_text(
            text, timeout=within(10) * 1000
        )

    async def expect_connected(self) -> None:
        await playwright_expect(self.page.locator("body")).to_have_attribute(
            "data-state", "connected", timeout=within(10) * 1000
        )

    async def add(self, delta: str) -> None:
        await self.page.fill("#delta", delta)
        await self.page.press("#delta", "Enter")

    async def rows(self) -> list[tuple[int, str, str]]:
        """The recent updates as listed, oldest first: (seq, delta, by)."""
        rows: list[list[str]] = await self.page.eval_on_selector_all(
            "#updates li",
            "lis => lis.map(li => [li.dataset.seq, li.querySelector('.delta').textContent,"
            " li.querySelector('.by').textContent])",
        )
        return [(int(seq), delta, by) for seq, delta, by in reversed(rows)]

    def problems(self) -> list[str]:
        return [*self.errors, *(m for m in self.console if m.startswith("error"))]


OpenTab = Callable[..., Awaitable[Tab]]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    reason = _no_browser()
    if reason is not None:
        if os.environ.get("WSTALLY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WSTALLY_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=within(30) * 1000
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def open_tab(
    browser: Browser, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenTab]:
    """Open a page at a URL; every page is closed after the test (and shot if it failed)."""
    opened: list[Tab] = []
    failed_before = request.session.testsfailed

    async def open_(
        url: str,
        *,
        init_script: str | None = None,
    ) -> Tab:
        context = await browser.new_context()
        context.set_default_timeout(within(10) * 1000)
        page = await context.new_page()
        tab = Tab(context, page)
        opened.append(tab)
        page.on("console", lambda m: tab.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: tab.errors.append(str(e)))

        async def dismiss(dialog: Any) -> None:
            tab.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", dismiss)
        await page.add_init_script(RECORD_VIOLATIONS)
        if init_script is not None:
            await page.add_init_script(init_script)
        await page.goto(url)
        return tab

    yield open_
    # The call phase's report is in by now: a failure has been counted.
    if request.session.testsfailed > failed_before:
        for i, tab in enumerate(opened):
            shot = tmp_path / f"page-{i}.png"
            with contextlib.suppress(Exception):
                await tab.page.screenshot(path=shot, full_page=True)
            print(f"page {i}: screenshot {shot}; console:", *tab.console, *tab.errors, sep="\n  ")
    for tab in opened:
        await tab.context.close()


class Proxy:
    """A TCP relay between the browser and the server. It can cut the page's connection,
    lose everything the server sends, refuse new connections, or switch to another server,
    while the page keeps its origin (and its CSP's host)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.refuse = False
        self.deaf = False  # drop what the server sends
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer, downstream=False),
            self._pipe(up_reader, writer, downstream=True),
            return_exceptions=True,
        )
        self._writers -= {writer, up_writer}

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if not (downstream and self.deaf):
                    writer.write(data)
                    await writer.drain()
        finally:
            # Either direction ending ends the connection.
            writer.transport.abort()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[int], Awaitable[Proxy]]]:
    started: list[Proxy] = []

    async def start(target: int) -> Proxy:
        relay = Proxy(target)
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.close()


def page_url(server: TallyServer) -> str:
    return f"http://127.0.0.1:{server.port}/"


async def health(server: TallyServer, token: str | None = None) -> dict[str, Any]:
    """The server's committed position, as anyone outside sees it."""
    query = "" if token is None else f"?token={token}"
    status, _, body = await http_get(server.port, "/healthz" + query)
    assert status == 200
    found: dict[str, Any] = json.loads(body)
    return found


async def until_health(server: TallyServer, **expected: Any) -> None:
    async with asyncio.timeout(within(10)):
        while True:
            found = await health(server)
            if all(found[k] == v for k, v in expected.items()):
                return
            await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], units: float = 10) -> None:
    async with asyncio.timeout(within(units)):
        # Polling the server's (or a session's) state: there is no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# The page and its headers


async def test_page_is_served_with_a_strict_policy(make_server: ServerFactory) -> None:
    server = await make_server(memory=True)
    for path, kind in (
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
        ("/?token=anything", "text/html"),
    ):
        status, headers, body = await http_get(server.port, path)
        assert status == 200, path
        assert headers["content-type"].startswith(kind)
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self';" in csp
        assert "style-src 'self';" in csp
        assert "connect-src 'self' ws://127.0.0.1 wss://127.0.0.1;" in csp
        assert "unsafe" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert body
    _, _, html = await http_get(server.port, "/")
    # Nothing inline for the policy to allow: one script and one stylesheet, both files.
    assert b"<script>" not in html
    assert b"style=" not in html
    assert b'<script src="/app.js" defer></script>' in html
    status, _, _ = await http_get(server.port, "/app.jsx")
    assert status == 404
    status, headers, _ = await http_get(server.port, "/healthz")
    assert (status, headers["content-type"]) == (200, "application/json")


def test_a_host_header_is_echoed_into_the_policy_only_when_plain() -> None:
    assert "ws://tally.example:80 wss://tally.example:80;" in web.policy("tally.example:80")
    assert "ws://[::1]:8765 " in web.policy("[::1]:8765")
    for bad in ("a b", "x;script-src *", "x'", "", None):
        assert "connect-src 'self';" in web.policy(bad)


async def test_the_page_loads_connects_and_shows_the_state(
    make_server: ServerFactory, open_tab: OpenTab
) -> None:
    server = await make_server(memory=True)
    tab = await open_tab(page_url(server))
    await tab.expect_connected()
    await tab.expect_text("#total", "0")
    await tab.expect_text("#seq", "0")
    await tab.expect_text("#clients", "1")
    await tab.expect_text("#epoch", (await health(server))["epoch"])
    assert await tab.page.evaluate("window.__violations") == []
    assert tab.problems() == []
    # The policy is enforced: an inline script injected now does not run.
    ran = await tab.page.evaluate(
        """() => new Promise((resolve) => {
            const script = document.createElement("script");
            script.textContent = "window.__inline = true";
            document.body.append(script);
            setTimeout(() => resolve(window.__inline === true), 100);
        })"""
    )
    assert ran is False
    assert any("script-src" in v for v in await tab.page.evaluate("window.__violations"))


async def test_connect_src_self_alone_admits_the_same_origin_websocket(
    make_server: ServerFactory, open_tab: OpenTab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CSP Level 3: 'self' matches ws: to the page's own host; the explicit ws/wss sources
    # in our policy are for older browsers. Chromium must connect without them. (Served as
    # is: a page fulfilled by Playwright's router would not count as loopback, and Chromium's
    # local network access checks would then block the socket for another reason.)
    monkeypatch.setattr(web, "policy", lambda host: web.CSP.format(ws=""))
    server = await make_server(memory=True)
    _, headers, _ = await http_get(server.port, "/")
    assert "connect-src 'self';" in headers["content-security-policy"]
    tab = await open_tab(page_url(server))
    await tab.expect_connected()
    await tab.expect_text("#seq", "0")
    assert await tab.page.evaluate("window.__violations") == []
    assert tab.problems() == []


# Live updates, both ways


async def test_updates_from_another_client_show_live(
    make_server: ServerFactory,
    open_tab: OpenTab,
    open_client: OpenClient,
) -> None:
    server = await make_server(memory=True)
    tab = await open_tab(page_url(server))
    await tab.expect_connected()
    await tab.expect_text("#clients", "1")
    bob = await open_client(server.url, {"client": "bob-1", "name": "bob"})
    await tab.expect_text("#clients", "2")
    assert (await bob.add(5, "a"))["type"] == "ack"
    await tab.expect_text("#total", "5")
    assert (await bob.add(-3, "b"))["type"] == "ack"
    await tab.expect_text("#total", "2")
    await tab.expect_text("#seq", "2")
    assert await tab.rows() == [(1, "+5", "bob"), (2, "\u22123", "bob")]
    # The chart has a line (redrawn at most 4 times a second).
    await playwright_expect(tab.page.locator("#line")).to_have_attribute(
        "points", re.compile(r"^[0-9.]+,[0-9.]+( [0-9.]+,[0-9.]+)+$")
    )


async def test_an_add_typed_in_the_page_is_acked_and_broadcast(
    make_server: ServerFactory, open_tab: OpenTab, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    watcher = await open_client(server.url, {"client": "watcher"})
    tab = await open_tab(page_url(server))
    await tab.expect_connected()
    await tab.add(" +12 ")
    await tab.expect_text("#notice", "+12 acknowledged as #1.")
    await tab.expect_text("#pending", "0")
    await tab.expect_text("#updates li .mine", "you \u2713")
    items = await watcher.items_until(1)
    assert [(i["seq"], i["delta"], i["total"]) for i in items] == [(1, 12, 12)]
    # Refused locally, never sent: the server's grammar, checked in the page.
    for bad in ("1e3", "0x10", "1_000", "١٢"):
        await tab.add(bad)
        await tab.expect_text("#notice", "Not an integer: try 5, -3 or +12.")
    await tab.page.click("#minus-one")
    await tab.expect_text("#notice", "\u22121 acknowledged as #2.")
    assert (await health(server))["total"] == 11
    # The page's hello carried the client id it keeps in localStorage.
    client_id = await tab.page.evaluate("localStorage.getItem('wstally.client')")
    assert client_id.startswith("web-")
    assert await tab.page.text_content("#client-id") == client_id


async def test_two_pages_and_a_terminal_client_see_the_same_order(
    make_server: ServerFactory, open_tab: OpenTab
) -> None:
    server = await make_server(memory=True)
    ann = await open_tab(page_url(server), init_script="localStorage.setItem('wstally.name','ann')")
    bea = await open_tab(page_url(server), init_script="localStorage.setItem('wstally.name','bea')")
    seen: list[Item] = []

    def on_event(event: Event) -> None:
        if isinstance(event, Updates):
            seen.extend(event.items)

    terminal = Session(server.url, name="term", on_event=on_event)
    runner = asyncio.ensure_future(terminal.run())
    try:
        await ann.expect_connected()
        await bea.expect_connected()
        await asyncio.wait_for(terminal.connected_once.wait(), within(10))
        for who, delta in ((ann, "1"), (bea, "2"), (terminal, 3), (ann, "4"), (bea, "-5")):
            if isinstance(who, Session):
                who.add(int(delta))
            else:
                await who.add(str(delta))
        terminal.add(6)
        await until(lambda: len(seen) == 6)
    finally:
        terminal.close()
        await runner
    expected = [(i.seq, f"+{i.delta}" if i.delta >= 0 else f"\u2212{-i.delta}", i.by) for i in seen]
    assert sorted(i.delta for i in seen) == [-5, 1, 2, 3, 4, 6]
    for tab in (ann, bea):
        await tab.expect_text("#seq", "6")
        assert await tab.rows() == expected
        assert tab.problems() == []


# Exact integers and text


@pytest.mark.parametrize("parser", ["source text", "fallback"])
async def test_int64_totals_and_deltas_are_exact(
    make_server: ServerFactory, open_tab: OpenTab, open_client: OpenClient, parser: str
) -> None:
    server = await make_server(memory=True)
    py = await open_client(server.url, {"client": "py", "name": "py"})
    tab = await open_tab(
        page_url(server), init_script=NO_SOURCE_TEXT if parser == "fallback" else None
    )
    await tab.expect_connected()
    assert (await py.add(2**53 + 1, "a"))["total"] == 9007199254740993
    await tab.expect_text("#total", "9007199254740993")
    await tab.add("4611686018427387905")  # 2**62 + 1, from the page
    await tab.expect_text("#notice", "+4611686018427387905 acknowledged as #2.")
    items = await py.items_until(2)
    assert items[-1]["delta"] == 2**62 + 1
    assert items[-1]["total"] == 2**62 + 2**53 + 2
    await tab.expect_text("#total", str(2**62 + 2**53 + 2))
    assert (await py.add(-(2**63), "b"))["type"] == "ack"
    await tab.expect_text("#total", str(2**62 + 2**53 + 2 - 2**63))
    assert (await tab.rows())[-1] == (3, "\u22129223372036854775808", "py")
    await tab.expect_text("#y-min", str(2**62 + 2**53 + 2 - 2**63))
    await tab.add("9223372036854775808")
    await tab.expect_text("#notice", "Outside the signed 64-bit range.")
    assert (await health(server))["seq"] == 3
    assert tab.problems() == []


async def test_a_hostile_name_is_shown_as_text(
    make_server: ServerFactory, open_tab: OpenTab, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    tab = await open_tab(page_url(server))
    await tab.expect_connected()
    mallory = await open_client(server.url, {"client": "m", "name": HOSTILE})
    assert (await mallory.add(1, "x"))["type"] == "ack"
    await tab.expect_text("#updates li .by", HOSTILE)
    # The page's own name, markup included, goes out as text too.
    await tab.page.fill("#name", "<b onmouseover=alert(2)>me</b>")
    await tab.page.click("#save-name")
    await tab.expect_text("#notice", "Your adds now show <b onmouseover=alert(2)>me</b>.")
    await tab.expect_connected()
    await tab.page.click("#plus-one")
    await tab.expect_text("#seq", "2")
    assert [row[2] for row in await tab.rows()] == [HOSTILE, "<b onmouseover=alert(2)>me</b>"]
    items = await mallory.items_until(2)
    assert items[-1]["by"] == "<b onmouseover=alert(2)>me</b>"
    assert await tab.page.locator("img").count() == 0
    assert await tab.page.locator("#updates b").count() == 0
    await tab.page.hover("#updates")
    await asyncio.sleep(within(0.2))
    assert tab.dialogs == []
    assert tab.problems() == []


# Faults: lost acks, a restart, a tab away


async def test_an_add_pending_across_a_restart_counts_once(
    make_server: ServerFactory,
    open_tab: OpenTab,
    proxy: Callable[[int], Awaitable[Proxy]],
    open_client: OpenClient,
) -> None:
    first = await make_server()  # SQLite: the ids it saw survive the restart
    relay = await proxy(first.port)
    tab = await open_tab(relay.url)
    await tab.expect_connected()
    await tab.expect_text("#seq", "0")
    # The add arrives and is committed, but its ack never reaches the page.
    relay.deaf = True
    await tab.add("7")
    await until_health(first, total=7)
    await tab.expect_text("#pending", "1")
    # Then the server goes away; another add waits in the outbox meanwhile.
    relay.refuse = True
    relay.cut()
    await until_health(first, clients=0)
    await first.stop()
    await tab.page.click("#plus-one")
    await tab.expect_text("#pending", "2")
    await playwright_expect(tab.page.locator("body")).to_have_attribute(
        "data-state", "reconnecting"
    )
    second = await make_server()
    relay.target, relay.deaf, relay.refuse = second.port, False, False
    await tab.page.evaluate("window.dispatchEvent(new Event('online'))")  # no backoff wait
    await tab.expect_connected()
    await tab.expect_text("#pending", "0")
    await tab.expect_text("#total", "8")
    await tab.expect_text("#seq", "2")
    assert (await health(second))["seq"] == 2
    assert (await health(second))["total"] == 8
    check = await open_client(second.url)
    assert (check.snapshot["seq"], check.snapshot["total"]) == (2, 8)
    # The lost ack's update comes back in the replay; both are marked as the page's own.
    assert [row[:2] for row in await tab.rows()] == [(1, "+7"), (2, "+1")]
    assert await tab.page.locator("#updates li.own").count() == 2


async def test_a_page_that_was_away_shows_what_it_missed(
    make_server: ServerFactory,
    open_tab: OpenTab,
    proxy: Callable[[int], Awaitable[Proxy]],
    open_client: OpenClient,
) -> None:
    server = await make_server(memory=True)
    relay = await proxy(server.port)
    carol = await open_client(server.url, {"client": "carol", "name": "carol"})
    tab = await open_tab(relay.url)
    await tab.expect_connected()
    assert (await carol.add(1, "1"))["type"] == "ack"
    await tab.expect_text("#seq", "1")
    relay.refuse = True
    relay.cut()
    await playwright_expect(tab.page.locator("body")).to_have_attribute(
        "data-state", "reconnecting"
    )
    for n in (2, 3, 4):
        assert (await carol.add(n, str(n)))["type"] == "ack"
    relay.refuse = False
    await tab.page.evaluate("window.dispatchEvent(new Event('online'))")
    await tab.expect_connected()
    await tab.expect_text("#seq", "4")
    await tab.expect_text("#total", "10")
    # Replayed one by one (since/epoch), not skipped over by a snapshot.
    assert await tab.rows() == [(n, f"+{n}", "carol") for n in (1, 2, 3, 4)]
    assert "not shown one by one" not in (await tab.page.text_content("#notice") or "")


# Access


async def test_the_page_passes_its_token_to_the_websocket(
    make_server: ServerFactory, open_tab: OpenTab
) -> None:
    secret = "s3cret-page-token"
    with capture_logs() as logs:
        server = await make_server(memory=True, token=secret)
        status, _, body = await http_get(server.port, "/")
        assert status == 200  # the page itself is public: it holds nothing
        assert secret.encode() not in body
        with_token = await open_tab(page_url(server) + f"?token={secret}")
        await with_token.expect_connected()
        await with_token.add("3")
        await with_token.expect_text("#notice", "+3 acknowledged as #1.")
        without = await open_tab(page_url(server))
        await playwright_expect(without.page.locator("#state")).to_contain_text(
            "/?token=", timeout=within(10) * 1000
        )
        # (It alternates between connecting and reconnecting, never connected.)
        assert await without.page.get_attribute("body", "data-state") != "connected"
        assert (await health(server, secret))["seq"] == 1
    assert secret not in repr(logs)


async def test_allowed_origins_apply_to_the_page(
    make_server: ServerFactory, open_tab: OpenTab, proxy: Callable[[int], Awaitable[Proxy]]
) -> None:
    # The page's WebSocket carries the page's origin: --allow-origin must list it. The
    # relay gives the page an origin known before the server starts.
    relay = await proxy(0)
    listed = relay.url.rstrip("/")
    server = await make_server(memory=True, allow_origins=[listed])
    relay.target = server.port
    allowed = await open_tab(relay.url)
    await allowed.expect_connected()
    await allowed.expect_text("#seq", "0")
    refused = await open_tab(page_url(server))  # served, but from an origin not listed
    await playwright_expect(refused.page.locator("#state")).to_contain_text(
        "retrying", timeout=within(10) * 1000
    )
    assert await refused.page.get_attribute("body", "data-state") != "connected"
    assert (await health(server))["clients"] == 1


# Load


async def test_a_thousand_updates_a_second_keep_the_page_responsive(
    make_server: ServerFactory, open_tab: OpenTab, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    tab = await open_tab(page_url(server))
    await tab.expect_connected()
    sender = await open_client(server.url, {"client": "load", "name": "load"})

    async def flood() -> None:
        for _ in range(20):  # 2,000 adds over about 2 s
            for _ in range(100):
                await sender.ws.send('{"type":"add","delta":1}')
            await asyncio.sleep(0.1)

    flooding = asyncio.ensure_future(flood())
    slowest = 0.0
    while not flooding.done():
        started = time.monotonic()
        await tab.page.evaluate("() => document.getElementById('total').textContent")
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    await flooding
    assert len(await sender.items_until(2000)) == 2000
    await tab.expect_text("#seq", "2000")
    await tab.expect_text("#total", "2000")
    assert slowest < within(1.0), f"the page took {slowest:.2f} s to answer during the flood"
    assert await tab.page.locator("#updates li").count() == 50
    points = await tab.page.get_attribute("#line", "points") or ""
    assert len(points.split()) <= 4 * 602 + 1
    assert tab.problems() == []
