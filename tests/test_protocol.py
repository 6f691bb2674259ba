"""Unit and property tests for the wire format: plain/JSON parsing and the server encoders."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wstally import protocol
from wstally.protocol import (
    ERROR_CODES,
    JSON_PARSE_ERRORS,
    MAX_ID,
    MAX_NAME,
    MAX_PLAIN_LEN,
    Add,
    Hello,
    ProtocolError,
    encode_ack,
    encode_error,
    encode_plain_error,
    encode_plain_total,
    encode_presence,
    encode_snapshot,
    encode_updates,
    escape_text,
    parse_json,
    parse_plain,
    plain_totals,
)
from wstally.tally import INT64_MAX, INT64_MIN, Update

FAST = settings(max_examples=300, deadline=None)

int64s: st.SearchStrategy[int] = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX]),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
)
# The whitespace parse_plain allows around a number.
plain_ws: st.SearchStrategy[str] = st.text(alphabet=" \t\r\n", max_size=8)
# The plain grammar, written independently of the implementation.
PLAIN_GRAMMAR = re.compile(r"[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*")


def plain_error(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_plain(text)
    return info.value


def json_error(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_json(text)
    return info.value


def add(**fields: Any) -> str:
    return json.dumps({"type": "add", **fields})


def hello(**fields: Any) -> str:
    return json.dumps({"type": "hello", **fields})


# -- parse_plain --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", 5),
        ("-3", -3),
        (" +12 ", 12),
        ("007", 7),
        ("0", 0),
        ("-0", 0),
        ("+0", 0),
        ("\t42\r\n", 42),
        ("5\n", 5),
        ("  -00", 0),
        (str(INT64_MAX), INT64_MAX),
        (str(INT64_MIN), INT64_MIN),
        ("+" + str(INT64_MAX), INT64_MAX),
        ("0" * 21 + str(INT64_MAX), INT64_MAX),  # exactly MAX_PLAIN_LEN chars
        (" " * (MAX_PLAIN_LEN - 1) + "5", 5),
    ],
)
def test_parse_plain_accepts(text: str, expected: int) -> None:
    assert len(text) <= MAX_PLAIN_LEN
    assert parse_plain(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1_000",
        "0x10",
        "0b1",
        "0o7",
        "1e3",
        "1.0",
        "1.",
        ".5",
        "١٢",  # Arabic-Indic digits
        "١",
        "５",  # fullwidth digit five
        "²",  # superscript two: str.isdigit() is True
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "",
        "  ",
        "\n",
        "+",
        "-",
        "+-1",
        "-+1",
        "--1",
        "++1",
        "1 2",
        "1-",
        "- 1",
        "5abc",
        "abc",
        "\x005",
        "5\x00",
        "\u00a05",  # no-break space is not ASCII whitespace
        "5\u3000",  # ideographic space
        "\x0b5",  # vertical tab: not in the accepted whitespace set (space, \t, \r, \n)
        "\x0c5",  # form feed: likewise
        "[5]",
        '"5"',
        "0" * 41,
        " " * MAX_PLAIN_LEN + "5",
        "9" * 5000,
    ],
)
def test_parse_plain_refuses_as_bad_number(text: str) -> None:
    error = plain_error(text)
    assert error.code == "bad_number"
    assert error.req_id is None
    assert str(error) == error.message
    assert "\x00" not in error.message


@pytest.mark.parametrize(
    "text",
    [
        str(2**63),
        str(INT64_MIN - 1),
        "+" + str(2**63),
        "9" * 20,
        "-" + "9" * 39,
    ],
)
def test_parse_plain_out_of_range_is_bad_delta(text: str) -> None:
    assert plain_error(text).code == "bad_delta"


def test_parse_plain_error_messages_are_escaped_and_bounded() -> None:
    error = plain_error("\x1b[2J" + "x" * 30)
    assert "\x1b" not in error.message
    assert "\\x1b[2J" in error.message
    assert len(plain_error("a" * 10_000).message) < 200
    assert "empty" in plain_error("   ").message


@given(n=int64s, left=plain_ws, right=plain_ws, plus=st.booleans())
@FAST
def test_parse_plain_round_trips_int64(n: int, left: str, right: str, plus: bool) -> None:
    assert parse_plain(str(n)) == n
    sign = "+" if plus and n >= 0 else ""
    assert parse_plain(left + sign + str(n) + right) == n


@given(
    n=st.integers(min_value=INT64_MAX + 1, max_value=10**39) | st.integers(-(10**38), INT64_MIN - 1)
)
@FAST
def test_parse_plain_out_of_range_property(n: int) -> None:
    assert plain_error(str(n)).code == "bad_delta"


def check_plain(text: str) -> None:
    try:
        value = parse_plain(text)
    except ProtocolError as error:
        if PLAIN_GRAMMAR.fullmatch(text) and len(text) <= MAX_PLAIN_LEN:
            # Grammatical and short enough: the only reason left is the int64 range.
            assert error.code == "bad_delta"
            assert not INT64_MIN <= int(text.strip()) <= INT64_MAX
        else:
            assert error.code == "bad_number"
    else:
        assert PLAIN_GRAMMAR.fullmatch(text)
        assert len(text) <= MAX_PLAIN_LEN
        assert value == int(text.strip())
        assert INT64_MIN <= value <= INT64_MAX


@given(st.text(max_size=60))
@FAST
def test_parse_plain_arbitrary_text(text: str) -> None:
    check_plain(text)


@given(
    st.from_regex(
        r"[ \t\r\n\x0b\x0c]{0,3}[+-]{0,2}[0-9٠-٩_.xe]{0,25}[ \t\r\n]{0,3}", fullmatch=True
    )
)
@FAST
def test_parse_plain_near_grammar_text(text: str) -> None:
    check_plain(text)


# -- parse_json: valid messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"hello","client":"c1"}', Hello("c1")),
        ('{"type":"hello","client":"c1","name":"Ann"}', Hello("c1", "Ann")),
        ('{"type":"hello","client":"c1","name":null}', Hello("c1")),
        ('{"type":"hello","client":"c1","extra":[1,2]}', Hello("c1")),
        (hello(client="x" * 64, name="n" * MAX_NAME), Hello("x" * 64, "n" * MAX_NAME)),
        (hello(client="c", name="Zoë 🎉"), Hello("c", "Zoë 🎉")),
        ('{"type":"add","delta":5}', Add(5)),
        ('{"type":"add","delta":-3,"id":"r1"}', Add(-3, "r1")),
        ('{"type":"add","delta":0,"id":null}', Add(0)),
        ('{"type":"add","delta":-0}', Add(0)),
        (' \n{"delta":7,"type":"add"}\t', Add(7)),
        (add(delta=INT64_MAX, id="i" * MAX_ID), Add(INT64_MAX, "i" * MAX_ID)),
        (add(delta=INT64_MIN), Add(INT64_MIN)),
        # Ids are opaque: they are echoed inside JSON, so any characters are acceptable.
        (add(delta=1, id="r-\u00e9"), Add(1, "r-\u00e9")),
    ],
)
def test_parse_json_valid(text: str, expected: Hello | Add) -> None:
    assert parse_json(text) == expected


@given(
    delta=int64s,
    req_id=st.none() | st.text(min_size=1, max_size=MAX_ID).filter(str.isprintable),
)
@FAST
def test_parse_json_add_round_trip(delta: int, req_id: str | None) -> None:
    msg: dict[str, Any] = {"type": "add", "delta": delta}
    if req_id is not None:
        msg["id"] = req_id
    assert parse_json(json.dumps(msg)) == Add(delta, req_id)
    assert parse_json(json.dumps(msg, ensure_ascii=False)) == Add(delta, req_id)


# -- parse_json: errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "{",
        "{'type':'add'}",
        '{"type":"add","delta":5,}',
        '{"type":"add","delta":5} {}',
        '{"type":"add","delta":NaN}',
        '{"type":"add","delta":Infinity}',
        '{"type":"add","delta":-Infinity}',
        "NaN",
        '{"type":"add","delta":1,"delta":2}',
        '{"type":"add","type":"add","delta":1}',
        '{"type":"add","delta":1,"x":{"k":1,"k":1}}',
        "[" * 3000,
        "[" * 3000 + "]" * 3000,
        '{"a":' * 3000,
        '{"a":' * 3000 + "1" + "}" * 3000,
        '{"type":"add","delta":' + "9" * 5000 + "}",
        '{"type":"add","delta":01}',
        '{"type":"add","delta":+1}',
        '{"type":"add","delta":0x10}',
        "\ufeff{}",
    ],
)
def test_parse_json_bad_json(text: str) -> None:
    error = json_error(text)
    assert error.code == "bad_json"
    assert error.req_id is None


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "[1]",
        "1",
        '"add"',
        "null",
        "true",
        "{}",
        '{"delta":1}',
        '{"type":null}',
        '{"type":1}',
        '{"type":["add"]}',
        '{"type":{"add":1}}',
        '{"type":true}',
    ],
)
def test_parse_json_bad_message(text: str) -> None:
    assert json_error(text).code == "bad_message"


@pytest.mark.parametrize("kind", ["", "ADD", "Add", "hello ", "snapshot", "ack", "\x1b[2J"])
def test_parse_json_unknown_type(kind: str) -> None:
    error = json_error(json.dumps({"type": kind, "delta": 1}))
    assert error.code == "unknown_type"
    assert "\x1b" not in error.message


def test_unknown_type_message_is_bounded() -> None:
    assert len(json_error(json.dumps({"type": "x" * 5000})).message) < 200


@pytest.mark.parametrize(
    "fields",
    [
        {"delta": 1.0},
        {"delta": -0.0},
        {"delta": 1.5},
        {"delta": True},
        {"delta": False},
        {"delta": "5"},
        {"delta": None},
        {"delta": [5]},
        {"delta": {"v": 5}},
        {},
        {"delta": INT64_MAX + 1},
        {"delta": INT64_MIN - 1},
        {"delta": 10**100},
    ],
)
@pytest.mark.parametrize("req_id", [None, "r1"])
def test_parse_json_bad_delta_carries_id(fields: dict[str, Any], req_id: str | None) -> None:
    if req_id is not None:
        fields = {**fields, "id": req_id}
    error = json_error(add(**fields))
    assert error.code == "bad_delta"
    assert error.req_id == req_id


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"add","delta":1e3,"id":"r"}',
        '{"type":"add","delta":1E3,"id":"r"}',
        '{"type":"add","delta":1e400,"id":"r"}',
        '{"type":"add","delta":5.0,"id":"r"}',
    ],
)
def test_parse_json_float_literals_are_bad_delta(text: str) -> None:
    error = json_error(text)
    assert (error.code, error.req_id) == ("bad_delta", "r")


@pytest.mark.parametrize("req_id", [5, 1.5, True, [], {}, "", "x" * (MAX_ID + 1)])
def test_parse_json_bad_id(req_id: object) -> None:
    error = json_error(add(delta=1, id=req_id))
    assert error.code == "bad_id"
    assert error.req_id is None
    # The id is checked first, so a bad id is reported even when the delta is bad too.
    assert json_error(add(delta="x", id=req_id)).code == "bad_id"
    assert json_error(add(id=req_id)).code == "bad_id"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"client": None},
        {"client": ""},
        {"client": 5},
        {"client": ["c"]},
        {"client": "c" * 65},
        {"client": "\x1b[2J"},
        {"client": "a\nb"},
        {"client": "\u200b"},  # zero-width space is not printable
        {"client": "\ud800"},  # lone surrogate, reachable through a JSON escape
    ],
)
def test_parse_json_bad_client(fields: dict[str, Any]) -> None:
    assert json_error(hello(**fields)).code == "bad_client"


def test_parse_json_bad_client_via_escape() -> None:
    assert json_error('{"type":"hello","client":"\\u001b[2J"}').code == "bad_client"


@pytest.mark.parametrize(
    "name",
    ["\x1b[2J", "", "n" * (MAX_NAME + 1), "a\tb", "a\x7fb", "\u2028", 5, True, ["Ann"], {}],
)
def test_parse_json_bad_name(name: object) -> None:
    assert json_error(hello(client="c1", name=name)).code == "bad_name"


@given(st.text(max_size=200))
@FAST
def test_parse_json_arbitrary_text(text: str) -> None:
    try:
        result = parse_json(text)
    except ProtocolError as error:
        assert error.code in JSON_PARSE_ERRORS
    else:
        assert isinstance(result, Hello | Add)


json_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=70),
    st.sampled_from(["add", "hello", "type", "delta", "id", "client", "name"]),
)


def json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    )


json_values: st.SearchStrategy[Any] = st.recursive(json_scalars, json_containers, max_leaves=12)
# Objects shaped like messages, so the field checks (not only the JSON parser) are exercised.
message_like: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"type": st.sampled_from(["add", "hello"]) | json_values},
    optional={
        "delta": int64s | json_values,
        "id": st.text(max_size=70) | json_values,
        "client": st.text(max_size=70) | json_values,
        "name": st.text(max_size=40) | json_values,
    },
)


def check_json(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        try:
            result = parse_json(text)
        except ProtocolError as error:
            assert error.code != "bad_json"  # json.dumps output is valid and shallow
            assert isinstance(error.message, str)
        else:
            assert isinstance(value, dict)
            if isinstance(result, Add):
                assert value["type"] == "add"
                assert type(value["delta"]) is int
                assert result.delta == value["delta"]
                assert result.req_id == value.get("id")
            else:
                assert value["type"] == "hello"
                assert result.client == value["client"]
                assert result.name == value.get("name")


@given(json_values)
@FAST
def test_parse_json_arbitrary_values(value: Any) -> None:
    check_json(value)


@given(message_like)
@settings(max_examples=500, deadline=None)
def test_parse_json_message_like_values(value: dict[str, Any]) -> None:
    check_json(value)
    # The add's id is carried on a bad delta whenever the id itself was valid.
    if value["type"] == "add":
        req_id = value.get("id")
        id_ok = req_id is None or (
            isinstance(req_id, str) and 0 < len(req_id) <= MAX_ID and req_id.isprintable()
        )
        try:
            parse_json(json.dumps(value))
        except ProtocolError as error:
            assert error.code == ("bad_delta" if id_ok else "bad_id")
            assert error.req_id == (req_id if id_ok else None)


# -- encoders -----------------------------------------------------------------------------------


def test_encode_snapshot() -> None:
    text = encode_snapshot("ep", 12, -5, 3)
    assert json.loads(text) == {
        "type": "snapshot",
        "epoch": "ep",
        "seq": 12,
        "total": -5,
        "clients": 3,
    }
    assert " " not in text
    extra = json.loads(encode_snapshot("ep", 0, 0, 0, history=[1, 2], name='a"b\x1b'))
    assert extra["history"] == [1, 2]
    assert extra["name"] == 'a"b\x1b'


@pytest.mark.parametrize("req_id", ["r1", 'q"uote', "back\\slash", "\x1b[2J", "\u2028", "\ud800"])
@pytest.mark.parametrize("duplicate", [False, True])
def test_encode_ack(req_id: str, duplicate: bool) -> None:
    text = encode_ack(req_id, 7, INT64_MIN, duplicate=duplicate)
    expected: dict[str, Any] = {"type": "ack", "id": req_id, "seq": 7, "total": INT64_MIN}
    if duplicate:
        expected["duplicate"] = True
    assert json.loads(text) == expected
    assert "\x1b" not in text


def test_encode_ack_default_not_duplicate() -> None:
    assert "duplicate" not in json.loads(encode_ack("r", 1, 1))


def test_encode_updates() -> None:
    nasty = 'O"Brien\\\x1b[2J\n\u2028'
    updates = [
        Update(1, 5, 5, 0.0, "k", "c", "Ann", "r"),
        Update(2, -3, 2, 0.0, "k", None, None, None),
        Update(3, INT64_MAX - 2, INT64_MAX, 0.0, "k", "c", nasty, "r2"),
    ]
    text = encode_updates(updates)
    assert "\x1b" not in text
    assert json.loads(text) == {
        "type": "updates",
        "seq": 3,
        "total": INT64_MAX,
        "items": [
            {"seq": 1, "delta": 5, "total": 5, "by": "Ann"},
            {"seq": 2, "delta": -3, "total": 2, "by": None},
            {"seq": 3, "delta": INT64_MAX - 2, "total": INT64_MAX, "by": nasty},
        ],
    }


@given(
    st.lists(
        st.tuples(int64s, int64s, st.none() | st.text(max_size=MAX_NAME)), min_size=1, max_size=8
    )
)
@FAST
def test_encode_updates_round_trips(items: list[tuple[int, int, str | None]]) -> None:
    updates = [
        Update(seq, delta, total, 0.0, "k", name=name)
        for seq, (delta, total, name) in enumerate(items, 1)
    ]
    decoded = json.loads(encode_updates(updates))
    assert decoded["type"] == "updates"
    assert decoded["seq"] == len(items)
    assert decoded["total"] == items[-1][1]
    assert decoded["items"] == [
        {"seq": u.seq, "delta": u.delta, "total": u.total, "by": u.name} for u in updates
    ]


def test_encode_presence() -> None:
    assert json.loads(encode_presence(4)) == {"type": "presence", "clients": 4}
    assert json.loads(encode_presence(0)) == {"type": "presence", "clients": 0}


def test_encode_error() -> None:
    assert json.loads(encode_error("bad_json", 'oops "x"\x1b')) == {
        "type": "error",
        "code": "bad_json",
        "message": 'oops "x"\x1b',
    }
    assert json.loads(encode_error("bad_delta", "m", "r1")) == {
        "type": "error",
        "code": "bad_delta",
        "message": "m",
        "id": "r1",
    }
    assert "\x1b" not in encode_error("c", "\x1b", "\x1b")


@given(code=st.text(), message=st.text(), req_id=st.none() | st.text())
@FAST
def test_encode_error_round_trips(code: str, message: str, req_id: str | None) -> None:
    decoded = json.loads(encode_error(code, message, req_id))
    assert decoded.pop("id", None) == req_id
    assert decoded == {"type": "error", "code": code, "message": message}


def test_encode_plain() -> None:
    assert encode_plain_total(5) == "Server records total=5"
    assert encode_plain_total(-3) == "Server records total=-3"
    assert encode_plain_total(INT64_MIN) == f"Server records total={INT64_MIN}"
    assert encode_plain_error("nope") == "error: nope"
    updates = [Update(1, 5, 5, 0.0, "k"), Update(2, -2, 3, 0.0, "k")]
    assert plain_totals(updates) == ["Server records total=5", "Server records total=3"]


@given(int64s)
@FAST
def test_plain_total_parses_back(total: int) -> None:
    line = encode_plain_total(total)
    prefix, _, number = line.partition("=")
    assert prefix == "Server records total"
    assert parse_plain(number) == total


# -- escape_text --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("", ""),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\nb\tc\rd", "a\\nb\\tc\\rd"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("\u2028", "\\u2028"),
        ("zoë 🎉", "zoë 🎉"),
        ("x" * 40, "x" * 40),
        ("x" * 41, "x" * 40 + "…"),
    ],
)
def test_escape_text(text: str, expected: str) -> None:
    assert escape_text(text) == expected


def test_escape_text_limit() -> None:
    assert escape_text("abcdef", limit=3) == "abc…"
    assert escape_text("abc", limit=3) == "abc"
    assert escape_text("\x1b" * 100, limit=2) == "\\x1b\\x1b…"


@given(text=st.text(), limit=st.integers(0, 60))
@FAST
def test_escape_text_properties(text: str, limit: int) -> None:
    out = escape_text(text, limit)
    assert all(c.isprintable() for c in out)
    assert "\x1b" not in out
    # At most `limit` source characters, each escaped to at most 10 characters (\U0010ffff).
    assert len(out) <= 10 * limit + 1
    assert out.endswith("…") == (len(text) > limit) or text[:limit].endswith("…")
    if text.isprintable():
        assert out == text[:limit] + ("…" if len(text) > limit else "")


@pytest.mark.parametrize("req_id", ["\x1b[2J", "\ud800", "a\nb"])
def test_unprintable_ids_are_refused(req_id: str) -> None:
    # A lone surrogate would reach the store and fail the whole batch's commit.
    with pytest.raises(ProtocolError) as refused:
        parse_json(json.dumps({"type": "add", "delta": 1, "id": req_id}))
    assert refused.value.code == "bad_id"


def test_every_error_code_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    assert [code for code in sorted(ERROR_CODES) if f"`{code}`" not in doc] == []


def test_server_frames_decode_to_typed_messages() -> None:
    from wstally.protocol import (
        AckMsg,
        ErrorMsg,
        ItemMsg,
        PresenceMsg,
        SnapshotMsg,
        UpdatesMsg,
        decode_server,
    )

    big = 2**63 - 1
    update = Update(7, -(2**63), big, 0.0, "c", name="ann", req_id="r")
    assert decode_server(encode_updates([update])) == UpdatesMsg(
        7, big, (ItemMsg(7, -(2**63), big, "ann"),)
    )
    assert decode_server(encode_ack("r", 7, big, True)) == AckMsg("r", 7, big, True)
    assert decode_server(encode_snapshot("e", 1, 2, 3)) == SnapshotMsg("e", 1, 2, 3)
    recovered = encode_snapshot("e", 1, 2, 3, recovered=False, reason="why")
    assert decode_server(recovered) == SnapshotMsg("e", 1, 2, 3, False, "why")
    assert decode_server(encode_presence(4)) == PresenceMsg(4)
    assert decode_server(encode_error("overflow", "no", "r")) == ErrorMsg("overflow", "no", "r")
    assert decode_server('{"type":"something-new"}') is None
    for bad in ("nope", '{"type":"ack"}', '{"type":"updates","seq":1,"total":1,"items":[1]}'):
        with pytest.raises((ValueError, KeyError, TypeError)):
            decode_server(bad)


def _outcome(parse: Any, text: str) -> object:
    try:
        return parse(text)
    except ProtocolError as exc:
        return (exc.code, str(exc), exc.req_id)


@given(
    delta=st.one_of(int64s, st.integers(-(10**20), 10**20)),
    req_id=st.text(st.characters(max_codepoint=0x7F), max_size=70),
    spaced=st.booleans(),
)
@settings(max_examples=500, deadline=None)
def test_the_plain_add_fast_path_answers_as_the_decoder_does(
    delta: int, req_id: str, spaced: bool
) -> None:
    sep = ", " if spaced else ","
    colon = ": " if spaced else ":"
    text = f'{{"type"{colon}"add"{sep}"delta"{colon}{delta}{sep}"id"{colon}{json.dumps(req_id)}}}'
    assert _outcome(protocol.parse_json, text) == _outcome(protocol._parse_decoded, text)
