"""Registry operations shared by the CLI and the admin API: publish from files, label moves,
rollback, diff and summaries, the check that a version's model is served, changing a
prompt's gate policy, four eyes (the setting, approving and denying requests), and the version
lifecycle (deprecating, blocking and reinstating versions). Each operation is one atomic store write or none (a production move to a
version with a weaker `evaluation` block may first keep the policy in force: see
`gates.move_label`)."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from prompt_registry.errors import (
    ApprovalClosed,
    GatePolicyConflict,
    GatePolicyInvalid,
    PromptNotFound,
    RegistryError,
    SelfApproval,
    UnservedModel,
)
from prompt_registry.gates import (
    APPROVAL_EXPIRY_S,
    ApprovalRequest,
    FourEyesRecord,
    GateOverride,
    GatePolicy,
    GateReport,
    PolicyInForce,
    compare_blocks,
    move_label,
    policy_in_force,
)
from prompt_registry.lifecycle import (
    LifecycleRecord,
    VersionBlocked,
    VersionRetired,
    VersionState,
    VersionStatus,
    latest_active,
    state_in,
)
from prompt_registry.loader import load_prompt_file
from prompt_registry.models import (
    AGGREGATES,
    EACH_CATEGORY,
    NO_CATEGORY,
    EvaluationSpec,
    PromptSpec,
    PromptVersion,
)
from prompt_registry.store import (
    GateReader,
    LifecycleReader,
    PromptReader,
    PromptStore,
    PublishResult,
)

__all__ = ["GatePolicyChange", "NothingToRollBack", "PromptSummary", "approvals_view",
           "approve_request", "check_model_served", "deny_request", "diff_versions", "gate_policy_diff", "gate_policy_view", "policy_changes",
           "publish_file", "rollback", "set_four_eyes", "set_gate_policy", "set_label", "set_version_state",
           "spec_as_yaml", "summarize"]


class NothingToRollBack(RegistryError):
    """The label has no earlier version to go back to."""


@dataclass(frozen=True)
class PromptSummary:
    """A prompt's versions and labels. `latest` is the highest version neither deprecated nor
    blocked; `states` names the versions that are (absent: active)."""

    name: str
    versions: list[int]
    labels: dict[str, int]
    lifecycle: LifecycleRecord | None = None

    @property
    def latest(self) -> int | None:
        return latest_active(self.versions, self.lifecycle)

    @property
    def states(self) -> dict[int, VersionState]:
        return {} if self.lifecycle is None else {v: s.state for v, s in self.lifecycle.versions.items()}

    def warnings(self) -> list[str]:
        """Labels that point at a deprecated version (they keep working; they should move)."""
        return [f"label {label!r} points at v{v}, which is deprecated"
                for label, v in sorted(self.labels.items()) if self.states.get(v) == "deprecated"]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": self.versions, "latest": self.latest,
                "labels": self.labels, "states": {str(v): s for v, s in sorted(self.states.items())},
                "warnings": self.warnings()}


def check_model_served(version: PromptVersion | PromptSpec, served: Collection[str] | None) -> None:
    """Raise UnservedModel (naming the model and the served ones) when a model *version* calls
    (its `model:` or its cascade's) is not one the serving layer serves. *served* None: nothing
    known, no check (tests, tools without a serving configuration). For publishing, rollout
    starts and every label move (rollbacks and approved requests included): callers holding
    `moderate:pin` reach any label, so no label may point at a version the serving layer
    cannot run."""
    if served is None:
        return
    spec = version.spec if isinstance(version, PromptVersion) else version
    for model in spec.models():
        if model not in served:
            number = version.version if isinstance(version, PromptVersion) else None
            raise UnservedModel(model, sorted(served), prompt=spec.name, version=number)


def publish_file(store: PromptStore, path: Path, *, actor: str, note: str = "",
                 label: str | None = None, expected: int | None = None,
                 override: GateOverride | None = None, production_label: str = "production",
                 served_models: Collection[str] | None = None, holder: str | None = None,
                 ) -> tuple[PublishResult, int | None]:
    """Publish a YAML or Markdown prompt file; optionally point *label* at the result (through
    the promotion gate when it is the production label: the version stays published when the
    gate refuses the label move). A file whose `model:` is not in *served_models* (when given)
    is refused before anything is written."""
    spec = load_prompt_file(path)
    check_model_served(spec, served_models)
    result = store.publish(spec, actor=actor, note=note)
    previous = None
    if label is not None:
        previous, _ = move_label(store, spec.name, label, result.version.version, expected=expected,
                                 actor=actor, note=note or f"published from {path.name}",
                                 override=override, production_label=production_label,
                                 holder=holder)
    return result, previous


def set_label(store: PromptStore, name: str, label: str, version: int, *, actor: str,
              expected: int | None = None, note: str = "", override: GateOverride | None = None,
              production_label: str = "production",
              served_models: Collection[str] | None = None,
              holder: str | None = None) -> tuple[int | None, GateReport | None]:
    """Move a label by hand; the production label goes through the promotion gate. No label
    may point at a version whose model is not served (when *served_models* is given): a caller
    pinning the label would get errors, not verdicts. Under four eyes a production move raises
    ApprovalRequired (*holder*: the requesting key holder, default *actor*)."""
    check_model_served(store.get_version(name, version), served_models)
    return move_label(store, name, label, version, expected=expected, actor=actor, note=note,
                      override=override, production_label=production_label, holder=holder)


def rollback(store: PromptStore, name: str, label: str, *, actor: str, note: str = "",
             served_models: Collection[str] | None = None) -> tuple[int, int]:
    """Point *label* back at the version it pointed at before its latest move.

    Returns (from_version, to_version). Compare-and-set against the current version, so a
    concurrent move makes this fail with LabelConflict instead of undoing someone else's work.
    Not judged by the promotion gate: the target held the label before, and in an incident
    nothing should stand between an operator and the previous version; so a deprecated target
    is allowed too (only a blocked one is refused). A target whose model the serving layer no
    longer serves (*served_models*) is refused like any label move: it would answer nobody,
    and the refusal names the model where the rollback would have failed every request.
    """
    current = store.labels(name).get(label)
    if current is None:
        raise PromptNotFound(f"prompt {name!r} has no label {label!r}")
    moves = [e for e in store.audit(name) if e.action == "label" and e.label == label]
    if not moves or moves[-1].to_version != current or moves[-1].from_version is None:
        raise NothingToRollBack(f"label {label!r} of {name!r} has no earlier version to roll back to")
    target = moves[-1].from_version
    if state_in(store.get_lifecycle(name), target) == "blocked":  # deprecated: allowed, an incident path
        raise VersionBlocked(f"label {label!r} of {name!r} cannot roll back to v{target}: it is blocked",
                             prompt=name, version=target, state="blocked")
    check_model_served(store.get_version(name, target), served_models)
    store.set_label(name, label, target, expected=current, actor=actor,
                    note=note or f"rollback from v{current}")
    return current, target


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so a diff of two prompts reads line by line."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_BlockDumper.add_representer(str, _str_representer)


def spec_as_yaml(version: PromptVersion) -> str:
    """A version as the YAML one would publish: fields left at null are left out (a diff of
    `max: null` lines says nothing), and the text parses back to the same spec."""
    return yaml.dump(version.spec.model_dump(mode="json", exclude_none=True), Dumper=_BlockDumper,
                     sort_keys=False, allow_unicode=True, width=100)


def diff_versions(a: PromptVersion, b: PromptVersion) -> str:
    """Unified diff of two versions' canonical YAML (empty when only metadata differs)."""
    return "".join(difflib.unified_diff(
        spec_as_yaml(a).splitlines(keepends=True), spec_as_yaml(b).splitlines(keepends=True),
        fromfile=f"{a.name}@v{a.version}", tofile=f"{b.name}@v{b.version}"))


def summarize(store: PromptReader, name: str) -> PromptSummary:
    """The prompt's versions and labels (and version states, when *store* keeps them);
    PromptNotFound for an unknown prompt."""
    versions = store.versions(name)
    if not versions:
        raise PromptNotFound(f"unknown prompt {name!r}")
    lifecycle = store.get_lifecycle(name) if isinstance(store, LifecycleReader) else None
    return PromptSummary(name=name, versions=versions, labels=store.labels(name), lifecycle=lifecycle)


# -- version lifecycle ------------------------------------------------------------------------

def set_version_state(store: PromptStore, name: str, version: int, state: VersionState, *,
                      actor: str, reason: str) -> bool:
    """Deprecate, block or reinstate (`active`) one version; returns False when it already was
    in *state* (nothing written). Needs a reason (audited as action "lifecycle").

    Blocking is refused (VersionRetired) while a label points at the version or a running or
    paused rollout serves it (as canary, stable or shadow): move the label or abort the
    rollout first, so that nothing already taking traffic is cut off by surprise. Deprecating
    is always allowed: existing pointers keep working. A compare-and-set on the record's
    revision: a concurrent change raises LifecycleConflict instead of being lost."""
    if not reason.strip():
        raise RegistryError("a reason is required (it is kept in the audit log)")
    store.get_version(name, version)  # PromptNotFound naming the version
    record = store.get_lifecycle(name)
    current: VersionState = "active" if record is None else record.state_of(version)
    if current == state:
        return False
    if state == "blocked":
        pointing = sorted(label for label, v in store.labels(name).items() if v == version)
        if pointing:
            raise VersionRetired(
                f"{name} v{version} cannot be blocked: label(s) {', '.join(pointing)} point at it; "
                f"move them first (a blocked version answers no request)",
                prompt=name, version=version, state=current)
        rollout = store.get_rollout(name)
        if rollout is not None and rollout.state in ("running", "paused") and version in (
                rollout.stable_version, rollout.canary_version, *(s.version for s in rollout.shadows)):
            raise VersionRetired(
                f"{name} v{version} cannot be blocked: rollout {rollout.id} ({rollout.state}) "
                f"serves it; abort the rollout first", prompt=name, version=version, state=current)
    status = VersionStatus(state=state, reason=reason.strip(), set_by=actor, set_at=datetime.now(UTC))
    base = record or LifecycleRecord(prompt=name, revision=0)
    store.put_lifecycle(base.with_state(version, status), expected_revision=base.revision,
                        actor=actor, version=version, note=f"{current} -> {state}: {reason.strip()}")
    return True


# -- gate policy ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GatePolicyChange:
    """A gate policy change: what was in force, the new record, and the difference."""

    before: PolicyInForce
    after: GatePolicy
    diff: str               # unified diff of the two policies as YAML ("" when identical)
    changes: list[str]      # one line per change (dataset, criteria added or removed)
    written: bool           # False for a dry run

    def as_dict(self) -> dict[str, Any]:
        return {"before": self.before.as_dict(), "after": self.after.as_dict(), "diff": self.diff,
                "changes": self.changes, "written": self.written}


def _policy_yaml(evaluation: EvaluationSpec | None) -> str:
    if evaluation is None:
        return "# no gate\n"
    return yaml.dump(evaluation.model_dump(mode="json", exclude_none=True), Dumper=_BlockDumper,
                     sort_keys=False, allow_unicode=True, width=100)


def gate_policy_diff(before: EvaluationSpec | None, after: EvaluationSpec | None, *,
                     before_name: str = "in force", after_name: str = "proposed") -> str:
    """Unified diff of two gate policies as YAML (empty when they are the same)."""
    if before == after:
        return ""
    return "".join(difflib.unified_diff(
        _policy_yaml(before).splitlines(keepends=True), _policy_yaml(after).splitlines(keepends=True),
        fromfile=before_name, tofile=after_name))


def policy_changes(before: EvaluationSpec | None, after: EvaluationSpec | None) -> list[str]:
    """What changes from *before* to *after*, one line each, for audit notes and terminals."""
    if before == after:
        return []
    if before is None:
        assert after is not None
        return [f"gate added: dataset {after.dataset.sha256[:12]}, "
                + ", ".join(c.describe() for c in after.criteria)]
    if after is None:
        return ["gate removed: no gate"]
    out = []
    if before.dataset.sha256 != after.dataset.sha256:
        out.append(f"dataset {before.dataset.sha256[:12]} -> {after.dataset.sha256[:12]}")
    elif before.dataset.path != after.dataset.path:
        out.append(f"dataset path {before.dataset.path!r} -> {after.dataset.path!r}")
    out += [f"- {c.describe()}" for c in before.criteria if c not in after.criteria]
    out += [f"+ {c.describe()}" for c in after.criteria if c not in before.criteria]
    return out


def _check_categories(store: PromptReader, name: str, evaluation: EvaluationSpec | None,
                      production: int | None) -> None:
    """A policy's categories must be the prompt's (production's verdict schema, else the
    latest version's)."""
    if evaluation is None:
        return
    versions = store.versions(name)
    schema = store.get_version(name, production if production is not None else versions[-1]).spec.verdict
    known = [c for c in schema.categories if c != NO_CATEGORY]
    for i, crit in enumerate(evaluation.criteria):
        cat = crit.category
        if cat is not None and cat not in known and cat != EACH_CATEGORY and cat not in AGGREGATES:
            raise GatePolicyInvalid(
                f"criteria.{i}.category: {cat!r} is not a violation category of {name}; one of "
                f"{', '.join(known)}, '*', 'micro', 'flagged'")


def set_gate_policy(store: PromptStore, name: str, evaluation: EvaluationSpec | None, *,
                    actor: str, reason: str, expected_revision: int | None = None,
                    dry_run: bool = False, production_label: str = "production") -> GatePolicyChange:
    """Make *evaluation* (None: explicitly no gate) the gate policy in force for *name*, as
    the registry's record. A protected change: the callers require the `gates:write` (or
    `admin`) scope first. Needs a reason; compare-and-set on the record's revision
    (*expected_revision*, when given, must be the current one: 0 for none); audited with the
    changes, the old and new policy hashes and the reason. *dry_run* computes the change
    without writing it."""
    if not reason.strip():
        raise GatePolicyInvalid("a gate policy change needs a reason (recorded in the audit log)")
    summarize(store, name)  # PromptNotFound for an unknown prompt
    production = store.labels(name).get(production_label)
    _check_categories(store, name, evaluation, production)
    record = store.get_gate_policy(name)
    current = record.revision if record is not None else 0
    if expected_revision is not None and expected_revision != current:
        raise GatePolicyConflict(f"the gate policy of {name!r} is at revision {current}, not "
                                 f"{expected_revision}")
    before = policy_in_force(store, name, production)
    after = GatePolicy(prompt=name, revision=current + 1, evaluation=evaluation, set_by=actor,
                       set_at=datetime.now(UTC), reason=reason.strip())
    changes = policy_changes(before.evaluation, evaluation)
    diff = gate_policy_diff(before.evaluation, evaluation, before_name=before.label(),
                            after_name=f"registry gate policy r{after.revision} "
                                       f"(policy {after.sha256[:12]})")
    if not dry_run:
        what = "; ".join(changes) if changes else "no change of criteria or dataset"
        store.put_gate_policy(after, expected_revision=current, actor=actor, note=(
            f"r{after.revision} (policy {after.sha256[:12]}) replaces {before.label()}: {what} "
            f"| {after.reason}"))
    return GatePolicyChange(before=before, after=after, diff=diff, changes=changes,
                            written=not dry_run)


def gate_policy_view(store: GateReader, name: str, *,
                     production_label: str = "production") -> dict[str, Any]:
    """The policy in force for *name*, the registry's record (if any), and how the production
    and latest versions' own blocks relate to the policy in force."""
    versions = summarize(store, name).versions
    production = store.labels(name).get(production_label)
    in_force = policy_in_force(store, name, production)
    record = store.get_gate_policy(name)
    blocks = {}
    for v in sorted({versions[-1], *([production] if production is not None else [])}):
        own = store.get_version(name, v).spec.evaluation
        blocks[str(v)] = {"declares_block": own is not None,
                          "relation": compare_blocks(own, in_force.evaluation)}
    return {"name": name, "production_version": production, "in_force": in_force.as_dict(),
            "record": record.as_dict() if record is not None else None, "versions": blocks}


# -- four eyes --------------------------------------------------------------------------------

def set_four_eyes(store: PromptStore, name: str, enabled: bool, *, actor: str, reason: str,
                  expiry_s: float | None = None) -> FourEyesRecord:
    """Switch four eyes on or off for *name* (a protected change: callers require the `admin`
    scope). Needs a reason; audited ("four_eyes"). Pending requests stay (they can still be
    approved, denied or expire) when it is switched off."""
    if not reason.strip():
        raise RegistryError("changing four eyes needs a reason (recorded in the audit log)")
    summarize(store, name)  # PromptNotFound for an unknown prompt
    current = store.get_four_eyes(name)
    expiry = expiry_s if expiry_s is not None else (current.expiry_s if current else APPROVAL_EXPIRY_S)
    now = datetime.now(UTC)
    revision = current.revision if current is not None else 0
    record = FourEyesRecord(prompt=name, revision=revision + 1, enabled=enabled, expiry_s=expiry,
                            set_by=actor, set_at=now, reason=reason.strip(),
                            requests=current.requests if current is not None else [])
    store.put_four_eyes(record, expected_revision=revision, actor=actor, action="four_eyes",
                        label="four-eyes", note=(
                            f"four eyes {'on' if enabled else 'off'}"
                            + (f" (requests expire after {timedelta(seconds=expiry)})" if enabled else "")
                            + f" | {reason.strip()}"))
    return record


def approvals_view(store: PromptStore, name: str) -> dict[str, Any]:
    """The prompt's four-eyes setting and its requests (newest first; a pending request past
    its expiry shows as expired)."""
    summarize(store, name)
    record = store.get_four_eyes(name)
    if record is None:
        return {"name": name, "four_eyes": False, "expiry_s": APPROVAL_EXPIRY_S, "requests": []}
    view = record.as_dict()
    return {"name": name, "four_eyes": record.enabled, "expiry_s": record.expiry_s,
            "set_by": record.set_by, "set_at": view["set_at"], "reason": record.reason,
            "requests": view["requests"][::-1]}


def _pending(store: PromptStore, name: str, request_id: str, *, actor: str,
             ) -> tuple[FourEyesRecord, ApprovalRequest]:
    """The record and the pending request *request_id*; an expired one is marked expired
    (audited) and ApprovalClosed raised, as for one already decided."""
    record = store.get_four_eyes(name)
    request = record.find(request_id) if record is not None else None
    if record is None or request is None:
        summarize(store, name)
        raise PromptNotFound(f"prompt {name!r} has no approval request {request_id!r}")
    now = datetime.now(UTC)
    state = request.state_at(now)
    if state == "expired" and request.state == "pending":
        expired = request.model_copy(update={"state": "expired", "decided_at": now})
        store.put_four_eyes(record.with_request(expired), expected_revision=record.revision,
                            actor=actor, action="approval_expired", label=request.label,
                            from_version=request.expected, to_version=request.version,
                            note=f"approval {request.id} expired at "
                                 f"{request.expires_at.isoformat(timespec='seconds')}; nothing moved")
    if state != "pending":
        who = f" by {request.decided_by}" if request.decided_by else ""
        raise ApprovalClosed(f"approval request {request_id} of {name!r} is {state}{who}, not pending")
    return record, request


def approve_request(store: PromptStore, name: str, request_id: str, *, actor: str,
                    holder: str | None = None, note: str = "",
                    production_label: str = "production",
                    served_models: Collection[str] | None = None,
                    ) -> tuple[ApprovalRequest, int | None, GateReport | None]:
    """A second key holder (*holder*, default *actor*; callers check the promote scope)
    approves a pending request: it is marked approved (compare-and-set, audited), then the
    move is made, judged by the gate now and compare-and-set on the production version the
    request expected. When the move fails (the gate refuses now, production moved meanwhile,
    the model is not served) the request is marked failed (audited) and the error raised.
    The requester cannot approve their own request (SelfApproval)."""
    holder = holder or actor
    record, request = _pending(store, name, request_id, actor=actor)
    if holder == request.requested_by:
        raise SelfApproval(f"{holder} requested approval {request_id}; a second key holder must "
                           "approve it (four eyes)")
    now = datetime.now(UTC)
    approved = request.model_copy(update={"state": "approved", "decided_by": holder,
                                          "decided_at": now, "reason": note})
    store.put_four_eyes(record.with_request(approved), expected_revision=record.revision,
                        actor=actor, action="approval_approved", label=request.label,
                        from_version=request.expected, to_version=request.version,
                        note=f"approval {request.id} of {request.requested_by}'s request approved by "
                             f"{holder}" + (f" | {note}" if note else ""))
    try:
        check_model_served(store.get_version(name, request.version), served_models)
        previous, report = move_label(
            store, name, request.label, request.version, expected=request.expected or 0,
            actor=actor, note=request.note, override=request.override,
            production_label=production_label, approved=approved)
    except RegistryError as exc:
        current = store.get_four_eyes(name)
        if current is not None:
            failed = approved.model_copy(update={"state": "failed", "reason": str(exc)[:2000]})
            store.put_four_eyes(current.with_request(failed), expected_revision=current.revision,
                                actor=actor, action="approval_failed", label=request.label,
                                from_version=request.expected, to_version=request.version,
                                note=f"approval {request.id}: the move failed: {exc}")
        raise
    return approved, previous, report


def deny_request(store: PromptStore, name: str, request_id: str, *, actor: str,
                 holder: str | None = None, reason: str = "") -> ApprovalRequest:
    """Deny a pending request (any key holder with the promote scope, the requester too, who
    withdraws it): nothing moves; audited."""
    holder = holder or actor
    record, request = _pending(store, name, request_id, actor=actor)
    denied = request.model_copy(update={"state": "denied", "decided_by": holder,
                                        "decided_at": datetime.now(UTC), "reason": reason})
    store.put_four_eyes(record.with_request(denied), expected_revision=record.revision,
                        actor=actor, action="approval_denied", label=request.label,
                        from_version=request.expected, to_version=request.version,
                        note=f"approval {request.id} denied by {holder}; nothing moved"
                             + (f" | {reason}" if reason else ""))
    return denied
