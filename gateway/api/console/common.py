"""What the console's route modules share: strict request bodies with the console's error
shape, and the type of the sign-in check (`routes.build_console_router` makes it: session
cookie, key re-checked, CSRF token and origin on writes, the scope the admin API asks)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from gateway.api.console.sessions import Session
from gateway.auth import _Anonymous
from gateway.problems import ApiError
from prompt_registry.keys import ApiKeyRecord

__all__ = ["Body", "Principal", "SignedIn", "parse_body"]

Principal = ApiKeyRecord | _Anonymous


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignedIn(Protocol):
    def __call__(self, request: Request, scope: str | None = None, *,
                 write: bool = False) -> Awaitable[tuple[Session, Principal]]: ...


def parse_body(model: type[BaseModel], payload: dict[str, Any]) -> Any:
    """*payload* validated as *model*; 422 `invalid_request` naming each bad field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        fields = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)",
                   "problem": "unknown field" if e["type"] == "extra_forbidden" else e["msg"]}
                  for e in exc.errors()]
        raise ApiError(422, "invalid_request", "request failed validation", fields=fields) from None
