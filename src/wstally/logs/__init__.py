"""``wstally logs``: filter, follow, pretty-print and summarize wstally's JSON log lines.

Lines are streamed one at a time, never loaded whole. Filters that name a literal (an event,
a client, a connection, a field's value) first test the raw line for it, so that most lines
are rejected without being parsed; ``--json`` writes the matching lines back byte for byte.

One module per concern, each leaning only on those listed before it:

- ``errors``: ``LogsError``, a bad option explained to the user;
- ``when``: ``--since``/``--until`` and the log's timestamps, in one comparable form;
- ``values``: what a line's JSON values mean (levels, text, numbers, dict keys);
- ``filters``: which lines are kept, tested on raw bytes first, then on the event;
- ``scan``: the one pass, lines through the filter to a sink, counted;
- ``follow``: ``--follow``, files read as they grow, through rotation and truncation;
- ``render``: one event as one readable line;
- ``summary``: the ``--summary`` figures (pure aggregation);
- ``report``: those figures as tables (rich);
- ``command``: ``run``, options to exit status.
"""

from __future__ import annotations

from wstally.logs.command import run

__all__ = ["run"]
