"""A fault-injecting TCP proxy for drills: put it between a client and a server, then switch
what the network does while traffic flows.

    proxy = await FaultProxy("127.0.0.1", upstream_port).start()
    proxy.set_mode("reset")            # every request is answered with a TCP RST
    ...
    proxy.set_mode("pass")
    await proxy.aclose()

Modes (`set_mode`), applied to new connections when they are accepted and to open (keep-alive)
connections at the start of each request they carry, so a pooled connection cannot dodge a
fault:

- `pass`: bytes are forwarded unchanged both ways;
- `latency`: each request is held `latency_s` before it is forwarded (a slow network or a slow
  engine: the answer arrives that much later);
- `reset`: the connection is aborted with an RST (`SO_LINGER` 0, then close) instead of being
  forwarded; with `count=n` only the next n requests are reset, then the proxy passes again;
- `half_open`: the connection is accepted and kept open, what the client sends is read and
  dropped and nothing ever comes back (an engine that hangs, or a peer that vanished without a
  FIN);
- `close_after`: the answer to each request is cut after `close_after_bytes` bytes and the
  connection closed (FIN): a response truncated in its headers or mid-body.

"A request starts" is a client chunk that begins with an HTTP/1.x request line (the clients
used here do not pipeline). `stats` counts connections and every fault applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FaultProxy", "Mode"]

Mode = Literal["pass", "latency", "reset", "half_open", "close_after"]
_REQUEST_LINE = re.compile(rb"^[A-Z]{3,8} \S+ HTTP/1\.[01]\r\n")
_CHUNK = 1 << 16


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    swallow: bool = False  # half open: drop everything both ways
    budget: int | None = None  # bytes of the current answer still forwarded (close_after)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.latency_s = 0.0
        self.close_after_bytes = 0
        self._count: int | None = None  # faults left before falling back to pass
        self.stats: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_mode(self, mode: Mode, *, latency_s: float = 0.0, close_after_bytes: int = 0,
                 count: int | None = None) -> None:
        self.mode = mode
        self.latency_s = latency_s
        self.close_after_bytes = close_after_bytes
        self._count = count

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._close(conn, rst=True)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- faults ---------------------------------------------------------------------------
    def _fault(self) -> Mode:
        """The mode the next request gets (counts down a limited fault)."""
        mode = self.mode
        if mode != "pass" and self._count is not None:
            if self._count <= 0:
                self.set_mode("pass")
                return "pass"
            self._count -= 1
        self.stats[mode] += 1
        return mode

    @staticmethod
    def _rst(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def _close(self, conn: _Conn, *, rst: bool = False) -> None:
        if rst:
            self._rst(conn.client)
        else:
            conn.client.close()
        if conn.upstream is not None:
            conn.upstream.close()
        self._conns.discard(conn)

    # -- pumps ----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        conn = _Conn(client=writer)
        self._conns.add(conn)
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            await self._serve(conn, reader)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # aclose(): end as a finished task (Python 3.11 logs cancelled stream handlers)
        finally:
            self._handlers.discard(me)
            for task in conn.tasks:
                task.cancel()
            if conn in self._conns:
                self._close(conn)

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        # The first request's fault is decided on its first bytes (below), so a `reset` or
        # `half_open` set now applies to this connection's first request.
        first = await reader.read(_CHUNK)
        if not first:
            return
        chunk: bytes | None = first
        while chunk:
            if _REQUEST_LINE.match(chunk) and not conn.swallow:
                fault = self._fault()
                if fault == "reset":
                    self._close(conn, rst=True)
                    return
                if fault == "half_open":
                    conn.swallow = True
                elif fault == "latency":
                    await asyncio.sleep(self.latency_s)
                conn.budget = self.close_after_bytes if fault == "close_after" else None
            if not conn.swallow:
                if conn.upstream is None:
                    up_reader, conn.upstream = await asyncio.open_connection(*self.upstream)
                    conn.tasks.append(asyncio.create_task(self._pump_back(conn, up_reader)))
                conn.upstream.write(chunk)
                await conn.upstream.drain()
            chunk = await reader.read(_CHUNK)

    async def _pump_back(self, conn: _Conn, up_reader: asyncio.StreamReader) -> None:
        """Upstream -> client, honouring `swallow` and the `close_after` budget."""
        try:
            while True:
                data = await up_reader.read(_CHUNK)
                if not data:
                    break
                if conn.swallow:
                    continue
                if conn.budget is not None:
                    if len(data) >= conn.budget:
                        conn.client.write(data[:conn.budget])
                        with contextlib.suppress(OSError):
                            await conn.client.drain()
                        self.stats["cut"] += 1
                        self._close(conn)
                        return
                    conn.budget -= len(data)
                conn.client.write(data)
                await conn.client.drain()
        except OSError:
            pass
        if not conn.swallow:
            self._close(conn)
