"""One load test: find or start the servers, run the workers through their phases while
reading the servers, then judge and report.

The phases, as the workers see them (:mod:`wstally.loadgen.worker`): every worker connects
and says ready; the coordinator reads the starting position and says go; the workers send
until done (or told to stop); the coordinator reads the final position and hands its seq
to the workers, whose watchers catch up to it; each worker puts its result on the queue.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from rich.console import Console

from wstally.loadgen import figures, report, verdict
from wstally.loadgen.observe import Observations, Probe, furthest
from wstally.loadgen.plan import split_run
from wstally.loadgen.results import WorkerFailure, WorkerResult
from wstally.loadgen.shared import Shared
from wstally.loadgen.targets import TargetError, Targets
from wstally.loadgen.worker import run_worker

__all__ = ["LoadTest"]

Results = list[WorkerResult | WorkerFailure]

POLL = 0.25  # seconds between looks at the workers while they send
COLLECT_TIMEOUT = 120.0  # seconds for every worker's result, once the senders are done


class LoadTest:
    """One run against one set of servers; ``figures`` holds what it measured."""

    def __init__(
        self, args: argparse.Namespace, console: Console, label: str | None = None
    ) -> None:
        self.args = args
        self.console = console
        self.label = label  # which server is under test, for the table's title
        self.targets = Targets()
        self.figures: dict[str, Any] = {}

    def run(self) -> int:
        """0 PASS, 1 FAIL, 2 no server to load."""
        try:
            try:
                self._find_servers()
            except TargetError as exc:
                style = "red" if exc.alarm else None
                self.console.print(str(exc), style=style, markup=False, highlight=False)
                return 2
            results, seen = self._run_workers()
            return self._judge(results, seen)
        finally:
            self.targets.close()

    def _find_servers(self) -> None:
        if self.args.spawn:
            self.targets.spawn(self.args)
        else:
            self.targets.check(self.args)

    def _run_workers(self) -> tuple[Results, Observations]:
        args = self.args
        ctx = mp.get_context("spawn")
        plans = split_run(args, self.targets.addresses, self.targets.tls)
        shared = Shared.allocate(ctx, len(plans), args.sample_every)
        workers = [ctx.Process(target=run_worker, args=(plan, shared)) for plan in plans]
        for worker in workers:
            worker.start()
        try:
            return self._drive(shared, workers)
        except KeyboardInterrupt:
            for worker in workers:
                worker.kill()  # an interrupted run has nothing to report
            raise
        finally:
            for worker in workers:
                worker.join(timeout=10)
                if worker.is_alive():
                    worker.kill()

    def _drive(
        self, shared: Shared, workers: Sequence[BaseProcess]
    ) -> tuple[Results, Observations]:
        """Step the workers through the phases, reading the servers between them."""
        probe = Probe(self.targets, self.args.cafile, self.args.token)
        several = len(self.targets.addresses) > 1
        connect_seconds = _await_ready(shared, workers)
        starts = probe.positions(3.0 if several else 0.0)
        before = probe.usage()
        shared.go.set()
        send_seconds = self._watch(shared, workers)
        during = probe.memory()
        patience = 30.0 if self.args.reconnect else 10.0 if several else 0.0
        finals = probe.positions(patience)
        shared.final_seq.value = int(furthest(finals)["seq"])
        results = _collect(shared, workers)
        after = probe.usage()
        return results, Observations(
            connect_seconds, send_seconds, starts, finals, before, during, after
        )

    def _watch(self, shared: Shared, workers: Sequence[BaseProcess]) -> float:
        """Show progress until every worker's senders are done; stop them at --duration."""
        duration = self.args.duration
        t0 = time.monotonic()
        with report.ProgressDisplay(self.console, self.args.quiet, t0) as display:
            while shared.senders_done.value < len(workers):
                now = time.monotonic()
                if duration is not None and now - t0 >= duration:
                    shared.stop.set()
                if not any(w.is_alive() for w in workers):
                    break
                display.update(report.progress_line(shared.progress.total(), now - t0), now)
                time.sleep(POLL)
        return time.monotonic() - t0

    def _judge(self, results: Results, seen: Observations) -> int:
        args = self.args
        found = verdict.checks(results, max(1, args.processes) + bool(args.probe), seen)
        passed = all(check.ok for check in found)
        good = [r for r in results if isinstance(r, WorkerResult)]
        figs = figures.build(self._config(), self.targets.urls, good, seen)
        report.show(self.console, report.figures_table(figs, self._title()))
        report.print_verdict(self.console, figs, found, passed)
        self.figures = {
            "pass": passed,
            "checks": [{"ok": ok, "what": what} for ok, what in found],
            **figs,
        }
        if args.json:
            with open(args.json, "w") as out:
                json.dump(self.figures, out, indent=2)
        return 0 if passed else 1

    def _title(self) -> str:
        if self.label is not None:
            return f"{self.label} load test"
        if self.args.spawn and self.args.server_cmd:
            return "load test of the --server-cmd server"
        return "wstally load test"

    def _config(self) -> dict[str, Any]:
        """The run's settings, with the URLs actually loaded (those of spawned servers)."""
        config = {k: v for k, v in vars(self.args).items() if k != "json"}
        config["url"] = list(self.targets.urls)
        return config


def _await_ready(shared: Shared, workers: Sequence[BaseProcess]) -> float:
    """Seconds until every worker has connected (or none is left alive)."""
    t0 = time.monotonic()
    while shared.ready.value < len(workers):
        if not any(w.is_alive() for w in workers):
            break
        time.sleep(0.02)
    return time.monotonic() - t0


def _collect(shared: Shared, workers: Sequence[BaseProcess]) -> Results:
    results: Results = []
    deadline = time.monotonic() + COLLECT_TIMEOUT
    while len(results) < len(workers) and time.monotonic() < deadline:
        try:
            results.append(shared.results.get(timeout=1))
        except Exception:  # queue.Empty: keep waiting while workers live
            if not any(w.is_alive() for w in workers) and shared.results.empty():
                break
    return results
