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

Failures carry our own messages (serving/errors.py): a Ray exception's class name and text
(which hold Ray's internal request ids and, in a task error, the replica's traceback) and the
engine's error message (which can quote the caller's regex or schema) never reach `str(exc)`;
Ray exceptions are not chained. The class name is kept as the error's `cause` and logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from serving.config import HandleBatchConfig
from serving.errors import (
    BackendError,
    BackendModelNotFound,
    BackendOverloaded,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    model_label,
    report_upstream,
)
from serving.hop_batcher import HopBatcher
from serving.http_backend import (
    OpenAIHttpBackend,
    build_chat_body,
    error_status,
    parse_completion,
    trace_headers,
    upstream_error,
)
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
                raise self._report(BackendUnavailable("the model server's Ray Serve application is not running",
                                                      kind="deployment_missing")) from None
            name = next((n for n in names if n.endswith(f":{model}")), None)
            if name is None:
                raise self._report(BackendModelNotFound(model, kind="model_not_found"))
            handle = self._handles[model] = serve.get_deployment_handle(name, app_name=self.app_name)
        return handle

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        start = time.perf_counter()
        try:
            handle = self._handle(request.model)
            body, headers = build_chat_body(request), trace_headers()
            if self._batch is None:
                call: Any = _cancel_when_abandoned(handle.chat_json.remote(body, headers))
            else:
                call = self._batcher(request.model, handle).submit((body, headers))
            data = await asyncio.wait_for(call, timeout_s)
        except TimeoutError:
            raise self._report(BackendTimeout(
                f"no answer from the deployment of model {model_label(request.model)} within {timeout_s:.1f}s",
                cause="TimeoutError")) from None
        except (RayError, RayServeException) as exc:  # actor died, replica unavailable, back-pressure ...
            # (Serve's BackPressureError, DeploymentUnavailableError and ReplicaUnavailableError
            # are RayServeExceptions, not RayErrors.)
            raise self._report(ray_error(exc, request.model), str(exc)) from None
        if not isinstance(data, dict):
            raise self._report(BackendProtocolError(
                "the model deployment answered something that is not a chat completion",
                cause=type(data).__name__))
        error = data.get("error")
        if error is not None:
            status = error_status(error.get("code") if isinstance(error, dict) else None) or 500
            raw = _dumps(error)
            raise self._report(upstream_error(status, data, raw, request.model), raw)
        return parse_completion(data, request.model, (time.perf_counter() - start) * 1000.0,
                                f"ray-serve:{self.app_name}")

    def _report(self, exc: BackendError, upstream_text: bytes | str | None = None) -> BackendError:
        return report_upstream(exc, upstream_text, where=f"ray-serve:{self.app_name}")

    def batch_stats(self) -> dict[str, dict[str, Any]]:
        """Per model: Ray calls made, requests they carried, mean requests per call."""
        return {model: b.stats() for model, b in self._batchers.items()}

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        async for chunk in self._fallback.stream_chat(request, timeout_s=timeout_s):
            yield chunk

    async def check_health(self) -> dict[str, Any]:
        from ray import serve

        try:
            # serve.status() blocks on the Serve controller, which can take many seconds while
            # it recovers a killed replica: in a thread, so the readiness probe's timeout can end
            # the wait and the event loop goes on serving (on the loop it froze /readyz and
            # every request with it).
            status = await asyncio.to_thread(serve.status)
            app = status.applications[self.app_name]
        except Exception as exc:  # noqa: BLE001 - any failure to read status means not healthy
            raise BackendUnavailable("the model server's Ray Serve application is not running",
                                     kind="deployment_missing", cause=exc) from None
        models = [n.split(":", 1)[1] for n, d in app.deployments.items()
                  if ":" in n and str(d.status).endswith("HEALTHY")]
        if not models:
            raise BackendUnavailable("no healthy model deployment in the model server's Ray Serve application",
                                     kind="deployment_failed")
        return {"models": models, "transport": "handle"}

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()
        await self._fallback.aclose()


def ray_error(exc: BaseException, model: str) -> BackendError:
    """Our error for a Ray exception raised by a call to *model*'s deployment: overloaded for
    Serve's back-pressure, unavailable otherwise. Only the class name is kept (as `cause`),
    never the exception's text, which holds Ray's request ids and the replica's traceback."""
    name = type(exc).__name__
    label = model_label(model)
    if "BackPressure" in name:
        return BackendOverloaded(f"the deployment of model {label} is saturated", kind="overloaded", cause=name)
    return BackendUnavailable(f"the deployment of model {label} failed", kind="deployment_failed", cause=name)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return repr(value).encode("utf-8", "replace")
