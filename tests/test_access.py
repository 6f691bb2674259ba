"""Who may connect: a token, allowed origins, TLS, and the connection cap."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from helpers import JsonClient, ServerFactory, within
from wstally.protocol import SUBPROTOCOL

SECRET = "s3cret-token-value"


async def test_token_is_required_by_header_or_query(make_server: ServerFactory) -> None:
    server = await make_server(memory=True, token=SECRET)
    with capture_logs() as logs:
        for headers, url in (
            (None, server.url),
            ({"Authorization": "Bearer wrong"}, server.url),
            ({"Authorization": f"Basic {SECRET}"}, server.url),
            (None, server.url + "?token=wrong"),
        ):
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, additional_headers=headers)
            assert refused.value.response.status_code == 401
            assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        async with connect(
            server.url, additional_headers={"Authorization": f"Bearer {SECRET}"}
        ) as ws:
            await ws.send("5")
            assert await asyncio.wait_for(ws.recv(), within(5)) == "Server records total=5"
        async with connect(server.url + f"?token={SECRET}") as ws:
            await ws.send("1")
            assert await asyncio.wait_for(ws.recv(), within(5)) == "Server records total=6"
    # The secret never reaches the logs, even when it was sent in the URL.
    assert SECRET not in repr(logs)


async def test_browser_origins_are_checked(make_server: ServerFactory) -> None:
    server = await make_server(memory=True, allow_origins=["https://tally.example"])
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url, origin="https://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    async with connect(server.url, origin="https://tally.example") as ws:  # type: ignore[arg-type]
        await ws.send("2")
        assert await asyncio.wait_for(ws.recv(), within(5)) == "Server records total=2"
    async with connect(server.url) as ws:  # not a browser: no Origin header at all
        await ws.send("3")
        assert await asyncio.wait_for(ws.recv(), within(5)) == "Server records total=5"


async def test_connections_beyond_the_cap_get_503(
    make_server: ServerFactory, clients: list[JsonClient]
) -> None:
    server = await make_server(memory=True, max_connections=2)
    clients.append(await JsonClient.connect(server.url))
    clients.append(await JsonClient.connect(server.url))
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.url)
    assert refused.value.response.status_code == 503
    await clients.pop().close()
    await asyncio.sleep(within(0.1))
    clients.append(await JsonClient.connect(server.url))


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile = tmp_path / "cert.pem"
    keyfile = tmp_path / "key.pem"
    cafile = tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    return str(certfile), str(keyfile), str(cafile)


async def test_tls_serves_wss(make_server: ServerFactory, tls_files: tuple[str, str, str]) -> None:
    certfile, keyfile, cafile = tls_files
    server = await make_server(memory=True, certfile=certfile, keyfile=keyfile, token=SECRET)
    assert server.url.startswith("wss://")
    context = ssl.create_default_context(cafile=cafile)
    async with connect(
        server.url,
        ssl=context,
        subprotocols=[SUBPROTOCOL],
        additional_headers={"Authorization": f"Bearer {SECRET}"},
    ) as ws:
        snapshot = json.loads(await asyncio.wait_for(ws.recv(), within(5)))
        assert snapshot["type"] == "snapshot"
    # A client that does not trust the CA is refused by TLS itself.
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(server.url)


def test_client_and_load_test_speak_wss(tmp_path: Path, tls_files: tuple[str, str, str]) -> None:
    from servers import ServeProcess

    certfile, keyfile, cafile = tls_files
    server = ServeProcess(
        tmp_path,
        "--memory",
        "--port",
        "0",
        "--certfile",
        certfile,
        "--keyfile",
        keyfile,
        "--token",
        SECRET,
    )
    try:
        url = f"wss://127.0.0.1:{server.port}/"
        piped = subprocess.run(
            [sys.executable, "-m", "wstally", "client", url, "--cafile", cafile, "--token", SECRET],
            input="7\n",
            capture_output=True,
            text=True,
            timeout=within(30),
        )
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout.strip() == "7"
        refused = subprocess.run(
            [sys.executable, "-m", "wstally", "client", url, "--cafile", cafile],
            input="7\n",
            capture_output=True,
            text=True,
            timeout=within(30),
        )
        assert refused.returncode == 2
        assert "HTTP 401" in refused.stderr
        root = Path(__file__).resolve().parents[1]
        load = subprocess.run(
            [
                sys.executable,
                str(root / "scripts" / "loadtest.py"),
                "--url",
                url,
                "--cafile",
                cafile,
                "--token",
                SECRET,
                "--watchers",
                "3",
                "--senders",
                "1",
                "--updates",
                "50",
                "--quiet",
                "--json",
                str(tmp_path / "load.json"),
            ],
            capture_output=True,
            text=True,
            timeout=within(60),
        )
        assert load.returncode == 0, load.stdout + load.stderr
        assert "PASS" in load.stdout
        # The figures file may be shared: the token is not in it.
        saved = (tmp_path / "load.json").read_text()
        assert SECRET not in saved
        assert SECRET not in load.stdout + load.stderr
    finally:
        server.stop()
        server.close()
