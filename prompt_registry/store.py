"""Store protocols, one per facet, so each consumer can be typed by what it touches.

A store holds nine kinds of state with different readers, writers and risks; a consumer typed by
the whole `PromptStore` could quietly start writing anything. The facets:

- `PromptReader`: versions, labels and the audit log, change events, health. The hot path
  (prompt cache) and read-only tools.
- `PromptWriter`: publishing and label moves (extends the reader: a compare-and-set writer must
  read what it replaces, and every write is audited).
- `RolloutReader` / `RolloutStore`: rollouts and their shared counters and flip records.
- `ScorecardReader` / `ScorecardStore`: evaluation scorecards the promotion gate reads.
- `GatePolicyReader` / `GatePolicyStore`: each prompt's promotion gate policy kept in the
  registry (`gates.GatePolicy`), which the gate reads before any version's own block.
- `FourEyesReader` / `FourEyesStore`: each prompt's four-eyes setting and its approval
  requests (`gates.FourEyesRecord`), which `gates.move_label` reads before a production move.
- `LifecycleReader` / `LifecycleStore`: each prompt's version states (`lifecycle.LifecycleRecord`:
  deprecated and blocked versions), read by every label move and by the hot path for pins.
- `KeyReader` / `KeyStore`: API-key records (the authenticator only ever reads).
- `MemoStore`: short-lived request id -> verdict memos that join reviewer feedback to rollouts.

`PromptStore` is all of them plus `close()`: what `gateway.stores.open_store` returns and what
code owning a store's lifetime holds. Each write facet extends its read facet, so a consumer
needs at most one facet per kind of state. A consumer needing facets of two kinds defines a
protocol inheriting both, next to itself (e.g. `gateway.prompt_cache.PromptCacheSource`). The
promotion gate's two are here (`GateReader`, `GatedWriter`): `prompt_registry.gates` cannot
import this module at run time (this module imports its ScorecardRecord), and every label move
to production, from the API, the CLI, seeding and rollouts, goes through the gate.

Versions are immutable and numbered by the store (1, 2, ...); publishing content identical to an
existing version returns that version. Labels (`production`, `canary`, any name) are mutable
pointers moved by compare-and-set. Every write leaves an audit entry.

All protocols are runtime-checkable, but `isinstance` only checks method names; signatures are
checked by mypy (tests/contract/test_store_facets.py runs it over both stores).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from prompt_registry.gates import FourEyesRecord, GatePolicy, ScorecardRecord
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.lifecycle import LifecycleRecord
from prompt_registry.models import PromptSpec, PromptVersion
from prompt_registry.rollouts import Rollout

__all__ = [
    "AuditEntry", "FourEyesReader", "FourEyesStore", "GatePolicyReader", "GatePolicyStore", "GateReader", "GatedWriter", "KeyReader",
    "KeyStore", "LifecycleReader", "LifecycleStore", "MemoStore",
    "PromptReader", "PromptStore", "PromptWriter", "PublishResult", "RolloutReader",
    "RolloutStore", "ScorecardReader", "ScorecardStore", "Subscription",
]


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime
    actor: str
    action: str  # "publish" | "label" | "rollout" | "scorecard" | "gate_policy" | "gate_refused" | ...
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
    """Reading prompts: what the hot path and read-only tools need. Change events and `ping`
    live here because every reader of a cached view needs them, whatever else it reads."""

    def resolve(self, name: str, label: str) -> PromptVersion:
        """The version *label* points at. Raises PromptNotFound."""
        ...

    def get_version(self, name: str, version: int) -> PromptVersion:
        """Raises PromptNotFound."""
        ...

    def versions(self, name: str) -> list[int]: ...

    def list_prompts(self) -> list[str]: ...

    def labels(self, name: str) -> dict[str, int]: ...

    def audit(self, name: str) -> list[AuditEntry]:
        """Every write concerning the prompt (publish, label, rollout, scorecard), oldest
        first. A read: reports and history views need it without write access."""
        ...

    def subscribe(self, callback: Callable[[str | None], None]) -> Subscription:
        """Call `callback(prompt_name)` from a background thread when a prompt changes (its
        versions, labels, rollout or scorecards), or `callback(None)` when anything may have
        changed (e.g. after a reconnect)."""
        ...

    def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...


@runtime_checkable
class PromptWriter(PromptReader, Protocol):
    """Publishing versions and moving labels (the registry's admin side)."""

    def publish(self, spec: PromptSpec, *, actor: str, note: str = "") -> PublishResult: ...

    def set_label(
        self, name: str, label: str, version: int, *, expected: int | None = None,
        actor: str, note: str = "",
    ) -> int | None:
        """Point *label* at *version*; returns the previous version. When *expected* is given
        and the label currently points elsewhere (0 = "the label must not exist yet"), raise
        LabelConflict and change nothing."""
        ...

    def record_audit(self, name: str, action: str, *, label: str | None = None,
                     from_version: int | None = None, to_version: int | None = None,
                     actor: str, note: str = "") -> None:
        """Append one audit entry that changes nothing else: a decision the registry refused
        or recorded (e.g. action "gate_refused": the promotion gate refused a production move,
        label = the production label, from = production, to = the candidate). One atomic
        write, announced as a change of the prompt like every other write, so the webhook
        dispatcher sees it. Raises PromptNotFound for an unknown prompt and ValueError for an
        action other writes own (publish, label, rollout, scorecard, gate_policy): a label
        move's audit entry may only come from the move itself (rollback reads them)."""
        ...


@runtime_checkable
class RolloutReader(Protocol):
    """Reading rollouts and their counters: the traffic split on the hot path, status views,
    the controller's judgement of a running rollout."""

    def get_rollout(self, prompt: str) -> Rollout | None:
        """The prompt's current (or last) rollout."""
        ...

    def list_rollouts(self) -> list[Rollout]: ...

    def rollout_stats(self, rollout_id: str) -> dict[str, int]: ...

    def rollout_flips(self, rollout_id: str, limit: int = 100) -> list[str]: ...


@runtime_checkable
class RolloutStore(RolloutReader, Protocol):
    """Starting and stepping rollouts (compare-and-set on the revision) and adding to their
    shared counters, which every replica does."""

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


@runtime_checkable
class ScorecardReader(Protocol):
    """Reading stored scorecards: the promotion gate and scorecard listings."""

    def get_scorecard(self, name: str, version: int, dataset_sha256: str) -> ScorecardRecord | None:
        """The stored scorecard of a version on a dataset, if any."""
        ...

    def list_scorecards(self, name: str, version: int | None = None) -> list[ScorecardRecord]:
        """Stored scorecards of a prompt (or of one version), by version then creation time."""
        ...


@runtime_checkable
class ScorecardStore(ScorecardReader, Protocol):
    """Storing scorecards (the offline evaluation's output, which the gate then trusts)."""

    def put_scorecard(self, record: ScorecardRecord, *, actor: str, note: str = "") -> bool:
        """Store the scorecard of (record.prompt, record.version) on record.dataset_sha256,
        replacing an earlier one for the same key (last write wins); returns True when it
        replaced one. Raises PromptNotFound for an unknown version and ScorecardMismatch when
        `record.version_hash` is not that version's content hash. Audited as action
        "scorecard" (to_version = the version) and announced as a change of the prompt."""
        ...


@runtime_checkable
class GatePolicyReader(Protocol):
    """Reading a prompt's gate policy record: the promotion gate and policy views."""

    def get_gate_policy(self, name: str) -> GatePolicy | None:
        """The prompt's gate policy kept in the registry, if one was ever set."""
        ...


@runtime_checkable
class GatePolicyStore(GatePolicyReader, Protocol):
    """Setting a prompt's gate policy: a protected change (callers check the `gates:write` or
    `admin` scope before calling)."""

    def put_gate_policy(self, policy: GatePolicy, *, expected_revision: int, actor: str,
                        note: str = "") -> None:
        """Store *policy* when the stored record has revision *expected_revision* (0: none may
        exist yet) and `policy.revision == expected_revision + 1`; raise GatePolicyConflict
        otherwise and PromptNotFound for an unknown prompt. Audited as action "gate_policy"
        (label "gate-policy", from/to version None) with *note*, and announced as a change of
        the prompt, in the same atomic write."""
        ...


@runtime_checkable
class FourEyesReader(Protocol):
    """Reading a prompt's four-eyes record: the promotion path and approval views."""

    def get_four_eyes(self, name: str) -> FourEyesRecord | None:
        """The prompt's four-eyes setting and approval requests, if ever set."""
        ...


@runtime_checkable
class FourEyesStore(FourEyesReader, Protocol):
    """Writing a prompt's four-eyes record: the setting (callers check the `admin` scope) and
    approval requests and their decisions (callers check the promote scope)."""

    def put_four_eyes(self, record: FourEyesRecord, *, expected_revision: int, actor: str,
                      action: str, label: str | None = None, from_version: int | None = None,
                      to_version: int | None = None, note: str = "") -> None:
        """Store *record* when the stored one has revision *expected_revision* (0: none may
        exist yet) and `record.revision == expected_revision + 1`; raise ApprovalConflict
        otherwise and PromptNotFound for an unknown prompt. Audited as *action* ("four_eyes",
        "approval_requested", "approval_approved", ...; not one another write owns) with the
        given label, versions and note, and announced, in the same atomic write."""
        ...


@runtime_checkable
class LifecycleReader(Protocol):
    """Reading a prompt's version states: label moves, rollouts and the hot path (pins)."""

    def get_lifecycle(self, name: str) -> LifecycleRecord | None:
        """The prompt's deprecated and blocked versions, if a state was ever set."""
        ...


@runtime_checkable
class LifecycleStore(LifecycleReader, Protocol):
    """Deprecating, blocking and reinstating versions (callers check the `admin` scope and the
    rules of `ops.set_version_state` before calling)."""

    def put_lifecycle(self, record: LifecycleRecord, *, expected_revision: int, actor: str,
                      version: int, note: str = "") -> None:
        """Store *record* when the stored one has revision *expected_revision* (0: none may
        exist yet) and `record.revision == expected_revision + 1`; raise LifecycleConflict
        otherwise and PromptNotFound for an unknown prompt. Audited as action "lifecycle"
        (label None, to_version *version*) with *note*, and announced as a change of the
        prompt, in the same atomic write."""
        ...


@runtime_checkable
class KeyReader(Protocol):
    """Looking up one API key: all the authenticator may do with key records."""

    def get_key(self, key_id: str) -> ApiKeyRecord | None: ...


@runtime_checkable
class KeyStore(KeyReader, Protocol):
    """Creating, listing and revoking API keys (admin CLI, local bootstrap)."""

    def put_key(self, record: ApiKeyRecord) -> None:
        """Insert or replace a key record (revocation replaces it with revoked=True)."""
        ...

    def list_keys(self) -> list[ApiKeyRecord]: ...


@runtime_checkable
class MemoStore(Protocol):
    """Verdict memos: written by the rollout recorder, read when reviewer feedback arrives."""

    def remember_verdicts(self, memos: dict[str, str], *, ttl_s: float) -> None:
        """Keep request id -> verdict memo (JSON) for *ttl_s*, so reviewer feedback arriving
        later can be matched to the rollout arm and version that answered."""
        ...

    def recall_verdict(self, request_id: str) -> str | None: ...


@runtime_checkable
class GateReader(PromptReader, ScorecardReader, GatePolicyReader, Protocol):
    """What the promotion gate reads (`gates.gate_report`): the candidate and production
    versions, the labels, the gate policy record and the stored scorecards."""


@runtime_checkable
class GatedWriter(PromptWriter, ScorecardReader, GatePolicyStore, FourEyesStore, LifecycleReader,
                  Protocol):
    """Moving labels through the promotion gate (`gates.move_label`, publishing with a label,
    seeding): a prompt writer that can also read the scorecards the gate judges by, keep a
    gate policy in force when production moves to a version with a weaker block, and record a
    four-eyes approval request instead of moving, and refuse a move to a retired version."""


@runtime_checkable
class PromptStore(PromptWriter, RolloutStore, ScorecardStore, GatePolicyStore, FourEyesStore,
                  LifecycleStore, KeyStore, MemoStore, Protocol):
    """Every facet, plus `close()`: for code that opens a store and owns its lifetime."""

    def close(self) -> None: ...
