"""Start a real `redis-server` on a free loopback port for tests (never assume one is running).

`start()` again after `stop()` or `kill()` restarts it on the same port and data directory, so
with AOF on (the default) the data survives: `kill()` is a `kill -9` (no shutdown, no final
AOF rewrite or RDB save), for crash drills."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from testsupport.ports import free_port


class RedisServer:
    def __init__(self, workdir: Path, *, appendonly: bool = True, appendfsync: str = "always") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run ./scripts/bootstrap (it installs it)")
        self.workdir = workdir
        self.binary = binary
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.port = free_port()  # kept across restarts: outside the range port-0 binds draw from
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", self.appendfsync, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed beyond what it already wrote)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
