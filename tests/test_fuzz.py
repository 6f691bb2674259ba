"""Hostile input, systematically: random and malformed frames in both modes.

A real server runs on its own thread and event loop; hypothesis drives real connections at
it. After every example: the sender got a specific error (or the RFC close code), the total
moved by exactly the acknowledged adds, and another client is still served.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from helpers import within
from wstally.protocol import JSON_PARSE_ERRORS, MAX_FRAME, SUBPROTOCOL
from wstally.server import ServerConfig, TallyServer
from wstally.tally import INT64_MAX, INT64_MIN

# What hostile frames may earn; rate_limited, shutting_down and store_failed would mean the
# server itself was in trouble during the fuzz.
KNOWN_CODES = JSON_PARSE_ERRORS | {"hello_late", "overflow", "binary_unsupported"}


class ThreadedServer:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: TallyServer | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(within(10))

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.server = TallyServer(ServerConfig(port=0, memory=True))
        await self.server.start()
        self.ready.set()
        await self.stop.wait()
        await self.server.stop()

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def health(self) -> dict[str, Any]:
        assert self.server is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.port}/healthz") as r:
            body: dict[str, Any] = json.load(r)
            return body

    def close(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(within(20))


@pytest.fixture(scope="module")
def live() -> Iterator[ThreadedServer]:
    server = ThreadedServer()
    yield server
    server.close()


# Frames, each labelled with what the server must make of it.
int64 = st.integers(INT64_MIN, INT64_MAX)
huge = st.one_of(st.integers(INT64_MAX + 1, 10**40), st.integers(-(10**40), INT64_MIN - 1))
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
ids = st.text(string.ascii_letters + string.digits, min_size=1, max_size=16)


@st.composite
def valid_add(draw: st.DrawFn) -> tuple[str, str | bytes]:
    return "add", json.dumps({"type": "add", "delta": draw(int64), "id": "v" + draw(ids)})


@st.composite
def bad_delta(draw: st.DrawFn) -> tuple[str, str | bytes]:
    delta = draw(huge | st.floats() | st.booleans() | st.text(max_size=5) | st.none())
    return "error", json.dumps({"type": "add", "delta": delta, "id": "b" + draw(ids)})


@st.composite
def wrong_shape(draw: st.DrawFn) -> tuple[str, str | bytes]:
    value = draw(json_values)
    if isinstance(value, dict) and value.get("type") in ("add", "hello"):
        value["type"] = "nope"
    return "error", json.dumps(value)


@st.composite
def not_json(draw: st.DrawFn) -> tuple[str, str | bytes]:
    text = draw(st.text(max_size=40))
    try:
        json.loads(text)
    except ValueError:
        return "error", text
    return "error", text + "{"


@st.composite
def nested(draw: st.DrawFn) -> tuple[str, str | bytes]:
    depth = draw(st.integers(1000, 3000))
    return "error", "[" * depth + "]" * depth


@st.composite
def binary(draw: st.DrawFn) -> tuple[str, str | bytes]:
    return "error", draw(st.binary(min_size=1, max_size=40))


json_frames = st.one_of(valid_add(), bad_delta(), wrong_shape(), not_json(), nested(), binary())


def drain_until_ack(ws: ClientConnection, req_id: str) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(ws.recv(timeout=within(5)))
        if frame["type"] in ("ack", "error"):
            frames.append(frame)
            if frame.get("id") == req_id:
                return frames


def observer_still_served(live: ThreadedServer) -> None:
    with connect(live.url) as plain:
        plain.send("0")
        assert plain.recv(timeout=within(5), decode=True).startswith("Server records total=")


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(
    hello=st.booleans(),
    frames=st.lists(json_frames, min_size=1, max_size=6),
    late=st.booleans(),
)
def test_json_mode_survives_any_frames(
    live: ThreadedServer, hello: bool, frames: list[tuple[str, str | bytes]], late: bool
) -> None:
    if hello and late:
        # After an accepted hello, another one is late whatever came between.
        frames = [*frames, ("error", '{"type":"hello","client":"again"}')]
    before = live.health()["total"]
    with connect(live.url, subprotocols=[SUBPROTOCOL]) as ws:
        assert json.loads(ws.recv(timeout=within(5)))["type"] == "snapshot"
        if hello:
            client = "fuzz-" + secrets.token_hex(4)
            ws.send(json.dumps({"type": "hello", "client": client, "name": "fuzzer"}))
        for _, frame in frames:
            ws.send(frame)
        # Acks wait for their commit: the last add's ack comes after every earlier answer.
        sentinel = "sentinel-" + secrets.token_hex(4)
        ws.send(json.dumps({"type": "add", "delta": 0, "id": sentinel}))
        answers = drain_until_ack(ws, sentinel)[:-1]
    # One answer per frame (errors may overtake acks, which wait for their commit).
    assert len(answers) == len(frames), (frames, answers)
    # The tally, modelled: adds apply in order; an id already applied is a duplicate; an
    # add that would leave int64 is refused (overflow) and does not use up its id.
    adds: set[str] = set()
    applied: set[str] = set()
    expected = before
    for kind, frame in frames:
        if kind == "add":
            add = json.loads(frame)
            adds.add(add["id"])
            if add["id"] not in applied and INT64_MIN <= expected + add["delta"] <= INT64_MAX:
                expected += add["delta"]
                applied.add(add["id"])
    answered: set[str] = set()
    for answer in answers:
        if answer["type"] == "ack":
            assert answer["id"] in applied, answer
        else:
            assert answer["code"] in KNOWN_CODES, answer
            assert answer["message"]
            if answer.get("id") in adds:
                assert answer["code"] == "overflow", answer
        if "id" in answer:
            answered.add(answer["id"])
    # Every well-formed add was answered by its id: applied, a duplicate, or an overflow.
    assert set(adds) <= answered
    assert live.health()["total"] == expected
    observer_still_served(live)


plain_texts = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"[ \t]{0,2}[+-]?[0-9]{1,25}[ \t]{0,2}", fullmatch=True),
    st.sampled_from(["1_000", "0x10", "1e3", "١٢", "NaN", "+-1", "", " ", "5" * 5000]),
)


@fuzz
@given(texts=st.lists(plain_texts, min_size=1, max_size=6))
def test_plain_mode_survives_any_text(live: ThreadedServer, texts: list[str]) -> None:
    with connect(live.url) as ws:
        for text in texts:
            before = live.health()["total"]
            ws.send(text)
            reply = ws.recv(timeout=within(5), decode=True)
            after = live.health()["total"]
            if reply.startswith("error: "):
                assert after == before, (text, reply)
            else:
                assert reply == f"Server records total={after}"
                assert after == before + int(text.strip())
    observer_still_served(live)


@pytest.mark.parametrize("mode", ["plain", "json"])
def test_oversized_and_invalid_utf8_close_with_rfc_codes(live: ThreadedServer, mode: str) -> None:
    protocols = [SUBPROTOCOL] if mode == "json" else None
    for payload, code in ((b"\xff\xfe", 1007), (b"1" * (MAX_FRAME + 1), 1009)):
        before = live.health()["total"]
        with connect(live.url, subprotocols=protocols) as ws:
            # Bypass the client's own checks to put the bad frame on the wire.
            with ws.protocol_mutex:
                ws.protocol.send_text(payload)
                ws.send_data()
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=within(5))
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == code
        assert live.health()["total"] == before
    observer_still_served(live)
