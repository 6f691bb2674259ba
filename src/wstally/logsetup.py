"""One structlog configuration for every command.

Events are rendered for people on a terminal and as JSON lines otherwise; ``--log-file``
always gets JSON lines. websockets' own stdlib records go through the same processors, so
they carry the same timestamp, level and connection context as ours. The events and their
fields are catalogued in ``docs/logging.md``.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor

__all__ = [
    "FORMATS",
    "LEVELS",
    "configure",
    "conn_id",
    "enabled_for",
    "get_logger",
    "redact",
    "reopen",
]

FORMATS = ("auto", "console", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")


def conn_id(ws: Any) -> str:
    """The short connection id every event about a connection carries as ``conn``."""
    return str(ws.id.hex[:12])


# websockets' own records, as events of the catalog (docs/logging.md): its message (a format
# string) -> our event name and the names of its arguments. The lines that only repeat one of
# our events (a connection opened or closed, the server started or stopped) are dropped.
_WEBSOCKETS_EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "HTTP response sent (%d %s)": ("http.response", ("status", "reason")),
    "connection rejected (%d %s)": ("http.rejected", ("status", "reason")),
    "opening handshake failed": ("conn.handshake_failed", ()),
    "connection handler failed": ("conn.handler_failed", ()),
    "unexpected internal error": ("conn.internal_error", ()),
    "keepalive ping failed": ("conn.ping_failed", ()),
    "parser failed": ("conn.parser_failed", ()),
    "process_request failed": ("http.request_failed", ()),
    "process_response failed": ("http.response_failed", ()),
}
_WEBSOCKETS_REPEATS = frozenset(
    {
        "connection open",  # conn.opened
        "connection closed",  # conn.closed
        "server listening on %s",  # server.started
        "server closing",  # server.stopping
        "server closed",  # server.stopped
    }
)


_STATUS = re.compile(r"\((\d{3}) ([^)]*)\)$")


class _DropRepeats(logging.Filter):
    # On the handlers: a filter on the "websockets" logger would not see its children's.
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("websockets") and record.msg in _WEBSOCKETS_REPEATS)


def _websocket_event(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    if record is None or not record.name.startswith("websockets"):
        return event_dict
    known = _WEBSOCKETS_EVENTS.get(record.msg)
    if known is None:
        # Anything else websockets says keeps one event name, its text as a field.
        event_dict["message"] = event_dict["event"]
        event_dict["event"] = "websockets.message"
        return event_dict
    text = event_dict["event"]
    event_dict["event"], names = known
    # structlog has already merged the record's arguments into its text: read them back.
    found = _STATUS.search(text) if names else None
    if found is not None:
        event_dict["status"], event_dict["reason"] = int(found[1]), found[2]
    return event_dict


def _websocket_context(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    # websockets logs some lines from transport callbacks, outside the connection's task and
    # so outside its bound context; its records carry the connection (a weak proxy) instead.
    record = event_dict.get("_record")
    ws = getattr(record, "websocket", None)
    if ws is None:
        return event_dict
    try:
        event_dict.setdefault("conn", conn_id(ws))
        if "peer" not in event_dict:
            addr = ws.remote_address
            if addr:
                event_dict["peer"] = f"{addr[0]}:{addr[1]}"
        response = ws.response
        if "mode" not in event_dict and response is not None and response.status_code == 101:
            event_dict["mode"] = "json" if ws.subprotocol else "plain"
    except (ReferenceError, AttributeError, OSError, TypeError, IndexError):
        pass  # the connection is already gone: log what we have
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


# Then the connection context, so that a line about a connection says which one up front.
_FIRST = ("timestamp", "level", "event", "logger", "conn", "peer", "mode", "client", "name")


def _order_keys(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    # JSON lines read best, in a pager or with jq, when every line starts the same way.
    ordered = {key: event_dict.pop(key) for key in _FIRST if key in event_dict}
    ordered.update(event_dict)
    return ordered


# Secrets (the server's token) that must never reach a log line, whatever path wrote it.
_SECRETS: set[str] = set()
REDACTED = "[redacted]"


def redact(secret: str) -> None:
    """Never write ``secret`` to any log: every rendered line is scrubbed of it."""
    if secret:
        _SECRETS.add(secret)


def _scrub(_logger: Any, _method: str, line: Any) -> Any:
    # The last processor, after rendering: it sees the exact text that will be written, so
    # a secret that reached an exception message or a header value is caught too.
    for secret in _SECRETS:
        if secret in line:
            line = line.replace(secret, REDACTED)
    return line


def _formatter(fmt: str, colors: bool = False) -> logging.Formatter:
    # Tracebacks never show local variables: a handshake's locals hold the token the client
    # presented and the one expected (a leak found by an attack, see docs/reliability.md).
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors,
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False),
        )
        extra: list[Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        extra = [tracebacks, _order_keys]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), _websocket_event, _websocket_context],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *extra,
            renderer,
            _scrub,
        ],
    )


def configure(
    fmt: str = "auto",
    level: str = "info",
    file: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Route every log record (ours and websockets') through one chain of processors."""
    stream = stream if stream is not None else sys.stderr
    tty = stream.isatty()
    if fmt == "auto":
        fmt = "console" if tty else "json"
    numeric = logging.getLevelNamesMapping()[level.upper()]

    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream)
    console.setFormatter(_formatter(fmt, colors=tty))
    handlers.append(console)
    if file is not None:
        # Watched: after logrotate moves the file away, the next line reopens it by name.
        to_file = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
        to_file.setFormatter(_formatter("json"))
        handlers.append(to_file)

    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.addFilter(_DropRepeats())
        root.addHandler(handler)
    root.setLevel(numeric)
    # websockets logs every frame at DEBUG: far too much even for our own debug level.
    logging.getLogger("websockets").setLevel(max(numeric, logging.INFO))

    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Filtering in the bound logger makes a disabled debug call nearly free.
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )


def reopen() -> int:
    """Reopen every log file by name (SIGHUP, after logrotate); returns how many."""
    reopened = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
                reopened += 1
            finally:
                handler.release()
    return reopened


def get_logger(name: str) -> FilteringBoundLogger:
    """A module's logger that follows the configuration in force at each call.

    Not cached, unlike ``structlog.get_logger()`` under ``cache_logger_on_first_use``: a
    cached logger keeps the level of its first use, which would pin the level of every
    later (re)configuration, in tests notably. Each call costs a couple of microseconds more,
    which is nothing for events logged per connection; per-update events are guarded by
    :func:`enabled_for`, read once when the object that logs them is created.
    """
    return cast(
        FilteringBoundLogger,
        structlog.wrap_logger(None, logger_factory_args=(name,), cache_logger_on_first_use=False),
    )


def enabled_for(level: int) -> bool:
    """Whether events at ``level`` are logged under the configuration in force."""
    bound = cast(FilteringBoundLogger, structlog.get_logger("wstally").bind())
    return bool(bound.is_enabled_for(level))
