"""`modgate prompts ...` and `modgate keys ...`: the registry from the command line.

These commands talk to the store the configuration names (the SQLite file by default, Redis
with `registry.store: redis`), exactly as the gateway does, so a label moved here is what every
gateway serves within a second. Human-readable output by default, `--json` for scripts.

With `--url` (or MODGATE_URL) they act on a remote gateway through its admin API instead, with
the API key in MODGATE_API_KEY or `--key-file`: the same output, `--json` and exit statuses;
the gateway checks the key's scopes for every call and records its name as the actor
(`gateway.cli.client`).

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
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.client import (
    APPROVAL_REQUIRED_EXIT,
    GATE_REFUSED_EXIT,
    ApprovalHold,
    ClientError,
    GateRefusal,
    KeyFileOpt,
    Override,
    RegistryClient,
    UrlOpt,
    open_client,
    override_asked,
    store_for,
)
from gateway.cli.promotion import AdminKeyOpt, OverrideOpt, ReasonOpt, report_lines
from gateway.config import AppConfig, ConfigError, load_config
from gateway.quality.reporting import MISSING
from prompt_registry import PromptStore
from prompt_registry.keys import KEY_NAME, SCOPES
from prompt_registry.loader import load_gate_policy_file, load_prompt_file
from prompt_registry.models import EvaluationSpec
from prompt_registry.ops import gate_policy_diff, spec_as_yaml

__all__ = ["APPROVAL_REQUIRED_EXIT", "GATE_REFUSED_EXIT", "approvals_app", "gate_policy_app",
           "keys_app", "prompts_app", "store_for"]

prompts_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                          help="Publish, label, roll back, diff and audit prompt versions "
                               "(here, or on a remote gateway with --url).")
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
                                              help="who to record in the audit log (default: MODGATE_ACTOR, else $LOGNAME or $USER, else uid <n> (<account>)); with --url the gateway records the key's name")]
NoteOpt = Annotated[str, typer.Option("--note", "-m", help="why; recorded in the audit log")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


KeyOpt = Annotated[str | None, typer.Option(
    "--key", envvar="MODGATE_API_KEY", show_envvar=True,
    help="your API key (labels:protected or admin): names you as the requester or approver")]


def approval_required(exc: ApprovalHold) -> typer.Exit:
    """Print a four-eyes hold (the request id and how to approve it); exit status 4."""
    typer.echo(f"modgate: {exc.message}\n  a second key holder approves it with: modgate prompts "
               f"approvals approve {exc.prompt} {exc.request_id} --key KEY", err=True)
    return typer.Exit(APPROVAL_REQUIRED_EXIT)


def gate_refused(exc: GateRefusal, *, before: str = "") -> typer.Exit:
    """Print a promotion-gate refusal (every failed criterion with its numbers, and how to
    override) and return the exit to raise (status 3)."""
    lines = [before] if before else []
    lines += [exc.message,
              "  (an admin can override: --override-gate --reason \"...\" --admin-key KEY)"]
    return _fail("\n".join(lines), GATE_REFUSED_EXIT)


def asked_override(override_gate: bool, reason: str | None, admin_key: str | None) -> Override | None:
    """The override asked for (checked for a reason), or exit status 2."""
    try:
        return override_asked(override_gate, reason, admin_key)
    except ClientError as exc:
        raise _fail(exc.message, exc.code) from None


@contextmanager
def _store(config: Path | None) -> Iterator[PromptStore]:
    with _store_and_config(config) as (store, _):
        yield store


@contextmanager
def _store_and_config(config: Path | None) -> Iterator[tuple[PromptStore, AppConfig]]:
    """The configured store and configuration (for commands that only work on this host)."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    with store_for(cfg) as store:
        yield store, cfg


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
def list_cmd(config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
             as_json: JsonOpt = False) -> None:
    """Every prompt with its latest version and labels."""
    with open_client(config, url, key_file) as client:
        rows = client.list_prompts()

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
             config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
             as_json: JsonOpt = False) -> None:
    """A prompt's versions and labels, or one version's full content (--version / --label)."""
    with open_client(config, url, key_file) as client:
        if version is None and label is None:
            summary = client.summary(name)
            states = summary["states"]
            _out(as_json, summary, lambda: typer.echo(
                f"{name}\n  versions: "
                + ", ".join(f"v{v}" + (f" ({states[str(v)]})" if str(v) in states else "")
                            for v in summary["versions"])
                + "\n  labels:   "
                + (", ".join(f"{k} -> v{v}" for k, v in summary["labels"].items()) or "none")
                + "".join(f"\n  warning: {w}" for w in summary["warnings"])))
            return
        data = client.version(name, version) if version is not None else client.resolve(name, label or "")
    from gateway.cli.client import prompt_version

    v = prompt_version(data)
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
    url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Publish a new immutable version. Identical content returns the existing version.

    The file is validated first (schema, sandboxed templates, declared variables, a `model:`
    the configured serving layer serves); nothing is written if it is invalid. With `--label production` the label move goes through the
    promotion gate; when the gate refuses, the version stays published and production is not
    moved (exit status 3).
    """
    override = asked_override(override_gate, reason, admin_key)
    with open_client(config, url, key_file) as client:
        spec = load_prompt_file(file)  # the same checks and messages here and remotely
        who = _actor(actor)
        result = client.publish(spec, actor=who, note=note)
        previous = None
        if label is not None:
            try:
                moved = client.move_label(spec.name, label, result["version"], expected=expected,
                                          actor=who, note=note or f"published from {file.name}",
                                          override=override, key=None)
            except GateRefusal as exc:
                raise gate_refused(exc, before=f"published {spec.name} v{result['version']}, but "
                                   f"{label} was not moved:") from None
            except ApprovalHold as exc:
                typer.echo(f"published {exc.prompt} v{exc.version}; {label} was not moved yet:", err=True)
                raise approval_required(exc) from None
            previous = moved["from_version"]
    data = {"name": result["name"], "version": result["version"], "created": result["created"],
            "content_hash": result["content_hash"], "label": label, "previous": previous}

    def human() -> None:
        verb = "published" if result["created"] else "unchanged: identical to"
        typer.echo(f"{verb} {data['name']} v{data['version']}")
        if label:
            typer.echo(f"{label}: v{previous if previous is not None else '-'} -> v{data['version']}")
    _out(as_json, data, human)


@prompts_app.command("label")
def label_cmd(
    name: str, label: str, version: int,
    expected: Annotated[int | None, typer.Option("--expected", help="only move if the label points at this version now (0: must not exist)")] = None,
    note: NoteOpt = "", actor: ActorOpt = None, override_gate: OverrideOpt = False,
    reason: ReasonOpt = None, admin_key: AdminKeyOpt = None, key: KeyOpt = None,
    config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point LABEL (production, canary, ...) of prompt NAME at VERSION.

    Moving production goes through the promotion gate: refused (exit status 3, every failed
    criterion printed with its numbers) unless VERSION's stored scorecard meets the criteria
    its prompt declares, or an admin overrides with --override-gate --reason --admin-key.
    Under four eyes the move is recorded as a pending request instead (exit status 4; --key
    names you as the requester) for a second key holder to approve.
    """
    override = asked_override(override_gate, reason, admin_key)
    with open_client(config, url, key_file) as client:
        try:
            data = client.move_label(name, label, version, expected=expected, actor=_actor(actor),
                                     note=note, override=override, key=key)
        except GateRefusal as exc:
            raise gate_refused(exc) from None
        except ApprovalHold as exc:
            raise approval_required(exc) from None
    previous, report = data["from_version"], data["gate"]

    def human() -> None:
        typer.echo(f"{name} {label}: v{previous if previous is not None else '-'} -> v{version}")
        if report is not None and report["verdict"] != "none":
            overridden = report["verdict"] == "fail"
            typer.echo(f"  promotion gate: {'OVERRIDDEN' if overridden else 'PASS'} "
                       f"({report['summary']})")
    _out(as_json, data, human)


@prompts_app.command("rollback")
def rollback_cmd(name: str, label: Annotated[str, typer.Argument()] = "production", note: NoteOpt = "",
                 actor: ActorOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
                 key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Move LABEL (default production) back to the version it pointed at before its last move."""
    with open_client(config, url, key_file) as client:
        data = client.rollback(name, label, actor=_actor(actor), note=note)
    _out(as_json, data, lambda: typer.echo(
        f"{name} {label}: v{data['from_version']} -> v{data['to_version']} (rolled back)"))


@prompts_app.command("diff")
def diff_cmd(name: str, from_version: int, to_version: int, config: ConfigOpt = None,
             url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Unified diff of two versions (templates, verdict schema, model, sampling, metadata)."""
    with open_client(config, url, key_file) as client:
        data = client.diff(name, from_version, to_version)
    text = data["diff"]
    _out(as_json, data, lambda: typer.echo(text or "no differences", nl=not text))


@prompts_app.command("audit")
def audit_cmd(name: str, config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
              as_json: JsonOpt = False) -> None:
    """Every publish, label move and rollout transition of a prompt, one line each: when, who,
    what moved and why. The full evidence of each entry (gate reports, rollout snapshots) is
    in --json."""
    from prompt_registry import AuditEntry
    from prompt_registry.audit_text import one_line

    with open_client(config, url, key_file) as client:
        data = client.audit(name)

    def human() -> None:
        for e in data["entries"]:
            typer.echo(one_line(AuditEntry.model_validate(e)))
        typer.echo(f"({len(data['entries'])} entries; the full evidence of each: modgate prompts "
                   f"audit {name} --json)")
    _out(as_json, data, human)


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
    config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stored scorecards (from `modgate eval run`) and the promotion gate's verdict.

    Without --version: one line per stored scorecard (version, dataset, items, micro precision
    and recall, who ran it when). With --version: per-category precision and recall with 95%
    Wilson intervals, failure rates, and what the promotion gate says of moving that version
    to production now (each criterion PASS/FAIL with its numbers).
    """
    with open_client(config, url, key_file) as client:
        label = client.production_label
        rows = client.scorecards(name, version)
        report = client.gate(name, version) if version is not None else None
        production = client.summary(name)["labels"].get(label)
    data: dict[str, Any] = {"name": name, "production_version": production, "scorecards": rows}
    if report is not None:
        data["gate"] = report

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


def _proposed(client: RegistryClient, name: str, file: Path | None, from_version: int | None,
              no_gate: bool) -> EvaluationSpec | None:
    given = [o for o, v in (("--file", file is not None), ("--from-version", from_version is not None),
                            ("--no-gate", no_gate)) if v]
    if len(given) != 1:
        raise _fail("give exactly one of --file, --from-version, --no-gate"
                    + (f" (got {', '.join(given)})" if given else ""), 2)
    if file is not None:
        return load_gate_policy_file(file)
    if from_version is not None:
        block = client.version(name, from_version)["spec"].get("evaluation")
        if block is None:
            raise _fail(f"{name} v{from_version} declares no evaluation block (use --no-gate "
                        "for a policy without a gate)", 2)
        return EvaluationSpec.model_validate(block)
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
def gate_policy_show(name: str, config: ConfigOpt = None, url: UrlOpt = None,
                     key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """The gate policy in force for NAME (the registry's policy, else production's evaluation
    block), its hash, dataset and criteria, and how the versions' own blocks relate to it."""
    with open_client(config, url, key_file) as client:
        view = client.gate_policy(name)
    _out(as_json, view, lambda: typer.echo("\n".join(_policy_lines(view))))


@gate_policy_app.command("diff")
def gate_policy_diff_cmd(name: str, file: FileOpt = None, from_version: FromVersionOpt = None,
                         no_gate: NoGateOpt = False, config: ConfigOpt = None, url: UrlOpt = None,
                         key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Diff the policy in force against a proposed one (--file, --from-version or --no-gate).
    Writes nothing."""
    with open_client(config, url, key_file) as client:
        proposed = _proposed(client, name, file, from_version, no_gate)
        view = client.gate_policy(name)
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
    url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Make a gate policy the one in force for NAME (kept in the registry; every later
    production move is judged by it, whatever the versions' own blocks say).

    A protected change: needs an API key with the `gates:write` (or `admin`) scope
    (--admin-key or MODGATE_ADMIN_KEY; with --url the key may be the client's own) and
    --reason; prints the diff against the policy in force and records who, why and both
    policies' hashes in the audit log.
    """
    if not reason or not reason.strip():
        raise _fail("gate-policy set needs --reason \"why\" (recorded in the audit log)", 2)
    with open_client(config, url, key_file) as client:
        proposed = _proposed(client, name, file, from_version, no_gate)
        change = client.set_gate_policy(name, proposed, reason=reason.strip(),
                                        expected_revision=expected_revision, dry_run=dry_run,
                                        actor=_actor(actor), key=admin_key)

    def human() -> None:
        typer.echo(change["diff"] or "no differences in criteria or dataset", nl=not change["diff"])
        verb = "would set" if dry_run else "set"
        after = change["after"]
        typer.echo(f"{name}: {verb} registry gate policy r{after['revision']} "
                   f"(policy {after['sha256'][:12]}), replacing {change['before']['description']}")
    _out(as_json, change, human)


@prompts_app.command("four-eyes")
def four_eyes_cmd(
    setting: Annotated[str, typer.Argument(help="on or off")], name: str,
    reason: Annotated[str | None, typer.Option("--reason", help="why (required; audited)")] = None,
    expiry_hours: Annotated[float | None, typer.Option(
        "--expiry-hours", min=0.01, max=720, help="how long a request stays open (default 24)")] = None,
    admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
    url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Switch four eyes on or off for NAME: when on, every production move (by label or by a
    rollout's promotion) waits for a second key holder's approval. Needs an admin key
    (--admin-key or MODGATE_ADMIN_KEY) and --reason; audited."""
    if setting not in ("on", "off"):
        raise _fail("four-eyes takes on or off", 2)
    if not reason or not reason.strip():
        raise _fail("four-eyes needs --reason \"why\" (recorded in the audit log)", 2)
    with open_client(config, url, key_file) as client:
        view = client.set_four_eyes(name, setting == "on", reason=reason.strip(),
                                    expiry_hours=expiry_hours, actor=_actor(actor), key=admin_key)
    _out(as_json, view, lambda: typer.echo(
        f"{name}: four eyes {setting}" + (f" (requests expire after {view['expiry_s'] / 3600:g} h)"
                                          if setting == "on" else "")))


def _set_state(name: str, version: int, state: str, reason: str | None, admin_key: str | None,
               actor: str | None, config: Path | None, url: str | None, key_file: Path | None,
               as_json: bool) -> None:
    """The lifecycle commands: the same `ops.set_version_state` (and rules) as the admin API.
    Blocking, or reinstating a blocked version, needs an admin key, as over the API."""
    if not reason or not reason.strip():
        raise _fail(f"{'reinstate' if state == 'active' else state[:-1]} needs --reason \"why\" "
                    "(recorded in the audit log)", 2)
    with open_client(config, url, key_file) as client:
        data = client.set_version_state(name, version, state, reason=reason, actor=_actor(actor),
                                        key=admin_key)
    summary = data["prompt"]
    _out(as_json, data, lambda: typer.echo(
        f"{name} v{version}: {state}" + ("" if data["changed"] else " (already)")
        + f"; latest is v{summary['latest']}" + "".join(f"\n  warning: {w}" for w in summary["warnings"])))


_VERSION_ARG = Annotated[int, typer.Argument(min=1, help="the version number")]
_REASON_OPT = Annotated[str | None, typer.Option("--reason", "-m", help="why (required; audited)")]


@prompts_app.command("deprecate")
def deprecate_cmd(name: str, version: _VERSION_ARG, reason: _REASON_OPT = None,
                  actor: ActorOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
                  key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Deprecate NAME VERSION: no new label, rollout or approval may point at it, and `latest`
    skips it; labels already on it keep serving (listed as warnings) and pinned requests are
    still answered, flagged `deprecated`. Undo with `modgate prompts reinstate`."""
    _set_state(name, version, "deprecated", reason, None, actor, config, url, key_file, as_json)


@prompts_app.command("block")
def block_cmd(name: str, version: _VERSION_ARG, reason: _REASON_OPT = None,
              admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
              url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Block NAME VERSION: refused everywhere (pinned requests get 410 version_blocked; no
    label, rollout or rollback may point at it). Refused while a label or an active rollout
    points at it: move the label or abort the rollout first. Needs an admin key
    (--admin-key or MODGATE_ADMIN_KEY). Undo with `modgate prompts reinstate`."""
    _set_state(name, version, "blocked", reason, admin_key, actor, config, url, key_file, as_json)


@prompts_app.command("reinstate")
def reinstate_cmd(name: str, version: _VERSION_ARG, reason: _REASON_OPT = None,
                  admin_key: AdminKeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
                  url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Make a deprecated or blocked NAME VERSION active again (a blocked one needs an admin
    key, --admin-key or MODGATE_ADMIN_KEY)."""
    _set_state(name, version, "active", reason, admin_key, actor, config, url, key_file, as_json)


@approvals_app.command("list")
def approvals_list(name: str, config: ConfigOpt = None, url: UrlOpt = None,
                   key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """NAME's four-eyes setting and approval requests, newest first."""
    with open_client(config, url, key_file) as client:
        view = client.approvals(name)

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
                      actor: ActorOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
                      key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a pending request of another key holder: the move is made now, through the
    promotion gate, compare-and-set on the production version the request expected (a
    rollout waiting for it is marked promoted). Needs --key (labels:protected or admin)."""
    with open_client(config, url, key_file) as client:
        try:
            data = client.decide(name, request_id, "approve", note=note, actor=_actor(actor), key=key)
        except GateRefusal as exc:
            raise gate_refused(exc, before=f"approval {request_id} failed:") from None
    approval, previous, rollout = data["approval"], data["from_version"], data["rollout"]

    def human() -> None:
        typer.echo(f"{name} {approval['label']}: v{previous if previous is not None else '-'} -> "
                   f"v{approval['version']} (approval {approval['id']} of "
                   f"{approval['requested_by']}'s request)")
        if rollout is not None:
            typer.echo(f"  rollout {rollout['id']}: promoted")
    _out(as_json, data, human)


@approvals_app.command("deny")
def approvals_deny(name: str, request_id: str,
                   reason: Annotated[str, typer.Option("--reason", help="why (audited)")] = "",
                   key: KeyOpt = None, actor: ActorOpt = None, config: ConfigOpt = None,
                   url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Deny (or, as its requester, withdraw) a pending request: nothing moves. Needs --key."""
    with open_client(config, url, key_file) as client:
        data = client.decide(name, request_id, "deny", note=reason, actor=_actor(actor), key=key)
    _out(as_json, data, lambda: typer.echo(
        f"{name}: approval {data['approval']['id']} denied; nothing moved"))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who the key is for, e.g. listing-pipeline")],
    scope: Annotated[list[str], typer.Option("--scope", "-s", help=f"repeatable; one of {', '.join(SCOPES)}")],
    actor: ActorOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
    key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create an API key. The key is printed once; only its hash is stored. With --url: needs
    an admin key; the gateway records the admin key's name as its creator."""
    bad = [s for s in scope if s not in SCOPES]
    if bad:
        raise _fail(f"unknown scope(s) {bad}; choose from {list(SCOPES)}", 2)
    if not re.match(KEY_NAME, name):
        raise _fail(f"key name {name!r}: 1-64 characters of [A-Za-z0-9._-], starting with a "
                    "letter or digit", 2)
    with open_client(config, url, key_file) as client:
        data = client.create_key(name, scope, actor=_actor(actor))
    _out(as_json, data, lambda: typer.echo(
        f"{data['key']}\n(key id {data['key_id']}; store it now: it cannot be shown again)"))


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
              as_json: JsonOpt = False) -> None:
    """Key ids, names, scopes and state (never the secrets)."""
    with open_client(config, url, key_file) as client:
        rows = client.list_keys()

    def human() -> None:
        for r in rows:
            typer.echo(f"{r['key_id']}  {r['name']:<24} {','.join(r['scopes']):<40} "
                       f"{'REVOKED' if r['revoked'] else 'active'}")
    _out(as_json, {"keys": rows}, human)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None, url: UrlOpt = None,
                key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key by id; gateways stop accepting it within gateway.key_cache_s."""
    if not re.match(r"^[a-f0-9]{12}$", key_id):  # not an id: no key has it, here or remotely
        raise _fail(f"no API key with id {key_id!r}")
    with open_client(config, url, key_file) as client:
        data = client.revoke_key(key_id)
    _out(as_json, data, lambda: typer.echo(f"revoked {data['key_id']} ({data['name']})"))
