"""One structlog configuration for every command.

Events are rendered for people on a terminal and as JSON lines otherwise; ``--log-file``
always gets JSON lines. websockets' own stdlib records go through the same processors, so
they carry the same timestamp, level and connection context as ours.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

__all__ = ["FORMATS", "LEVELS", "configure"]

FORMATS = ("auto", "console", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


_FIRST = ("timestamp", "level", "event", "logger")


def _order_keys(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    # JSON lines read best, in a pager or with jq, when every line starts the same way.
    ordered = {key: event_dict.pop(key) for key in _FIRST if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _formatter(fmt: str) -> logging.Formatter:
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
        extra: list[Processor] = []
    else:
        renderer = structlog.processors.JSONRenderer()
        extra = [structlog.processors.dict_tracebacks, _order_keys]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *extra,
            renderer,
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
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric = logging.getLevelNamesMapping()[level.upper()]

    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream)
    console.setFormatter(_formatter(fmt))
    handlers.append(console)
    if file is not None:
        to_file = logging.FileHandler(file, encoding="utf-8")
        to_file.setFormatter(_formatter("json"))
        handlers.append(to_file)

    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
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


def bind_connection(**fields: Any) -> None:
    structlog.contextvars.bind_contextvars(**fields)
