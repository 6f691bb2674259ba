"""Shared fixtures: real servers on 127.0.0.1 port 0, real clients."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import JsonClient, OpenClient, ServerFactory
from logcases import restored_logging, write_logfile
from redisproc import RedisServer
from servers import ServeProcess
from wstally import logsetup
from wstally.server import ServerConfig, TallyServer
from wstally.store import SQLiteStore, Store

logsetup.configure("json", os.environ.get("WSTALLY_TEST_LOG_LEVEL", "warning"))


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start servers on a free loopback port; every one is stopped at the end of the test."""
    started: list[TallyServer] = []

    async def factory(store: Store | None = None, **options: Any) -> TallyServer:
        config = ServerConfig(host="127.0.0.1", port=0, db=str(tmp_path / "tally.db"), **options)
        if store is None and not config.memory and config.redis is None:
            store = SQLiteStore(config.db)
        server = TallyServer(config, store)
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        if not server.stopped:
            await server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF always) on a free loopback port, for this test alone."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def server(make_server: ServerFactory) -> TallyServer:
    return await make_server(memory=True)


@pytest.fixture
async def clients() -> AsyncIterator[list[JsonClient]]:
    """Collects JSON clients so they are closed however the test ends."""
    opened: list[JsonClient] = []
    yield opened
    for client in opened:
        await client.close()


@pytest.fixture
def open_client(clients: list[JsonClient]) -> OpenClient:
    """``JsonClient.connect``, the client closed at the end of the test."""

    async def open_(url: str, hello: dict[str, Any] | None = None) -> JsonClient:
        client = await JsonClient.connect(url, hello)
        clients.append(client)
        return client

    return open_


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests of commands, which configure logging: the suite's configuration back after.

    A module of such tests uses it throughout: ``pytestmark = usefixtures("restore_logging")``.
    """
    yield from restored_logging()


@pytest.fixture
def logfile(tmp_path: Path) -> Path:
    """``logcases.LINES`` in a log file, malformed lines among them."""
    return write_logfile(tmp_path)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``wstally serve`` processes (args as on the command line); all are killed after."""
    procs: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        proc = ServeProcess(tmp_path, *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()
