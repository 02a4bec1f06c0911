"""Registry operations shared by the CLI and the admin API: publish from files, label moves,
rollback, diff and summaries. Each operation is one atomic store write or none."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prompt_registry.errors import PromptNotFound, RegistryError
from prompt_registry.gates import GateOverride, GateReport, move_label
from prompt_registry.loader import load_prompt_file
from prompt_registry.models import PromptVersion
from prompt_registry.store import PromptReader, PromptStore, PublishResult

__all__ = ["NothingToRollBack", "PromptSummary", "diff_versions", "publish_file", "rollback",
           "set_label", "spec_as_yaml", "summarize"]


class NothingToRollBack(RegistryError):
    """The label has no earlier version to go back to."""


@dataclass(frozen=True)
class PromptSummary:
    name: str
    versions: list[int]
    labels: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": self.versions, "latest": max(self.versions, default=None),
                "labels": self.labels}


def publish_file(store: PromptStore, path: Path, *, actor: str, note: str = "",
                 label: str | None = None, expected: int | None = None,
                 override: GateOverride | None = None, production_label: str = "production",
                 ) -> tuple[PublishResult, int | None]:
    """Publish a YAML or Markdown prompt file; optionally point *label* at the result (through
    the promotion gate when it is the production label: the version stays published when the
    gate refuses the label move)."""
    spec = load_prompt_file(path)
    result = store.publish(spec, actor=actor, note=note)
    previous = None
    if label is not None:
        previous, _ = move_label(store, spec.name, label, result.version.version, expected=expected,
                                 actor=actor, note=note or f"published from {path.name}",
                                 override=override, production_label=production_label)
    return result, previous


def set_label(store: PromptStore, name: str, label: str, version: int, *, actor: str,
              expected: int | None = None, note: str = "", override: GateOverride | None = None,
              production_label: str = "production") -> tuple[int | None, GateReport | None]:
    """Move a label by hand; the production label goes through the promotion gate."""
    return move_label(store, name, label, version, expected=expected, actor=actor, note=note,
                      override=override, production_label=production_label)


def rollback(store: PromptStore, name: str, label: str, *, actor: str, note: str = "") -> tuple[int, int]:
    """Point *label* back at the version it pointed at before its latest move.

    Returns (from_version, to_version). Compare-and-set against the current version, so a
    concurrent move makes this fail with LabelConflict instead of undoing someone else's work.
    Not judged by the promotion gate: the target held the label before, and in an incident
    nothing should stand between an operator and the previous version.
    """
    current = store.labels(name).get(label)
    if current is None:
        raise PromptNotFound(f"prompt {name!r} has no label {label!r}")
    moves = [e for e in store.audit(name) if e.action == "label" and e.label == label]
    if not moves or moves[-1].to_version != current or moves[-1].from_version is None:
        raise NothingToRollBack(f"label {label!r} of {name!r} has no earlier version to roll back to")
    target = moves[-1].from_version
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
    return yaml.dump(version.spec.model_dump(mode="json"), Dumper=_BlockDumper, sort_keys=False,
                     allow_unicode=True, width=100)


def diff_versions(a: PromptVersion, b: PromptVersion) -> str:
    """Unified diff of two versions' canonical YAML (empty when only metadata differs)."""
    return "".join(difflib.unified_diff(
        spec_as_yaml(a).splitlines(keepends=True), spec_as_yaml(b).splitlines(keepends=True),
        fromfile=f"{a.name}@v{a.version}", tofile=f"{b.name}@v{b.version}"))


def summarize(store: PromptReader, name: str) -> PromptSummary:
    versions = store.versions(name)
    if not versions:
        raise PromptNotFound(f"unknown prompt {name!r}")
    return PromptSummary(name=name, versions=versions, labels=store.labels(name))
