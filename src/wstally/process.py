"""The ``wstally serve`` process around its server: signals, the collector, log reopening.

SIGINT/SIGTERM drain and stop (a second one forces the exit), SIGHUP reopens the log files;
the garbage collector is tuned once the server has started.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal

from wstally import logsetup
from wstally.config import ServerConfig
from wstally.server import StartupError, TallyServer
from wstally.store import StoreError

__all__ = ["GC_THRESHOLD", "run"]

log = logsetup.get_logger("wstally.server")

GC_THRESHOLD = (20_000, 50, 100)  # Python's defaults: (700, 10, 10); see _tune_gc


async def run(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; a second signal forces an immediate exit."""
    try:
        server = TallyServer(config)
        await server.start()
    except (StoreError, StartupError) as exc:
        log.error("server.failed", error=str(exc))
        raise
    _tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("server.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("server.signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    # The Unix convention for daemons: SIGHUP reopens the log file (after logrotate moved
    # it away) and the server keeps serving; its default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, _reopen_logs)
    await stop.wait()
    await server.stop()
    return 0


def _tune_gc() -> None:
    """Fewer, cheaper pauses of the cyclic garbage collector.

    With 600 connections replaying, Python's default thresholds (700, 10, 10) collected
    every few hundred milliseconds: 5-26 ms for the youngest generation, ~50 ms for the
    middle one and 80-100 ms for a full pass, and others' p99 ack rose to 75-97 ms. What was
    built at start (modules, the loaded state) is frozen out of every pass; the young
    generation is collected after GC_THRESHOLD[0] allocations rather than 700.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _reopen_logs() -> None:
    files = logsetup.reopen()
    log.info("server.logs_reopened", signal="SIGHUP", files=files)
