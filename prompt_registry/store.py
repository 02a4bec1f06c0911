"""Store protocols. The gateway depends on `PromptReader` only; tools that write use `PromptStore`.

Versions are immutable and numbered by the store (1, 2, ...); publishing content identical to an
existing version returns that version. Labels (`production`, `canary`, any name) are mutable
pointers moved by compare-and-set. Every write leaves an audit entry.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from prompt_registry.models import PromptSpec, PromptVersion

__all__ = ["AuditEntry", "PromptReader", "PromptStore", "PublishResult"]


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime
    actor: str
    action: str  # "publish" | "label"
    prompt: str
    label: str | None = None
    from_version: int | None = None
    to_version: int | None = None
    note: str = ""


class PublishResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: PromptVersion
    created: bool


@runtime_checkable
class PromptReader(Protocol):
    def resolve(self, name: str, label: str) -> PromptVersion:
        """The version *label* points at. Raises PromptNotFound."""
        ...

    def get_version(self, name: str, version: int) -> PromptVersion:
        """Raises PromptNotFound."""
        ...

    def list_prompts(self) -> list[str]: ...


@runtime_checkable
class PromptStore(PromptReader, Protocol):
    def publish(self, spec: PromptSpec, *, actor: str, note: str = "") -> PublishResult: ...

    def set_label(
        self, name: str, label: str, version: int, *, expected: int | None = None,
        actor: str, note: str = "",
    ) -> int | None:
        """Point *label* at *version*; returns the previous version. When *expected* is given
        and the label currently points elsewhere, raise LabelConflict and change nothing."""
        ...

    def labels(self, name: str) -> dict[str, int]: ...

    def audit(self, name: str) -> list[AuditEntry]: ...

    def close(self) -> None: ...
