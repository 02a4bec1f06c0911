"""Ports for the servers tests start, chosen where nothing else will be given them.

A port-0 bind returns a port from the kernel's ephemeral range (`ip_local_port_range`, 32768–60999
by default), closes, and the test hands the number to a server that binds it later. Anything
started in between that binds port 0 itself can be given the same number: `modgate up` starts
Ray first (GCS, raylets, dashboard agents and workers all bind kernel-chosen ports), and CI once
failed with the gateway's port taken that way (`[Errno 98] ... address already in use`).

So the ports come from below the ephemeral range and above Ray's default worker ports
(10002–19999), checked free by a bind, and never handed out twice in one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

__all__ = ["free_port"]

_LOW, _HIGH = 20000, 32767
_given: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on now, outside the ranges the kernel and Ray pick from."""
    high = min(_HIGH, _ephemeral_low() - 1)
    rng = random.SystemRandom()
    with _lock:
        for _ in range(200):
            port = rng.randint(_LOW, high)
            if port in _given:
                continue
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free port between {_LOW} and {high}")
