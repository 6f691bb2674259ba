"""Unit and property tests for the pure tally: seq/total, int64 edges, dedup, commit/rollback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from wstally.tally import (
    DEDUP_WINDOW,
    INT64_MAX,
    INT64_MIN,
    Duplicate,
    Refused,
    Tally,
    Update,
    in_int64,
)

FAST = settings(max_examples=300, deadline=None)

# Deltas: mostly anywhere in int64, with the edges (and their neighbours) over-represented so
# that overflow/underflow and exact-edge totals come up often.
EDGES = [INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX]
int64s: st.SearchStrategy[int] = st.one_of(
    st.sampled_from(EDGES),
    st.integers(min_value=-1000, max_value=1000),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
)
conns: st.SearchStrategy[str] = st.sampled_from(["c1", "c2", "c3"])
clients: st.SearchStrategy[str | None] = st.sampled_from([None, "alice", "bob", "conn:c1"])
req_ids: st.SearchStrategy[str | None] = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"]))


def applied(result: Update | Duplicate | Refused) -> Update:
    assert isinstance(result, Update), result
    return result


# -- in_int64 ---------------------------------------------------------------------------------


def test_int64_constants() -> None:
    assert INT64_MIN == -(2**63)
    assert INT64_MAX == 2**63 - 1
    assert DEDUP_WINDOW >= 100_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, True),
        (INT64_MAX, True),
        (INT64_MIN, True),
        (INT64_MAX + 1, False),
        (INT64_MIN - 1, False),
        (10**30, False),
        (-(10**30), False),
    ],
)
def test_in_int64(value: int, expected: bool) -> None:
    assert in_int64(value) is expected


# -- apply: seq and total -----------------------------------------------------------------------


def test_fresh_tally_state() -> None:
    tally = Tally("e1", seq=7, total=-3)
    assert (tally.epoch, tally.seq, tally.total) == ("e1", 7, -3)
    assert (tally.committed_seq, tally.committed_total) == (7, -3)
    assert tally.window == DEDUP_WINDOW
    assert tally.remembered == 0


def test_apply_returns_full_update() -> None:
    tally = Tally("e", seq=41, total=100)
    update = applied(tally.apply(5, conn="k", at=12.5, client="cl", name="Ann", req_id="r1"))
    assert update == Update(42, 5, 105, 12.5, "k", "cl", "Ann", "r1")
    assert (tally.seq, tally.total) == (42, 105)
    assert update.scope == "client:cl"
    assert tally.lookup("client:cl", "r1") == (42, 105)


def test_apply_without_id_remembers_nothing() -> None:
    tally = Tally("e")
    first = applied(tally.apply(1, conn="k", at=0.0))
    second = applied(tally.apply(1, conn="k", at=0.0))
    assert (first.seq, second.seq) == (1, 2)
    assert tally.total == 2
    assert tally.remembered == 0
    assert first.req_id is None
    assert first.scope == "conn:k"


@given(st.lists(int64s, max_size=40), st.integers(-(10**6), 10**6), st.integers(0, 10**6))
@FAST
def test_total_is_sum_of_applied_deltas(deltas: list[int], start: int, seq0: int) -> None:
    tally = Tally("e", seq=seq0, total=start)
    applied_deltas: list[int] = []
    for i, delta in enumerate(deltas):
        result = tally.apply(delta, conn="k", at=float(i))
        if in_int64(start + sum(applied_deltas) + delta):
            update = applied(result)
            applied_deltas.append(delta)
            assert update.seq == seq0 + len(applied_deltas)
            assert update.total == start + sum(applied_deltas)
            assert update.delta == delta
        else:
            assert isinstance(result, Refused)
            assert result.code == "overflow"
        assert tally.total == start + sum(applied_deltas)
        assert tally.seq == seq0 + len(applied_deltas)
        assert in_int64(tally.total)


# -- int64 edges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "delta"),
    [
        (INT64_MAX, 1),
        (INT64_MAX, INT64_MAX),
        (1, INT64_MAX),
        (INT64_MIN, -1),
        (INT64_MIN, INT64_MIN),
        (-2, INT64_MIN + 1),  # -2 + (MIN + 1) == MIN - 1
        (-1, INT64_MIN),
    ],
)
def test_overflow_and_underflow_refused(start: int, delta: int) -> None:
    tally = Tally("e", seq=9, total=start)
    result = tally.apply(delta, conn="k", at=0.0, req_id="x")
    assert isinstance(result, Refused)
    assert result.code == "overflow"
    assert "total unchanged" in result.message
    assert (tally.seq, tally.total) == (9, start)
    # A refused add is not remembered, so the id stays free for a later, valid add.
    assert tally.lookup("conn:k", "x") is None
    assert tally.remembered == 0
    retry = applied(tally.apply(0, conn="k", at=0.0, req_id="x"))
    assert (retry.seq, retry.total) == (10, start)


@given(start=int64s, delta=int64s)
@FAST
def test_out_of_range_results_refused_exactly(start: int, delta: int) -> None:
    tally = Tally("e", total=start)
    result = tally.apply(delta, conn="k", at=0.0)
    if in_int64(start + delta):
        assert applied(result).total == start + delta
    else:
        assert isinstance(result, Refused)
        assert result.code == "overflow"
        assert (tally.seq, tally.total) == (0, start)


def test_exact_edges_reachable() -> None:
    tally = Tally("e")
    assert applied(tally.apply(INT64_MAX, conn="k", at=0.0)).total == INT64_MAX
    assert isinstance(tally.apply(1, conn="k", at=0.0), Refused)
    assert applied(tally.apply(INT64_MIN, conn="k", at=0.0)).total == -1
    assert applied(tally.apply(INT64_MIN + 1, conn="k", at=0.0)).total == INT64_MIN
    assert isinstance(tally.apply(-1, conn="k", at=0.0), Refused)
    assert applied(tally.apply(INT64_MAX, conn="k", at=0.0)).total == -1
    assert applied(tally.apply(0, conn="k", at=0.0)).total == -1
    assert tally.seq == 5


def test_edge_from_neighbour() -> None:
    tally = Tally("e", total=INT64_MAX - 1)
    assert applied(tally.apply(1, conn="k", at=0.0)).total == INT64_MAX
    tally = Tally("e", total=INT64_MIN + 1)
    assert applied(tally.apply(-1, conn="k", at=0.0)).total == INT64_MIN


@pytest.mark.parametrize("delta", [INT64_MAX + 1, INT64_MIN - 1, 2**100, -(2**100)])
def test_delta_outside_int64_refused_as_bad_delta(delta: int) -> None:
    tally = Tally("e", seq=3, total=0)
    result = tally.apply(delta, conn="k", at=0.0, req_id="x")
    assert isinstance(result, Refused)
    assert result.code == "bad_delta"
    assert (tally.seq, tally.total) == (3, 0)
    assert tally.remembered == 0


# -- dedup --------------------------------------------------------------------------------------


def test_duplicate_returns_original_result() -> None:
    tally = Tally("e")
    first = applied(tally.apply(5, conn="k", at=0.0, req_id="r"))
    applied(tally.apply(7, conn="k", at=0.0, req_id="other"))
    applied(tally.apply(11, conn="k", at=0.0))
    again = tally.apply(5, conn="k", at=1.0, req_id="r")
    assert again == Duplicate("r", first.seq, first.total)
    assert again == Duplicate("r", 1, 5)
    assert (tally.seq, tally.total) == (3, 23)


def test_duplicate_wins_over_changed_or_invalid_delta() -> None:
    # A resend is answered with the original result whatever delta it carries.
    tally = Tally("e", total=INT64_MAX - 1)
    applied(tally.apply(1, conn="k", at=0.0, req_id="r"))
    for delta in (1, 999, INT64_MAX, INT64_MAX + 1):
        assert tally.apply(delta, conn="k", at=0.0, req_id="r") == Duplicate("r", 1, INT64_MAX)
    assert (tally.seq, tally.total) == (1, INT64_MAX)


def test_ids_scoped_per_client_across_connections() -> None:
    tally = Tally("e")
    first = applied(tally.apply(1, conn="k1", at=0.0, client="alice", req_id="r"))
    # Same client on a new connection (a reconnect): the id is recognised.
    assert tally.apply(1, conn="k2", at=0.0, client="alice", req_id="r") == Duplicate(
        "r", first.seq, first.total
    )
    # Another client may use the same id: both apply.
    second = applied(tally.apply(1, conn="k1", at=0.0, client="bob", req_id="r"))
    assert (second.seq, second.total) == (2, 2)
    assert tally.lookup("client:alice", "r") == (1, 1)
    assert tally.lookup("client:bob", "r") == (2, 2)


def test_ids_scoped_per_connection_without_client() -> None:
    tally = Tally("e")
    applied(tally.apply(1, conn="k1", at=0.0, req_id="r"))
    applied(tally.apply(1, conn="k2", at=0.0, req_id="r"))
    assert tally.apply(1, conn="k1", at=0.0, req_id="r") == Duplicate("r", 1, 1)
    assert tally.apply(1, conn="k2", at=0.0, req_id="r") == Duplicate("r", 2, 2)
    assert tally.lookup("conn:k1", "r") == (1, 1)
    assert tally.lookup("conn:k2", "r") == (2, 2)
    assert tally.total == 2


def test_client_scope_and_connection_scope_are_distinct() -> None:
    tally = Tally("e")
    applied(tally.apply(1, conn="k", at=0.0, req_id="r"))
    # A client named like the connection does not share the connection's ids.
    applied(tally.apply(1, conn="k", at=0.0, client="k", req_id="r"))
    # And a hello'd connection does not see the ids it sent before its hello.
    applied(tally.apply(1, conn="k", at=0.0, client="alice", req_id="r"))
    assert tally.seq == 3


def test_update_scope() -> None:
    assert Update(1, 1, 1, 0.0, "k").scope == "conn:k"
    assert Update(1, 1, 1, 0.0, "k", client="alice").scope == "client:alice"


@given(st.lists(st.tuples(conns, clients, req_ids, st.integers(-5, 5)), max_size=60))
@FAST
def test_repeated_id_never_applied_twice(
    adds: list[tuple[str, str | None, str | None, int]],
) -> None:
    tally = Tally("e")
    first_result: dict[tuple[str, str], tuple[int, int]] = {}
    total = 0
    for conn, client, req_id, delta in adds:
        result = tally.apply(delta, conn=conn, at=0.0, client=client, req_id=req_id)
        scope = "client:" + client if client is not None else "conn:" + conn
        if req_id is not None and (scope, req_id) in first_result:
            seq, tot = first_result[(scope, req_id)]
            assert result == Duplicate(req_id, seq, tot)
        else:
            total += delta
            update = applied(result)
            assert update.total == total
            assert update.scope == scope
            if req_id is not None:
                first_result[(scope, req_id)] = (update.seq, update.total)
    assert tally.total == total
    assert tally.remembered == len(first_result)


@given(
    st.lists(st.tuples(int64s, conns, clients, st.sampled_from([None, "x"]), req_ids), max_size=60),
    int64s,
    st.integers(0, 60),
)
@FAST
def test_a_batch_applied_at_once_is_the_same_adds_applied_one_by_one(
    adds: list[tuple[int, str, str | None, str | None, str | None]], start: int, cut: int
) -> None:
    # The server applies whole batches (apply_all): repeated ids within the batch, refusals
    # in its middle and every seq must come out as they would add by add.
    batched, single = Tally("e", seq=7, total=start), Tally("e", seq=7, total=start)
    rows = [
        (delta, conn, float(n), client, name, rid)
        for n, (delta, conn, client, name, rid) in enumerate(adds)
    ]
    results = batched.apply_all(rows[:cut]) + batched.apply_all(rows[cut:])
    expected = [
        single.apply(delta, conn=conn, at=at, client=client, name=name, req_id=rid)
        for delta, conn, at, client, name, rid in rows
    ]
    assert results == expected
    assert (batched.seq, batched.total, batched.remembered) == (
        single.seq,
        single.total,
        single.remembered,
    )


def test_an_add_that_raises_mid_batch_leaves_ids_and_seq_in_step() -> None:
    # Nothing the server hands over raises (deltas are checked first), but if one did, the
    # adds before it must stay consistent, so that the engine's rollback forgets them all.
    tally = Tally("e")
    adds: list[Any] = [(5, "c1", 0.0, None, None, "a"), ("x", "c1", 0.0, None, None, "b")]
    with pytest.raises(TypeError):
        tally.apply_all(adds)
    assert (tally.seq, tally.total, tally.lookup("conn:c1", "a")) == (1, 5, (1, 5))
    assert tally.rollback() == 1
    assert tally.lookup("conn:c1", "a") is None
    assert tally.apply(2, conn="c1", at=0.0, req_id="a") == Update(1, 2, 2, 0.0, "c1", req_id="a")


# -- remember / lookup --------------------------------------------------------------------------


def test_remember_and_lookup() -> None:
    tally = Tally("e", seq=10, total=50)
    assert tally.lookup("client:alice", "r") is None
    tally.remember("client:alice", "r", 9, 45)
    tally.remember("conn:k", "r", 10, 50)
    assert tally.lookup("client:alice", "r") == (9, 45)
    assert tally.lookup("conn:k", "r") == (10, 50)
    assert tally.lookup("client:bob", "r") is None
    assert tally.remembered == 2
    # A remembered id from the store makes a resend a duplicate, even on a new connection.
    assert tally.apply(1, conn="new", at=0.0, client="alice", req_id="r") == Duplicate("r", 9, 45)
    assert tally.apply(1, conn="k", at=0.0, req_id="r") == Duplicate("r", 10, 50)
    assert (tally.seq, tally.total) == (10, 50)


def test_remembered_ids_survive_rollback_and_age_out_on_commit() -> None:
    tally = Tally("e", seq=10, total=0, window=3)
    for seq in (7, 8, 9, 10):
        tally.remember("s", f"r{seq}", seq, 0)
    applied(tally.apply(1, conn="k", at=0.0, req_id="new"))
    assert tally.rollback() == 1
    assert tally.remembered == 4
    assert tally.lookup("conn:k", "new") is None
    applied(tally.apply(1, conn="k", at=0.0))
    tally.commit(11, 1)
    assert [tally.lookup("s", f"r{seq}") is not None for seq in (7, 8, 9, 10)] == [
        False,
        False,
        True,
        True,
    ]


# -- commit / rollback --------------------------------------------------------------------------


def test_rollback_restores_committed_state_and_forgets_uncommitted_ids() -> None:
    tally = Tally("e", seq=100, total=1000)
    c1 = applied(tally.apply(1, conn="k", at=0.0, req_id="c1"))
    c2 = applied(tally.apply(2, conn="k", at=0.0, client="alice", req_id="c2"))
    tally.commit(c2.seq, c2.total)
    assert (tally.committed_seq, tally.committed_total) == (102, 1003)
    applied(tally.apply(10, conn="k", at=0.0, req_id="u1"))
    applied(tally.apply(20, conn="k", at=0.0, client="alice", req_id="u2"))
    applied(tally.apply(30, conn="k", at=0.0))
    assert (tally.seq, tally.total) == (105, 1063)

    assert tally.rollback() == 3
    assert (tally.seq, tally.total) == (102, 1003)
    assert (tally.committed_seq, tally.committed_total) == (102, 1003)
    assert tally.lookup("conn:k", "u1") is None
    assert tally.lookup("alice", "u2") is None
    assert tally.remembered == 2
    # Committed ids are still recognised.
    assert tally.apply(1, conn="k", at=0.0, req_id="c1") == Duplicate("c1", c1.seq, c1.total)
    assert tally.apply(2, conn="z", at=0.0, client="alice", req_id="c2") == Duplicate(
        "c2", c2.seq, c2.total
    )
    # Forgotten ids apply again, with fresh seq numbers.
    again = applied(tally.apply(10, conn="k", at=0.0, req_id="u1"))
    assert (again.seq, again.total) == (103, 1013)
    again2 = applied(tally.apply(20, conn="k", at=0.0, client="alice", req_id="u2"))
    assert (again2.seq, again2.total) == (104, 1033)


def test_rollback_with_nothing_uncommitted() -> None:
    tally = Tally("e", seq=5, total=5)
    assert tally.rollback() == 0
    applied(tally.apply(1, conn="k", at=0.0, req_id="r"))
    tally.commit(6, 6)
    assert tally.rollback() == 0
    assert (tally.seq, tally.total, tally.remembered) == (6, 6, 1)


def test_partial_commit_then_rollback() -> None:
    tally = Tally("e")
    u1 = applied(tally.apply(1, conn="k", at=0.0, req_id="a"))
    applied(tally.apply(2, conn="k", at=0.0, req_id="b"))
    applied(tally.apply(4, conn="k", at=0.0, req_id="c"))
    tally.commit(u1.seq, u1.total)
    assert tally.rollback() == 2
    assert (tally.seq, tally.total) == (1, 1)
    assert tally.lookup("conn:k", "a") == (1, 1)
    assert tally.lookup("conn:k", "b") is None
    assert tally.lookup("conn:k", "c") is None


def test_commit_evicts_ids_beyond_window() -> None:
    tally = Tally("e", window=3)
    for i in range(1, 11):
        applied(tally.apply(1, conn="k", at=0.0, req_id=f"r{i}"))
    # Nothing is evicted before a commit.
    assert tally.remembered == 10
    tally.commit(10, 10)
    # Exactly the last `window` seqs are remembered: seq > committed_seq - window.
    assert [i for i in range(1, 11) if tally.lookup("conn:k", f"r{i}") is not None] == [8, 9, 10]
    assert tally.remembered == 3
    # An evicted id is no longer recognised; one inside the window still is.
    assert tally.apply(1, conn="k", at=0.0, req_id="r8") == Duplicate("r8", 8, 8)
    assert isinstance(tally.apply(1, conn="k", at=0.0, req_id="r7"), Update)


def test_commit_keeps_uncommitted_ids_and_evicts_by_committed_seq() -> None:
    tally = Tally("e", window=2)
    for i in range(1, 7):
        applied(tally.apply(1, conn="k", at=0.0, req_id=f"r{i}"))
    tally.commit(4, 4)  # horizon 2: r1, r2 go; r3, r4 (committed) and r5, r6 (not yet) stay
    assert [i for i in range(1, 7) if tally.lookup("conn:k", f"r{i}") is not None] == [3, 4, 5, 6]
    assert tally.rollback() == 2
    assert [i for i in range(1, 7) if tally.lookup("conn:k", f"r{i}") is not None] == [3, 4]


def test_commit_with_ids_sparse_in_seq() -> None:
    tally = Tally("e", window=3)
    applied(tally.apply(1, conn="k", at=0.0, req_id="a"))  # seq 1
    for _ in range(5):
        applied(tally.apply(1, conn="k", at=0.0))  # seq 2..6, no ids
    applied(tally.apply(1, conn="k", at=0.0, req_id="b"))  # seq 7
    tally.commit(7, 7)
    assert tally.lookup("conn:k", "a") is None
    assert tally.lookup("conn:k", "b") == (7, 7)
    assert tally.remembered == 1


# -- model-based state machine ------------------------------------------------------------------


@dataclass
class Model:
    seq0: int
    total0: int
    window: int
    deltas: list[int] = field(default_factory=list)  # applied, uncommitted ones last
    committed: int = 0  # how many of `deltas` are committed
    ids: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return self.seq0 + len(self.deltas)

    @property
    def total(self) -> int:
        return self.total0 + sum(self.deltas)

    def total_at(self, count: int) -> int:
        return self.total0 + sum(self.deltas[:count])


class TallyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tally = Tally("e")
        self.model = Model(0, 0, DEDUP_WINDOW)

    @initialize(
        seq0=st.integers(0, 10**9),
        total0=int64s,
        window=st.integers(1, 5),
    )
    def start(self, seq0: int, total0: int, window: int) -> None:
        self.tally = Tally("e", seq=seq0, total=total0, window=window)
        self.model = Model(seq0, total0, window)

    @rule(delta=int64s, conn=conns, client=clients, req_id=req_ids)
    def apply(self, delta: int, conn: str, client: str | None, req_id: str | None) -> None:
        m = self.model
        before = (self.tally.seq, self.tally.total)
        result = self.tally.apply(delta, conn=conn, at=1.5, client=client, name="n", req_id=req_id)
        scope = "client:" + client if client is not None else "conn:" + conn
        key = (scope, req_id) if req_id is not None else None
        if key is not None and key in m.ids:
            assert result == Duplicate(key[1], *m.ids[key])
            assert (self.tally.seq, self.tally.total) == before
        elif not in_int64(m.total + delta):
            assert isinstance(result, Refused)
            assert result.code == "overflow"
            assert (self.tally.seq, self.tally.total) == before
        else:
            m.deltas.append(delta)
            assert result == Update(m.seq, delta, m.total, 1.5, conn, client, "n", req_id)
            if key is not None:
                m.ids[key] = (m.seq, m.total)

    @rule(delta=st.sampled_from([INT64_MAX + 1, INT64_MIN - 1]), req_id=req_ids)
    def apply_bad_delta(self, delta: int, req_id: str | None) -> None:
        before = (self.tally.seq, self.tally.total, self.tally.remembered)
        result = self.tally.apply(delta, conn="c1", at=0.0, req_id=req_id)
        if req_id is not None and ("conn:c1", req_id) in self.model.ids:
            assert isinstance(result, Duplicate)
        else:
            assert isinstance(result, Refused)
            assert result.code == "bad_delta"
        assert (self.tally.seq, self.tally.total, self.tally.remembered) == before

    @precondition(lambda self: len(self.model.deltas) > self.model.committed)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        m = self.model
        count = data.draw(st.integers(m.committed, len(m.deltas)), label="commit count")
        m.committed = count
        seq, total = m.seq0 + count, m.total_at(count)
        self.tally.commit(seq, total)
        m.ids = {k: v for k, v in m.ids.items() if v[0] > seq - m.window}
        assert (self.tally.committed_seq, self.tally.committed_total) == (seq, total)

    @rule()
    def rollback(self) -> None:
        m = self.model
        dropped = len(m.deltas) - m.committed
        del m.deltas[m.committed :]
        m.ids = {k: v for k, v in m.ids.items() if v[0] <= m.seq}
        assert self.tally.rollback() == dropped

    @invariant()
    def matches_model(self) -> None:
        m, t = self.model, self.tally
        assert t.seq == m.seq
        assert t.total == m.total
        assert in_int64(t.total)
        assert t.committed_seq == m.seq0 + m.committed
        assert t.committed_total == m.total_at(m.committed)
        assert t.remembered == len(m.ids)
        for (scope, req_id), value in m.ids.items():
            assert t.lookup(scope, req_id) == value


TallyMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestTallyMachine = TallyMachine.TestCase
