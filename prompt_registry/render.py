"""Sandboxed prompt rendering.

Templates are Jinja2 in a `SandboxedEnvironment` with `StrictUndefined`. At publish time a
template is parsed and its syntax tree checked against an allow-list: text, declared variable
names, constants, `if`, and a few harmless filters. Attribute and item access, calls, imports,
includes, macros, `set` and undeclared names are rejected, so a prompt file can never reach
Python objects. Caller content only ever arrives as variable *values*, which Jinja does not
evaluate, and only user messages may reference variables: system messages are fixed policy text
(which also makes them a byte-identical prefix for the engine's prefix cache).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from prompt_registry.errors import RenderError, TemplateRejected

if TYPE_CHECKING:
    from jinja2 import Template

    from prompt_registry.models import Message

__all__ = ["ALLOWED_FILTERS", "check_messages", "check_template", "render_messages"]

ALLOWED_FILTERS = frozenset({"trim", "upper", "lower", "default", "truncate", "length", "tojson"})

_ALLOWED_NODES: tuple[type[nodes.Node], ...] = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Const, nodes.If,
    nodes.Filter, nodes.Not, nodes.And, nodes.Or, nodes.Compare, nodes.Operand, nodes.Concat,
    nodes.Test,
)

_env = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, trim_blocks=False
)


def _describe(node: nodes.Node) -> str:
    return {
        "Getattr": "attribute access",
        "Getitem": "item access",
        "Call": "function or method call",
        "Import": "import",
        "FromImport": "import",
        "Include": "include",
        "Extends": "extends",
        "Macro": "macro",
        "Assign": "set",
        "AssignBlock": "set",
        "For": "for loop",
    }.get(type(node).__name__, type(node).__name__)


def check_template(source: str, declared: Sequence[str], *, where: str = "template") -> set[str]:
    """Reject unsafe or undeclared constructs; return the variable names the template uses."""
    try:
        ast = _env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateRejected(f"{where}: syntax error on line {exc.lineno}: {exc.message}") from None
    used: set[str] = set()
    for node in ast.find_all(nodes.Node):
        if not isinstance(node, _ALLOWED_NODES):
            raise TemplateRejected(f"{where}: {_describe(node)} is not allowed in prompt templates")
        if isinstance(node, nodes.Filter) and node.name not in ALLOWED_FILTERS:
            raise TemplateRejected(
                f"{where}: filter {node.name!r} is not allowed (allowed: {sorted(ALLOWED_FILTERS)})"
            )
        if isinstance(node, nodes.Test) and node.name not in {"defined", "none", "string"}:
            raise TemplateRejected(f"{where}: test {node.name!r} is not allowed")
        if isinstance(node, nodes.Name):
            if node.ctx != "load":
                raise TemplateRejected(f"{where}: assignment is not allowed")
            used.add(node.name)
    undeclared = used - set(declared)
    if undeclared:
        raise TemplateRejected(
            f"{where}: undeclared variable(s) {sorted(undeclared)}; declare them under 'variables'"
        )
    return used


def check_messages(messages: Sequence[Message], declared: Sequence[str], *, where: str = "") -> None:
    """Check every message template; system messages may not use variables."""
    for i, msg in enumerate(messages):
        used = check_template(msg.content, declared, where=f"{where}messages[{i}] ({msg.role})")
        if msg.role == "system" and used:
            raise TemplateRejected(
                f"{where}messages[{i}] (system): system messages hold fixed policy text and may not use "
                f"variables ({sorted(used)}); put caller content in a user message"
            )


@lru_cache(maxsize=1024)
def _compile(source: str) -> Template:
    return _env.from_string(source)


def render_messages(
    messages: Sequence[Message], declared: Sequence[str], values: Mapping[str, object]
) -> list[dict[str, str]]:
    """Render templates into chat messages using only the declared variables."""
    missing = [v for v in declared if v not in values or values[v] is None]
    if missing:
        raise RenderError(f"prompt needs variable(s) {missing} that the request did not provide")
    ctx = {v: values[v] for v in declared}
    out = []
    for msg in messages:
        try:
            text = _compile(msg.content).render(ctx)
        except UndefinedError as exc:  # pragma: no cover - guarded by the declared check above
            raise RenderError(str(exc)) from None
        out.append({"role": msg.role, "content": text})
    return out
