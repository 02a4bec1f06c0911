"""Version lifecycle: retiring a version without deleting it.

Versions are immutable and never deleted (the audit trail and the decision log name them), so
a version published by mistake would otherwise stay "latest" and assignable for ever. Each
version is in one of three states:

- `active`: the default; anything may point at it.
- `deprecated`: no *new* pointers. No label move, rollout or approval may target it; labels
  that already point at it keep serving (views warn about them), and requests that pin it are
  still answered, marked deprecated, so callers can migrate without an outage.
- `blocked`: refused everywhere. Nothing may point at it: blocking is refused while a label
  points at it or an active rollout serves it (move the label or abort the rollout first), a
  label move to it is refused, and a request pinning it is refused (410 `version_blocked`).

"latest" (listings, the console, which version's gate block the policy views compare) is the
highest version that is neither deprecated nor blocked. Both changes are reversible (back to
`active`) and each is audited as action "lifecycle" with the version as `to_version`.

One record per prompt, written by compare-and-set on `revision` like the gate policy and the
four-eyes record, so two operators changing states at once cannot lose a change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prompt_registry.errors import RegistryError

__all__ = [
    "LIFECYCLE_STATES", "LifecycleRecord", "VersionBlocked", "VersionRetired", "VersionState",
    "VersionStatus", "assignable_or_raise", "latest_active", "state_in",
]

VersionState = Literal["active", "deprecated", "blocked"]
LIFECYCLE_STATES: tuple[VersionState, ...] = ("active", "deprecated", "blocked")


class VersionRetired(RegistryError):
    """A new pointer (label move, rollout, approval) names a deprecated or blocked version, or a
    version cannot be blocked because something points at it. Callers answer 409."""

    def __init__(self, message: str, *, prompt: str, version: int, state: VersionState) -> None:
        super().__init__(message)
        self.prompt = prompt
        self.version = version
        self.state = state


class VersionBlocked(VersionRetired):
    """A request pinned a blocked version (callers answer 410: it will not come back unless an
    operator reinstates it)."""


class VersionStatus(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    state: VersionState
    reason: str = ""
    set_by: str = Field(..., min_length=1)
    set_at: datetime


class LifecycleRecord(BaseModel):
    """The non-active states of one prompt's versions (an absent version is active)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(..., min_length=1)
    revision: int = Field(..., ge=0, description="0 before the first write, +1 per change")
    versions: dict[int, VersionStatus] = Field(default_factory=dict)

    def state_of(self, version: int) -> VersionState:
        status = self.versions.get(version)
        return "active" if status is None else status.state

    def with_state(self, version: int, status: VersionStatus) -> LifecycleRecord:
        """The next revision with *version* set to *status* (`active` removes the entry)."""
        versions = {v: s for v, s in self.versions.items() if v != version}
        if status.state != "active":
            versions[version] = status
        return self.model_copy(update={"revision": self.revision + 1, "versions": versions})


def state_in(record: LifecycleRecord | None, version: int) -> VersionState:
    return "active" if record is None else record.state_of(version)


def assignable_or_raise(record: LifecycleRecord | None, prompt: str, version: int, *,
                        what: str) -> None:
    """Raise VersionRetired when *version* may not receive a new pointer (*what*: "label
    'production'", "rollout", ... for the message)."""
    state = state_in(record, version)
    if state == "active":
        return
    status = record.versions[version] if record is not None else None
    why = f" ({status.reason})" if status is not None and status.reason else ""
    raise VersionRetired(f"{prompt} v{version} is {state}{why}: it cannot become the target of "
                         f"a new {what}; publish a new version or reinstate v{version} with "
                         f"`modgate prompts reinstate {prompt} {version}`",
                         prompt=prompt, version=version, state=state)


def latest_active(versions: list[int], record: LifecycleRecord | None) -> int | None:
    """The highest version that is neither deprecated nor blocked (None when there is none)."""
    return max((v for v in versions if state_in(record, v) == "active"), default=None)
