"""The open-file limit, raised for processes that hold one socket per client.

Shared by the server and the load generator: each connection is a file descriptor, and the
usual soft limit of 1024 is far below what one process of either handles.
"""

from __future__ import annotations

import contextlib
import resource

__all__ = ["raise_fd_limit"]


def raise_fd_limit(wanted: int | None = None) -> None:
    """Raise the soft limit to ``wanted`` descriptors, or to the hard limit when ``None``.

    Never above the hard limit (only root may raise that), never below the current soft
    limit; a refusal is ignored: the process then runs with what it has.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(hard, wanted)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
