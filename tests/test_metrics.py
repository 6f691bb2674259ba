"""/metrics: Prometheus text format, read back with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from helpers import OpenClient, ServerFactory, http_get, within
from wstally.metrics import ACK_BUCKETS, Histogram

TOKEN = "metrics-token"


async def scrape(port: int, query: str = "") -> dict[str, dict[tuple[Any, ...], float]]:
    def fetch() -> str:
        url = f"http://127.0.0.1:{port}/metrics{query}"
        with urllib.request.urlopen(url, timeout=within(5)) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(response.read().decode())

    text = await asyncio.to_thread(fetch)
    samples: dict[str, dict[tuple[Any, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def test_metrics_count_what_happened(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    server = await make_server(memory=True)
    client = await open_client(server.url, {"client": "m"})
    watcher = await open_client(server.url)
    async with connect(server.url) as plain:
        assert (await client.add(5, "one"))["type"] == "ack"
        assert (await client.add(5, "one")).get("duplicate") is True
        await client.send({"type": "add", "delta": "x"})
        assert (await client.expect("error"))["code"] == "bad_delta"
        await plain.send("nope")
        await watcher.items_until(1)
        m = await scrape(server.port)
        assert m["wstally_connections"] == {(("mode", "json"),): 2, (("mode", "plain"),): 1}
    assert m["wstally_adds_applied_total"][()] == 1
    assert m["wstally_adds_duplicate_total"][()] == 1
    refused = m["wstally_adds_refused_total"]
    assert refused[(("code", "bad_delta"),)] == 1
    assert refused[(("code", "bad_number"),)] == 1
    assert m["wstally_deliveries_total"][()] == 3  # one update, three clients
    assert m["wstally_sent_bytes_total"][()] > 0
    assert m["wstally_seq"][()] == 1
    assert m["wstally_engine_up"][()] == 1
    assert m["wstally_loop_cpu_wait_ratio"][()] >= 0.0
    assert m["wstally_engine_info"] == {(("engine", "memory"),): 1}
    assert m["wstally_ack_seconds_count"][()] == 2
    assert m["wstally_ack_seconds_bucket"][(("le", "+Inf"),)] == 2
    assert m["wstally_commit_batch_size_count"][()] >= 1
    assert m["wstally_commit_seconds_count"][()] >= 1
    assert m["process_resident_memory_bytes"][()] > 0  # the process collector
    names = set(m)
    assert all(n.startswith(("wstally_", "process_", "python_")) for n in names), names


async def test_replays_are_counted(make_server: ServerFactory, open_client: OpenClient) -> None:
    server = await make_server(memory=True)
    writer = await open_client(server.url, {"client": "w"})
    await writer.add(1, "a")
    epoch = writer.snapshot["epoch"]
    await open_client(server.url, {"client": "r", "since": 0, "epoch": epoch})
    await open_client(server.url, {"client": "s", "since": 0, "epoch": "old"})
    m = await scrape(server.port)
    replays = m["wstally_replays_total"]
    assert replays[(("outcome", "recovered"),)] == 1
    assert replays[(("outcome", "not_recovered"),)] == 1


async def test_the_loop_s_wait_for_a_cpu_is_the_hub_s_last_reading(
    make_server: ServerFactory,
) -> None:
    server = await make_server(memory=True)
    server.hub.contention.share = 0.25  # as a window of a contended machine would leave it
    m = await scrape(server.port)
    assert m["wstally_loop_cpu_wait_ratio"][()] == 0.25


async def test_metrics_need_the_token(make_server: ServerFactory) -> None:
    server = await make_server(memory=True, token=TOKEN)
    status, headers, _ = await http_get(server.port, "/metrics")
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, _ = await http_get(server.port, "/metrics?token=wrong")
    assert status == 401
    m = await scrape(server.port, f"?token={TOKEN}")
    assert m["wstally_seq"][()] == 0
    with pytest.raises(urllib.error.HTTPError):
        await scrape(server.port)


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert histogram.total == pytest.approx(3.65)


def test_histogram_observes_a_batch_as_one_by_one() -> None:
    values = [0.0, 0.0004, 0.0005, 0.0006, 0.01, 0.02, 7.0, 0.3]
    one, batch = Histogram(ACK_BUCKETS), Histogram(ACK_BUCKETS)
    for value in values:
        one.observe(value)
    batch.observe_all(values[:3])
    batch.observe_all(values[3:])
    batch.observe_all([])
    assert batch.buckets() == one.buckets()
    assert batch.total == pytest.approx(one.total)


async def test_no_metrics_serves_none_and_times_nothing(
    make_server: ServerFactory, open_client: OpenClient
) -> None:
    server = await make_server(memory=True, metrics=False)
    client = await open_client(server.url, {"client": "n"})
    assert (await client.add(1, "a"))["type"] == "ack"
    status, _, _ = await http_get(server.port, "/metrics")
    assert status == 404
    assert server.tallies.ack_seconds.total == 0.0
