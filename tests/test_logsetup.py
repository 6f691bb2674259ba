"""One logging chain for structlog events and stdlib records (websockets'), in both formats."""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from wstally import logsetup


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_start_the_same_way_and_carry_the_context() -> None:
    stream = io.StringIO()
    logsetup.configure("json", "info", stream=stream)
    structlog.contextvars.bind_contextvars(name="ann", conn="abc123", mode="json", peer="p")
    logsetup.get_logger("wstally.test").info("conn.hello", since=None)
    (event,) = lines(stream)
    assert list(event) == [
        "timestamp",
        "level",
        "event",
        "logger",
        "conn",
        "peer",
        "mode",
        "name",
        "since",
    ]
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")


def test_stdlib_records_keep_their_level_and_get_the_context() -> None:
    stream = io.StringIO()
    logsetup.configure("json", "info", stream=stream)
    structlog.contextvars.bind_contextvars(conn="c1")
    logging.getLogger("websockets.server").warning("skipped broadcast: %s", "why")
    (event,) = lines(stream)
    assert (event["event"], event["level"], event["logger"]) == (
        "websockets.message",
        "warning",
        "websockets.server",
    )
    assert event["message"] == "skipped broadcast: why"
    assert event["conn"] == "c1"


def test_websockets_records_become_catalog_events_and_repeats_are_dropped() -> None:
    stream = io.StringIO()
    logsetup.configure("json", "info", stream=stream)
    server = logging.getLogger("websockets.server")
    server.info("server listening on %s", "127.0.0.1:1")  # server.started says it
    server.info("connection open")  # conn.opened says it
    server.info("HTTP response sent (%d %s)", 404, "Not Found")
    server.info("connection rejected (%d %s)", 403, "Forbidden")
    try:
        raise ValueError("bad request")
    except ValueError:
        server.error("opening handshake failed", exc_info=True)
    server.info("connection closed")  # conn.closed says it
    events = lines(stream)
    assert [e["event"] for e in events] == [
        "http.response",
        "http.rejected",
        "conn.handshake_failed",
    ]
    assert (events[0]["status"], events[0]["reason"]) == (404, "Not Found")
    assert (events[1]["status"], events[1]["reason"]) == (403, "Forbidden")
    assert events[2]["exception"][0]["exc_type"] == "ValueError"


class FakeResponse:
    status_code = 101


class FakeConnection:
    def __init__(self) -> None:
        self.id = uuid.UUID("0123456789abcdef0123456789abcdef")
        self.remote_address = ("127.0.0.1", 4242)
        self.response = FakeResponse()
        self.subprotocol = "wstally.v1"


def test_records_about_a_connection_name_it_even_outside_its_task() -> None:
    stream = io.StringIO()
    logsetup.configure("json", "info", stream=stream)
    ws = FakeConnection()
    adapter = logging.LoggerAdapter(
        logging.getLogger("websockets.server"), {"websocket": weakref.proxy(ws)}
    )
    adapter.info("HTTP response sent (%d %s)", 200, "OK")
    del ws
    gc.collect()
    adapter.info("late line")  # the proxy is dead now: logged without the connection
    first, second = lines(stream)
    assert (first["conn"], first["peer"], first["mode"]) == (
        "0123456789ab",
        "127.0.0.1:4242",
        "json",
    )
    assert second["message"] == "late line"
    assert "conn" not in second


def test_console_format_for_people_without_colors_off_a_terminal() -> None:
    stream = io.StringIO()
    logsetup.configure("console", "info", stream=stream)
    logsetup.get_logger("wstally.test").info("server.started", port=8765)
    text = stream.getvalue()
    assert "server.started" in text
    assert "port=8765" in text
    assert "\x1b[" not in text


def test_log_file_gets_json_whatever_the_console_and_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    stream = io.StringIO()
    logsetup.configure("console", "info", str(path), stream=stream)
    log = logsetup.get_logger("wstally.test")
    log.info("first", n=1)
    path.rename(tmp_path / "server.log.1")  # what logrotate does
    log.info("second", n=2)
    logsetup.configure("json", "warning")  # closes the file
    rotated = [json.loads(line) for line in (tmp_path / "server.log.1").read_text().splitlines()]
    fresh = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in rotated] == ["first"]
    assert [(e["event"], e["n"]) for e in fresh] == [("second", 2)]
    assert "first" in stream.getvalue()


def test_levels_filter_and_module_loggers_follow_a_reconfiguration() -> None:
    stream = io.StringIO()
    log = logsetup.get_logger("wstally.test")  # made before, as a module's logger is
    logsetup.configure("json", "info", stream=stream)
    log.debug("hidden")
    log.info("shown")
    assert not logsetup.enabled_for(logging.DEBUG)
    logsetup.configure("json", "debug", stream=stream)
    log.debug("now shown")
    assert logsetup.enabled_for(logging.DEBUG)
    assert [e["event"] for e in lines(stream)] == ["shown", "now shown"]
    # websockets' per-frame debug lines stay out even at debug.
    assert logging.getLogger("websockets").getEffectiveLevel() == logging.INFO


def test_exceptions_become_structured_in_json() -> None:
    stream = io.StringIO()
    logsetup.configure("json", "info", stream=stream)
    try:
        raise ValueError("bad")
    except ValueError:
        logsetup.get_logger("wstally.test").critical("committer.error", exc_info=True)
    (event,) = lines(stream)
    assert event["exception"][0]["exc_type"] == "ValueError"
    assert event["exception"][0]["exc_value"] == "bad"
