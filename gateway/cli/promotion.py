"""Promotion gates on the command line: who may override one, how a gate report reads on a
terminal, and storing `modgate eval run` scorecards in the registry.

The gate itself (criteria, evaluation, the one label-move check) lives in
`prompt_registry.gates`; this module only adds what needs the gateway: API-key scopes and
human output. An override needs the `admin` scope: on the admin API that is the calling key;
on the command line, which talks to the store directly, it is an admin key given with
`--admin-key` (or MODGATE_ADMIN_KEY), checked against the store's key records, so the audit
entry names an accountable key and not only a login name. (Whoever holds the store's
credentials can do anything; the key makes an override deliberate and attributable.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.rollouts.promotion import ADMIN_SCOPE, OVERRIDE_PURPOSE
from prompt_registry import GateOverride, KeyReader, RegistryError
from prompt_registry.keys import lacks_scope, parse_key, verify_secret

if TYPE_CHECKING:
    from gateway.cli.client import RegistryClient
    from gateway.quality.evaluation.scorecard import Scorecard

__all__ = ["AdminKeyOpt", "GATES_SCOPE", "OverrideOpt", "OverrideRefused", "ReasonOpt",
           "cli_key_holder", "cli_override", "report_lines", "store_scorecards"]

GATES_SCOPE = "gates:write"

OverrideOpt = Annotated[bool, typer.Option(
    "--override-gate", help="move production although its promotion gate fails (needs an admin "
    "key and --reason; recorded in the audit log)")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="why the gate is overridden "
                                                                "(required with --override-gate)")]
AdminKeyOpt = Annotated[str | None, typer.Option(
    "--admin-key", envvar="MODGATE_ADMIN_KEY", show_envvar=True,
    help="an API key with the admin scope, needed by --override-gate")]


class OverrideRefused(RegistryError):
    """An override asked for without what it needs (a reason, an admin key)."""


def cli_key_holder(keys: KeyReader, key: str | None, *, scope: str, what: str,
                   auth_required: bool = True) -> str:
    """Who holds *key*, an API key with *scope* (or `admin`), as "key NAME" for the audit log;
    raises OverrideRefused naming what is missing. *what* says what the key is needed for."""
    if not auth_required:
        return "anonymous (auth disabled)"
    if not key:
        raise OverrideRefused(f"{what} needs an API key with the {scope!r} (or 'admin') scope: "
                              "pass --admin-key or set MODGATE_ADMIN_KEY")
    parsed = parse_key(key)
    record = keys.get_key(parsed[0]) if parsed else None
    if parsed is None or record is None or not verify_secret(record, parsed[1]):
        raise OverrideRefused("--admin-key is not a valid API key")
    if record.revoked:
        raise OverrideRefused(f"API key {record.name!r} is revoked")
    if not record.allows(scope):
        raise OverrideRefused(lacks_scope(record.name, scope, f"for {what}"))
    return f"key {record.name}"


def cli_override(keys: KeyReader, *, override_gate: bool, reason: str | None,
                 admin_key: str | None, auth_required: bool = True) -> GateOverride | None:
    """The override a command-line caller asked for, or None; raises OverrideRefused when the
    reason or the admin key is missing or not good enough. Reads the admin key's record from
    *keys* (any `KeyReader`, normally the store)."""
    if not override_gate:
        if reason is not None:
            raise OverrideRefused("--reason is only used with --override-gate")
        return None
    if reason is None or not reason.strip():
        raise OverrideRefused("--override-gate needs --reason \"why\" (recorded in the audit log)")
    if not auth_required:  # auth is off: every caller is allowed everything, as on the API
        return GateOverride(reason=reason, by="anonymous (auth disabled)")
    if not admin_key:
        raise OverrideRefused("--override-gate needs an API key with the admin scope: pass "
                              "--admin-key or set MODGATE_ADMIN_KEY")
    parsed = parse_key(admin_key)
    record = keys.get_key(parsed[0]) if parsed else None
    if parsed is None or record is None or not verify_secret(record, parsed[1]):
        raise OverrideRefused("--admin-key is not a valid API key")
    if record.revoked:
        raise OverrideRefused(f"API key {record.name!r} is revoked")
    if ADMIN_SCOPE not in record.scopes:
        raise OverrideRefused(lacks_scope(record.name, ADMIN_SCOPE, OVERRIDE_PURPOSE))
    return GateOverride(reason=reason, by=f"admin key {record.name}")


def report_lines(report: dict[str, Any], *, label: str = "production") -> list[str]:
    """A gate report (`GateReport.as_dict`, as the admin API answers it) for a terminal: the
    verdict, then every check with its numbers."""
    if report["verdict"] == "none":
        lines = [f"promotion gate of v{report['version']} -> {label}: none "
                 f"({report['policy_label']}); any version may be promoted"]
    else:
        lines = [f"promotion gate of v{report['version']} -> {label}: {report['verdict'].upper()} on "
                 f"{report['dataset_label']}", f"  policy in force: {report['policy_label']}"]
        for r in report["criteria"]:
            lines.append(f"  {r['verdict'].upper():<5} {r['detail']}")
    if report["candidate_note"]:
        lines.append(f"  {report['candidate_note']}")
    if report["hint"]:
        lines.append(f"  {report['hint']}")
    return lines


def store_scorecards(client: RegistryClient, scorecards: Sequence[Scorecard], *, actor: str,
                     out_dir: str = "") -> list[str]:
    """Store `eval run` scorecards in the registry (here, or through a remote gateway's admin
    API); lines saying what was stored and what the promotion gate of each non-production
    version now says. Storing evidence never promotes."""
    from gateway.quality.evaluation.scorecard import registry_record

    lines = []
    for sc in scorecards:
        record = registry_record(sc, created_by=actor, report=out_dir)
        replaced = client.put_scorecard(record, actor=actor)
        lines.append(f"registry: scorecard of {sc.prompt} v{sc.version} on dataset "
                     f"{sc.dataset_sha256[:12]} {'replaced' if replaced else 'stored'}")
    label = client.production_label
    production = client.summary(scorecards[0].prompt)["labels"].get(label) if scorecards else None
    for sc in scorecards:
        if sc.version == production:
            continue
        lines += report_lines(client.gate(sc.prompt, sc.version), label=label)
    return lines
