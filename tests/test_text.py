"""``wstally.text``: the one escape helper (its bounded use is also tested in test_protocol)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wstally.text import escape_text


def test_no_limit_keeps_the_whole_text() -> None:
    assert escape_text("x" * 1000, limit=None) == "x" * 1000
    assert escape_text("\x1b" * 50, limit=None) == "\\x1b" * 50


def test_the_mark_comes_after_the_escapes() -> None:
    assert escape_text("a\nbcd", 2) == "a\\n…"


@given(text=st.text(), limit=st.none() | st.integers(0, 60))
def test_as_the_slow_way(text: str, limit: int | None) -> None:
    # Escape what is kept, then mark the cut: what the first three helpers each did.
    kept = text if limit is None else text[:limit]
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in kept)
    assert escape_text(text, limit) == escaped + ("…" if len(kept) < len(text) else "")
