"""What one generator process is asked to do: its share of the load and where it goes."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import ssl
from dataclasses import dataclass

__all__ = ["PROBE_RATE", "Plan", "split_run"]

# Adds per second of the --probe process's one sender: some 400 acks timed in a run of 8 s,
# next to a load of 1,000/s.
PROBE_RATE = 50.0


@dataclass(frozen=True)
class Plan:
    """One worker's share of the run, decided by the coordinator and pickled to the worker.

    Several servers (nodes of one tally): watcher k, sender k and stalled reader k of the
    whole run go to ``targets[k % len(targets)]``, or round-robin over ``watch_on`` /
    ``send_on`` only; the offsets are this process's first k.
    """

    index: int
    targets: tuple[tuple[str, int], ...]  # (host, port) of every server of the run
    watchers: int
    senders: int
    window: int = 50
    rate: float | None = None  # adds per second per sender; None: as fast as acks allow
    duration: float | None = 10.0
    updates: int | None = None  # per sender
    stalled: int = 0  # connections that stop reading after their snapshot
    ramp: float = 0.0
    sample_every: int = 8  # fan-out latency is measured on every Nth seq
    connect_timeout: float = 30.0
    reconnect: bool = False  # survive a server restart: reconnect, resend unacked adds
    tls: bool = False  # wss://
    cafile: str | None = None
    token: str | None = None
    run_id: str = ""  # makes hello client ids unique to this run
    watch_on: tuple[int, ...] = ()  # () means every target
    send_on: tuple[int, ...] = ()
    watcher_offset: int = 0
    sender_offset: int = 0
    stalled_offset: int = 0

    def watcher_homes(self) -> list[int]:
        """Target index of each of this process's watchers."""
        return self._homes(self.watch_on, self.watcher_offset, self.watchers)

    def sender_homes(self) -> list[int]:
        return self._homes(self.send_on, self.sender_offset, self.senders)

    def stalled_homes(self) -> list[int]:
        # Stalled readers are watchers that stop reading: they go where watchers go.
        return self._homes(self.watch_on, self.stalled_offset, self.stalled)

    def _homes(self, on: tuple[int, ...], offset: int, count: int) -> list[int]:
        on = on or tuple(range(len(self.targets)))
        return [on[(offset + i) % len(on)] for i in range(count)]

    def access(self) -> tuple[ssl.SSLContext | None, str | None]:
        """The TLS context and token every connection presents."""
        tls = ssl.create_default_context(cafile=self.cafile) if self.tls else None
        return tls, self.token


def split_run(args: argparse.Namespace, targets: list[tuple[str, int]], tls: bool) -> list[Plan]:
    """The run, shared out between ``--processes`` workers as evenly as it divides, and
    with ``--probe`` one more worker: one paced sender, nothing else, the last plan."""
    workers = max(1, args.processes)
    run_id = secrets.token_hex(4)
    watchers = _split(args.watchers, workers)
    senders = _split(args.senders, workers)
    stalled = _split(args.stalled, workers)
    per_sender = None
    if args.updates is not None:
        per_sender = max(1, args.updates // max(1, args.senders))
    plans = [
        Plan(
            index=i,
            targets=tuple(targets),
            watchers=watchers[i],
            senders=senders[i],
            window=args.window,
            rate=args.rate,
            duration=args.duration,
            updates=per_sender,
            stalled=stalled[i],
            ramp=args.ramp,
            sample_every=args.sample_every,
            reconnect=args.reconnect,
            tls=tls,
            cafile=args.cafile,
            token=args.token,
            run_id=run_id,
            watch_on=tuple(args.watchers_on or ()),
            send_on=tuple(args.senders_on or ()),
            watcher_offset=_offset(watchers, i),
            sender_offset=_offset(senders, i),
            stalled_offset=_offset(stalled, i),
        )
        for i in range(workers)
    ]
    if args.probe:
        # The same run and targets as the first worker's; its own, quiet share.
        probe = dataclasses.replace(
            plans[0],
            index=workers,
            watchers=0,
            senders=1,
            stalled=0,
            window=1,
            rate=PROBE_RATE,
            updates=None if args.updates is None else max(1, args.updates // 20),
            ramp=0.0,
            watcher_offset=0,
            sender_offset=args.senders,
            stalled_offset=0,
        )
        plans.append(probe)
    return plans


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _offset(parts: list[int], i: int) -> int:
    """Index, in the whole run, of the first of worker i's connections of one kind."""
    return sum(parts[:i])
