"""scripts/loadtest.py end to end, with small numbers: its verdict must be honest."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from helpers import within
from redisproc import RedisServer, redis_server_binary
from servers import ServeProcess
from wstally.loadgen import node_peer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "loadtest.py"
NAIVE = f"{sys.executable} -m wstally.loadgen.naive_server"


def run_script(
    *args: str,
    script: Path = SCRIPT,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    units: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``loadtest.py ARGS`` to its end, its output captured."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=within(units),
        cwd=cwd,
        env=env,
    )


def figures_of(out: Path) -> dict[str, Any]:
    return json.loads(out.read_text()) if out.exists() else {}


def loadtest(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "result.json"
    result = run_script("--quiet", "--json", str(out), *args, env=env)
    return result.returncode, figures_of(out), result.stdout + result.stderr


def test_passes_against_wstally_with_sqlite(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path, "--spawn", "--watchers", "20", "--senders", "3", "--updates", "600"
    )
    assert code == 0, output
    assert figures["pass"] is True
    assert "PASS" in output
    assert figures["acked"] == figures["sent"] == 600
    assert figures["final"]["seq"] - figures["start"]["seq"] == 600
    # Every watcher received every update.
    assert figures["deliveries"] == 600 * 20
    assert figures["fanout_ms"]["count"] > 0
    assert figures["ack_ms"]["count"] == 600
    assert figures["server_cpu_seconds"] >= 0


def test_paced_senders_over_several_processes(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--store",
        "memory",
        "--watchers",
        "10",
        "--senders",
        "2",
        "--rate",
        "200",
        "--duration",
        "1",
        "--processes",
        "2",
    )
    assert code == 0, output
    assert 200 <= figures["acked"] <= 2 * 200 * 1.5
    assert figures["connections"] == 12


@pytest.mark.parametrize("fault", ["drop", "double"])
def test_fails_against_a_broken_server(tmp_path: Path, fault: str) -> None:
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--server-cmd",
        f"{NAIVE} --fault {fault}",
        "--watchers",
        "5",
        "--senders",
        "2",
        "--updates",
        "300",
    )
    assert code == 1, output
    assert figures["pass"] is False
    failed = [c["what"] for c in figures["checks"] if not c["ok"]]
    if fault == "drop":
        assert any("gaps" in what for what in failed), failed
    else:
        assert any("server total" in what for what in failed), failed


def test_refuses_a_non_loopback_target(tmp_path: Path) -> None:
    code, _, output = loadtest(tmp_path, "--url", "ws://192.0.2.1:8765/", "--duration", "1")
    assert code == 2
    assert "not a loopback address" in output


def test_find_capacity_steps_until_the_limit(tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    result = run_script(
        "--quiet",
        "--spawn",
        "--store",
        "memory",
        "--find-capacity",
        "--step",
        "10",
        "--max-watchers",
        "30",
        "--p99-limit",
        "5000",
        "--senders",
        "2",
        "--rate",
        "50",
        "--duration",
        "0.5",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    # A generous limit holds at every step: the search stops at --max-watchers.
    assert [s["watchers"] for s in report["steps"]] == [10, 20, 30]
    assert report["capacity"] == 30
    assert "largest audience that held" in result.stdout


class Run(NamedTuple):
    code: int
    figures: dict[str, Any]
    stdout: str
    stderr: str


def _piped_env(**extra: str) -> dict[str, str]:
    # As through a pipe, with nothing saying how wide it is.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One ``--compare naive`` run, from the package copied away from the source checkout,
    as pip would install it: the naive reference server must come with it, not from
    benchmarks/ in a clone."""
    tmp_path = tmp_path_factory.mktemp("compare")
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "src" / "wstally", site / "wstally", ignore=shutil.ignore_patterns("__pycache__")
    )
    script = tmp_path / "loadtest.py"
    shutil.copy(SCRIPT, script)
    out = tmp_path / "compare.json"
    result = run_script(
        "--quiet",
        "--compare",
        "naive",
        "--store",
        "memory",
        "--watchers",
        "3",
        "--senders",
        "1",
        "--updates",
        "200",
        "--json",
        str(out),
        script=script,
        cwd=tmp_path,
        env=_piped_env(PYTHONPATH=str(site)),
    )
    return Run(result.returncode, figures_of(out), result.stdout, result.stderr)


def test_compare_naive_works_from_an_installed_package(compared: Run) -> None:
    output = compared.stdout + compared.stderr
    assert compared.code == 0, output
    assert "Traceback" not in output
    assert compared.figures["runs"]["naive"]["pass"] is True
    assert compared.figures["runs"]["naive"]["acked"] == 200


def test_compare_titles_each_table_by_its_server(compared: Run) -> None:
    assert compared.code == 0, compared.stdout + compared.stderr
    titles = [line.strip() for line in compared.stdout.splitlines() if "load test" in line]
    assert titles == ["wstally load test", "naive load test"]


def test_compare_json_holds_every_ratio_the_table_shows(compared: Run) -> None:
    assert compared.code == 0, compared.stdout + compared.stderr
    table = compared.stdout[compared.stdout.index("wstally / naive") :]
    shown = [line.split("│")[1].strip() for line in table.splitlines() if line.endswith(" │")]
    assert shown == ["deliveries_per_s", "ingest_per_s", "ack_ms p99", "fanout_ms p99"]
    ratios = compared.figures["ratios"]
    assert list(ratios) == ["deliveries_per_s", "ingest_per_s", "ack_ms_p99", "fanout_ms_p99"]
    assert all(ratio > 0 for ratio in ratios.values())


def test_spawned_runs_record_the_url_they_loaded(compared: Run) -> None:
    # Not the default --url (8765), which --spawn ignores: each run's own server.
    urls = [compared.figures["runs"][label]["config"]["url"] for label in ("wstally", "naive")]
    assert all(len(url) == 1 and url[0].startswith("ws://127.0.0.1:") for url in urls), urls
    assert "ws://127.0.0.1:8765/" not in [url[0] for url in urls]
    assert urls[0] != urls[1]


def node_peer_or_skip() -> None:
    """Skips the test without node or the ws package, or fails it when CI requires them."""
    try:
        node_peer.command()
    except node_peer.PeerMissing as exc:
        if os.environ.get("WSTALLY_REQUIRE_NODE") == "1":
            pytest.fail(f"WSTALLY_REQUIRE_NODE=1 requires the Node peer: {exc}")
        pytest.skip(f"{exc} (WSTALLY_REQUIRE_NODE=1 makes this a failure)")


def test_compare_node_sets_the_peer_beside_wstally(tmp_path: Path) -> None:
    node_peer_or_skip()
    code, figures, output = loadtest(
        tmp_path,
        "--compare",
        "node",
        "--store",
        "memory",
        "--watchers",
        "3",
        "--senders",
        "2",
        "--rate",
        "100",
        "--duration",
        "1",
    )
    assert code == 0, output
    peer = figures["runs"]["node"]
    assert peer["pass"] is True, output
    assert peer["acked"] > 0
    assert peer["server_cpu_seconds"] >= 0
    assert peer["config"]["server_cmd"].endswith("benchmarks/node_ws_server.js")
    assert figures["peer"]["ws"] == "8.23.0"  # pinned by benchmarks/package-lock.json
    assert list(figures["ratios"]) == [
        "ingest_per_s",
        "ack_ms_p50",
        "ack_ms_p99",
        "fanout_ms_p50",
        "fanout_ms_p99",
        "server_cpu_seconds",
        "server_cpu_us_per_delivery",
    ]
    assert all(ratio > 0 for ratio in figures["ratios"].values())
    titles = [line.strip() for line in output.splitlines() if "load test" in line]
    assert titles == ["wstally load test", "node load test"]
    assert "wstally / node" in output


def test_a_piped_table_is_not_wrapped(tmp_path: Path) -> None:
    # The stalled-reader row makes the table wider than 80 columns.
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--store",
        "memory",
        "--watchers",
        "3",
        "--senders",
        "1",
        "--updates",
        "100",
        "--stalled",
        "1",
        env=_piped_env(),
    )
    assert code == 0, output
    rows = [line for line in output.splitlines() if line.startswith("│")]
    assert max(len(row) for row in rows) > 80
    # Every row on one line: no cell continues on the next.
    assert all(row.split("│")[1].strip() and row.split("│")[2].strip() for row in rows), output
    stalled = next(row for row in rows if "stalled readers / evicted by the server" in row)
    assert stalled.split("│")[2].strip() == f"1 / {figures['evicted_by_server']}"


def test_help_shows_the_defaults(tmp_path: Path) -> None:
    result = run_script(
        "--help", env=_piped_env(COLUMNS="200", WSTALLY_TOKEN="not-for-the-help"), units=30
    )
    assert result.returncode == 0, result.stderr
    lines: dict[str, str] = {}  # each flag's whole entry: its help may start a line below
    flag = ""
    for line in result.stdout.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0]
        if flag:
            lines[flag] = lines.get(flag, "") + line
    for flag, default in (
        ("--watchers", "[default 100]"),
        ("--senders", "[default 10]"),
        ("--window", "[default 50]"),
        ("--duration", "[default 10]"),
        ("--processes", "[default 1]"),
        ("--sample-every", "[default 8]"),
        ("--url", "[default ws://127.0.0.1:8765/]"),
        ("--store", "[default: sqlite in a temp dir]"),
        ("--token", "[env WSTALLY_TOKEN]"),
    ):
        assert default in lines[flag], lines[flag]
    # The token's value comes from the environment after parsing: --help never shows it.
    assert "not-for-the-help" not in result.stdout


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        (["--wathcers", "5"], "--watchers"),
        (["--duratoin=1"], "--duration"),
        (["-spawn"], "--spawn"),
    ],
)
def test_a_misspelt_flag_suggests_the_right_one(given: list[str], meant: str) -> None:
    result = run_script(*given, units=30)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"loadtest.py: error: unrecognized arguments: {' '.join(given)}; did you mean {meant}?"
    )


def test_an_unknown_flag_far_from_any_gets_no_guess() -> None:
    result = run_script("--xyzzy", units=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "loadtest.py: error: unrecognized arguments: --xyzzy"
    )


def test_no_server_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    code, _, output = loadtest(tmp_path, "--url", f"ws://127.0.0.1:{port}/", "--duration", "1")
    assert code == 2
    assert output.strip() == f"no server at ws://127.0.0.1:{port}/; start one or use --spawn"
    # The default URL, as the README's first command would meet it with no server running.
    code, _, output = loadtest(tmp_path, "--duration", "1")
    if code == 2:  # (unless someone's server does listen on 8765 on this machine)
        assert output.strip() == "no server at ws://127.0.0.1:8765/; start one or use --spawn"


def test_rate_limited_senders_pace_themselves_and_resend(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--server-cmd",
        f"{sys.executable} -m wstally serve --memory --rate-limit 400",
        "--watchers",
        "3",
        "--senders",
        "2",
        "--window",
        "400",
        "--updates",
        "2000",
    )
    assert code == 0, output
    assert figures["rate_limited"] > 0, "the limit was never met"
    assert figures["refused"] == {}
    assert figures["acked"] == figures["sent"] == 2000
    assert figures["final"]["seq"] - figures["start"]["seq"] == 2000


def test_ctrl_c_ends_a_run_with_130_and_no_traceback(tmp_path: Path) -> None:
    run = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--spawn",
            "--store",
            "memory",
            "--watchers",
            "5",
            "--senders",
            "1",
            "--rate",
            "100",
            "--duration",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        time.sleep(within(4))  # spawned server up, workers connected, adds flowing
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: the whole group
        output, _ = run.communicate(timeout=within(30))
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 130, output
    assert "interrupted: no verdict" in output
    assert "Traceback" not in output


# Several nodes of one tally (the Redis engine): the verdict holds across them.


def _checks(figures: dict[str, Any]) -> list[str]:
    return [c["what"] for c in figures["checks"]]


def test_spawned_nodes_pass_with_one_order_across_them(tmp_path: Path) -> None:
    redis_server_binary()
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--nodes",
        "2",
        "--watchers",
        "6",
        "--senders",
        "4",
        "--updates",
        "1200",
    )
    assert code == 0, output
    applied = figures["final"]["seq"] - figures["start"]["seq"]
    assert figures["acked"] == applied == 1200
    # Round-robin: half the watchers and half the senders on each node.
    nodes = figures["nodes"]
    assert [(n["watchers"], n["senders"]) for n in nodes] == [(3, 2), (3, 2)]
    assert sum(n["acked"] for n in nodes) == 1200
    # Every watcher on every node received every update, and both nodes ended in one place.
    assert [n["deliveries"] for n in nodes] == [1200 * 3, 1200 * 3]
    assert len({(n["final"]["seq"], n["final"]["total"], n["final"]["epoch"]) for n in nodes}) == 1
    assert any(what.startswith("one order:") for what in _checks(figures))
    assert any(what.startswith("all 2 nodes reported one seq") for what in _checks(figures))
    # An add sent on one node and seen by a watcher of the other: timed apart.
    assert figures["fanout_cross_node_ms"]["count"] > 0
    assert figures["fanout_same_node_ms"]["count"] > 0
    # Redis's own accounting of the run, and both nodes' CPU.
    assert figures["redis"]["script_calls"] > 0
    assert figures["redis"]["cpu_us_per_add"] > 0
    assert all(n["cpu_seconds"] > 0 for n in nodes)


def test_senders_on_one_node_and_watchers_on_another(tmp_path: Path) -> None:
    redis_server_binary()
    code, figures, output = loadtest(
        tmp_path,
        "--spawn",
        "--nodes",
        "2",
        "--watchers-on",
        "1",
        "--senders-on",
        "0",
        "--watchers",
        "4",
        "--senders",
        "2",
        "--rate",
        "200",
        "--duration",
        "1.5",
    )
    assert code == 0, output
    assert [(n["watchers"], n["senders"]) for n in figures["nodes"]] == [(0, 2), (4, 0)]
    # Every fan-out latency measured went from a sender on node 0 to a watcher on node 1.
    assert figures["fanout_cross_node_ms"]["count"] == figures["fanout_ms"]["count"] > 0
    assert figures["fanout_same_node_ms"] == {}
    # A server index that is not there is a usage error.
    code, _, output = loadtest(tmp_path, "--spawn", "--nodes", "2", "--watchers-on", "2")
    assert code == 2
    assert "--watchers-on: 2 is not a server index (0 to 1)" in output


def test_urls_of_running_nodes_are_loaded_round_robin(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    nodes = [
        ServeProcess(tmp_path, "--port", "0", "--redis", redis_server.url, "--node", f"n{i}")
        for i in range(3)
    ]
    try:
        urls = [arg for node in nodes for arg in ("--url", node.url)]
        code, figures, output = loadtest(
            tmp_path, *urls, "--watchers", "7", "--senders", "3", "--duration", "1.5"
        )
    finally:
        for node in nodes:
            node.close()
    assert code == 0, output
    # Watcher k and sender k go to URL k mod 3.
    placed = [(n["url"], n["watchers"], n["senders"]) for n in figures["nodes"]]
    assert placed == [(node.url, w, 1) for node, w in zip(nodes, (3, 2, 2), strict=True)]
    applied = figures["final"]["seq"] - figures["start"]["seq"]
    assert applied == figures["acked"] > 0
    assert figures["deliveries"] == applied * 7


def test_servers_that_do_not_share_a_total_fail_the_verdict(tmp_path: Path) -> None:
    # Two independent servers, each with its own total: each node's watchers see a
    # consistent history of their own, but not the same one.
    ports = [_free_port(), _free_port()]
    naive = [
        subprocess.Popen(
            [sys.executable, "-m", "wstally.loadgen.naive_server", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            _wait_for_port(port)
        urls = [arg for port in ports for arg in ("--url", f"ws://127.0.0.1:{port}/")]
        code, figures, output = loadtest(
            tmp_path, *urls, "--watchers", "4", "--senders", "2", "--updates", "400"
        )
    finally:
        for proc in naive:
            proc.kill()
            proc.wait()
    assert code == 1, output
    failed = [c["what"] for c in figures["checks"] if not c["ok"]]
    assert any("disagreements on the total after a seq" in what for what in failed), failed
    assert any("the nodes disagree" in what for what in failed), failed


def test_adds_refused_as_unavailable_are_resent_and_count_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Redis hangs for longer than a node waits for it: the node answers unavailable (the
    # outcome of its batch unknown), the generator resends with the same ids.
    nodes = [
        ServeProcess(tmp_path, "--port", "0", "--redis", redis_server.url, "--node", f"n{i}")
        for i in range(2)
    ]
    out = tmp_path / "result.json"
    try:
        urls = [arg for node in nodes for arg in ("--url", node.url)]
        load = ("--watchers", "4", "--senders", "2", "--rate", "100", "--duration", "6")
        run = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--quiet", "--json", str(out), *urls, *load],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        time.sleep(2.5)  # connected, sending
        redis_server.pause()
        time.sleep(3.0)
        redis_server.resume()
        output, _ = run.communicate(timeout=within(120))
    finally:
        redis_server.resume()
        for node in nodes:
            node.close()
    figures = json.loads(out.read_text())
    assert run.returncode == 0, output
    assert figures["unavailable"] > 0, "no add met the outage"
    assert figures["refused"] == {}
    applied = figures["final"]["seq"] - figures["start"]["seq"]
    assert applied == figures["acked"] == figures["sent"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + within(15)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_fan_out_is_timed_on_watchers_spread_over_the_connection_order() -> None:
    # A server writes a broadcast to its connections one after the other (20 ms from first
    # to last for 1,000 here): the timed watchers must sample every place in that order,
    # not only the first connected, which servers reach first.
    import multiprocessing

    from wstally.loadgen.plan import Plan
    from wstally.loadgen.shared import Shared
    from wstally.loadgen.worker import LATENCY_WATCHERS, Worker

    shared = Shared.allocate(multiprocessing.get_context("spawn"), 1, 8)
    for count in (1000, 120, 10):
        plan = Plan(index=0, targets=(("127.0.0.1", 1),), watchers=count, senders=0)
        timed = [i for i, w in enumerate(Worker(plan, shared).watchers) if w.samples is not None]
        assert len(timed) == min(count, LATENCY_WATCHERS)
        assert timed[0] == 0
        assert timed[-1] >= count - count // len(timed) - 1  # as far as the last ones
        gaps = {b - a for a, b in itertools.pairwise(timed)}
        assert max(gaps) - min(gaps) <= 1  # evenly


def test_probe_times_the_acks_of_a_quiet_process_apart(tmp_path: Path) -> None:
    code, figures, output = loadtest(
        tmp_path, "--spawn", "--store", "memory", "--watchers", "20", "--senders", "2",
        "--rate", "50", "--duration", "2", "--probe",
    )  # fmt: skip
    assert code == 0, output
    assert "probe ack latency" in output
    # Its adds count in the verdict like any other (the run PASSed on them too) ...
    assert figures["acked"] == figures["sent"] > 2 * 50 * 2
    probe = figures["probe_ack_ms"]
    assert probe["count"] >= 50  # ... and its acks are timed apart: 50/s for 2 s
    assert probe["count"] < figures["ack_ms"]["count"]
    assert len(figures["generator_cpu"]) == 2  # one more process
