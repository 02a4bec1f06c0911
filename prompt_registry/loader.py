"""Read prompt files (YAML) into `PromptSpec`s, with errors that name the file and the field."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prompt_registry.errors import GatePolicyInvalid, LabelConflict, PromptFileError, UnservedModel
from prompt_registry.gates import GateOverride, move_label
from prompt_registry.models import EvaluationSpec, PromptSpec
from prompt_registry.store import PromptStore

__all__ = ["BOOTSTRAP_REASON", "format_validation_error", "load_gate_policy_file",
           "load_prompt_file", "parse_gate_policy_text", "parse_prompt_text", "seed_store"]

BOOTSTRAP_REASON = ("bootstrap: first production version of a prompt seeded from a file "
                    "(no scorecard can exist before a version is published)")


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


_HEADING = re.compile(r"^#{1,3}[ \t]*(system|user)(?:[ \t]*\[([A-Za-z]{2,3}(?:-[A-Za-z]{2,4})?)\])?[ \t]*$",
                      re.MULTILINE)


def load_prompt_file(path: Path) -> PromptSpec:
    """Read a prompt from YAML, or from Markdown with YAML front matter.

    Markdown form: front matter between `---` lines holds everything but the messages; each
    message is a section under a `## system` or `## user` heading, and `## system [zh-CN]`
    starts the zh-CN variant.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_prompt_text(text, source=str(path), markdown=path.suffix.lower() in (".md", ".markdown"))


def parse_prompt_text(text: str, *, source: str, markdown: bool = False) -> PromptSpec:
    if markdown:
        data = _parse_markdown(text, source)
    else:
        data = _load_yaml(text, source)
    try:
        return PromptSpec.model_validate(data)
    except ValidationError as exc:
        raise PromptFileError(format_validation_error(exc, source)) from None


def load_gate_policy_file(path: Path) -> EvaluationSpec:
    """Read a gate policy: a YAML file holding an evaluation block (`dataset:` and
    `criteria:`), or a prompt file (YAML or Markdown front matter) whose `evaluation:` is
    taken. Errors name the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GatePolicyInvalid(f"{path}: cannot read: {exc.strerror}") from None
    return parse_gate_policy_text(text, source=str(path))


def parse_gate_policy_text(text: str, *, source: str) -> EvaluationSpec:
    if text.lstrip().startswith("---"):  # Markdown prompt: the front matter holds the block
        lines = text.lstrip().splitlines(keepends=True)
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), len(lines))
        text = "".join(lines[1:end])
    data = _load_yaml(text, source)
    if "evaluation" in data:
        data = data["evaluation"]
        if not isinstance(data, dict):
            raise GatePolicyInvalid(f"{source}: 'evaluation' is not a mapping")
    try:
        return EvaluationSpec.model_validate(data)
    except ValidationError as exc:
        raise GatePolicyInvalid(format_validation_error(exc, source)) from None


def _load_yaml(text: str, source: str, offset: int = 0) -> dict[str, Any]:
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1 + offset}, column {mark.column + 1}" if mark else ""
        raise PromptFileError(f"{source}:{where} malformed YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:  # YAML nested thousands deep: a refusal, not an internal error
        raise PromptFileError(f"{source}: the YAML nests too deeply") from None
    if not isinstance(data, dict):
        raise PromptFileError(f"{source}: expected a mapping at the top level")
    return data


def _parse_markdown(text: str, source: str) -> dict[str, Any]:
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise PromptFileError(f"{source}: Markdown prompts start with YAML front matter between '---' lines")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise PromptFileError(f"{source}: front matter is not closed by a '---' line") from None
    data = _load_yaml("".join(lines[1:end]), source, offset=1)
    if "messages" in data or "locales" in data:
        raise PromptFileError(f"{source}: in Markdown prompts, messages are '## system' / '## user' sections, "
                              "not front matter keys")
    body = "".join(lines[end + 1:])
    heads = list(_HEADING.finditer(body))
    if not heads:
        raise PromptFileError(f"{source}: no '## system' or '## user' section found")
    if body[:heads[0].start()].strip():
        raise PromptFileError(f"{source}: text before the first '## system' / '## user' heading")
    default: list[dict[str, str]] = []
    locales: dict[str, dict[str, list[dict[str, str]]]] = {}
    for i, m in enumerate(heads):
        end_pos = heads[i + 1].start() if i + 1 < len(heads) else len(body)
        content = body[m.end():end_pos].strip("\n") + "\n"
        msg = {"role": m.group(1), "content": content}
        if m.group(2):
            locales.setdefault(m.group(2), {"messages": []})["messages"].append(msg)
        else:
            default.append(msg)
    data["messages"] = default
    if locales:
        data["locales"] = locales
    return data


def seed_store(store: PromptStore, prompt_dir: Path, *, label: str = "production",
               served_models: Collection[str] | None = None) -> list[str]:
    """Publish every `*.yaml` prompt in *prompt_dir*; point *label* at it if the label is unset.

    Idempotent: identical content is not re-published, and an existing label is never moved
    (a seed must not undo a rollback someone did through the registry).

    With *served_models*, every file is checked first: one naming a model the serving layer
    does not serve raises UnservedModel (a PromptFileError) and nothing is seeded.

    The first version of a prompt cannot have a scorecard yet (scorecards are stored per
    published version), so when its promotion gate fails, the initial label is set as an
    explicit bootstrap override: the audit entry says so, with the gate's findings. Every later
    production move is judged by the gate.
    """
    seeded = []
    paths = sorted([*prompt_dir.glob("*.yaml"), *prompt_dir.glob("*.yml"), *prompt_dir.glob("*.md")])
    specs = [(path, load_prompt_file(path)) for path in paths]
    if served_models is not None:
        for path, spec in specs:
            for model in spec.models():
                if model not in served_models:
                    raise UnservedModel(model, sorted(served_models), prompt=f"{path}: {spec.name}")
    for path, spec in specs:
        result = store.publish(spec, actor="seed", note=f"seeded from {path.name}")
        if label not in store.labels(spec.name):
            try:
                move_label(store, spec.name, label, result.version.version, expected=0, actor="seed",
                           note=f"initial {label} from {path.name}", production_label=label,
                           override=GateOverride(reason=BOOTSTRAP_REASON, by="seed"))
            except LabelConflict:
                pass  # another process seeding the same store set it first
        seeded.append(spec.name)
    return seeded
