"""Admin HTTP API for the prompt registry: the same operations as `modgate prompts`.

Every route needs an API key with the right scope; moving a protected label (`production` by
default) needs `labels:protected` besides `labels:write`. The key's name is the audit actor.

Moving the production label goes through the promotion gate (`prompt_registry.gates`): a
version whose prompt declares an `evaluation` block needs a stored scorecard meeting it, or the
move is refused with 409 `promotion_gate_failed` naming each failed criterion with its numbers.
`{"override": {"reason": "..."}}` moves it anyway; it needs the `admin` scope (403 otherwise)
and is recorded, with the key's name and the reason, in the label move's audit entry.

The gate judges by the policy in force for the prompt (the registry's gate policy, else
production's `evaluation` block), never by a block the candidate brings along. `GET
/v1/prompts/{name}/gate-policy` shows it; `PUT` changes it: a protected change (scope
`gates:write` or `admin`) with a reason, answered with the diff and audited.

Four eyes (`PUT /v1/prompts/{name}/four-eyes`, admin scope): a production move by one key is
answered `202` with `status: "approval_required"` and the pending request (`Location`: the
prompt's approvals); a second key holder with `labels:protected` (or `admin`) approves or denies it with `POST
/v1/prompts/{name}/approvals/{approval_id}/approve|deny` (403 for the requesting key itself);
`GET /v1/prompts/{name}/approvals` lists them.

Version lifecycle (`PUT /v1/prompts/{name}/versions/{version}/state`): `deprecated` (no new
label, rollout or approval may target it; what points at it keeps working) needs
`labels:write`; `blocked` (refused everywhere; refused while a label or an active rollout
points at it) and undoing a block need `admin`. `latest` skips both.

With `served_models`, publishing a version whose `model:` the serving layer does not serve, or
pointing any label at one (a move, a rollback, an approved request), is refused (`UnservedModel`,
422), naming the model and the served ones.

`POST /v1/prompts/{name}/scorecards` (scope `prompts:publish`) stores a scorecard `modgate eval
run` computed elsewhere (the remote CLI), audited under the key's name; one computed for other
content than the version it names is refused (`scorecard_mismatch`, 422). `GET /v1/keys`,
`POST /v1/keys` and `POST /v1/keys/{key_id}/revoke` manage API keys (admin scope), through the
code `modgate keys` uses. Scope refusals say what the scope was needed for, in the words the
command line uses (`prompt_registry.keys.lacks_scope`), so a remote `modgate` command prints
the same refusal as a local one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import Response

from gateway.api.edge import ERROR_RESPONSES, json_response, read_body
from gateway.auth import Authenticator
from gateway.problems import ApiError, Forbidden
from gateway.rollouts.ops import complete_approved_promotion
from gateway.rollouts.promotion import ADMIN_SCOPE, OVERRIDE_PURPOSE, GateOverrideBody, report_dict
from prompt_registry import (
    ApprovalRequired,
    GateOverride,
    PromptSpec,
    PromptStore,
    SelfApproval,
    VersionState,
)
from prompt_registry.gates import ScorecardRecord, gate_report
from prompt_registry.keys import KEY_NAME, ApiKeyRecord, Scope, create_key, revoke_key
from prompt_registry.loader import format_validation_error, parse_prompt_text
from prompt_registry.models import MAX_VERSION, EvaluationSpec
from prompt_registry.ops import (
    approvals_view,
    approve_request,
    check_model_served,
    deny_request,
    diff_versions,
    gate_policy_view,
    rollback,
    set_four_eyes,
    set_gate_policy,
    set_label,
    set_version_state,
    summarize,
)

__all__ = ["GATES_SCOPE", "KeyCreate", "build_admin_router"]

GATES_SCOPE = "gates:write"

_LABEL = r"^[a-z0-9][a-z0-9._-]{0,63}$"
AuthHeader = Annotated[str | None, Header()]


class LabelMove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, le=MAX_VERSION)
    expected_version: int | None = Field(
        None, ge=0, le=MAX_VERSION, description="compare-and-set: fail with 409 unless the label points here "
        "(0 = the label must not exist)")
    note: str = Field("", max_length=2000)
    override: GateOverrideBody | None = Field(
        None, description="move the production label although its promotion gate fails "
        "(needs the admin scope; the reason is recorded in the audit log)")


class GatePolicyChangeBody(BaseModel):
    """`PUT /v1/prompts/{name}/gate-policy`: the new policy (`evaluation`, null for "no gate", or
    `from_version` to adopt that version's block), why, and optionally the revision it replaces
    (compare-and-set; 0: no registry policy yet) or a dry run (the diff, nothing written)."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    evaluation: EvaluationSpec | None = Field(
        None, description="dataset and criteria; null (and no from_version): no gate")
    from_version: int | None = Field(None, ge=1, le=MAX_VERSION,
                                     description="adopt this version's evaluation block")
    reason: str = Field(..., min_length=1, max_length=2000, pattern=r"\S",
                        description="why the policy changes (recorded in the audit log)")
    expected_revision: int | None = Field(None, ge=0, le=1_000_000)
    dry_run: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> GatePolicyChangeBody:
        if self.from_version is not None and self.evaluation is not None:
            raise ValueError("give evaluation or from_version, not both")
        return self


class FourEyesBody(BaseModel):
    """`PUT /v1/prompts/{name}/four-eyes`: switch four eyes on or off (admin scope), why, and
    how long a request stays open (hours, default 24)."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    enabled: bool
    reason: str = Field(..., min_length=1, max_length=2000, pattern=r"\S",
                        description="why (recorded in the audit log)")
    expiry_hours: float | None = Field(None, gt=0, le=720)


class VersionStateBody(BaseModel):
    """`PUT /v1/prompts/{name}/versions/{version}/state`: deprecate, block or reinstate
    (`active`) a version, and why."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    state: VersionState
    reason: str = Field(..., min_length=1, max_length=2000, pattern=r"\S",
                        description="why (recorded in the audit log)")


class ApprovalDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=2000, description="recorded in the audit log")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=2000)


class KeyCreate(BaseModel):
    """`POST /v1/keys`: who the key is for and its scopes (admin scope; the key is answered
    once, only its hash is kept)."""

    model_config = ConfigDict(extra="forbid", regex_engine="python-re")

    name: str = Field(..., pattern=KEY_NAME, description="who the key is for, e.g. listing-pipeline")
    scopes: list[Scope] = Field(..., min_length=1, max_length=16)




def _version_dict(v: Any) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "content_hash": v.content_hash,
            "created_at": v.created_at.isoformat(), "created_by": v.created_by,
            "spec": v.spec.model_dump(mode="json")}


def _approval_required(exc: ApprovalRequired) -> Response:
    """202: the production move is recorded as a pending four-eyes request, not made."""
    req = exc.request
    body = {"name": exc.prompt, "label": req.label, "status": "approval_required",
            "type": "approval_required", "message": str(exc), "from_version": req.expected,
            "to_version": req.version, "created": exc.created, "approval": req.as_dict()}
    return json_response(body, 202, headers={"location": f"/v1/prompts/{exc.prompt}/approvals"})


def build_admin_router(store: PromptStore, auth: Authenticator, *, protected_labels: list[str],
                       production_label: str = "production", max_body_bytes: int = 1 << 20,
                       on_change: Callable[[str], Awaitable[None]] | None = None,
                       served_models: list[str] | None = None) -> APIRouter:
    """*served_models*: the models the serving layer serves; publishing (or moving a label
    to) a version naming another is refused. None: no check (tests, back-compat)."""
    async def changed(name: str) -> None:
        if on_change is not None:
            await on_change(name)

    router = APIRouter(prefix="/v1/prompts", tags=["prompt registry"], responses=ERROR_RESPONSES)

    async def principal(authorization: str | None, x_api_key: str | None, scope: str,
                        purpose: str = "") -> ApiKeyRecord | Any:
        p = await auth.authenticate(authorization, x_api_key)
        auth.require(p, scope, purpose)
        return p

    async def label_principal(authorization: str | None, x_api_key: str | None, label: str,
                              purpose: str = "") -> Any:
        p = await principal(authorization, x_api_key, "labels:write")
        if label in protected_labels:
            auth.require(p, "labels:protected", purpose)
        return p

    @router.get("")
    async def list_prompts(authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Every prompt with its versions and labels."""
        await principal(authorization, x_api_key, "prompts:read")

        def work() -> list[dict[str, Any]]:
            return [summarize(store, n).as_dict() for n in store.list_prompts()]
        return json_response({"prompts": await asyncio.to_thread(work)})

    @router.get("/{name}")
    async def show_prompt(name: str, authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        await principal(authorization, x_api_key, "prompts:read")
        return json_response((await asyncio.to_thread(summarize, store, name)).as_dict())

    @router.get("/{name}/versions/{version}")
    async def show_version(name: str, version: Annotated[int, Path(ge=1, le=MAX_VERSION)], authorization: AuthHeader = None,
                           x_api_key: AuthHeader = None) -> Response:
        await principal(authorization, x_api_key, "prompts:read")
        return json_response(_version_dict(await asyncio.to_thread(store.get_version, name, version)))

    @router.post("", status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": PromptSpec.model_json_schema()},
        "application/yaml": {"schema": {"type": "string"}},
        "text/markdown": {"schema": {"type": "string"}}}}})
    async def publish(request: Request, note: Annotated[str, Query(max_length=2000)] = "",
                      authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Publish a version (JSON spec, YAML or Markdown-with-front-matter). Identical content
        returns the existing version with 200 instead of 201."""
        p = await principal(authorization, x_api_key, "prompts:publish")
        raw = await read_body(request, max_body_bytes)  # refused past the limit, never buffered
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "malformed_body", "prompt body is not UTF-8") from None
        if ctype == "application/json":
            try:
                spec = PromptSpec.model_validate_json(raw)
            except ValidationError as exc:
                raise ApiError(422, "invalid_prompt", format_validation_error(exc, "request body")) from None
        elif ctype in ("application/yaml", "application/x-yaml", "text/yaml", "text/markdown"):
            spec = parse_prompt_text(text, source="request body", markdown=ctype == "text/markdown")
        else:
            raise ApiError(415, "unsupported_media_type",
                           "send application/json, application/yaml or text/markdown")
        check_model_served(spec, served_models)
        result = await asyncio.to_thread(store.publish, spec, actor=p.name, note=note)
        return json_response({"created": result.created, **_version_dict(result.version)},
                     201 if result.created else 200)

    @router.put("/{name}/labels/{label}", responses={202: {
        "description": "four eyes: the move is recorded as a pending approval request"}})
    async def move_label(name: str, label: Annotated[str, Path(pattern=_LABEL)], body: LabelMove,
                         authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Point a label at a version (compare-and-set with `expected_version`; 409 on conflict).

        The production label goes through the promotion gate: 409 `promotion_gate_failed` when
        the version's stored scorecard does not meet its prompt's criteria, unless `override`
        is given by a key with the admin scope. The answer's `gate` is the gate's verdict
        (null for other labels)."""
        p = await label_principal(authorization, x_api_key, label)
        override = None
        if body.override is not None:
            auth.require(p, ADMIN_SCOPE, OVERRIDE_PURPOSE)
            override = GateOverride(reason=body.override.reason, by=p.name)
        try:
            previous, report = await asyncio.to_thread(
                set_label, store, name, label, body.version, expected=body.expected_version,
                actor=p.name, note=body.note, override=override, production_label=production_label,
                served_models=served_models, holder=p.name)
        except ApprovalRequired as exc:
            return _approval_required(exc)
        await changed(name)
        return json_response({"name": name, "label": label, "from_version": previous,
                              "to_version": body.version, "gate": report_dict(report)})

    @router.post("/{name}/labels/{label}/rollback")
    async def rollback_label(name: str, label: str, body: RollbackRequest | None = None,
                             authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Move a label back to the version it pointed at before its latest move."""
        p = await label_principal(authorization, x_api_key, label)
        note = body.note if body else ""
        frm, to = await asyncio.to_thread(rollback, store, name, label, actor=p.name, note=note,
                                          served_models=served_models)
        await changed(name)
        return json_response({"name": name, "label": label, "from_version": frm, "to_version": to})

    @router.get("/{name}/scorecards")
    async def scorecards(name: str, version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
                         authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Stored scorecards (from `modgate eval run`) of a prompt, or of one version: counts,
        precision and recall with 95 % Wilson intervals per category, failure rates, dataset."""
        await principal(authorization, x_api_key, "prompts:read")

        def work() -> list[dict[str, Any]]:
            if version is None:
                summarize(store, name)  # 404 for an unknown prompt
            else:
                store.get_version(name, version)  # 404 for an unknown version
            return [r.as_dict() for r in store.list_scorecards(name, version)]
        return json_response({"name": name, "scorecards": await asyncio.to_thread(work)})

    @router.post("/{name}/scorecards")
    async def upload_scorecard(name: str, record: ScorecardRecord, authorization: AuthHeader = None,
                               x_api_key: AuthHeader = None) -> Response:
        """Store a scorecard `modgate eval run` computed where it ran (scope `prompts:publish`,
        as publishing: evidence, not a production move; the gate still judges it against the
        policy in force and the version's content hash). Audited; `created_by` is the key.
        Answers whether an earlier scorecard of the version on that dataset was replaced."""
        p = await principal(authorization, x_api_key, "prompts:publish")
        if record.prompt != name:
            raise ApiError(422, "invalid_request", f"the scorecard is of prompt {record.prompt!r}, "
                           f"not {name!r}", fields=[{"field": "prompt", "problem": "differs from the path"}])
        stored = record.model_copy(update={"created_by": p.name})
        replaced = await asyncio.to_thread(store.put_scorecard, stored, actor=p.name)
        await changed(name)
        return json_response({"name": name, "version": record.version,
                              "dataset_sha256": record.dataset_sha256, "replaced": replaced})

    @router.get("/{name}/versions/{version}/gate")
    async def promotion_gate(name: str, version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
                             authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Would the promotion gate let this version become production now? Each declared
        criterion, judged on the version's stored scorecard, with its numbers."""
        await principal(authorization, x_api_key, "prompts:read")
        report = await asyncio.to_thread(gate_report, store, name, version,
                                         production_label=production_label)
        return json_response(report.as_dict())

    @router.get("/{name}/gate-policy")
    async def show_gate_policy(name: str, authorization: AuthHeader = None,
                               x_api_key: AuthHeader = None) -> Response:
        """The promotion gate policy in force for the prompt (source: the registry's policy or
        production's `evaluation` block, with its hash), the registry's record if any, and how
        the production and latest versions' own blocks relate to it."""
        await principal(authorization, x_api_key, "prompts:read")
        view = await asyncio.to_thread(gate_policy_view, store, name, production_label=production_label)
        return json_response(view)

    @router.put("/{name}/gate-policy")
    async def change_gate_policy(name: str, body: GatePolicyChangeBody, authorization: AuthHeader = None,
                                 x_api_key: AuthHeader = None) -> Response:
        """Change the prompt's gate policy (scope `gates:write` or `admin`): the registry's
        record becomes the policy in force for every later production move. Answers with the
        policy before and after and their diff; audited with the key's name and the reason.
        409 when `expected_revision` is not the current revision."""
        p = await principal(authorization, x_api_key, GATES_SCOPE, "for changing a gate policy")

        def work() -> dict[str, Any]:
            evaluation = body.evaluation
            if body.from_version is not None:
                evaluation = store.get_version(name, body.from_version).spec.evaluation
            change = set_gate_policy(store, name, evaluation, actor=p.name, reason=body.reason,
                                     expected_revision=body.expected_revision, dry_run=body.dry_run,
                                     production_label=production_label)
            return {"name": name, **change.as_dict()}
        result = await asyncio.to_thread(work)
        if not body.dry_run:
            await changed(name)
        return json_response(result)

    @router.put("/{name}/four-eyes")
    async def change_four_eyes(name: str, body: FourEyesBody, authorization: AuthHeader = None,
                               x_api_key: AuthHeader = None) -> Response:
        """Switch four eyes on or off for the prompt (admin scope; audited with the reason):
        when on, every production move needs a second key holder's approval."""
        p = await principal(authorization, x_api_key, ADMIN_SCOPE, "for changing four eyes")
        expiry = body.expiry_hours * 3600 if body.expiry_hours is not None else None
        await asyncio.to_thread(set_four_eyes, store, name, body.enabled, actor=p.name,
                                reason=body.reason, expiry_s=expiry)
        await changed(name)
        return json_response(await asyncio.to_thread(approvals_view, store, name))

    @router.put("/{name}/versions/{version}/state")
    async def change_version_state(name: str, version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
                                   body: VersionStateBody, authorization: AuthHeader = None,
                                   x_api_key: AuthHeader = None) -> Response:
        """Deprecate, block or reinstate a version (audited with the reason). Deprecating
        needs `labels:write`; blocking, or reinstating a blocked version, needs `admin`. 409
        `version_retired` when a label or an active rollout still points at a version to be
        blocked."""
        p = await principal(authorization, x_api_key, "labels:write")
        record = await asyncio.to_thread(store.get_lifecycle, name)
        current = "active" if record is None else record.state_of(version)
        if "blocked" in (body.state, current):
            auth.require(p, ADMIN_SCOPE, "for blocking a version" if body.state == "blocked"
                         else "for unblocking a version")
        changed_ = await asyncio.to_thread(set_version_state, store, name, version, body.state,
                                           actor=p.name, reason=body.reason)
        if changed_:
            await changed(name)
        summary = await asyncio.to_thread(summarize, store, name)
        return json_response({"name": name, "version": version, "state": body.state,
                              "changed": changed_, "prompt": summary.as_dict()})

    @router.get("/{name}/approvals")
    async def list_approvals(name: str, authorization: AuthHeader = None,
                             x_api_key: AuthHeader = None) -> Response:
        """The prompt's four-eyes setting and its approval requests, newest first."""
        await principal(authorization, x_api_key, "prompts:read")
        return json_response(await asyncio.to_thread(approvals_view, store, name))

    @router.post("/{name}/approvals/{approval_id}/{decision}")
    async def decide_approval(name: str, approval_id: Annotated[str, Path(pattern=r"^[0-9a-f]{12}$")],
                              decision: Annotated[str, Path(pattern=r"^(approve|deny)$")],
                              body: ApprovalDecision | None = None, authorization: AuthHeader = None,
                              x_api_key: AuthHeader = None) -> Response:
        """Approve (the move is made now, through the promotion gate, compare-and-set on the
        production version the request expected) or deny a pending four-eyes request. Needs
        `labels:write` and `labels:protected` (or `admin`); the requesting key cannot approve
        its own request (403). 409 when the request is no longer pending."""
        p = await label_principal(authorization, x_api_key, production_label,
                                  f"for {'approving' if decision == 'approve' else 'denying'} a request")
        note = body.note if body is not None else ""

        def work() -> dict[str, Any]:
            if decision == "deny":
                denied = deny_request(store, name, approval_id, actor=p.name, holder=p.name,
                                      reason=note)
                return {"name": name, "approval": denied.as_dict()}
            try:
                approved, previous, report = approve_request(
                    store, name, approval_id, actor=p.name, holder=p.name, note=note,
                    production_label=production_label, served_models=served_models)
            except SelfApproval as exc:
                raise Forbidden(str(exc)) from None
            rollout = None
            if approved.rollout_id is not None:
                r = complete_approved_promotion(store, name, approved, actor=p.name,
                                                production_label=production_label)
                rollout = None if r is None else r.model_dump(mode="json")
            return {"name": name, "approval": approved.as_dict(), "label": approved.label,
                    "from_version": previous, "to_version": approved.version,
                    "gate": report_dict(report), "rollout": rollout}
        result = await asyncio.to_thread(work)
        await changed(name)
        return json_response(result)

    @router.get("/{name}/diff")
    async def diff(name: str, from_version: Annotated[int, Query(alias="from", ge=1, le=MAX_VERSION)],
                   to_version: Annotated[int, Query(alias="to", ge=1, le=MAX_VERSION)],
                   authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Unified diff between two versions' canonical YAML."""
        await principal(authorization, x_api_key, "prompts:read")
        a = await asyncio.to_thread(store.get_version, name, from_version)
        b = await asyncio.to_thread(store.get_version, name, to_version)
        return json_response({"name": name, "from": from_version, "to": to_version, "diff": diff_versions(a, b)})

    @router.get("/{name}/audit")
    async def audit(name: str, authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        await principal(authorization, x_api_key, "prompts:read")
        entries = await asyncio.to_thread(store.audit, name)
        if not entries:
            await asyncio.to_thread(summarize, store, name)  # 404 for an unknown prompt
        return json_response({"name": name, "entries": [e.model_dump(mode="json") for e in entries]})

    keys = APIRouter(prefix="/v1/keys", tags=["api keys"], responses=ERROR_RESPONSES)

    @keys.get("")
    async def list_keys(authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Key ids, names, scopes and state, never the secrets (admin scope)."""
        await principal(authorization, x_api_key, ADMIN_SCOPE, "for listing API keys")
        records = await asyncio.to_thread(store.list_keys)
        return json_response({"keys": [_key_dict(r) for r in records]})

    @keys.post("", status_code=201)
    async def new_key(body: KeyCreate, authorization: AuthHeader = None,
                      x_api_key: AuthHeader = None) -> Response:
        """Create a key (admin scope). The key is in this answer only; the registry keeps its
        hash. `created_by` is the calling key's name."""
        p = await principal(authorization, x_api_key, ADMIN_SCOPE, "for creating API keys")
        key, record = await asyncio.to_thread(create_key, store, body.name, list(body.scopes),
                                              created_by=str(p.name))
        return json_response({"key": key, "key_id": record.key_id, "name": record.name,
                              "scopes": list(record.scopes)}, 201)

    @keys.post("/{key_id}/revoke")
    async def revoke(key_id: Annotated[str, Path(pattern=r"^[a-f0-9]{12}$")],
                     authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Revoke a key by id (admin scope); gateways stop accepting it within
        gateway.key_cache_s. 404 for an unknown id."""
        await principal(authorization, x_api_key, ADMIN_SCOPE, "for revoking API keys")
        record = await asyncio.to_thread(revoke_key, store, key_id)
        return json_response({"key_id": record.key_id, "name": record.name, "revoked": True})

    outer = APIRouter()
    outer.include_router(router)
    outer.include_router(keys)
    return outer


def _key_dict(record: ApiKeyRecord) -> dict[str, Any]:
    """A key record as listed: everything but the secret's hash."""
    return record.model_dump(mode="json", exclude={"secret_sha256"})
