"""Exception tree of the serving layer. Backends raise these; they never return error objects."""

from __future__ import annotations

__all__ = [
    "BackendBadRequest",
    "BackendError",
    "BackendOverloaded",
    "BackendProtocolError",
    "BackendTimeout",
    "BackendUnavailable",
]


class BackendError(Exception):
    """Base of every error a backend raises on purpose."""

    retryable: bool = False


class BackendOverloaded(BackendError):
    """The model is saturated (HTTP 429 or a full queue). Retry after `retry_after_s`."""

    retryable = True

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendTimeout(BackendError):
    """No answer within the request's deadline."""

    retryable = True


class BackendUnavailable(BackendError):
    """Connection refused or reset, engine dead, or a 5xx from the server."""

    retryable = True


class BackendBadRequest(BackendError):
    """The server rejected the request (4xx other than 429): our bug or a bad configuration."""


class BackendProtocolError(BackendError):
    """The server answered something that is not a valid OpenAI chat completion."""
