"""What the engine writes to Redis and reads back: key names, a batch's arguments and reply,
a stream entry's fields.

Pure functions over strings: no connection, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from math import isfinite
from typing import Any

from wstally.engine.base import Result, Submission
from wstally.store.base import ROW_COLUMNS
from wstally.tally import Duplicate, Refused, Update, dedup_scope

__all__ = ["decode", "encode", "entry_rows", "history_keys", "results"]

# A stream entry's payload: [at, conn, client, name, req_id] (null for None). JSON keeps
# None apart from "", floats exact (repr), and packs five fields into one for Redis.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The C scanner alone: decode() would also run a regex for surrounding whitespace, twice
# the cost, on every entry of every feed.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def history_keys(prefix: str) -> tuple[str, str, str]:
    """The meta hash, the log stream and the ids hash of the history kept under ``prefix``."""
    # One hash tag for every key: Redis Cluster puts the keys of one script in one slot.
    tag = "{" + prefix + "}"
    return f"{tag}:meta", f"{tag}:log", f"{tag}:ids"


# An entry's s, d and t and then its payload hold an update's fields in this order.
_UPDATE_FIELDS = Update._fields
_INTEGER = re.compile(r"-?[0-9]+")


def entry_rows(fields: Sequence[str]) -> tuple[str | None, list[tuple[Any, ...]]]:
    """A stream entry's epoch and its updates as stored rows (``store.ROW_COLUMNS``).

    Read by field name and without trusting the values, unlike the feed's decoding: a number
    that is not one stays as found, a missing field or item is None. ``wstally history
    --verify`` can then name what is wrong with an entry instead of failing on it.
    """
    named = dict(zip(fields[::2], fields[1::2], strict=False))
    if "u" not in named:
        return named.get("e"), [_single_row(named)]
    try:
        items = json.loads(named["u"])
    except ValueError:
        items = None
    if not isinstance(items, list) or not items:
        items = [None]
    return named.get("e"), [_batch_row(item) for item in items]


def _single_row(named: dict[str, str]) -> tuple[Any, ...]:
    # An entry of one update, as versions before batch entries wrote them.
    try:
        payload = json.loads(named.get("p", ""))
    except ValueError:
        payload = None
    if not isinstance(payload, list) or len(payload) != len(_UPDATE_FIELDS) - 3:
        payload = [None] * (len(_UPDATE_FIELDS) - 3)
    numbers = [_stored_int(named.get(name)) for name in ("s", "d", "t")]
    values = dict(zip(_UPDATE_FIELDS, (*numbers, *payload), strict=True))
    return tuple(values[column] for column in ROW_COLUMNS)


def _batch_row(item: Any) -> tuple[Any, ...]:
    if not isinstance(item, list) or len(item) != len(_UPDATE_FIELDS):
        item = [None] * len(_UPDATE_FIELDS)
    values = dict(zip(_UPDATE_FIELDS, item, strict=True))
    return tuple(values[column] for column in ROW_COLUMNS)


def _stored_int(text: str | None) -> int | str | None:
    # The script writes integers as %d: anything else is kept as found, for the report.
    return int(text) if text is not None and _INTEGER.fullmatch(text) else text


def decode(f: Sequence[str]) -> list[Update]:
    """The updates of a stream entry's field list (fields in the order the script wrote)."""
    if f[2] == "u":
        # One JSON array per batch, parsed in C; its items are Update's fields in order.
        return [Update(*item) for item in _scan(f[3], 0)[0]]
    # An entry of one update, as versions before batch entries wrote them.
    at, conn, client, name, req_id = _scan(f[11], 0)[0]
    return [Update(int(f[3]), int(f[5]), int(f[7]), at, conn, client, name, req_id)]


def encode(batch: Sequence[Submission]) -> list[Any]:
    """The batch script's arguments for ``batch``: delta, dedup key, payload per add.

    The payload is what ``_dumps([at, conn, client, name, req_id])`` gives, built from
    parts: the encoder's setup per call cost more than the encoding, and a connection's
    conn, client and name are the same for each of its adds.
    """
    args: list[Any] = []
    for s in batch:
        middle, scope = _source(s.conn, s.client, s.name)
        at, req_id = s.at, s.req_id
        # repr() is what the JSON encoder writes for a finite float.
        when = repr(at) if type(at) is float and isfinite(at) else _dumps(at)
        if req_id is None:
            args += (s.delta, "", f"[{when},{middle},null]")
        else:
            args += (s.delta, scope + req_id, f"[{when},{middle},{_string(req_id)}]")
    return args


_string: Callable[[str], str] = json.encoder.encode_basestring  # as _dumps writes a str
# (conn, client, name) -> their JSON, comma-separated, and the dedup key's prefix.
_SOURCES: dict[tuple[str, str | None, str | None], tuple[str, str]] = {}
_SOURCES_KEPT = 4096


def _source(conn: str, client: str | None, name: str | None) -> tuple[str, str]:
    found = _SOURCES.get((conn, client, name))
    if found is None:
        if len(_SOURCES) >= _SOURCES_KEPT:
            _SOURCES.clear()  # connections come and go: start again rather than grow
        scope = dedup_scope(client, conn)
        # The length prefix keeps (scope, id) pairs apart whatever characters they hold.
        found = (_dumps([conn, client, name])[1:-1], f"{len(scope)}:{scope}")
        _SOURCES[(conn, client, name)] = found
    return found


def results(batch: Sequence[Submission], tokens: list[str]) -> list[Result]:
    """Each add's answer, from the tokens of an ``ok`` reply of the batch script."""
    answers: list[Result] = []
    # The reply gives the seq and total before the batch; each applied add is the next seq
    # and adds its delta (Redis applied exactly these, in this order, atomically).
    seq, total = int(tokens[2]), int(tokens[3])
    i = 4
    for s in batch:
        kind = tokens[i]
        if kind == "u":
            seq += 1
            total += s.delta
            answers.append(Update(seq, s.delta, total, s.at, s.conn, s.client, s.name, s.req_id))
            i += 1
        elif kind == "d":
            assert s.req_id is not None
            answers.append(Duplicate(s.req_id, int(tokens[i + 1]), int(tokens[i + 2])))
            i += 3
        else:
            answers.append(_refusal(kind, s.delta))
            i += 1
    return answers


def _refusal(kind: str, delta: int) -> Refused:
    if kind == "o":
        return Refused(
            "overflow",
            f"adding {delta} would take the total out of the signed 64-bit range; total unchanged",
        )
    return Refused("bad_delta", "delta must be in the signed 64-bit range")
