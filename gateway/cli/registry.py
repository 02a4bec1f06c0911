"""`modgate prompts ...` and `modgate keys ...`: the registry from the command line.

These commands talk to the store the configuration names (the SQLite file by default, Redis
with `registry.store: redis`), exactly as the gateway does, so a label moved here is what every
gateway serves within a second. Human-readable output by default, `--json` for scripts.

Moving production (`label`, `publish --label production`) goes through the promotion gate:
when the version's stored scorecard does not meet the criteria its prompt declares, the command
prints each failed criterion with its numbers and exits with status 3; `--override-gate
--reason "..." --admin-key KEY` moves it anyway and records who and why in the audit log.
`prompts scorecards NAME` shows the stored scorecards and what the gate says of a version.

The gate judges by the policy in force for the prompt (the registry's gate policy, else
production's `evaluation` block), never by a block the candidate brings along: `prompts
gate-policy show|diff|set` shows and changes it (`set` needs an API key with `gates:write` or
`admin`, a reason, and is audited). Publishing (and moving production to) a version whose
`model:` the configured serving layer (`serving.models`) does not serve is refused.

Four eyes (`prompts four-eyes on|off NAME`, an admin key): a production move is then recorded
as a pending request (exit status 4, printing its id) that a second key holder approves or
denies with `prompts approvals approve|deny NAME ID --key KEY` (`labels:protected` or
`admin`); `prompts approvals list NAME` shows them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.promotion import (
    GATES_SCOPE,
    AdminKeyOpt,
    OverrideOpt,
    OverrideRefused,
    ReasonOpt,
    cli_key_holder,
    cli_override,
    report_lines,
)
from gateway.config import AppConfig, ConfigError, load_config
from gateway.quality.reporting import MISSING
from gateway.rollouts.ops import complete_approved_promotion
from gateway.rollouts.promotion import ADMIN_SCOPE
from prompt_registry import (
    ApprovalRequired,
    GateRefused,
    KeyReader,
    PromptStore,
    RegistryError,
    VersionState,
)
from prompt_registry.gates import gate_report
from prompt_registry.keys import SCOPES, generate_key
from prompt_registry.loader import load_gate_policy_file
from prompt_registry.models import EvaluationSpec
from prompt_registry.ops import (
    approvals_view,
    approve_request,
    deny_request,
    diff_versions,
    gate_policy_diff,
    gate_policy_view,
    publish_file,
    rollback,
    set_four_eyes,
    set_gate_policy,
    set_label,
    set_version_state,
    spec_as_yaml,
    summarize,
)

__all__ = ["approvals_app", "gate_policy_app", "keys_app", "prompts_app"]

prompts_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                          help="Publish, label, roll back, diff and audit prompt versions.")
keys_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                       help="Create, list and revoke API keys (stored hashed; shown once).")
gate_policy_app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Show, diff and set the promotion gate policy in force for a prompt.")
prompts_app.add_typer(gate_policy_app, name="gate-policy")
approvals_app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Four eyes: list, approve or deny pending production moves.")
prompts_app.add_typer(approvals_app, name="approvals")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ActorOpt = Annotated[str | None, typer.Option("--actor", envvar="MODGATE_ACTOR",
                                              help="who to record in the audit log (default: MODGATE_ACTOR, else $LOGNAME or $USER, else uid <n> (<account>))")]
NoteOpt = Annotated[str, typer.Option("--note", "-m", help="why; recorded in the audit log")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


GATE_REFUSED_EXIT = 3
APPROVAL_REQUIRED_EXIT = 4

KeyOpt = Annotated[str | None, typer.Option(
    "--key", envvar="MODGATE_API_KEY", show_envvar=True,
    help="your API key (labels:protected or admin): names you as the requester or approver")]


def approval_required(exc: ApprovalRequired) -> typer.Exit:
    """Print a four-eyes hold (the request id and how to approve it); exit status 4."""
    typer.echo(f"modgate: {exc}\n  a second key holder approves it with: modgate prompts "
               f"approvals approve {exc.prompt} {exc.request.id} --key KEY", err=True)
    return typer.Exit(APPROVAL_REQUIRED_EXIT)


def _holder(keys: KeyReader, cfg: AppConfig, key: str | None, *, scope: str, what: str,
            required: bool) -> str | None:
    """The key holder's name (what four eyes compares), or None when no key is given and
    none is *required*."""
    if key is None and not required:
        return None
    try:
        holder = cli_key_holder(keys, key, scope=scope, what=what,
                                auth_required=cfg.gateway.auth == "required")
    except OverrideRefused as exc:
        raise _fail(str(exc), 2) from None
    return holder.removeprefix("key ")


@contextmanager
def _store(config: Path | None) -> Iterator[PromptStore]:
    with _store_and_config(config) as (store, _):
        yield store


@contextmanager
def _store_and_config(config: Path | None) -> Iterator[tuple[PromptStore, AppConfig]]:
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    with store_for(cfg) as store:
        yield store, cfg


def gate_refused(exc: GateRefused, *, before: str = "") -> typer.Exit:
    """Print a promotion-gate refusal (every failed criterion with its numbers, and how to
    override) and return the exit to raise (status 3)."""
    lines = [before] if before else []
    lines += [exc.report.message(),
              "  (an admin can override: --override-gate --reason \"...\" --admin-key KEY)"]
    return _fail("\n".join(lines), GATE_REFUSED_EXIT)


def _override(keys: KeyReader, cfg: AppConfig, override_gate: bool, reason: str | None,
              admin_key: str | None) -> Any:
    try:
        return cli_override(keys, override_gate=override_gate, reason=reason, admin_key=admin_key,
                            auth_required=cfg.gateway.auth == "required")
    except OverrideRefused as exc:
        raise _fail(str(exc), 2) from None


@contextmanager
def store_for(cfg: AppConfig) -> Iterator[PromptStore]:
    """The configured store for a CLI command; store errors become `modgate: error: ...`."""
    from gateway.stores import open_store

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


def _served(cfg: AppConfig) -> list[str]:
    """The models the configured serving layer serves."""
    return [m.name for m in cfg.serving.models]


def _actor(actor: str | None) -> str:
    """Who to record: --actor, else what `eval run` records (MODGATE_ACTOR, the first non-empty
    login variable, else `uid <n> (<name>)`): an empty $USER never records a bare `root`."""
    if actor:
        return actor
    from gateway.cli.eval import actor_name

    return actor_name()


def _out(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        human()


@prompts_app.command("list")
def list_cmd(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every prompt with its latest version and labels."""
    with _store(config) as store:
        rows = [summarize(store, n).as_dict() for n in store.list_prompts()]

    def human() -> None:
        if not rows:
            typer.echo("no prompts yet: publish one with `modgate prompts publish FILE`")
        for r in rows:
            labels = ", ".join(f"{k}=v{v}" for k, v in r["labels"].items()) or "no labels"
            latest = f"v{r['latest']}" if r["latest"] is not None else "-"
            retired = ", ".join(f"v{v} {s}" for v, s in r["states"].items())
            typer.echo(f"{r['name']:<32} latest {latest:<5} {labels}" + (f"  ({retired})" if retired else ""))
            for w in r["warnings"]:
                typer.echo(f"  warning: {w}")
    _out(as_json, {"prompts": rows}, human)


@prompts_app.command("show")
def show_cmd(name: str, version: Annotated[int | None, typer.Option("--version", "-v", help="print this version's content")] = None,
             label: Annotated[str | None, typer.Option("--label", "-l", help="print the version this label points at")] = None,
             config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """A prompt's versions and labels, or one version's full content (--version / --label)."""
    with _store(config) as store:
        if version is None and label is None:
            summary = summarize(store, name).as_dict()
            states = summary["states"]
            _out(as_json, summary, lambda: typer.echo(
                f"{name}\n  versions: "
                + ", ".join(f"v{v}" + (f" ({states[str(v)]})" if str(v) in states else "")
                            for v in summary["versions"])
                + "\n  labels:   "
                + (", ".join(f"{k} -> v{v}" for k, v in summary["labels"].items()) or "none")
                + "".join(f"\n  warning: {w}" for w in summary["warnings"])))
            return
        v = store.get_version(name, version) if version is not None else store.resolve(name, label or "")
        data = {"name": v.name, "version": v.version, "content_hash": v.content_hash,
                "created_at": v.created_at.isoformat(), "created_by": v.created_by,
                "spec": v.spec.model_dump(mode="json")}
        _out(as_json, data, lambda: typer.echo(
            f"# {v.name} v{v.version} (sha256 {v.content_hash[:12]}, by {v.created_by} at "
            f"{v.created_at:%Y-%m-%d %H:%M:%S} UTC)\n{spec_as_yaml(v)}"))


@prompts_app.command("publish")
def publish_cmd(
    file: Annotated[Path, typer.Argument(help="prompt file: YAML, or Markdown with YAML front matter")],
    label: Annotated[str | None, typer.Option("--label", "-l", help="also point this label at the new version")] = None,
    expected: Annotated[int | None, typer.Option("--expected", help="with --label: only if the label points at this version now")] = None,
    note: NoteOpt = "", actor: ActorOpt = None, override_gate: OverrideOpt = False,
    reason: ReasonOpt = None, admin_key: AdminKeyOpt = None, config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a new immutable version. Identical content returns the existing version.

    The file is validated first (schema, sandboxed templates, declared variables, a `model:`
    the configured serving layer serves); nothing is written if it is invalid. With `--label production` the label move goes through the
    promotion gate; when the gate refuses, the version stays published and production is not
    moved (exit status 3).
    """
    with _store_and_config(config) as (store, cfg):
        override = _override(store, cfg, override_gate, reason, admin_key)
        try:
            result, previous = publish_file(store, file, actor=_actor(actor), note=note, label=label,
                                            expected=expected, override=override,
                                            production_label=cfg.gateway.default_label,
                                            served_models=_served(cfg))
        except GateRefused as exc:
            v = exc.report.version
            raise gate_refused(exc, before=f"published {exc.report.prompt} v{v}, but {label} was "
                               "not moved:") from None
        except ApprovalRequired as exc:
            typer.echo(f"published {exc.prompt} v{exc.request.version}; {label} was not moved yet:",
                       err=True)
            raise approval_required(exc) from None
    v = result.version
    data = {"name": v.name, "version": v.version, "created": result.created, "content_hash": v.content_hash,
            "label": label, "previous": previous}

    def human() -> None:
        verb = "published" if result.created else "unchanged: identical to"
        typer.echo(f"{verb} {v.name} v{v.version}")
        if label:
            typer.echo(f"{label}: v{previous if previous is not None else '-'} -> v{v.version}")
    _out(as_json, data, human)


@prompts_app.command("label")
def label_cmd(
    name: str, label: str, version: int,
    expected: Annotated[int | None, typer.Option("--expected", help="only move if the label points at this version now (0: must not exist)")] = None,
    note: NoteOpt = "", actor: ActorOpt = None, override_gate: OverrideOpt = False,
    reason: ReasonOpt = None, admin_key: AdminKeyOpt = None, key: KeyOpt = None,
    config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Point LABEL (production, canary, ...) of prompt NAME at VERSION.

    Moving production goes through the promotion gate: refused (exit status 3, every failed
    criterion printed with its numbers) unless VERSION's stored scorecard meets the criteria
    its prompt declares, or an admin overrides with --override-gate --reason --admin-key.
    Under four eyes the move is recorded as a pending request instead (exit status 4; --key
    names you as the requester) for a second key holder to approve.
    """
    with _store_and_config(config) as (store, cfg):
        override = _override(store, cfg, override_gate, reason, admin_key)
        holder = _holder(store, cfg, key, scope="labels:protected", what="a four-eyes request",
                         required=False)
        try:
            previous, report = set_label(store, name, label, version, expected=expected,
                                         actor=_actor(actor), note=note, override=override,
                                         production_label=cfg.gateway.default_label,
                                         served_models=_served(cfg), holder=holder)
        except GateRefused as exc:
            raise gate_refused(exc) from None
        except ApprovalRequired as exc:
            raise approval_required(exc) from None

    def human() -> None:
        typer.echo(f"{name} {label}: v{previous if previous is not None else '-'} -> v{version}")
        if report is not None and report.verdict != "none":
            overridden = report.verdict == "fail"
            typer.echo(f"  promotion gate: {'OVERRIDDEN' if overridden else 'PASS'} "
                       f"({report.summary()})")
    _out(as_json, {"name": name, "label": label, "from_version": previous, "to_version": version,
                   "gate": report.as_dict() if report is not None else None}, human)


@prompts_app.command("rollback")
def rollback_cmd(name: str, label: Annotated[str, typer.Argument()] = "production", note: NoteOpt = "",
                 actor: ActorOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Move LABEL (default production) back to the version it pointed at before its last move."""
    with _store(config) as store:
        frm, to = rollback(store, name, label, actor=_actor(actor), note=note)
    _out(as_json, {"name": name, "label": label, "from_version": frm, "to_version": to},
         lambda: typer.echo(f"{name} {label}: v{frm} -> v{to} (rolled back)"))


@prompts_app.command("diff")
def diff_cmd(name: str, from_version: int, to_version: int, config: ConfigOpt = None,
             as_json: JsonOpt = False) -> None:
    """Unified diff of two versions (templates, verdict schema, model, sampling, metadata)."""
    with _store(config) as store:
        text = diff_versions(store.get_version(name, from_version), store.get_version(name, to_version))
    _out(as_json, {"name": name, "from": from_version, "to": to_version, "diff": text},
         lambda: typer.echo(text or "no differences", nl=not text))


@prompts_app.command("audit")
def audit_cmd(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Every publish, label move and rollout transition of a prompt, one line each: when, who,
    what moved and why. The full evidence of each entry (gate reports, rollout snapshots) is
    in --json."""
    from prompt_registry.audit_text import one_line

    with _store(config) as store:
        entries = store.audit(name)
        if not entries:
            summarize(store, name)
    rows = [e.model_dump(mode="json") for e in entries]

    def human() -> None:
        for e in entries:
            typer.echo(one_line(e))
        typer.echo(f"({len(entries)} entries; the full evidence of each: modgate prompts audit "
                   f"{name} --json)")
    _out(as_json, {"name": name, "entries": rows}, human)


def _fmt(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


def _ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


@prompts_app.command("scorecards")
def scorecards_cmd(
    name: str,
    version: Annotated[int | None, typer.Option("--version", "-v", help="one version: its "
                                                "scorecards in full and its promotion gate")] = None,
    config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Stored scorecards (from `modgate eval run`) and the promotion gate's verdict.

    Without --version: one line per stored scorecard (version, dataset, items, micro precision
    and recall, who ran it when). With --version: per-category precision and recall with 95%
    Wilson intervals, failure rates, and what the promotion gate says of moving that version
    to production now (each criterion PASS/FAIL with its numbers).
    """
    with _store_and_config(config) as (store, cfg):
        label = cfg.gateway.default_label
        if version is None:
            summarize(store, name)  # unknown prompt -> error
        else:
            store.get_version(name, version)
        records = store.list_scorecards(name, version)
        report = gate_report(store, name, version, production_label=label) if version is not None else None
        production = store.labels(name).get(label)
    rows = [r.as_dict() for r in records]
    data: dict[str, Any] = {"name": name, "production_version": production, "scorecards": rows}
    if report is not None:
        data["gate"] = report.as_dict()

    def human() -> None:
        if not rows:
            which = f"v{version} of {name}" if version is not None else name
            typer.echo(f"no scorecards stored for {which}: run `modgate eval run --prompt {name} "
                       f"--version N --dataset FILE`")
        if version is None:
            for r in rows:
                prod = f"  ({label})" if r["version"] == production else ""
                typer.echo(f"v{r['version']:<4} dataset {r['dataset_sha256'][:12]} {r['items']:>5} items  "
                           f"micro P {_fmt(r['micro']['precision'])} R {_fmt(r['micro']['recall'])}  "
                           f"by {r['created_by'] or '-'} at {r['created_at'][:19]}{prod}")
        for r in rows if version is not None else []:
            typer.echo(f"{name} v{r['version']} on dataset {r['dataset_sha256'][:12]} "
                       f"({r['items']} items, {r['dataset_source'] or 'source unknown'}; by "
                       f"{r['created_by'] or '-'} at {r['created_at'][:19]})")
            typer.echo(f"  {'category':<22}{'support':>8}  {'precision (95% CI)':<24}{'recall (95% CI)':<24}")
            for cat, c in [*r["categories"].items(), ("micro", r["micro"]), ("flagged", r["flagged"])]:
                typer.echo(f"  {cat:<22}{c['support']:>8}  {_ci(c['precision'], c['precision_ci']):<24}"
                           f"{_ci(c['recall'], c['recall_ci']):<24}")
            rates = r["rates"]
            typer.echo(f"  accuracy {_fmt(r['accuracy'])}  parse failures {rates['parse_failure']['count']}"
                       f"/{rates['parse_failure']['n']}  errors {rates['error']['count']}/{rates['error']['n']}")
        if report is not None:
            typer.echo("\n".join(report_lines(report, label=label)))
    _out(as_json, data, human)


FileOpt = Annotated[Path | None, typer.Option(
    "--file", "-f", help="a YAML evaluation block (dataset, criteria), or a prompt file whose "
    "`evaluation:` is taken")]
FromVersionOpt = Annotated[int | None, typer.Option("--from-version", help="adopt this version's "
                                                    "evaluation block")]
NoGateOpt = Annotated[bool, typer.Option("--no-gate", help="the policy is: no promotion gate")]


def _proposed(store: PromptStore, name: str, file: Path | None, from_version: int | None,
              no_gate: bool) -> EvaluationSpec | None:
    given = [o for o, v in (("--file", file is not None), ("--from-version", from_version is not None),
                            ("--no-gate", no_gate)) if v]
    if len(given) != 1:
        raise _fail("give exactly one of --file, --from-version, --no-gate"
                    + (f" (got {', '.join(given)})" if given else ""), 2)
    if file is not None:
        return load_gate_policy_file(file)
    if from_version is not None:
        block = store.get_version(name, from_version).spec.evaluation
        if block is None:
            raise _fail(f"{name} v{from_version} declares no evaluation block (use --no-gate "
                        "for a policy without a gate)", 2)
        return block
    return None


def _policy_lines(view: dict[str, Any]) -> list[str]:
    in_force = view["in_force"]
    lines = [f"{view['name']}: gate policy in force: {in_force['description']}"]
    ev = in_force["evaluation"]
    if ev is not None:
        lines.append(f"  dataset {ev['dataset']['sha256']} ({ev['dataset']['path'] or 'path unknown'})")
        lines += [f"  - {EvaluationSpec.model_validate(ev).criteria[i].describe()}"
                  for i in range(len(ev["criteria"]))]
    record = view["record"]
    if record is not None:
        lines.append(f"  registry record r{record['revision']} set by {record['set_by']} at "
                     f"{record['set_at'][:19]}: {record['reason']}")
    for v, b in view["versions"].items():
        role = " (production)" if int(v) == view["production_version"] else ""
        block = {"absent": "declares no evaluation block", "same": "its own block is the same",
                 "stricter": "its own block is at least as strict",
                 "not_stricter": "its own block is NOT at least as strict (not applied)"}[b["relation"]]
        if not b["declares_block"] and b["relation"] == "same":
            block = "declares no evaluation block"
        lines.append(f"  v{v}{role}: {block}")
    return lines


@gate_policy_app.command("show")
def gate_policy_show(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The gate policy in force for NAME (the registry's policy, else production's evaluation
    block), its hash, dataset and criteria, and how the versions' own blocks relate to it."""
    with _store_and_config(config) as (store, cfg):
        view = gate_policy_view(store, name, production_label=cfg.gateway.default_label)
    _out(as_json, view, lambda: typer.echo("\n".join(_policy_lines(view))))


@gate_policy_app.command("diff")
def gate_policy_diff_cmd(name: str, file: FileOpt = None, from_version: FromVersionOpt = None,
                         no_gate: NoGateOpt = False, config: ConfigOpt = None,
                         as_json: JsonOpt = False) -> None:
    """Diff the policy in force against a proposed one (--file, --from-version or --no-gate).
    Writes nothing."""
    with _store_and_config(config) as (store, cfg):
        proposed = _proposed(store, name, file, from_version, no_gate)
        view = gate_policy_view(store, name, production_label=cfg.gateway.default_label)
    in_force = view["in_force"]
    current = EvaluationSpec.model_validate(in_force["evaluation"]) if in_force["evaluation"] else None
    text = gate_policy_diff(current, proposed, before_name=in_force["description"])
    _out(as_json, {"name": name, "in_force": in_force, "diff": text},
         lambda: typer.echo(text or "no differences", nl=not text))


@gate_policy_app.command("set")
def gate_policy_set(
    name: str, file: FileOpt = None, from_version: FromVersionOpt = None, no_gate: NoGateOpt = False,
    reason: Annotated[str | None, typer.Option("--reason", help="why (required; recorded in the "
                                               "audit log)")] = None,
    expected_revision: Annotated[int | None, typer.Option(
        "--expected-revision", help="only if the registry's policy is at this revision now (0: none)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the diff, write nothing")] = False,
    admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a gate policy the one in force for NAME (kept in the registry; every later
    production move is judged by it, whatever the versions' own blocks say).

    A protected change: needs an API key with the `gates:write` (or `admin`) scope
    (--admin-key or MODGATE_ADMIN_KEY) and --reason; prints the diff against the policy in
    force and records who, why and both policies' hashes in the audit log.
    """
    if not reason or not reason.strip():
        raise _fail("gate-policy set needs --reason \"why\" (recorded in the audit log)", 2)
    with _store_and_config(config) as (store, cfg):
        proposed = _proposed(store, name, file, from_version, no_gate)
        if not dry_run:
            try:
                holder = cli_key_holder(store, admin_key, scope=GATES_SCOPE,
                                        what="changing a gate policy",
                                        auth_required=cfg.gateway.auth == "required")
            except OverrideRefused as exc:
                raise _fail(str(exc), 2) from None
            reason = f"{reason.strip()} (by {holder})"
        change = set_gate_policy(store, name, proposed, actor=_actor(actor), reason=reason,
                                 expected_revision=expected_revision, dry_run=dry_run,
                                 production_label=cfg.gateway.default_label)

    def human() -> None:
        typer.echo(change.diff or "no differences in criteria or dataset", nl=not change.diff)
        verb = "would set" if dry_run else "set"
        typer.echo(f"{name}: {verb} registry gate policy r{change.after.revision} "
                   f"(policy {change.after.sha256[:12]}), replacing {change.before.label()}")
    _out(as_json, {"name": name, **change.as_dict()}, human)


@prompts_app.command("four-eyes")
def four_eyes_cmd(
    setting: Annotated[str, typer.Argument(help="on or off")], name: str,
    reason: Annotated[str | None, typer.Option("--reason", help="why (required; audited)")] = None,
    expiry_hours: Annotated[float | None, typer.Option(
        "--expiry-hours", min=0.01, max=720, help="how long a request stays open (default 24)")] = None,
    admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Switch four eyes on or off for NAME: when on, every production move (by label or by a
    rollout's promotion) waits for a second key holder's approval. Needs an admin key
    (--admin-key or MODGATE_ADMIN_KEY) and --reason; audited."""
    if setting not in ("on", "off"):
        raise _fail("four-eyes takes on or off", 2)
    if not reason or not reason.strip():
        raise _fail("four-eyes needs --reason \"why\" (recorded in the audit log)", 2)
    with _store_and_config(config) as (store, cfg):
        holder = _holder(store, cfg, admin_key, scope=ADMIN_SCOPE, what="changing four eyes",
                         required=True)
        set_four_eyes(store, name, setting == "on", actor=_actor(actor),
                      reason=f"{reason.strip()} (by key {holder})",
                      expiry_s=expiry_hours * 3600 if expiry_hours is not None else None)
        view = approvals_view(store, name)
    _out(as_json, view, lambda: typer.echo(
        f"{name}: four eyes {setting}" + (f" (requests expire after {view['expiry_s'] / 3600:g} h)"
                                          if setting == "on" else "")))


def _set_state(name: str, version: int, state: VersionState, reason: str | None,
               admin_key: str | None, actor: str | None, config: Path | None, as_json: bool) -> None:
    """The lifecycle commands: the same `ops.set_version_state` (and rules) as the admin API.
    Blocking, or reinstating a blocked version, needs an admin key, as over the API."""
    if not reason or not reason.strip():
        raise _fail(f"{'reinstate' if state == 'active' else state[:-1]} needs --reason \"why\" "
                    "(recorded in the audit log)", 2)
    with _store_and_config(config) as (store, cfg):
        record = store.get_lifecycle(name)
        current = "active" if record is None else record.state_of(version)
        who = _actor(actor)
        if "blocked" in (state, current):
            holder = _holder(store, cfg, admin_key, scope=ADMIN_SCOPE, required=True,
                             what="blocking a version" if state == "blocked" else "unblocking a version")
            who = f"{who} (key {holder})"
        changed = set_version_state(store, name, version, state, actor=who, reason=reason)
        summary = summarize(store, name).as_dict()
    data = {"name": name, "version": version, "state": state, "changed": changed, "prompt": summary}
    _out(as_json, data, lambda: typer.echo(
        f"{name} v{version}: {state}" + ("" if changed else " (already)")
        + f"; latest is v{summary['latest']}" + "".join(f"\n  warning: {w}" for w in summary["warnings"])))


_VERSION_ARG = Annotated[int, typer.Argument(min=1, help="the version number")]
_REASON_OPT = Annotated[str | None, typer.Option("--reason", "-m", help="why (required; audited)")]


@prompts_app.command("deprecate")
def deprecate_cmd(name: str, version: _VERSION_ARG, reason: _REASON_OPT = None,
                  actor: ActorOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Deprecate NAME VERSION: no new label, rollout or approval may point at it, and `latest`
    skips it; labels already on it keep serving (listed as warnings) and pinned requests are
    still answered, flagged `deprecated`. Undo with `modgate prompts reinstate`."""
    _set_state(name, version, "deprecated", reason, None, actor, config, as_json)


@prompts_app.command("block")
def block_cmd(name: str, version: _VERSION_ARG, reason: _REASON_OPT = None,
              admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
              as_json: JsonOpt = False) -> None:
    """Block NAME VERSION: refused everywhere (pinned requests get 410 version_blocked; no
    label, rollout or rollback may point at it). Refused while a label or an active rollout
    points at it: move the label or abort the rollout first. Needs an admin key
    (--admin-key or MODGATE_ADMIN_KEY). Undo with `modgate prompts reinstate`."""
    _set_state(name, version, "blocked", reason, admin_key, actor, config, as_json)


@prompts_app.command("reinstate")
def reinstate_cmd(name: str, version: _VERSION_ARG, reason: _REASON_OPT = None,
                  admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Make a deprecated or blocked NAME VERSION active again (a blocked one needs an admin
    key, --admin-key or MODGATE_ADMIN_KEY)."""
    _set_state(name, version, "active", reason, admin_key, actor, config, as_json)


@approvals_app.command("list")
def approvals_list(name: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """NAME's four-eyes setting and approval requests, newest first."""
    with _store(config) as store:
        view = approvals_view(store, name)

    def human() -> None:
        typer.echo(f"{name}: four eyes {'on' if view['four_eyes'] else 'off'}")
        for r in view["requests"]:
            cur = "-" if r["expected"] is None else f"v{r['expected']}"
            decided = f", {r['decided_by']}" if r["decided_by"] else ""
            typer.echo(f"  {r['id']}  {r['state']:<8} {r['label']}: {cur} -> v{r['version']}  by "
                       f"{r['requested_by']} at {r['requested_at'][:19]}, expires "
                       f"{r['expires_at'][:19]}{decided}")
    _out(as_json, view, human)


@approvals_app.command("approve")
def approvals_approve(name: str, request_id: str, note: NoteOpt = "", key: KeyOpt = None,
                      actor: ActorOpt = None, config: ConfigOpt = None,
                      as_json: JsonOpt = False) -> None:
    """Approve a pending request of another key holder: the move is made now, through the
    promotion gate, compare-and-set on the production version the request expected (a
    rollout waiting for it is marked promoted). Needs --key (labels:protected or admin)."""
    with _store_and_config(config) as (store, cfg):
        holder = _holder(store, cfg, key, scope="labels:protected", what="approving a request",
                         required=True)
        who = _actor(actor)
        try:
            approved, previous, report = approve_request(
                store, name, request_id, actor=who, holder=holder, note=note,
                production_label=cfg.gateway.default_label, served_models=_served(cfg))
        except GateRefused as exc:
            raise gate_refused(exc, before=f"approval {request_id} failed:") from None
        rollout = complete_approved_promotion(store, name, approved, actor=who,
                                              production_label=cfg.gateway.default_label)
    data = {"name": name, "approval": approved.as_dict(), "from_version": previous,
            "to_version": approved.version, "gate": report.as_dict() if report else None,
            "rollout": rollout.model_dump(mode="json") if rollout else None}

    def human() -> None:
        typer.echo(f"{name} {approved.label}: v{previous if previous is not None else '-'} -> "
                   f"v{approved.version} (approval {approved.id} of {approved.requested_by}'s "
                   f"request)")
        if rollout is not None:
            typer.echo(f"  rollout {rollout.id}: promoted")
    _out(as_json, data, human)


@approvals_app.command("deny")
def approvals_deny(name: str, request_id: str,
                   reason: Annotated[str, typer.Option("--reason", help="why (audited)")] = "",
                   key: KeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Deny (or, as its requester, withdraw) a pending request: nothing moves. Needs --key."""
    with _store_and_config(config) as (store, cfg):
        holder = _holder(store, cfg, key, scope="labels:protected", what="denying a request",
                         required=True)
        denied = deny_request(store, name, request_id, actor=_actor(actor), holder=holder,
                              reason=reason)
    _out(as_json, {"name": name, "approval": denied.as_dict()},
         lambda: typer.echo(f"{name}: approval {denied.id} denied; nothing moved"))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who the key is for, e.g. listing-pipeline")],
    scope: Annotated[list[str], typer.Option("--scope", "-s", help=f"repeatable; one of {', '.join(SCOPES)}")],
    actor: ActorOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create an API key. The key is printed once; only its hash is stored."""
    bad = [s for s in scope if s not in SCOPES]
    if bad:
        raise _fail(f"unknown scope(s) {bad}; choose from {list(SCOPES)}", 2)
    key, record = generate_key(name, scope, created_by=_actor(actor))
    with _store(config) as store:
        store.put_key(record)
    _out(as_json, {"key": key, "key_id": record.key_id, "name": name, "scopes": scope},
         lambda: typer.echo(f"{key}\n(key id {record.key_id}; store it now: it cannot be shown again)"))


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Key ids, names, scopes and state (never the secrets)."""
    with _store(config) as store:
        records = store.list_keys()
    rows = [r.model_dump(mode="json", exclude={"secret_sha256"}) for r in records]
    _out(as_json, {"keys": rows}, lambda: [typer.echo(
        f"{r.key_id}  {r.name:<24} {','.join(r.scopes):<40} {'REVOKED' if r.revoked else 'active'}")
        for r in records])


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke a key by id; gateways stop accepting it within gateway.key_cache_s."""
    with _store(config) as store:
        record = store.get_key(key_id)
        if record is None:
            raise _fail(f"no API key with id {key_id!r}")
        store.put_key(record.model_copy(update={"revoked": True}))
    typer.echo(f"revoked {key_id} ({record.name})")


