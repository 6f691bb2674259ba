"""The load test's command line: its flags in groups, their defaults shown, their clashes.

A flag mistyped gets the closest real one suggested (:mod:`wstally.suggest`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from wstally.loadgen.plan import PROBE_RATE
from wstally.options import apply_env, env_argument, ws_url
from wstally.suggest import parse_args as parse_or_suggest

__all__ = ["DEFAULT_URL", "parse_args"]

DEFAULT_URL = "ws://127.0.0.1:8765/"
DEFAULT_DURATION = 10.0


class _ShowDefaults(argparse.HelpFormatter):
    """Append ``[default X]`` to a flag's help, unless it says its default itself (because
    it is computed, or because argparse's own would mislead) or has none worth naming."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or "[env " in text
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} [default %(default)s]"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loadtest.py",
        description="Load a wstally server, measure it, and check that nothing was lost.",
        formatter_class=_ShowDefaults,
    )
    _target_flags(parser)
    _spawn_flags(parser.add_argument_group("spawned servers"))
    _load_flags(parser.add_argument_group("the load"))
    _mode_flags(parser.add_argument_group("other runs"))
    _output_flags(parser.add_argument_group("output"))
    args = parse_or_suggest(parser, argv)
    apply_env(args, parser)
    _settle(parser, args)
    return args


def _target_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("servers to load")
    group.add_argument(
        "--url",
        type=ws_url,
        action="append",
        help=f"server to load (ignored with --spawn) [default {DEFAULT_URL}]; repeat it for "
        "the nodes of one tally: watcher k and sender k connect to the (k mod N)th URL",
    )
    group.add_argument("--spawn", action="store_true", help="start a throwaway server for the run")
    group.add_argument(
        "--watchers-on",
        type=_indices,
        metavar="I,J",
        help="place watchers (and --stalled readers) only on these servers, round-robin: "
        "indices into the --url list or the --nodes, from 0 [default: all]",
    )
    group.add_argument(
        "--senders-on",
        type=_indices,
        metavar="I,J",
        help="place senders only on these servers [default: all]; with --watchers-on on "
        "others, every fan-out latency measured is from a sender on another node",
    )
    group.add_argument("--cafile", metavar="PEM", help="trust this CA for wss:// URLs")
    env_argument(
        parser,
        "--token",
        group=group,
        env="TOKEN",
        default=None,
        help="access token for a server started with --token",
    )
    group.add_argument(
        "--server-pid", type=int, metavar="PID", help="read CPU and RSS of this local server"
    )
    group.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback target (off by default: load only what you own)",
    )


def _spawn_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="start a private redis-server (AOF always, temp dir, free port) and N nodes "
        "(wstally serve --redis), load them round-robin, stop them at the end (implies --spawn)",
    )
    group.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        help="store of the spawned server [default: sqlite in a temp dir]",
    )
    group.add_argument(
        "--server-cmd",
        metavar="CMD",
        help="command line of the spawned server instead of wstally serve "
        "(it must accept --host and --port and answer GET /healthz)",
    )
    group.add_argument(
        "--server-cpus",
        metavar="LIST",
        action="append",
        help="pin spawned servers to these CPUs (taskset -c LIST), e.g. 0; run the generator "
        "itself under taskset -c 1 for one core each; repeated, node i gets the (i mod N)th",
    )
    group.add_argument(
        "--redis-cpus",
        metavar="LIST",
        help="pin the redis-server of --nodes to these CPUs (taskset -c LIST)",
    )


def _load_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--watchers", type=int, metavar="N", default=100, help="receive-only JSON connections"
    )
    group.add_argument(
        "--senders", type=int, metavar="N", default=10, help="connections sending adds"
    )
    group.add_argument(
        "--window", type=int, metavar="N", default=50, help="adds in flight per sender"
    )
    group.add_argument(
        "--rate", type=float, metavar="N", help="adds/s per sender [default: as fast as acks allow]"
    )
    run = group.add_mutually_exclusive_group()
    run.add_argument(
        "--duration",
        type=float,
        metavar="SECS",
        help=f"seconds of sending [default {DEFAULT_DURATION:g}]",
    )
    run.add_argument(
        "--updates", type=int, metavar="N", help="total adds to send, split across senders"
    )
    group.add_argument(
        "--processes", type=int, metavar="N", default=1, help="generator worker processes"
    )
    group.add_argument(
        "--ramp", type=float, metavar="SECS", default=0.0, help="spread connecting over SECS"
    )
    group.add_argument(
        "--sample-every",
        type=int,
        metavar="N",
        default=8,
        help="measure fan-out latency on every Nth seq",
    )
    group.add_argument(
        "--stalled",
        type=int,
        default=0,
        metavar="N",
        help="N more connections that read their snapshot and then stop reading (the "
        "server must resync or evict them without slowing the others)",
    )
    group.add_argument(
        "--reconnect",
        action="store_true",
        help="survive server restarts: reconnect, resend unanswered adds with their ids "
        "(the verdict then proves exactly-once across the crash)",
    )
    group.add_argument(
        "--probe",
        action="store_true",
        help=f"one more generator process, quiet: a sender of {PROBE_RATE:g} adds/s whose "
        "ack latency is reported apart (the server's, without the queueing of a generator "
        "busy with thousands of connections); its adds count in the verdict",
    )


def _mode_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--compare",
        choices=("naive", "node"),
        help="run the same load against a reference server too and print the ratios "
        "(implies --spawn): naive, the textbook Python server (wstally.loadgen.naive_server); "
        "node, the Node.js ws peer (benchmarks/node_ws_server.js: needs node 18+ and "
        "npm ci --prefix benchmarks)",
    )
    group.add_argument(
        "--find-capacity",
        action="store_true",
        help="add watchers in steps until p99 fan-out latency passes --p99-limit; report the "
        "largest count that held",
    )
    group.add_argument(
        "--p99-limit",
        type=float,
        default=50.0,
        metavar="MS",
        help="fan-out p99 limit for --find-capacity, in ms",
    )
    group.add_argument(
        "--step", type=int, metavar="N", default=500, help="watchers added per --find-capacity step"
    )
    group.add_argument(
        "--max-watchers", type=int, metavar="N", default=15000, help="stop --find-capacity here"
    )


def _output_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    group.add_argument("--quiet", action="store_true", help="no live progress line")


def _settle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Computed defaults, and the flags that exclude or imply one another."""
    if args.duration is None and args.updates is None:
        args.duration = DEFAULT_DURATION
    args.url = args.url or [DEFAULT_URL]
    if args.nodes is not None:
        if args.nodes < 1:
            parser.error("--nodes must be at least 1")
        for clash, given in (
            ("--store", args.store),
            ("--server-cmd", args.server_cmd),
            ("--compare", args.compare),
        ):
            if given is not None:
                parser.error(f"--nodes starts wstally serve --redis nodes: it excludes {clash}")
        args.spawn = True
    args.store = args.store or "sqlite"
    servers = args.nodes or (1 if args.spawn else len(args.url))
    for option, indices in (("--watchers-on", args.watchers_on), ("--senders-on", args.senders_on)):
        if indices and max(indices) >= servers:
            parser.error(f"{option}: {max(indices)} is not a server index (0 to {servers - 1})")


def _indices(text: str) -> list[int]:
    """``0,2``: server indices, for --watchers-on and --senders-on."""
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0,1") from None
    if any(i < 0 for i in indices):
        raise argparse.ArgumentTypeError(f"{text!r}: indices start at 0")
    return indices
