"""`modgate prompts ...` and `modgate keys ...`: the registry from the command line.

These commands talk to the store the configuration names (the SQLite file by default, Redis
with `registry.store: redis`), exactly as the gateway does, so a label moved here is what every
gateway serves within a second. Human-readable output by default, `--json` for scripts.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.config import AppConfig, ConfigError, load_config
from prompt_registry import PromptStore, RegistryError
from prompt_registry.keys import SCOPES, generate_key
from prompt_registry.ops import diff_versions, publish_file, rollback, spec_as_yaml, summarize

__all__ = ["keys_app", "prompts_app"]

prompts_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                          help="Publish, label, roll back, diff and audit prompt versions.")
keys_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                       help="Create, list and revoke API keys (stored hashed; shown once).")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ActorOpt = Annotated[str | None, typer.Option("--actor", envvar="MODGATE_ACTOR",
                                              help="who to record in the audit log (default: $USER)")]
NoteOpt = Annotated[str, typer.Option("--note", "-m", help="why; recorded in the audit log")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _store(config: Path | None) -> Iterator[PromptStore]:
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    with store_for(cfg) as store:
        yield store


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


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


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
            typer.echo(f"{r['name']:<32} latest v{r['latest']:<4} {labels}")
    _out(as_json, {"prompts": rows}, human)


@prompts_app.command("show")
def show_cmd(name: str, version: Annotated[int | None, typer.Option("--version", "-v", help="print this version's content")] = None,
             label: Annotated[str | None, typer.Option("--label", "-l", help="print the version this label points at")] = None,
             config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """A prompt's versions and labels, or one version's full content (--version / --label)."""
    with _store(config) as store:
        if version is None and label is None:
            summary = summarize(store, name).as_dict()
            _out(as_json, summary, lambda: typer.echo(
                f"{name}\n  versions: {', '.join(f'v{v}' for v in summary['versions'])}\n  labels:   "
                + (", ".join(f"{k} -> v{v}" for k, v in summary["labels"].items()) or "none")))
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
    note: NoteOpt = "", actor: ActorOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Publish a new immutable version. Identical content returns the existing version.

    The file is validated first (schema, sandboxed templates, declared variables); nothing is
    written if it is invalid.
    """
    with _store(config) as store:
        result, previous = publish_file(store, file, actor=_actor(actor), note=note, label=label,
                                        expected=expected)
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
    note: NoteOpt = "", actor: ActorOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Point LABEL (production, canary, ...) of prompt NAME at VERSION."""
    with _store(config) as store:
        previous = store.set_label(name, label, version, expected=expected, actor=_actor(actor), note=note)
    _out(as_json, {"name": name, "label": label, "from_version": previous, "to_version": version},
         lambda: typer.echo(f"{name} {label}: v{previous if previous is not None else '-'} -> v{version}"))


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
    """Every publish and label move of a prompt: who, when, from -> to, and why."""
    with _store(config) as store:
        entries = store.audit(name)
        if not entries:
            summarize(store, name)
    rows = [e.model_dump(mode="json") for e in entries]

    def human() -> None:
        for e in entries:
            what = (f"published v{e.to_version}" if e.action == "publish" else
                    f"{e.label}: v{e.from_version if e.from_version is not None else '-'} -> v{e.to_version}")
            note = f"  # {e.note}" if e.note else ""
            typer.echo(f"{e.at:%Y-%m-%d %H:%M:%S}  {e.actor:<14} {what}{note}")
    _out(as_json, {"name": name, "entries": rows}, human)


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


