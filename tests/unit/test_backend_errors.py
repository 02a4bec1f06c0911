"""Backend errors carry our own message, a reference id and safe fields, never upstream text
(issue 18): the error types themselves, and the Ray handle backend's path (Ray exceptions and
the engine's error dicts), with fake handles."""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import traceback
from typing import Any

import pytest

from serving import (
    BackendBadRequest,
    BackendError,
    BackendModelNotFound,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejectedInput,
    BackendTimeout,
    BackendUnavailable,
    ChatRequest,
)
from serving.errors import report_upstream
from serving.resilience import CircuitOpen

MARKER = "SECRET-MARKER-91ab"
RAY_TEXT = (f"ray::ServeReplica:llm:LLMServer:m.chat_json() (pid=4242, ip=10.0.0.7, actor_id=7d3c0ffee, "
            f"request_id=9c1f2e7a-5b1d) Traceback ... ValueError: {MARKER}")
RAY_BITS = ("Ray", "ServeReplica", "request_id", "9c1f2e7a", "actor_id", "BackPressure")
REQ = ChatRequest(model="moderation-small", messages=[{"role": "user", "content": "x"}], max_tokens=4)


def _assert_clean(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(exc, BackendError)
    for text in (str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))):
        assert MARKER not in text, text
    for bit in RAY_BITS:
        assert bit not in str(exc), str(exc)
    assert re.fullmatch(r"ref-[0-9a-f]{12}", exc.reference) and exc.reference in str(exc)
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert all(MARKER not in r.getMessage() for r in loud)
    assert any(exc.reference in r.getMessage() for r in loud)


# -- the error types ------------------------------------------------------------------------

def test_message_reference_and_safe_fields() -> None:
    exc = BackendUnavailable("the model server failed (HTTP 500)", kind="server_error", upstream_status=500,
                             upstream_body=f"boom {MARKER}".encode())
    assert exc.args == ("the model server failed (HTTP 500)",)
    assert str(exc) == f"the model server failed (HTTP 500) [{exc.reference}]"
    assert (exc.kind, exc.upstream_status, exc.upstream_length) == ("server_error", 500, len(f"boom {MARKER}"))
    assert re.fullmatch(r"[0-9a-f]{16}", exc.upstream_sha256 or "")
    assert MARKER not in repr(exc) and exc.reference in repr(exc) and "status=500" in repr(exc)
    assert not hasattr(exc, "upstream_text") and MARKER not in repr(vars(exc))
    assert BackendUnavailable("x").reference != BackendUnavailable("x").reference


def test_every_type_has_a_default_message_and_kind() -> None:
    for cls, kind in ((BackendError, "backend_error"), (BackendOverloaded, "overloaded"),
                      (BackendTimeout, "timeout"), (BackendUnavailable, "unavailable"),
                      (BackendBadRequest, "rejected"), (BackendRejectedInput, "rejected_input"),
                      (BackendProtocolError, "protocol_error")):
        exc = cls()
        assert exc.kind == kind and str(exc).startswith("the model server") and exc.reference in str(exc)
    assert CircuitOpen("circuit open for model 'm'", retry_after_s=2.0).kind == "circuit_open"
    assert issubclass(BackendModelNotFound, BackendBadRequest) and issubclass(BackendRejectedInput, BackendBadRequest)
    assert not issubclass(BackendModelNotFound, BackendRejectedInput)


def test_errors_survive_pickling_with_their_reference() -> None:
    for exc in (BackendUnavailable("down", kind="server_error", upstream_status=503, upstream_body=b"x"),
                BackendOverloaded("busy", 2.0), BackendModelNotFound("m"), CircuitOpen("open", 3.0),
                BackendRejectedInput(param="response_format", upstream_status=400)):
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc) and copy.args == exc.args
        assert vars(copy) == vars(exc)


def test_messages_are_bounded_and_causes_are_identifiers() -> None:
    assert len(BackendUnavailable("x" * 10_000).message) == 300
    assert BackendUnavailable(cause=KeyError(MARKER)).cause == "KeyError"
    assert BackendUnavailable(cause=f"not an identifier: {MARKER}").cause is None
    long_model = "m" * 500
    assert len(str(BackendModelNotFound(long_model))) < 200


def test_report_logs_fields_at_info_or_warning_and_text_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="modgate.serving.upstream")
    warn = report_upstream(BackendUnavailable(kind="server_error", upstream_status=500), f"a {MARKER}")
    info = report_upstream(BackendRejectedInput(upstream_status=400), f"b {MARKER}")
    levels = {r.levelno for r in caplog.records if r.levelno >= logging.INFO and warn.reference in r.getMessage()}
    assert levels == {logging.WARNING}
    levels = {r.levelno for r in caplog.records if r.levelno >= logging.INFO and info.reference in r.getMessage()}
    assert levels == {logging.INFO}
    assert all(MARKER not in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert sum(MARKER in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG) == 2


# -- the Ray handle backend -----------------------------------------------------------------

class _Answer:
    """Stands in for a Serve `DeploymentResponse` that answers (or raises) at once."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self):  # type: ignore[no-untyped-def]
        async def get() -> Any:
            if isinstance(self.value, BaseException):
                raise self.value
            return self.value
        return get().__await__()

    def cancel(self) -> None:
        pass


class _Method:
    def __init__(self, value: Any) -> None:
        self.value = value

    def remote(self, *args: object) -> _Answer:
        return _Answer(self.value)


class _Handle:
    def __init__(self, value: Any) -> None:
        self.chat_json = _Method(value)
        self.chat_json_batch = _Method([value])


def _ray_chat(value: Any, caplog: pytest.LogCaptureFixture) -> BaseException:
    from serving.http_backend import OpenAIHttpBackend
    from serving.ray_handle_backend import RayHandleBackend

    caplog.set_level(logging.DEBUG, logger="modgate.serving.upstream")

    async def run() -> BaseException:
        backend = RayHandleBackend("llm", stream_fallback=OpenAIHttpBackend("http://127.0.0.1:9/v1"))
        backend._handles[REQ.model] = _Handle(value)
        try:
            await backend.chat(REQ, timeout_s=5)
        except BackendError as exc:
            return exc
        finally:
            await backend.aclose()
        raise AssertionError("no error")

    return asyncio.run(run())


def _ray_errors() -> list[tuple[BaseException, type[BackendError], str]]:
    from ray.exceptions import RayActorError, RayError
    from ray.serve.exceptions import BackPressureError, RayServeException

    class RayTaskError(RayError):  # the shape of a remote traceback wrapped by Ray
        def __str__(self) -> str:
            return RAY_TEXT

    class ReplicaUnavailable(RayServeException):  # Serve's own errors are not RayErrors
        def __str__(self) -> str:
            return RAY_TEXT

    return [
        (RayTaskError(), BackendUnavailable, "deployment_failed"),
        (ReplicaUnavailable(), BackendUnavailable, "deployment_failed"),
        (RayActorError(error_msg=RAY_TEXT), BackendUnavailable, "deployment_failed"),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), BackendOverloaded, "overloaded"),
    ]


def test_ray_exceptions_keep_only_their_class_name(caplog: pytest.LogCaptureFixture) -> None:
    for ray_exc, cls, kind in _ray_errors():
        caplog.clear()
        raised = _ray_chat(ray_exc, caplog)
        assert type(raised) is cls and raised.kind == kind  # type: ignore[attr-defined]
        assert "'moderation-small'" in str(raised)
        assert raised.cause == type(ray_exc).__name__  # type: ignore[attr-defined]
        assert raised.__cause__ is None and raised.__suppress_context__
        _assert_clean(raised, caplog)


@pytest.mark.parametrize(
    ("error", "cls", "kind"),
    [
        ({"message": f"{RAY_TEXT}", "code": 500}, BackendUnavailable, "server_error"),
        ({"message": f"ValueError: {MARKER}", "code": 400}, BackendRejectedInput, "rejected_input"),
        ({"message": f"bad schema {MARKER}", "type": "BadRequestError", "param": "response_format", "code": 400},
         BackendRejectedInput, "rejected_input"),
        ({"message": f"The model `{MARKER}` does not exist.", "type": "NotFoundError", "code": 404},
         BackendModelNotFound, "model_not_found"),
        ({"message": f"queue full {MARKER}", "code": 429}, BackendOverloaded, "overloaded"),
        ({"message": f"no code {MARKER}"}, BackendUnavailable, "server_error"),
        (f"a bare string {MARKER}", BackendUnavailable, "server_error"),
    ],
)
def test_engine_error_dicts_are_classified_without_their_text(error: Any, cls: type[BackendError], kind: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    raised = _ray_chat({"error": error}, caplog)
    assert type(raised) is cls and raised.kind == kind  # type: ignore[attr-defined]
    assert raised.upstream_length is not None  # type: ignore[attr-defined]
    if isinstance(raised, BackendModelNotFound):
        assert raised.model == REQ.model and "'moderation-small'" in str(raised)
    if isinstance(raised, BackendRejectedInput) and isinstance(error, dict) and error.get("param"):
        assert raised.param == "response_format"
    _assert_clean(raised, caplog)


@pytest.mark.parametrize("answer", [f"not a dict {MARKER}", {"choices": [{"message": MARKER}]}])
def test_malformed_deployment_answers_are_protocol_errors(answer: Any, caplog: pytest.LogCaptureFixture) -> None:
    raised = _ray_chat(answer, caplog)
    assert isinstance(raised, BackendProtocolError)
    _assert_clean(raised, caplog)


def test_the_handle_health_check_leaves_the_event_loop_free_while_serve_is_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve.status()` blocks while the Serve controller recovers a killed replica (seen in the
    engine-kill drill: /readyz hung past its client's 30 s). The readiness probe's timeout must
    end the wait, and the loop must go on serving meanwhile."""
    import threading
    from types import SimpleNamespace

    from ray import serve

    from serving.http_backend import OpenAIHttpBackend
    from serving.ray_handle_backend import RayHandleBackend

    release = threading.Event()

    def slow_status() -> Any:
        release.wait(10)  # a guard: without the fix this blocks the loop until released or 10 s
        return SimpleNamespace(applications={})

    monkeypatch.setattr(serve, "status", slow_status)

    async def run() -> tuple[bool, int]:
        backend = RayHandleBackend("llm", stream_fallback=OpenAIHttpBackend("http://127.0.0.1:9/v1"))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        try:
            await asyncio.wait_for(backend.check_health(), 0.3)
            timed_out = False
        except TimeoutError:
            timed_out = True
        finally:
            seen = ticks
            release.set()
            await tick_task
            await backend.aclose()
        return timed_out, seen

    timed_out, ticks = asyncio.run(run())
    assert timed_out, "the probe's timeout could not end a blocked serve.status()"
    assert ticks >= 2, ticks  # the loop ran other work while the status call waited
