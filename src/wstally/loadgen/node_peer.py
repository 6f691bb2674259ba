"""``--compare node``: the Node.js ``ws`` peer of ``benchmarks/``, and what it needs to start.

The peer is a script in a wstally checkout (``benchmarks/node_ws_server.js``), with its one
dependency pinned by ``benchmarks/package-lock.json``. Nothing is installed here: a load test
that fetched packages behind one's back would measure a tree nobody chose. What is missing
is said in one line, with the command that installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["INSTALL", "PeerMissing", "command"]

SCRIPT = "node_ws_server.js"
MIN_NODE = 18  # benchmarks/package.json, "engines"
INSTALL = "npm ci --prefix benchmarks"  # the versions of package-lock.json, exactly


class PeerMissing(Exception):
    """No peer run: the message says what is missing and how to get it."""


def command() -> tuple[list[str], dict[str, str]]:
    """The peer's command line (``--host`` and ``--port`` still to add), and the versions
    it runs (``node``, ``ws``), to record beside its figures."""
    node = shutil.which("node")
    if node is None:
        raise PeerMissing(
            "--compare node: node is not on PATH; install Node.js 18 or later "
            "(Debian: apt-get install nodejs npm)"
        )
    version = _ask([node, "--version"], None)
    if _major(version) < MIN_NODE:
        raise PeerMissing(f"--compare node: node {version} is too old; the peer needs 18 or later")
    where = _benchmarks()
    # Resolved by node itself, from where the script is: what the peer will load.
    ws = _ask([node, "-p", "require('ws/package.json').version"], where)
    if not ws:
        raise PeerMissing(
            f"--compare node: the ws package is not installed for {where / SCRIPT}; "
            f"install the pinned version with: {INSTALL}"
        )
    return [node, str(where / SCRIPT)], {"node": version, "ws": ws}


def _benchmarks() -> Path:
    """``benchmarks/`` of the checkout this package runs from, or of the current directory."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / "benchmarks" / SCRIPT).is_file():
            return root / "benchmarks"
    raise PeerMissing(
        f"--compare node: benchmarks/{SCRIPT} not found; run the load test from a wstally checkout"
    )


def _ask(argv: list[str], cwd: Path | None) -> str:
    """What ``argv`` prints, stripped; empty when it fails."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _major(version: str) -> int:
    """18 from ``v18.19.1``; 0 when it cannot be read."""
    head = version.removeprefix("v").partition(".")[0]
    return int(head) if head.isdigit() else 0
