"""The verdict: was any update lost, counted twice, or seen in another order?

Each check compares what the workers saw (acks, watchers' streams) with what the servers
report (/healthz at go and at the end), and says in one line what held or what did not.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import NamedTuple

from wstally.loadgen.observe import Observations, agree
from wstally.loadgen.results import WorkerFailure, WorkerResult
from wstally.loadgen.sender import SenderStats

__all__ = ["Check", "checks"]

EXAMPLES = 3  # disagreements, gaps... quoted in a failed check


class Check(NamedTuple):
    ok: bool
    what: str


def checks(
    results: list[WorkerResult | WorkerFailure], processes: int, seen: Observations
) -> list[Check]:
    """Every check of one run, in the order they are printed."""
    good = [r for r in results if isinstance(r, WorkerResult)]
    adds = SenderStats.merge(r.adds for r in good)
    found = [
        _finished(results, processes),
        _connected(good),
        _answered(good),
        _total(adds, seen),
        _applied(adds, seen),
        _own_seqs(adds, seen),
        _no_duplicates(adds),
        _watchers_ended(good, seen),
        _no_gaps(good),
        _one_order(good, adds),
    ]
    if len(seen.finals) > 1:
        found.append(_one_position(seen))
    return found


def _finished(results: list[WorkerResult | WorkerFailure], processes: int) -> Check:
    fatal = [r.fatal for r in results if isinstance(r, WorkerFailure)]
    return Check(
        not fatal and len(results) == processes,
        "every generator process finished" + (f": {fatal}" if fatal else ""),
    )


def _connected(good: list[WorkerResult]) -> Check:
    failed = sum(r.connect_failed for r in good)
    what = f"{failed} connections failed" if failed else "every connection opened"
    return Check(failed == 0, what)


def _answered(good: list[WorkerResult]) -> Check:
    unanswered = sum(r.unanswered for r in good)
    return Check(
        unanswered == 0,
        f"{unanswered} adds never answered" if unanswered else "every add was answered",
    )


def _total(adds: SenderStats, seen: Observations) -> Check:
    start, final = int(seen.start["total"]), int(seen.final["total"])
    if final == start + adds.delta_sum:
        return Check(True, f"server total {final} == start {start} + acked deltas {adds.delta_sum}")
    return Check(
        False,
        f"server total {final} != start {start} + acked deltas {adds.delta_sum} "
        f"(off by {final - start - adds.delta_sum})",
    )


def _applied(adds: SenderStats, seen: Observations) -> Check:
    applied = int(seen.final["seq"]) - int(seen.start["seq"])
    return Check(applied == adds.acked, f"server applied {applied} updates, {adds.acked} acked")


def _own_seqs(adds: SenderStats, seen: Observations) -> Check:
    start, final = int(seen.start["seq"]), int(seen.final["seq"])
    unique = len(set(adds.seqs))
    in_range = all(start < s <= final for s in adds.seqs)
    if unique == len(adds.seqs) and in_range:
        return Check(True, "every ack has its own seq within the run")
    return Check(False, f"{len(adds.seqs) - unique} acks share a seq; in range: {in_range}")


def _no_duplicates(adds: SenderStats) -> Check:
    return Check(
        adds.duplicates == 0, f"{adds.duplicates} acks flagged duplicate for adds sent once"
    )


def _watchers_ended(good: list[WorkerResult], seen: Observations) -> Check:
    final = (int(seen.final["seq"]), int(seen.final["total"]))
    states = {state for r in good for state in r.watched.states}
    behind = sum(r.watched.behind for r in good)
    if states <= {final} and behind == 0:
        return Check(True, "every watcher ended on the server's seq and total")
    return Check(
        False,
        f"watchers ended on {sorted(states)[:5]}, server on {final}; {behind} behind",
    )


def _no_gaps(good: list[WorkerResult]) -> Check:
    gaps = sum(r.watched.gaps for r in good)
    if gaps == 0:
        return Check(True, "no watcher saw a gap")
    examples = [g for r in good for g in r.watched.gap_examples][:EXAMPLES]
    return Check(False, f"{gaps} gaps not covered by a snapshot, e.g. {examples}")


def _one_order(good: list[WorkerResult], adds: SenderStats) -> Check:
    """Every watcher (on every node) saw one order: wherever two of them, or a watcher and
    an ack, tell the total after one seq, they tell the same total."""
    totals: dict[int, int] = {}
    conflicts = sum(r.watched.position_conflicts for r in good)
    examples = [tuple(e) for r in good for e in r.watched.position_examples]
    sources = [(adds.seqs, adds.totals)]
    sources += [(r.watched.position_seqs, r.watched.position_totals) for r in good]
    for seq, total in _pairs(sources):
        known = totals.setdefault(seq, total)
        if known != total:
            conflicts += 1
            if len(examples) < EXAMPLES:
                examples.append((seq, known, total))
    if conflicts:
        return Check(
            False,
            f"{conflicts} disagreements on the total after a seq (seq, one total, another): "
            f"{examples[:EXAMPLES]}",
        )
    return Check(
        True, f"one order: every watcher and every ack agree on the total at {len(totals):,} seqs"
    )


def _pairs(sources: list[tuple[array[int], array[int]]]) -> Iterable[tuple[int, int]]:
    for seqs, totals in sources:
        yield from zip(seqs, totals, strict=True)


def _one_position(seen: Observations) -> Check:
    """Every node of the tally at one position (seq, total, epoch), at start and end."""
    for when, bodies in (("start", seen.starts), ("end", seen.finals)):
        if not agree(bodies):
            found = [(b.get("seq"), b.get("total"), b.get("epoch")) for b in bodies]
            return Check(False, f"the nodes disagree at the {when}: (seq, total, epoch) {found}")
    n = len(seen.finals)
    return Check(True, f"all {n} nodes reported one seq, total and epoch at the start and the end")
