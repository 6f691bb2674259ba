"""The servers of one run: spawned for it (``--spawn``, ``--nodes``) or given (``--url``).

Given URLs are checked before any load starts: one scheme, loopback unless allowed, and a
server answering, each refusal one line (:class:`TargetError`) rather than a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import socket
import ssl
from urllib.parse import urlsplit

from wstally.loadgen.server_proc import SpawnedRedis, SpawnedServer, healthz

__all__ = ["TargetError", "Targets"]


class TargetError(Exception):
    """No run: the message says why, in one line, for exit status 2."""

    def __init__(self, message: str, *, alarm: bool = True) -> None:
        super().__init__(message)
        self.alarm = alarm  # shown in red: the user asked for something refused


class Targets:
    """Where the servers are, how to reach them, and the processes started for the run.

    Filled one server at a time, so that :meth:`close` stops whatever was started even
    when a later one fails to start.
    """

    def __init__(self) -> None:
        self.addresses: list[tuple[str, int]] = []
        self.urls: list[str] = []
        self.tls = False  # wss://
        self.pids: list[int | None] = []  # local processes to read CPU and memory from
        self.servers: list[SpawnedServer] = []
        self.redis: SpawnedRedis | None = None

    def spawn(self, args: argparse.Namespace) -> None:
        """One throwaway server, or a private Redis and ``--nodes`` servers on it."""
        cpus = args.server_cpus or [None]
        if args.nodes is not None:
            self.redis = SpawnedRedis(args.redis_cpus)
            for i in range(args.nodes):
                node = SpawnedServer(cpus=cpus[i % len(cpus)], redis=self.redis.url, node=f"n{i}")
                self._add_spawned(node)
        else:
            command = shlex.split(args.server_cmd) if args.server_cmd else None
            self._add_spawned(SpawnedServer(args.store, command, cpus[0]))

    def _add_spawned(self, server: SpawnedServer) -> None:
        self.servers.append(server)
        self.addresses.append((server.host, server.port))
        self.urls.append(f"ws://{server.host}:{server.port}/")
        self.pids.append(server.proc.pid)

    def check(self, args: argparse.Namespace) -> None:
        """The ``--url`` targets, checked: one scheme, loopback unless allowed, answering."""
        schemes = set()
        for url in args.url:
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or parts.hostname is None:
                raise TargetError(f"unsupported URL {url}; use ws:// or wss://")
            schemes.add(parts.scheme)
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80)
            if not args.allow_remote and not _is_loopback(host):
                raise TargetError(f"{host} is not a loopback address; see --allow-remote")
            self.addresses.append((host, port))
            self.urls.append(url)
        if len(schemes) > 1:
            raise TargetError("mixed ws:// and wss:// URLs; use one scheme")
        self.tls = schemes == {"wss"}
        for url, (host, port) in zip(self.urls, self.addresses, strict=True):
            self._check_answers(url, host, port, args)
        # --server-pid describes the first URL's server.
        self.pids = [args.server_pid] + [None] * (len(self.addresses) - 1)

    def _check_answers(self, url: str, host: str, port: int, args: argparse.Namespace) -> None:
        try:
            healthz(host, port, timeout=5.0, tls=self.health_tls(args.cafile), token=args.token)
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            # Nothing listening says it all; anything else (TLS, HTTP) is worth naming.
            why = "" if isinstance(reason, ConnectionRefusedError) else f" ({reason})"
            raise TargetError(
                f"no server at {url}{why}; start one or use --spawn", alarm=False
            ) from None

    def health_tls(self, cafile: str | None) -> ssl.SSLContext | None:
        """The context for /healthz over https, when the targets are wss://."""
        return ssl.create_default_context(cafile=cafile) if self.tls else None

    def close(self) -> None:
        """Stop every server and the Redis started for the run (given ones are left alone)."""
        for server in self.servers:
            server.stop()
        if self.redis is not None:
            self.redis.stop()


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False
