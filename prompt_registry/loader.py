"""Read prompt files (YAML) into `PromptSpec`s, with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prompt_registry.errors import PromptFileError
from prompt_registry.models import PromptSpec
from prompt_registry.store import PromptStore

__all__ = ["format_validation_error", "load_prompt_file", "seed_store"]


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_prompt_file(path: Path) -> PromptSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PromptFileError(f"{path}:{where} malformed YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected a mapping at the top level")
    try:
        return PromptSpec.model_validate(data)
    except ValidationError as exc:
        raise PromptFileError(format_validation_error(exc, str(path))) from None


def seed_store(store: PromptStore, prompt_dir: Path, *, label: str = "production") -> list[str]:
    """Publish every `*.yaml` prompt in *prompt_dir*; point *label* at it if the label is unset.

    Idempotent: identical content is not re-published, and an existing label is never moved
    (a seed must not undo a rollback someone did through the registry).
    """
    seeded = []
    for path in sorted(prompt_dir.glob("*.yaml")):
        spec = load_prompt_file(path)
        result = store.publish(spec, actor="seed", note=f"seeded from {path.name}")
        if label not in store.labels(spec.name):
            store.set_label(spec.name, label, result.version.version, expected=None, actor="seed",
                            note=f"initial {label} from {path.name}")
        seeded.append(spec.name)
    return seeded
