"""Text that others wrote, made safe to show: control characters escaped, length bounded.

The one helper for everything a peer or a log line can put on a terminal or into a message:
the server's refusals and log fields, the client's views, ``wstally logs`` and ``history``.
"""

from __future__ import annotations

__all__ = ["escape_text"]


def escape_text(text: str, limit: int | None = 40) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\u2028``).

    Cut to ``limit`` characters, then marked with "…", when it is longer; ``None``: whole.
    Escaped, a peer's text cannot drive a terminal (clear it, move the cursor, retitle it)
    nor forge a line of its own.
    """
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    # Nearly everything is printable already: one C-level check spares the join.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
