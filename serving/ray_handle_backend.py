"""Backend over Ray Serve deployment handles, for a gateway that runs inside the Ray cluster
(`modgate up` with `serving.transport: handle`).

Each model is a Ray Serve LLM `LLMServer` deployment started with `server_cls` =
`serving.ray_app.handle_server_cls()`, which adds `chat_json(body, headers)`: plain dicts in and
out, so this side never imports vLLM. A call is one Ray actor call instead of an HTTP request
through Ray Serve's proxy and OpenAI ingress (two fewer hops). The W3C trace context travels
in `headers`, so the engine's span still joins the caller's trace. Streaming goes over HTTP
(the `http` fallback backend), since the handle method answers in one piece.

With `batch.max_size > 1` requests to one model share actor calls (`chat_json_batch`, through a
`HopBatcher`): one call carries several requests when calls are already in flight, none wait
when the model is idle.

Abandoned work is cancelled on the replica: awaiting a Serve `DeploymentResponse` and then
being cancelled (deadline, caller gone) does not cancel the remote call by itself in Ray 2.60
(`DeploymentResponse.__await__` only re-raises), so every call goes through
`_cancel_when_abandoned`, which calls `DeploymentResponse.cancel()`: Serve cancels the actor
task, and vLLM aborts the request when the replica's coroutine is cancelled. A batched call is
cancelled once every request in it has been given up (see serving/hop_batcher.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.config import HandleBatchConfig
from serving.errors import (
    BackendBadRequest,
    BackendOverloaded,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)
from serving.hop_batcher import HopBatcher
from serving.http_backend import OpenAIHttpBackend, build_chat_body, parse_completion, trace_headers
from serving.protocol import ChatChunk, ChatRequest, ChatResult

__all__ = ["RayHandleBackend"]


async def _cancel_when_abandoned(response: Any) -> Any:
    """Await a Serve `DeploymentResponse`; if this await is cancelled, cancel the request too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class RayHandleBackend:
    def __init__(self, app_name: str, *, stream_fallback: OpenAIHttpBackend,
                 batch: HandleBatchConfig | None = None) -> None:
        self.app_name = app_name
        self._fallback = stream_fallback
        self._handles: dict[str, Any] = {}
        self._batch = batch if batch is not None and batch.max_size > 1 else None
        self._batchers: dict[str, HopBatcher[tuple[dict[str, Any], dict[str, str]], Any]] = {}

    def _batcher(self, model: str, handle: Any) -> HopBatcher[tuple[dict[str, Any], dict[str, str]], Any]:
        batcher = self._batchers.get(model)
        if batcher is None:
            assert self._batch is not None

            async def send(items: list[tuple[dict[str, Any], dict[str, str]]]) -> list[Any]:
                return list(await _cancel_when_abandoned(
                    handle.chat_json_batch.remote([b for b, _ in items], [h for _, h in items])))

            batcher = self._batchers[model] = HopBatcher(
                send, max_size=self._batch.max_size, max_wait_s=self._batch.max_wait_ms / 1000.0,
                max_hops=self._batch.max_hops)
        return batcher

    def _handle(self, model: str) -> Any:
        handle = self._handles.get(model)
        if handle is None:
            from ray import serve

            try:
                names = list(serve.status().applications[self.app_name].deployments)
            except KeyError:
                raise BackendUnavailable(f"Ray Serve application {self.app_name!r} is not running") from None
            name = next((n for n in names if n.endswith(f":{model}")), None)
            if name is None:
                raise BackendBadRequest(f"model {model!r} is not deployed in {self.app_name!r}")
            handle = self._handles[model] = serve.get_deployment_handle(name, app_name=self.app_name)
        return handle

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        from ray.exceptions import RayError

        start = time.perf_counter()
        try:
            handle = self._handle(request.model)
            body, headers = build_chat_body(request), trace_headers()
            if self._batch is None:
                call: Any = _cancel_when_abandoned(handle.chat_json.remote(body, headers))
            else:
                call = self._batcher(request.model, handle).submit((body, headers))
            data = await asyncio.wait_for(call, timeout_s)
        except TimeoutError as exc:
            raise BackendTimeout(f"no answer from deployment of {request.model!r} within {timeout_s:.1f}s") from exc
        except RayError as exc:  # actor died, replica unavailable, serve backpressure ...
            name = type(exc).__name__
            if "BackPressure" in name:
                raise BackendOverloaded(f"deployment of {request.model!r} is saturated: {name}") from exc
            raise BackendUnavailable(f"deployment of {request.model!r} failed: {name}") from exc
        if not isinstance(data, dict):
            raise BackendProtocolError("the deployment answered something that is not a chat completion")
        error = data.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            message = str(error.get("message") if isinstance(error, dict) else error)[:500]
            code = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else 500
            if code == 429:
                raise BackendOverloaded(f"model overloaded: {message}")
            if code >= 500:
                raise BackendUnavailable(f"engine error {code}: {message}")
            raise BackendBadRequest(f"engine rejected the request ({code}): {message}")
        return parse_completion(data, request.model, (time.perf_counter() - start) * 1000.0,
                                f"deployment of {request.model!r}")

    def batch_stats(self) -> dict[str, dict[str, Any]]:
        """Per model: Ray calls made, requests they carried, mean requests per call."""
        return {model: b.stats() for model, b in self._batchers.items()}

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        async for chunk in self._fallback.stream_chat(request, timeout_s=timeout_s):
            yield chunk

    async def check_health(self) -> dict[str, Any]:
        from ray import serve

        try:
            app = serve.status().applications[self.app_name]
        except Exception as exc:  # noqa: BLE001 - any failure to read status means not healthy
            raise BackendUnavailable(f"Ray Serve application {self.app_name!r}: {exc}") from None
        models = [n.split(":", 1)[1] for n, d in app.deployments.items()
                  if ":" in n and str(d.status).endswith("HEALTHY")]
        if not models:
            raise BackendUnavailable(f"no healthy model deployment in {self.app_name!r}")
        return {"models": models, "transport": "handle"}

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()
        await self._fallback.aclose()
