"""Serve an httpx-style handler (`httpx.Request -> httpx.Response`) on a real loopback socket,
so backend tests can describe upstream behaviour compactly and still exercise a real HTTP
client. A handler that raises `httpx.TransportError` makes the server drop the connection
(before the response, or mid-body when the response's stream raises)."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import httpx
from aiohttp import web

Handler = Callable[[httpx.Request], httpx.Response]


class HandlerServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HandlerServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object | TracebackType) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        req = httpx.Request(request.method, f"http://test{request.path_qs}",
                            headers=list(request.headers.items()), content=body)
        try:
            resp = self.handler(req)
        except httpx.TransportError:
            request.transport.close()  # type: ignore[union-attr]
            raise web.HTTPInternalServerError() from None
        out = web.StreamResponse(status=resp.status_code, headers={
            k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "transfer-encoding")})
        await out.prepare(request)
        try:
            if isinstance(resp.stream, httpx.AsyncByteStream) and not isinstance(resp.stream, httpx.ByteStream):
                async for chunk in resp.aiter_raw():  # content given as a (possibly failing) async iterator
                    await out.write(chunk)
            else:
                try:
                    chunks = iter([resp.content])
                except httpx.ResponseNotRead:  # content given as a (possibly failing) iterator
                    chunks = resp.iter_raw()
                for chunk in chunks:
                    await out.write(chunk)
        except httpx.TransportError:
            request.transport.close()  # type: ignore[union-attr]
            return out
        await out.write_eof()
        return out
