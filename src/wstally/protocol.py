"""The wire format, as pure functions: parse client frames, encode server frames.

Two modes share one endpoint. Plain mode (no subprotocol) exchanges bare integers and
``Server records total=N`` lines; JSON mode (subprotocol ``wstally.v1``) exchanges one JSON
object per frame. See docs/protocol.md for the normative description.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from websockets.typing import Subprotocol

from wstally.tally import Update, in_int64
from wstally.text import escape_text  # re-exported: the protocol's callers quote peers too

__all__ = [
    "ERROR_CODES",
    "JSON_PARSE_ERRORS",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_NAME",
    "MAX_SERVER_FRAME",
    "SUBPROTOCOL",
    "UPDATES_PER_FRAME",
    "AckMsg",
    "Add",
    "ErrorMsg",
    "Hello",
    "ItemMsg",
    "PresenceMsg",
    "ProtocolError",
    "ServerMessage",
    "SnapshotMsg",
    "UpdatesMsg",
    "decode_server",
    "encode_ack",
    "encode_error",
    "encode_items",
    "encode_plain_error",
    "encode_plain_total",
    "encode_presence",
    "encode_snapshot",
    "encode_updates",
    "encode_updates_frames",
    "escape_text",
    "parse_json",
    "parse_plain",
]

SUBPROTOCOL = Subprotocol("wstally.v1")
# Every legitimate client frame is well under 300 bytes; 8 KiB leaves room to answer a
# pasted 5,000-digit "number" with a readable error; anything larger is closed with 1009.
MAX_FRAME = 8192
MAX_NAME = 32
MAX_ID = 64
MAX_CLIENT = 64
# No frame the server sends is larger (docs/protocol.md), far below the 1 MiB websockets-based
# clients accept by default: a backlog goes out as several updates frames, in order. An item
# is at most ~480 bytes (three int64s and a 32-character name of astral characters, each
# escaped as a \uXXXX pair), so 256 items stay under 123 KB.
MAX_SERVER_FRAME = 128 * 1024
UPDATES_PER_FRAME = 256
# 19 digits hold every int64; a few more allow leading zeros without inviting huge parses.
MAX_PLAIN_LEN = 40

# ASCII only: str.isdigit() and \d accept other scripts' digits (e.g. Arabic-Indic), and
# int() accepts underscores, neither of which a plain client means.
_PLAIN_RE = re.compile(r"[ \t\r\n]*([+-]?)([0-9]+)[ \t\r\n]*", re.ASCII)


# Every error code, in one place: docs/protocol.md's table and the tests follow this.
JSON_PARSE_ERRORS = frozenset(
    {
        "bad_json",
        "bad_message",
        "unknown_type",
        "bad_delta",
        "bad_id",
        "bad_client",
        "bad_name",
        "bad_since",
    }
)
ERROR_CODES = JSON_PARSE_ERRORS | {
    "bad_number",  # plain mode's parse error
    "overflow",
    "hello_late",
    "binary_unsupported",
    "rate_limited",
    "shutting_down",
    "store_failed",
    "unavailable",  # the shared engine (Redis) cannot be reached: resend later, same id
}


class ProtocolError(Exception):
    """A client frame that cannot be acted on; ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str, req_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


@dataclass(frozen=True, slots=True)
class Hello:
    client: str
    name: str | None = None
    # Recovery: the last seq this client saw, in which history. Both or neither.
    since: int | None = None
    epoch: str | None = None


class Add(NamedTuple):  # one per add frame: a named tuple is built 3x faster
    delta: int
    req_id: str | None = None


def parse_plain(text: str) -> int:
    """Parse a plain-mode frame: an optionally signed run of ASCII digits."""
    if len(text) > MAX_PLAIN_LEN:
        raise ProtocolError("bad_number", f"message too long for a number ({len(text)} chars)")
    match = _PLAIN_RE.fullmatch(text)
    if match is None:
        if not text.strip():
            raise ProtocolError("bad_number", "empty message; send an integer such as 5 or -3")
        raise ProtocolError(
            "bad_number",
            f"not an integer: '{escape_text(text)}'; send an integer such as 5, -3 or +12",
        )
    value = int(match.group(1) + match.group(2))
    if not in_int64(value):
        raise ProtocolError("bad_delta", f"{value} is outside the signed 64-bit range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


# Built once: json.loads() with hooks would construct a new decoder for every frame.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _loads(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ProtocolError("bad_json", "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, int digit limits, our own hooks
        raise ProtocolError("bad_json", f"invalid JSON: {exc}") from None


# The add frame as our clients, the page and the load test write it (compact, or with
# json.dumps' default spaces), with an id that needs no escape: matched without the JSON
# decoder, at a third of its cost. Anything else, or a delta past int64, takes the full path.
_PLAIN_ADD = re.compile(
    r'\{"type": ?"add", ?"delta": ?(-?(?:0|[1-9][0-9]{0,18})), ?"id": ?"([ !#-\[\]-~]{1,'
    + str(MAX_ID)
    + r'})"\}'
).fullmatch


_new = tuple.__new__


def parse_json(text: str) -> Hello | Add:
    """Parse a JSON-mode frame into a typed message or raise ProtocolError."""
    match = _PLAIN_ADD(text)
    if match is not None:
        delta = int(match[1])
        if in_int64(delta):
            # tuple.__new__ directly: a named tuple's own __new__ is a Python function.
            return _new(Add, (delta, match[2]))
    return _parse_decoded(text)


def _parse_decoded(text: str) -> Hello | Add:
    obj = _loads(text)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "a message must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "a message needs a string field 'type'")
    if kind == "add":
        return _parse_add(obj)
    if kind == "hello":
        return _parse_hello(obj)
    raise ProtocolError(
        "unknown_type", f"unknown message type '{escape_text(kind)}'; expected 'hello' or 'add'"
    )


def _parse_add(obj: dict[str, Any]) -> Add:
    req_id = obj.get("id")
    # Printable also rules out lone surrogates, which the store could not encode.
    if req_id is not None and (
        not isinstance(req_id, str) or not 0 < len(req_id) <= MAX_ID or not req_id.isprintable()
    ):
        raise ProtocolError(
            "bad_id", f"'id' must be a non-empty printable string of at most {MAX_ID} chars"
        )
    if "delta" not in obj:
        raise ProtocolError("bad_delta", "an add needs an integer field 'delta'", req_id)
    delta = obj["delta"]
    # bool is a subclass of int in Python, but true is not a number on the wire.
    if type(delta) is not int:
        raise ProtocolError(
            "bad_delta",
            f"'delta' must be a JSON integer, not {_json_kind(delta)}",
            req_id,
        )
    if not in_int64(delta):
        raise ProtocolError("bad_delta", "'delta' is outside the signed 64-bit range", req_id)
    return Add(delta, req_id)


def _parse_hello(obj: dict[str, Any]) -> Hello:
    client = obj.get("client")
    if not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT or not client.isprintable():
        raise ProtocolError(
            "bad_client",
            f"'client' must be a non-empty printable string of at most {MAX_CLIENT} chars",
        )
    name = obj.get("name")
    if name is not None and (
        not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable()
    ):
        raise ProtocolError(
            "bad_name", f"'name' must be non-empty printable text of at most {MAX_NAME} chars"
        )
    since = obj.get("since")
    epoch = obj.get("epoch")
    if since is not None or epoch is not None:
        if type(since) is not int or since < 0:
            raise ProtocolError("bad_since", "'since' must be a non-negative integer seq")
        if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_ID:
            raise ProtocolError("bad_since", "'since' needs the 'epoch' it was seen in")
    return Hello(client, name, since, epoch)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    return "an object"


# Server -> client. Hand-assembled where it matters: these run once per range of updates
# or per ack on the hot path, and every value but names and ids is an int we produced ourselves.


def encode_snapshot(epoch: str, seq: int, total: int, clients: int, **extra: Any) -> str:
    msg: dict[str, Any] = {
        "type": "snapshot",
        "epoch": epoch,
        "seq": seq,
        "total": total,
        "clients": clients,
    }
    msg.update(extra)
    return json.dumps(msg, separators=(",", ":"))


# A JSON string, quoted and escaped: what json.dumps(str) returns (ASCII-only output), from
# its C helper without dumps' Python layers (1 µs an add, acks and broadcast items alike).
_quote: Callable[[str], str] = encode_basestring_ascii


def encode_ack(req_id: str, seq: int, total: int, duplicate: bool = False) -> str:
    dup = ',"duplicate":true' if duplicate else ""
    return f'{{"type":"ack","id":{_quote(req_id)},"seq":{seq},"total":{total}{dup}}}'


def _encode_item(update: Update) -> str:
    by = "null" if update.name is None else _quote(update.name)
    return f'{{"seq":{update.seq},"delta":{update.delta},"total":{update.total},"by":{by}}}'


def encode_items(updates: Iterable[Update]) -> list[str]:
    """Each update as an item of an ``updates`` frame: the broadcast encodes an update once
    and joins it into the frames of every range of updates that holds it."""
    return list(map(_encode_item, updates))


def encode_updates(updates: Sequence[Update], items: Iterable[str] | None = None) -> str:
    """One ``updates`` frame; ``items``: the updates already encoded (``encode_items``)."""
    last = updates[-1]
    joined = ",".join(map(_encode_item, updates) if items is None else items)
    return f'{{"type":"updates","seq":{last.seq},"total":{last.total},"items":[{joined}]}}'


def encode_updates_frames(
    updates: Sequence[Update], items: Sequence[str] | None = None
) -> list[str]:
    """``updates`` as consecutive frames of at most UPDATES_PER_FRAME items each
    (``items``: as for ``encode_updates``)."""
    n = UPDATES_PER_FRAME
    if len(updates) <= n:
        return [encode_updates(updates, items)] if updates else []
    return [
        encode_updates(updates[i : i + n], None if items is None else items[i : i + n])
        for i in range(0, len(updates), n)
    ]


def encode_presence(clients: int) -> str:
    return f'{{"type":"presence","clients":{clients}}}'


def encode_error(code: str, message: str, req_id: str | None = None) -> str:
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if req_id is not None:
        msg["id"] = req_id
    return json.dumps(msg, separators=(",", ":"))


def encode_plain_total(total: int) -> str:
    return f"Server records total={total}"


def encode_plain_error(message: str) -> str:
    return f"error: {message}"


def plain_totals(updates: Iterable[Update]) -> list[str]:
    return [f"Server records total={u.total}" for u in updates]


# Server -> client, decoded (for clients: wstally client, watch, the load test). What a
# client cannot read raises ValueError (or KeyError, TypeError for a missing or odd field);
# a type it does not know is None, so that a newer server's additions are skipped.


@dataclass(frozen=True, slots=True)
class SnapshotMsg:
    epoch: str
    seq: int
    total: int
    clients: int
    recovered: bool | None = None  # only in answer to a hello with since
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ItemMsg:
    seq: int
    delta: int
    total: int
    by: str | None = None


@dataclass(frozen=True, slots=True)
class UpdatesMsg:
    seq: int
    total: int
    items: tuple[ItemMsg, ...]


@dataclass(frozen=True, slots=True)
class AckMsg:
    req_id: str
    seq: int
    total: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class PresenceMsg:
    clients: int


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    code: str
    message: str
    req_id: str | None = None


ServerMessage = SnapshotMsg | UpdatesMsg | AckMsg | PresenceMsg | ErrorMsg


def decode_server(text: str) -> ServerMessage | None:
    """One server frame of the JSON mode, typed; None for a type this client does not know."""
    msg = json.loads(text)
    kind = msg["type"]
    if kind == "updates":
        items = tuple(
            ItemMsg(int(i["seq"]), int(i["delta"]), int(i["total"]), _text(i.get("by")))
            for i in msg["items"]
        )
        return UpdatesMsg(int(msg["seq"]), int(msg["total"]), items)
    if kind == "ack":
        return AckMsg(
            str(msg["id"]), int(msg["seq"]), int(msg["total"]), bool(msg.get("duplicate"))
        )
    if kind == "snapshot":
        recovered = msg.get("recovered")
        return SnapshotMsg(
            str(msg["epoch"]),
            int(msg["seq"]),
            int(msg["total"]),
            int(msg["clients"]),
            None if recovered is None else bool(recovered),
            _text(msg.get("reason")),
        )
    if kind == "presence":
        return PresenceMsg(int(msg["clients"]))
    if kind == "error":
        return ErrorMsg(str(msg.get("code")), str(msg.get("message")), _text(msg.get("id")))
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
