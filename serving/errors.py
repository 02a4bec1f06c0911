"""Exception tree of the serving layer. Backends raise these; they never return error objects.

**Upstream text stays upstream** (issue 18). A model server's error text can carry what the
caller sent (vLLM quotes a rejected regex or JSON schema back), Ray's internal exception
classes and request ids. None of it may reach the caller, the gateway's log or a span, and
all three see a backend error only through `str(exc)` (the gateway answers it as the error
message and logs it for 5xx), `repr(exc)`, its `args` or its traceback. So, by construction:

- the message (`args[0]`) is always our own short text, built from our templates and values
  we chose (an HTTP status, the model name we asked for), never from an upstream body;
- `str(exc)` is that message plus a random **reference id** (`ref-` and 12 hex digits), which
  the caller can quote and an operator can find in the logs;
- what is known about the upstream answer travels as safe structured fields: `kind` (our
  classification), `upstream_status`, `upstream_length` and `upstream_sha256` (the body's size
  in bytes and a 16-hex-digit prefix of its SHA-256, enough to tell two answers apart or match
  one seen on the model server, not to read it) and `cause` (the class name of a transport or
  Ray exception, as a plain identifier, never its text). The upstream text itself is not kept;
- the backends raise these `from None`: a chained exception would put its text (a Ray
  traceback, a JSON decoder's message quoting the body) into every formatted traceback,
  including the exception event OpenTelemetry records on the span.

Logging (`report_upstream`): one line per upstream failure in `modgate.serving.upstream`, at
WARNING when the server failed (5xx, broken protocol, a model it does not serve, a dead
deployment) and INFO when it answered as designed (4xx, 429), with the fields above and never
upstream text. The text is logged only at DEBUG, only its first `DEBUG_EXCERPT_CHARS`
characters (control characters escaped), so it appears only when an operator turns that logger
to DEBUG to chase a failure - knowing it may contain what callers sent.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from typing import Any, ClassVar

__all__ = [
    "DEBUG_EXCERPT_CHARS",
    "BackendBadRequest",
    "BackendError",
    "BackendModelNotFound",
    "BackendOverloaded",
    "BackendProtocolError",
    "BackendRejectedInput",
    "BackendTimeout",
    "BackendUnavailable",
    "model_label",
    "new_reference",
    "report_upstream",
    "safe_identifier",
]

upstream_log = logging.getLogger("modgate.serving.upstream")

DEBUG_EXCERPT_CHARS = 200
_MAX_MESSAGE_CHARS = 300
_MAX_MODEL_CHARS = 100
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.()]{0,63}")
# Kinds logged at WARNING: the model server (or the way to it) failed, or is misconfigured.
_WARNING_KINDS = frozenset({"server_error", "stream_error", "protocol_error", "model_not_found",
                            "deployment_failed", "deployment_missing"})


def new_reference() -> str:
    """A random reference id for one failure, e.g. `ref-5f0c2a9be41d`."""
    return f"ref-{secrets.token_hex(6)}"


def safe_identifier(value: object) -> str | None:
    """*value* if it is a plain identifier (a class name, a parameter name), else None."""
    return value if isinstance(value, str) and _IDENTIFIER.fullmatch(value) else None


def model_label(model: str) -> str:
    """The model name we asked for, quoted and bounded, for a message."""
    return repr(model if len(model) <= _MAX_MODEL_CHARS else model[:_MAX_MODEL_CHARS] + "...")


class BackendError(Exception):
    """Base of every error a backend raises on purpose (see the module docstring)."""

    retryable: bool = False
    default_kind: ClassVar[str] = "backend_error"
    default_message: ClassVar[str] = "the model server failed"

    def __init__(self, message: str = "", *, kind: str | None = None, upstream_status: int | None = None,
                 upstream_body: bytes | str | None = None, cause: object = None,
                 reference: str | None = None) -> None:
        message = (message or self.default_message)[:_MAX_MESSAGE_CHARS]
        super().__init__(message)
        self.message = message
        self.kind = kind or self.default_kind
        self.reference = reference or new_reference()
        self.upstream_status = upstream_status
        self.upstream_length: int | None = None
        self.upstream_sha256: str | None = None
        if upstream_body is not None:
            data = upstream_body.encode("utf-8", "replace") if isinstance(upstream_body, str) else upstream_body
            self.upstream_length = len(data)
            self.upstream_sha256 = hashlib.sha256(data).hexdigest()[:16]
        if cause is not None and not isinstance(cause, str):
            cause = type(cause).__name__
        self.cause = safe_identifier(cause)

    def __str__(self) -> str:
        return f"{self.message} [{self.reference}]"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.log_fields()})"

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.message, dict(self.__dict__))

    def log_fields(self) -> str:
        """The safe fields as `key=value` pairs, for a log line."""
        fields: list[tuple[str, object]] = [("kind", self.kind), ("ref", self.reference)]
        if self.upstream_status is not None:
            fields.append(("status", self.upstream_status))
        if self.cause is not None:
            fields.append(("cause", self.cause))
        if self.upstream_length is not None:
            fields += [("body_bytes", self.upstream_length), ("body_sha256", self.upstream_sha256)]
        return " ".join(f"{k}={v}" for k, v in fields)


def _rebuild(cls: type[BackendError], message: str, state: dict[str, Any]) -> BackendError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class BackendOverloaded(BackendError):
    """The model is saturated (HTTP 429 or a full queue). Retry after `retry_after_s`."""

    retryable = True
    default_kind = "overloaded"
    default_message = "the model server is overloaded"

    def __init__(self, message: str = "", retry_after_s: float | None = None, *, kind: str | None = None,
                 upstream_status: int | None = None, upstream_body: bytes | str | None = None,
                 cause: object = None, reference: str | None = None) -> None:
        super().__init__(message, kind=kind, upstream_status=upstream_status, upstream_body=upstream_body,
                         cause=cause, reference=reference)
        self.retry_after_s = retry_after_s


class BackendTimeout(BackendError):
    """No answer within the request's deadline."""

    retryable = True
    default_kind = "timeout"
    default_message = "the model server did not answer in time"


class BackendUnavailable(BackendError):
    """Connection refused or reset, engine dead, or a 5xx from the server."""

    retryable = True
    default_kind = "unavailable"
    default_message = "the model server is unavailable"


class BackendBadRequest(BackendError):
    """The server rejected the request (4xx other than 429): our bug or a bad configuration."""

    default_kind = "rejected"
    default_message = "the model server rejected the request"


class BackendRejectedInput(BackendBadRequest):
    """The server refused the request's content (HTTP 400, 413 or 422): its messages, sampling
    parameters or output constraint. Whose fault that is depends on who wrote them: the
    caller's on a raw chat completion (the gateway should answer 400), our prompt's otherwise
    (a bad regex in a prompt version: 502). `param` names the parameter at fault when the
    server said which and it is one of the chat completion's own parameter names."""

    default_kind = "rejected_input"
    PARAMS: ClassVar[frozenset[str]] = frozenset({
        "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
        "stop", "n", "stream", "stream_options", "response_format", "structured_outputs", "priority"})

    def __init__(self, message: str = "", *, param: object = None, kind: str | None = None,
                 upstream_status: int | None = None, upstream_body: bytes | str | None = None,
                 cause: object = None, reference: str | None = None) -> None:
        self.param = param if isinstance(param, str) and param in self.PARAMS else None
        if not message:
            what = f"the request's {self.param!r}" if self.param else "the request"
            status = f" (HTTP {upstream_status})" if upstream_status is not None else ""
            message = f"the model server rejected {what}{status}"
        super().__init__(message, kind=kind, upstream_status=upstream_status, upstream_body=upstream_body,
                         cause=cause, reference=reference)


class BackendModelNotFound(BackendBadRequest):
    """The model server does not serve the model we asked for (an OpenAI-style 404
    `model_not_found`, or the model's deployment is missing). Names only the model we asked
    for: a configuration error (a prompt version or the gateway's model list names a model
    the server does not run), never the caller's."""

    default_kind = "model_not_found"

    def __init__(self, model: str, message: str = "", *, kind: str | None = None,
                 upstream_status: int | None = None, upstream_body: bytes | str | None = None,
                 cause: object = None, reference: str | None = None) -> None:
        super().__init__(message or f"the model server does not serve model {model_label(model)}", kind=kind,
                         upstream_status=upstream_status, upstream_body=upstream_body, cause=cause,
                         reference=reference)
        self.model = model


class BackendProtocolError(BackendError):
    """The server answered something that is not a valid OpenAI chat completion."""

    default_kind = "protocol_error"
    default_message = "the model server's answer is not a chat completion"


def report_upstream(exc: BackendError, upstream_text: bytes | str | None = None, *,
                    where: str = "model server") -> BackendError:
    """Log *exc*'s safe fields (WARNING or INFO, see the module docstring) and, at DEBUG only,
    the first `DEBUG_EXCERPT_CHARS` characters of *upstream_text*; returns *exc* to raise."""
    level = logging.WARNING if exc.kind in _WARNING_KINDS else logging.INFO
    upstream_log.log(level, "%s failed: %s %s", where, type(exc).__name__, exc.log_fields())
    if upstream_text is not None and upstream_log.isEnabledFor(logging.DEBUG):
        text = upstream_text.decode("utf-8", "replace") if isinstance(upstream_text, bytes) else upstream_text
        excerpt = text[:DEBUG_EXCERPT_CHARS].encode("unicode_escape").decode("ascii")
        upstream_log.debug("%s upstream text of %s (first %d of %d chars): %s", where, exc.reference,
                           min(len(text), DEBUG_EXCERPT_CHARS), len(text), excerpt)
    return exc
