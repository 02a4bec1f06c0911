"""One seam between the registry commands and the registry, here or on a remote gateway.

`modgate prompts|rollouts|keys` (and the registry part of `eval run` and `feedback import`)
are written once, against `RegistryClient`. It has two implementations:

- `LocalClient`: the store the configuration names (SQLite or Redis), through the same service
  code as the gateway (`prompt_registry.ops`, `gateway.rollouts.ops`). Whoever holds the
  store's credentials may act; an API key is asked for where the command line always asked
  for one (overrides, gate policy, four eyes, approvals), as today.
- `RemoteClient`: a gateway's admin API over HTTP (`--url` or MODGATE_URL), with one API key
  (MODGATE_API_KEY, or `--key-file` so the key stays out of the shell history). The gateway
  authorises every call by the key's scopes and records the key's name as the actor; the
  command line sends no actor of its own.

Both return the admin API's JSON shapes (so `--json` is the same either way) and fail with
`ClientError`, carrying the exit status the local command has always used: 1 for a registry
error (unknown prompt, conflict, invalid file), 2 for a refused or missing key, 3 for a
promotion gate refusal (`GateRefusal`), 4 for a four-eyes hold (`ApprovalHold`). A remote
problem response is mapped to the same status and prints the gateway's message, which is
the message the local command prints (`prompt_registry.keys.lacks_scope` words scope
refusals for both).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer

from gateway.config import AppConfig, ConfigError, load_config

if TYPE_CHECKING:
    import httpx

    from prompt_registry import PromptSpec, PromptStore, PromptVersion
    from prompt_registry.gates import ScorecardRecord
    from prompt_registry.models import EvaluationSpec

__all__ = ["ApprovalHold", "ClientError", "GateRefusal", "KeyFileOpt", "LocalClient", "Override",
           "RegistryClient", "RemoteClient", "UrlOpt", "open_client", "override_asked",
           "prompt_version"]

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="MODGATE_URL", show_envvar=True,
    help="a remote gateway's base URL (e.g. https://modgate.internal): act through its admin "
         "API with the key in MODGATE_API_KEY or --key-file, instead of on the configured store")]
KeyFileOpt = Annotated[Path | None, typer.Option(
    "--key-file", envvar="MODGATE_KEY_FILE", show_envvar=True,
    help="with --url: a file holding the API key (keeps it out of the shell history; default: "
         "MODGATE_API_KEY)")]

GATE_REFUSED_EXIT = 3
APPROVAL_REQUIRED_EXIT = 4
KEY_REFUSED_EXIT = 2


class ClientError(Exception):
    """A registry operation failed; `code` is the command's exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class GateRefusal(ClientError):
    """The promotion gate refused a production move; the message names each failed criterion."""

    def __init__(self, message: str) -> None:
        super().__init__(message, GATE_REFUSED_EXIT)


class ApprovalHold(ClientError):
    """Four eyes: the production move was recorded as a pending request, not made."""

    def __init__(self, message: str, *, prompt: str, request_id: str, version: int) -> None:
        super().__init__(message, APPROVAL_REQUIRED_EXIT)
        self.prompt, self.request_id, self.version = prompt, request_id, version


@dataclass(frozen=True)
class Override:
    """A gate override the caller asked for: why, and the admin key to do it with (remote:
    the call is made with that key, or the client's own when none is given)."""

    reason: str
    admin_key: str | None


def override_asked(override_gate: bool, reason: str | None, admin_key: str | None) -> Override | None:
    """The override asked for on the command line, or None; refuses (status 2) a reason without
    --override-gate and an override without a reason, on either side."""
    if not override_gate:
        if reason is not None:
            raise ClientError("--reason is only used with --override-gate", KEY_REFUSED_EXIT)
        return None
    if reason is None or not reason.strip():
        raise ClientError("--override-gate needs --reason \"why\" (recorded in the audit log)",
                          KEY_REFUSED_EXIT)
    return Override(reason=reason, admin_key=admin_key)


class RegistryClient(Protocol):
    """What the registry commands do, in the admin API's JSON shapes. *actor* is who the
    local audit log records; a remote gateway records the key's name instead. *key*: an API
    key a command was given for this one operation (an admin or approver key)."""

    production_label: str

    def list_prompts(self) -> list[dict[str, Any]]: ...
    def summary(self, name: str) -> dict[str, Any]: ...
    def version(self, name: str, version: int) -> dict[str, Any]: ...
    def resolve(self, name: str, label: str) -> dict[str, Any]: ...
    def publish(self, spec: PromptSpec, *, actor: str, note: str) -> dict[str, Any]: ...
    def move_label(self, name: str, label: str, version: int, *, expected: int | None, actor: str,
                   note: str, override: Override | None, key: str | None) -> dict[str, Any]: ...
    def rollback(self, name: str, label: str, *, actor: str, note: str) -> dict[str, Any]: ...
    def diff(self, name: str, from_version: int, to_version: int) -> dict[str, Any]: ...
    def audit(self, name: str) -> dict[str, Any]: ...
    def scorecards(self, name: str, version: int | None) -> list[dict[str, Any]]: ...
    def gate(self, name: str, version: int) -> dict[str, Any]: ...
    def put_scorecard(self, record: ScorecardRecord, *, actor: str) -> bool: ...
    def gate_policy(self, name: str) -> dict[str, Any]: ...
    def set_gate_policy(self, name: str, evaluation: EvaluationSpec | None, *, reason: str,
                        expected_revision: int | None, dry_run: bool, actor: str,
                        key: str | None) -> dict[str, Any]: ...
    def set_four_eyes(self, name: str, enabled: bool, *, reason: str, expiry_hours: float | None,
                      actor: str, key: str | None) -> dict[str, Any]: ...
    def approvals(self, name: str) -> dict[str, Any]: ...
    def set_version_state(self, name: str, version: int, state: str, *, reason: str, actor: str,
                          key: str | None) -> dict[str, Any]: ...
    def decide(self, name: str, request_id: str, decision: str, *, note: str, actor: str,
               key: str | None) -> dict[str, Any]: ...
    def list_keys(self) -> list[dict[str, Any]]: ...
    def create_key(self, name: str, scopes: list[str], *, actor: str) -> dict[str, Any]: ...
    def revoke_key(self, key_id: str) -> dict[str, Any]: ...
    def start_rollout(self, name: str, body: dict[str, Any], *, actor: str,
                      override: Override | None) -> dict[str, Any]: ...
    def rollout_status(self, name: str) -> dict[str, Any]: ...
    def rollout_action(self, name: str, action: str, *, note: str, actor: str,
                       override: Override | None) -> dict[str, Any]: ...
    def rollout_history(self, name: str) -> list[dict[str, Any]]: ...
    def rollout_detail(self, name: str, rollout_id: str) -> dict[str, Any]: ...


def prompt_version(data: dict[str, Any]) -> PromptVersion:
    """A version as the admin API answers it (`client.version`), as the registry's model."""
    from prompt_registry import PromptVersion

    return PromptVersion.model_validate({k: v for k, v in data.items() if k != "name"})


def _version_dict(v: PromptVersion) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "content_hash": v.content_hash,
            "created_at": v.created_at.isoformat(), "created_by": v.created_by,
            "spec": v.spec.model_dump(mode="json")}


# -- local: the configured store --------------------------------------------------------------

@contextmanager
def _refusals() -> Iterator[None]:
    """The registry's gate refusal and four-eyes hold as the client's (what a remote gateway's
    409 `promotion_gate_failed` and 202 `approval_required` become too)."""
    from prompt_registry import ApprovalRequired, GateRefused

    try:
        yield
    except GateRefused as exc:
        raise GateRefusal(str(exc)) from None
    except ApprovalRequired as exc:
        raise ApprovalHold(str(exc), prompt=exc.prompt, request_id=exc.request.id,
                           version=exc.request.version) from None


class LocalClient:
    """The configured store, through the service code the admin API uses."""

    def __init__(self, store: PromptStore, cfg: AppConfig) -> None:
        self.store, self.cfg = store, cfg
        self.production_label = cfg.gateway.default_label
        self.served = [m.name for m in cfg.serving.models]
        self.auth_required = cfg.gateway.auth == "required"

    def _holder(self, key: str | None, *, scope: str, what: str, required: bool) -> str | None:
        """The key holder's name (what four eyes compares; the override and policy records
        name it), or None when no key is given and none is *required*."""
        from gateway.cli.promotion import OverrideRefused, cli_key_holder

        if key is None and not required:
            return None
        try:
            holder = cli_key_holder(self.store, key, scope=scope, what=what,
                                    auth_required=self.auth_required)
        except OverrideRefused as exc:
            raise ClientError(str(exc), KEY_REFUSED_EXIT) from None
        return holder.removeprefix("key ")

    def _override(self, override: Override | None) -> Any:
        from gateway.cli.promotion import OverrideRefused, cli_override

        if override is None:
            return None
        try:
            return cli_override(self.store, override_gate=True, reason=override.reason,
                                admin_key=override.admin_key, auth_required=self.auth_required)
        except OverrideRefused as exc:
            raise ClientError(str(exc), KEY_REFUSED_EXIT) from None

    def list_prompts(self) -> list[dict[str, Any]]:
        from prompt_registry.ops import summarize

        return [summarize(self.store, n).as_dict() for n in self.store.list_prompts()]

    def summary(self, name: str) -> dict[str, Any]:
        from prompt_registry.ops import summarize

        return summarize(self.store, name).as_dict()

    def version(self, name: str, version: int) -> dict[str, Any]:
        return _version_dict(self.store.get_version(name, version))

    def resolve(self, name: str, label: str) -> dict[str, Any]:
        return _version_dict(self.store.resolve(name, label))

    def publish(self, spec: PromptSpec, *, actor: str, note: str) -> dict[str, Any]:
        from prompt_registry.ops import check_model_served

        check_model_served(spec, self.served)
        result = self.store.publish(spec, actor=actor, note=note)
        return {"created": result.created, **_version_dict(result.version)}

    def move_label(self, name: str, label: str, version: int, *, expected: int | None, actor: str,
                   note: str, override: Override | None, key: str | None) -> dict[str, Any]:
        from prompt_registry.ops import set_label

        gate_override = self._override(override)
        holder = self._holder(key, scope="labels:protected", what="a four-eyes request", required=False)
        with _refusals():
            previous, report = set_label(self.store, name, label, version, expected=expected,
                                         actor=actor, note=note, override=gate_override,
                                         production_label=self.production_label,
                                         served_models=self.served, holder=holder)
        return {"name": name, "label": label, "from_version": previous, "to_version": version,
                "gate": report.as_dict() if report is not None else None}

    def rollback(self, name: str, label: str, *, actor: str, note: str) -> dict[str, Any]:
        from prompt_registry.ops import rollback

        frm, to = rollback(self.store, name, label, actor=actor, note=note, served_models=self.served)
        return {"name": name, "label": label, "from_version": frm, "to_version": to}

    def diff(self, name: str, from_version: int, to_version: int) -> dict[str, Any]:
        from prompt_registry.ops import diff_versions

        text = diff_versions(self.store.get_version(name, from_version),
                             self.store.get_version(name, to_version))
        return {"name": name, "from": from_version, "to": to_version, "diff": text}

    def audit(self, name: str) -> dict[str, Any]:
        from prompt_registry.ops import summarize

        entries = self.store.audit(name)
        if not entries:
            summarize(self.store, name)  # an unknown prompt is an error, not an empty trail
        return {"name": name, "entries": [e.model_dump(mode="json") for e in entries]}

    def scorecards(self, name: str, version: int | None) -> list[dict[str, Any]]:
        from prompt_registry.ops import summarize

        if version is None:
            summarize(self.store, name)
        else:
            self.store.get_version(name, version)
        return [r.as_dict() for r in self.store.list_scorecards(name, version)]

    def gate(self, name: str, version: int) -> dict[str, Any]:
        from prompt_registry.gates import gate_report

        return gate_report(self.store, name, version, production_label=self.production_label).as_dict()

    def put_scorecard(self, record: ScorecardRecord, *, actor: str) -> bool:
        return self.store.put_scorecard(record, actor=actor)

    def gate_policy(self, name: str) -> dict[str, Any]:
        from prompt_registry.ops import gate_policy_view

        return gate_policy_view(self.store, name, production_label=self.production_label)

    def set_gate_policy(self, name: str, evaluation: EvaluationSpec | None, *, reason: str,
                        expected_revision: int | None, dry_run: bool, actor: str,
                        key: str | None) -> dict[str, Any]:
        from prompt_registry.ops import set_gate_policy

        if not dry_run:
            holder = self._holder(key, scope="gates:write", what="changing a gate policy", required=True)
            reason = f"{reason} (by key {holder})" if self.auth_required else f"{reason} (by {holder})"
        change = set_gate_policy(self.store, name, evaluation, actor=actor, reason=reason,
                                 expected_revision=expected_revision, dry_run=dry_run,
                                 production_label=self.production_label)
        return {"name": name, **change.as_dict()}

    def set_four_eyes(self, name: str, enabled: bool, *, reason: str, expiry_hours: float | None,
                      actor: str, key: str | None) -> dict[str, Any]:
        from prompt_registry.ops import approvals_view, set_four_eyes

        holder = self._holder(key, scope="admin", what="changing four eyes", required=True)
        set_four_eyes(self.store, name, enabled, actor=actor, reason=f"{reason} (by key {holder})",
                      expiry_s=expiry_hours * 3600 if expiry_hours is not None else None)
        return approvals_view(self.store, name)

    def approvals(self, name: str) -> dict[str, Any]:
        from prompt_registry.ops import approvals_view

        return approvals_view(self.store, name)

    def set_version_state(self, name: str, version: int, state: str, *, reason: str, actor: str,
                          key: str | None) -> dict[str, Any]:
        from prompt_registry.ops import set_version_state, summarize

        record = self.store.get_lifecycle(name)
        current = "active" if record is None else record.state_of(version)
        who = actor
        if "blocked" in (state, current):
            holder = self._holder(key, scope="admin", required=True,
                                  what="blocking a version" if state == "blocked" else "unblocking a version")
            who = f"{actor} (key {holder})"
        changed = set_version_state(self.store, name, version, state, actor=who,  # type: ignore[arg-type]
                                    reason=reason)
        return {"name": name, "version": version, "state": state, "changed": changed,
                "prompt": summarize(self.store, name).as_dict()}

    def decide(self, name: str, request_id: str, decision: str, *, note: str, actor: str,
               key: str | None) -> dict[str, Any]:
        from gateway.rollouts.ops import complete_approved_promotion
        from prompt_registry import SelfApproval
        from prompt_registry.ops import approve_request, deny_request

        what = "approving a request" if decision == "approve" else "denying a request"
        holder = self._holder(key, scope="labels:protected", what=what, required=True)
        if decision == "deny":
            denied = deny_request(self.store, name, request_id, actor=actor, holder=holder, reason=note)
            return {"name": name, "approval": denied.as_dict()}
        try:
            with _refusals():
                approved, previous, report = approve_request(
                    self.store, name, request_id, actor=actor, holder=holder, note=note,
                    production_label=self.production_label, served_models=self.served)
        except SelfApproval as exc:  # the API answers 403: a refusal of the key, not an error
            raise ClientError(str(exc), KEY_REFUSED_EXIT) from None
        rollout = complete_approved_promotion(self.store, name, approved, actor=actor,
                                              production_label=self.production_label)
        return {"name": name, "approval": approved.as_dict(), "label": approved.label,
                "from_version": previous, "to_version": approved.version,
                "gate": report.as_dict() if report is not None else None,
                "rollout": rollout.model_dump(mode="json") if rollout is not None else None}

    def list_keys(self) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json", exclude={"secret_sha256"}) for r in self.store.list_keys()]

    def create_key(self, name: str, scopes: list[str], *, actor: str) -> dict[str, Any]:
        from prompt_registry.keys import create_key

        key, record = create_key(self.store, name, scopes, created_by=actor)
        return {"key": key, "key_id": record.key_id, "name": record.name, "scopes": list(record.scopes)}

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        from prompt_registry.keys import revoke_key

        record = revoke_key(self.store, key_id)
        return {"key_id": record.key_id, "name": record.name, "revoked": True}

    def start_rollout(self, name: str, body: dict[str, Any], *, actor: str,
                      override: Override | None) -> dict[str, Any]:
        from gateway.rollouts.ops import rollout_status, start_rollout
        from prompt_registry.rollouts import GateConfig, ShadowSpec

        gate_override = self._override(override)
        with _refusals():
            start_rollout(self.store, name, canary_version=body["canary_version"], steps=body["steps"],
                          shadows=[ShadowSpec.model_validate(s) for s in body["shadows"]],
                          step_hold_s=body["step_hold_s"], gates=GateConfig.model_validate(body["gates"]),
                          auto=body["auto"], subject_key=body["subject_key"], actor=actor,
                          note=body["note"], production_label=self.production_label,
                          override=gate_override, unproven_max_weight=body["max_unproven_weight"],
                          on_promotion_refused=body["on_promotion_refused"], served_models=self.served)
        return rollout_status(self.store, name, production_label=self.production_label)

    def rollout_status(self, name: str) -> dict[str, Any]:
        from gateway.rollouts.ops import rollout_status

        return rollout_status(self.store, name, production_label=self.production_label)

    def rollout_action(self, name: str, action: str, *, note: str, actor: str,
                       override: Override | None) -> dict[str, Any]:
        from gateway.rollouts.ops import apply_action, rollout_status

        gate_override = self._override(override)
        with _refusals():
            apply_action(self.store, name, action, actor=actor, note=note,
                         production_label=self.production_label, override=gate_override)
        return rollout_status(self.store, name, production_label=self.production_label)

    def rollout_history(self, name: str) -> list[dict[str, Any]]:
        from gateway.rollouts.ops import rollout_history

        return rollout_history(self.store, name, production_label=self.production_label)

    def rollout_detail(self, name: str, rollout_id: str) -> dict[str, Any]:
        from gateway.rollouts.ops import rollout_detail

        return rollout_detail(self.store, name, rollout_id, production_label=self.production_label)


# -- remote: a gateway's admin API --------------------------------------------------------------

def http_client(url: str) -> httpx.Client:
    """The HTTP client a remote command uses."""
    import httpx

    return httpx.Client(base_url=url, timeout=60.0)


class RemoteClient:
    """A gateway's admin API. Every call carries the client's key (or the one a command was
    given for the operation); the gateway checks its scopes and records its name."""

    def __init__(self, http: httpx.Client, key: str | None, *, url: str,
                 production_label: str = "production") -> None:
        self.http, self.key, self.url = http, key, url
        self.production_label = production_label

    def _call(self, method: str, path: str, *, key: str | None = None, json: Any = None,
              params: dict[str, Any] | None = None) -> Any:
        import httpx

        use = key or self.key
        if not use:
            raise ClientError(f"a remote gateway ({self.url}) needs an API key: set MODGATE_API_KEY "
                              "or pass --key-file FILE", KEY_REFUSED_EXIT)
        try:
            resp = self.http.request(method, path, json=json, params=params,
                                     headers={"authorization": f"Bearer {use}"})
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the gateway at {self.url}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code == 202 and isinstance(body, dict) and body.get("status") == "approval_required":
            raise ApprovalHold(str(body["message"]), prompt=str(body["name"]),
                               request_id=str(body["approval"]["id"]), version=int(body["to_version"]))
        if resp.status_code < 400:
            return body
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            raise ClientError(f"the gateway at {self.url} answered {resp.status_code}: "
                              f"{resp.text[:200]}")
        kind, message = str(error.get("type", "")), str(error.get("message", ""))
        if kind == "promotion_gate_failed":
            raise GateRefusal(message)
        if resp.status_code in (401, 403):
            raise ClientError(message, KEY_REFUSED_EXIT)
        if resp.status_code >= 500 or resp.status_code == 429:
            raise ClientError(f"the gateway at {self.url} answered {resp.status_code} {kind}: {message}")
        fields = error.get("fields") or []
        if kind == "invalid_request" and fields:  # the framework's validation: name the fields
            message += ": " + "; ".join(f"{f.get('field')}: {f.get('problem')}" for f in fields)
        raise ClientError(message)

    @staticmethod
    def _override(override: Override | None) -> tuple[dict[str, Any] | None, str | None]:
        """The body's override and the key to send it with (the admin key, when one is given)."""
        if override is None:
            return None, None
        return {"reason": override.reason}, override.admin_key

    def list_prompts(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/prompts")["prompts"])

    def summary(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}"))

    def version(self, name: str, version: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/versions/{version}"))

    def resolve(self, name: str, label: str) -> dict[str, Any]:
        labels = self.summary(name)["labels"]
        if label not in labels:
            raise ClientError(f"prompt {name!r} has no label {label!r}")
        return self.version(name, int(labels[label]))

    def publish(self, spec: PromptSpec, *, actor: str, note: str) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/prompts", json=spec.model_dump(mode="json"),
                               params={"note": note} if note else None))

    def move_label(self, name: str, label: str, version: int, *, expected: int | None, actor: str,
                   note: str, override: Override | None, key: str | None) -> dict[str, Any]:
        body_override, admin_key = self._override(override)
        body = {"version": version, "expected_version": expected, "note": note, "override": body_override}
        return dict(self._call("PUT", f"/v1/prompts/{name}/labels/{label}", json=body,
                               key=admin_key or key))

    def rollback(self, name: str, label: str, *, actor: str, note: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/prompts/{name}/labels/{label}/rollback", json={"note": note}))

    def diff(self, name: str, from_version: int, to_version: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/diff",
                               params={"from": from_version, "to": to_version}))

    def audit(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/audit"))

    def scorecards(self, name: str, version: int | None) -> list[dict[str, Any]]:
        params = {"version": version} if version is not None else None
        return list(self._call("GET", f"/v1/prompts/{name}/scorecards", params=params)["scorecards"])

    def gate(self, name: str, version: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/versions/{version}/gate"))

    def put_scorecard(self, record: ScorecardRecord, *, actor: str) -> bool:
        answer = self._call("POST", f"/v1/prompts/{record.prompt}/scorecards",
                            json=record.model_dump(mode="json"))
        return bool(answer["replaced"])

    def gate_policy(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/gate-policy"))

    def set_gate_policy(self, name: str, evaluation: EvaluationSpec | None, *, reason: str,
                        expected_revision: int | None, dry_run: bool, actor: str,
                        key: str | None) -> dict[str, Any]:
        body = {"evaluation": None if evaluation is None else evaluation.model_dump(mode="json"),
                "reason": reason, "expected_revision": expected_revision, "dry_run": dry_run}
        return dict(self._call("PUT", f"/v1/prompts/{name}/gate-policy", json=body, key=key))

    def set_four_eyes(self, name: str, enabled: bool, *, reason: str, expiry_hours: float | None,
                      actor: str, key: str | None) -> dict[str, Any]:
        body = {"enabled": enabled, "reason": reason, "expiry_hours": expiry_hours}
        return dict(self._call("PUT", f"/v1/prompts/{name}/four-eyes", json=body, key=key))

    def approvals(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/approvals"))

    def set_version_state(self, name: str, version: int, state: str, *, reason: str, actor: str,
                          key: str | None) -> dict[str, Any]:
        return dict(self._call("PUT", f"/v1/prompts/{name}/versions/{version}/state",
                               json={"state": state, "reason": reason}, key=key))

    def decide(self, name: str, request_id: str, decision: str, *, note: str, actor: str,
               key: str | None) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/prompts/{name}/approvals/{request_id}/{decision}",
                               json={"note": note}, key=key))

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/keys")["keys"])

    def create_key(self, name: str, scopes: list[str], *, actor: str) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/keys", json={"name": name, "scopes": scopes}))

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/keys/{key_id}/revoke"))

    def start_rollout(self, name: str, body: dict[str, Any], *, actor: str,
                      override: Override | None) -> dict[str, Any]:
        body_override, admin_key = self._override(override)
        return dict(self._call("POST", f"/v1/prompts/{name}/rollout",
                               json={**body, "override": body_override}, key=admin_key))

    def rollout_status(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/rollout"))

    def rollout_action(self, name: str, action: str, *, note: str, actor: str,
                       override: Override | None) -> dict[str, Any]:
        body_override, admin_key = self._override(override)
        return dict(self._call("POST", f"/v1/prompts/{name}/rollout/{action}",
                               json={"note": note, "override": body_override}, key=admin_key))

    def rollout_history(self, name: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/prompts/{name}/rollouts")["rollouts"])

    def rollout_detail(self, name: str, rollout_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/prompts/{name}/rollouts/{rollout_id}"))


# -- choosing one --------------------------------------------------------------------------------

def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


def remote_key(key_file: Path | None) -> str | None:
    """The API key for a remote gateway: the --key-file's content (first line), else
    MODGATE_API_KEY. None when neither is set."""
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _fail(f"--key-file {key_file}: cannot read: {exc.strerror or exc}", 2) from None
        if not text:
            raise _fail(f"--key-file {key_file} is empty", 2)
        return text.splitlines()[0].strip()
    return os.environ.get("MODGATE_API_KEY", "").strip() or None


@contextmanager
def open_client(config: Path | None, url: str | None = None, key_file: Path | None = None, *,
                key: str | None = None) -> Iterator[RegistryClient]:
    """The client a command works through: the remote gateway at *url* when one is given (or
    MODGATE_URL), with *key* or the key of `remote_key`, else the configured store.
    `ClientError`s and registry errors raised inside become `modgate: error: ...` and the
    command's exit status."""
    from prompt_registry import RegistryError

    if url:
        label = "production"
        if config is not None:  # the remote gateway's production label, when it is not the default
            label = _config(config).gateway.default_label
        with http_client(url.rstrip("/")) as http:
            try:
                yield RemoteClient(http, key or remote_key(key_file), url=url.rstrip("/"),
                                   production_label=label)
            except ClientError as exc:
                raise _fail(exc.message, exc.code) from None
        return
    if key_file is not None:
        raise _fail("--key-file is for a remote gateway: give --url (or MODGATE_URL) too", 2)
    cfg = _config(config)
    with store_for(cfg) as store:
        try:
            yield LocalClient(store, cfg)
        except ClientError as exc:
            raise _fail(exc.message, exc.code) from None
        except RegistryError as exc:
            raise _fail(str(exc)) from None


def _config(config: Path | None) -> AppConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


@contextmanager
def store_for(cfg: AppConfig) -> Iterator[PromptStore]:
    """The configured store for a CLI command; store errors become `modgate: error: ...`."""
    from gateway.stores import open_store
    from prompt_registry import RegistryError

    try:
        store = open_store(cfg)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    try:
        yield store
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
