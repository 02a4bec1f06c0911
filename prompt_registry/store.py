"""Store protocols. The gateway depends on `PromptReader` only; tools that write use `PromptStore`.

Versions are immutable and numbered by the store (1, 2, ...); publishing content identical to an
existing version returns that version. Labels (`production`, `canary`, any name) are mutable
pointers moved by compare-and-set. Every write leaves an audit entry.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from prompt_registry.gates import ScorecardRecord
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.models import PromptSpec, PromptVersion
from prompt_registry.rollouts import Rollout

__all__ = ["AuditEntry", "PromptReader", "PromptStore", "PublishResult", "Subscription"]


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime
    actor: str
    action: str  # "publish" | "label" | "rollout" | "scorecard"
    prompt: str
    label: str | None = None
    from_version: int | None = None
    to_version: int | None = None
    note: str = ""


class PublishResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: PromptVersion
    created: bool


class Subscription(Protocol):
    def close(self) -> None: ...


@runtime_checkable
class PromptReader(Protocol):
    def resolve(self, name: str, label: str) -> PromptVersion:
        """The version *label* points at. Raises PromptNotFound."""
        ...

    def get_version(self, name: str, version: int) -> PromptVersion:
        """Raises PromptNotFound."""
        ...

    def list_prompts(self) -> list[str]: ...

    def labels(self, name: str) -> dict[str, int]: ...

    def get_rollout(self, prompt: str) -> Rollout | None:
        """The prompt's current (or last) rollout."""
        ...

    def get_scorecard(self, name: str, version: int, dataset_sha256: str) -> ScorecardRecord | None:
        """The stored scorecard of a version on a dataset, if any."""
        ...

    def subscribe(self, callback: Callable[[str | None], None]) -> Subscription:
        """Call `callback(prompt_name)` from a background thread when a prompt changes, or
        `callback(None)` when anything may have changed (e.g. after a reconnect)."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...


@runtime_checkable
class PromptStore(PromptReader, Protocol):
    def publish(self, spec: PromptSpec, *, actor: str, note: str = "") -> PublishResult: ...

    def set_label(
        self, name: str, label: str, version: int, *, expected: int | None = None,
        actor: str, note: str = "",
    ) -> int | None:
        """Point *label* at *version*; returns the previous version. When *expected* is given
        and the label currently points elsewhere (0 = "the label must not exist yet"), raise
        LabelConflict and change nothing."""
        ...

    def versions(self, name: str) -> list[int]: ...

    def audit(self, name: str) -> list[AuditEntry]: ...

    def list_rollouts(self) -> list[Rollout]: ...

    def put_scorecard(self, record: ScorecardRecord, *, actor: str, note: str = "") -> bool:
        """Store the scorecard of (record.prompt, record.version) on record.dataset_sha256,
        replacing an earlier one for the same key (last write wins); returns True when it
        replaced one. Raises PromptNotFound for an unknown version and ScorecardMismatch when
        `record.version_hash` is not that version's content hash. Audited as action
        "scorecard" (to_version = the version) and announced as a change of the prompt."""
        ...

    def list_scorecards(self, name: str, version: int | None = None) -> list[ScorecardRecord]:
        """Stored scorecards of a prompt (or of one version), by version then creation time."""
        ...

    def put_rollout(self, rollout: Rollout, *, expected_revision: int | None, actor: str,
                    note: str = "") -> None:
        """Store *rollout* if the stored one has `expected_revision` (None: no rollout stored
        for the prompt, or only a finished one). Raises RolloutConflict otherwise. Audited as
        action "rollout" and announced as a change of the prompt."""
        ...

    def add_rollout_stats(self, rollout_id: str, counters: dict[str, int],
                          flips: list[str] | None = None, *, keep_flips: int = 500) -> None:
        """Add to a rollout's shared counters; append flipped-item records (JSON), keeping the
        newest *keep_flips*."""
        ...

    def rollout_stats(self, rollout_id: str) -> dict[str, int]: ...

    def rollout_flips(self, rollout_id: str, limit: int = 100) -> list[str]: ...

    def remember_verdicts(self, memos: dict[str, str], *, ttl_s: float) -> None:
        """Keep request id -> verdict memo (JSON) for *ttl_s*, so reviewer feedback arriving
        later can be matched to the rollout arm and version that answered."""
        ...

    def recall_verdict(self, request_id: str) -> str | None: ...

    def get_key(self, key_id: str) -> ApiKeyRecord | None: ...

    def put_key(self, record: ApiKeyRecord) -> None:
        """Insert or replace a key record (revocation replaces it with revoked=True)."""
        ...

    def list_keys(self) -> list[ApiKeyRecord]: ...

    def close(self) -> None: ...
