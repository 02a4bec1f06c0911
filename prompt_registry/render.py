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
from json.encoder import encode_basestring
from typing import TYPE_CHECKING

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from prompt_registry.errors import RenderError, TemplateRejected

if TYPE_CHECKING:
    from jinja2 import Template

    from prompt_registry.models import Message

__all__ = ["ALLOWED_FILTERS", "MAX_NESTING", "MAX_RENDERED_CHARS", "MAX_VARIABLE_CHARS",
           "check_messages", "check_renders", "check_template", "render_messages"]

ALLOWED_FILTERS = frozenset({"trim", "upper", "lower", "default", "truncate", "length", "tojson",
                             "json"})

# A rendered prompt (all messages) may not exceed this many characters: a template that repeats
# a caller's text 200 times must not turn a 20 KB request into a 4 MB model request. Publishing
# refuses a template whose worst case (every variable at MAX_VARIABLE_CHARS) exceeds it, and
# rendering enforces it for every request (422 render_error naming the cap).
MAX_RENDERED_CHARS = 256 * 1024
MAX_VARIABLE_CHARS = 20_000  # the gateway's default max_description_chars
MAX_NESTING = 24  # nested ifs / operators in one template expression tree

_ALLOWED_NODES: tuple[type[nodes.Node], ...] = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Const, nodes.If,
    nodes.Filter, nodes.Not, nodes.And, nodes.Or, nodes.Compare, nodes.Operand, nodes.Concat,
    nodes.Test,
)

_env = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, trim_blocks=False
)


def _json_string(value: object) -> str:
    """`{{ title|json }}`: the value as one JSON string literal, quotes, backslashes and
    newlines escaped, so seller text placed in a JSON object can never end its string or the
    object (a delimiter a seller could type, like `LISTING>>>`, can be forged; this cannot).
    Unlike `tojson` it keeps non-ASCII text readable (a Chinese title stays Chinese).
    `json.dumps(s, ensure_ascii=False)` for a string is exactly this call (the C encoder's
    `encode_basestring`), minus the encoder object `dumps` builds per call."""
    text: str = encode_basestring(value if isinstance(value, str) else str(value))
    return text


_env.filters["json"] = _json_string


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


def _depth(node: nodes.Node, limit: int) -> int:
    """Nesting depth of *node*'s tree, stopping (iteratively) once past *limit*."""
    deepest = 0
    stack: list[tuple[nodes.Node, int]] = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in current.iter_child_nodes())
    return deepest


def check_template(source: str, declared: Sequence[str], *, where: str = "template") -> set[str]:
    """Reject unsafe or undeclared constructs; return the variable names the template uses."""
    try:
        ast = _env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateRejected(f"{where}: syntax error on line {exc.lineno}: {exc.message}") from None
    except RecursionError:
        raise TemplateRejected(f"{where}: the template nests too deeply") from None
    if _depth(ast, MAX_NESTING + 2) > MAX_NESTING + 2:  # Template and Output wrap every body
        raise TemplateRejected(f"{where}: the template nests more than {MAX_NESTING} levels deep")
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


def _constant(source: str) -> str | None:
    """The text of a template that reads no variable (a system message: fixed policy text),
    rendered once; None when it reads one, or fails to render (it fails at each render then,
    as before)."""
    try:
        if any(True for _ in _env.parse(source).find_all(nodes.Name)):
            return None
        template = _compile(source)
        if template.blocks:
            return None
        text: str = _env.concat(template.root_render_func(template.new_context({})))
    except Exception:  # noqa: BLE001 - not folded: the render reports it with the message's name
        return None
    return text


# Per message list (a prompt version's locale variant: built once, never changed): each
# message's role with its constant text or its compiled template. Keyed by the list's id; the
# entry holds the list, so the id cannot be reused while the entry lives.
_Parts = tuple[tuple[str, "str | Template"], ...]
_compiled: dict[int, tuple[Sequence[Message], _Parts]] = {}
_COMPILED_MAX = 1024


def _parts(messages: Sequence[Message]) -> _Parts:
    entry = _compiled.get(id(messages))
    if entry is not None and entry[0] is messages:
        return entry[1]
    parts = tuple((m.role, _constant(m.content) or _compile(m.content)) for m in messages)
    if len(_compiled) >= _COMPILED_MAX:
        _compiled.clear()
    _compiled[id(messages)] = (messages, parts)
    return parts


def render_messages(
    messages: Sequence[Message], declared: Sequence[str], values: Mapping[str, object], *,
    max_chars: int = MAX_RENDERED_CHARS,
) -> list[dict[str, str]]:
    """Render templates into chat messages using only the declared variables. Any failure of
    a template on these values (a filter given the wrong type, a comparison of a string with a
    number) is a `RenderError` naming the message, never an internal error; so is a rendered
    prompt longer than *max_chars*. The error never quotes the values. A message that reads no
    variable was rendered once, when its list was first rendered."""
    missing = [v for v in declared if v not in values or values[v] is None]
    if missing:
        raise RenderError(f"prompt needs variable(s) {missing} that the request did not provide")
    ctx = {v: values[v] for v in declared}
    # One jinja context for every message of this render, holding only the declared values:
    # `Template.render` copies the values and the environment's globals (a ChainMap) into a
    # new context per message, which was most of the render's cost on the gateway's hot path.
    # Sharing it is safe because the allow-list admits no `set`, block or global: a message
    # can only read it. Templates are compiled from strings, so they all have no name.
    context = None
    out = []
    total = 0
    for i, (role, part) in enumerate(_parts(messages)):
        if isinstance(part, str):
            text = part
        else:
            try:
                if part.blocks:
                    text = _env.concat(part.root_render_func(part.new_context(ctx, shared=True)))
                else:
                    if context is None:
                        context = _env.context_class(_env, ctx, None, {})
                    text = _env.concat(part.root_render_func(context))
            except UndefinedError as exc:  # pragma: no cover - guarded by the declared check above
                raise RenderError(str(exc)) from None
            except RecursionError:
                raise RenderError(f"messages[{i}] ({role}) nests too deeply to render") from None
            except Exception as exc:  # noqa: BLE001 - a template failing on a value is the caller's 4xx
                raise RenderError(f"messages[{i}] ({role}) cannot be rendered with these variables "
                                  f"({type(exc).__name__})") from None
        total += len(text)
        if total > max_chars:
            raise RenderError(f"the rendered prompt exceeds the cap of {max_chars} characters")
        out.append({"role": role, "content": text})
    return out


def check_renders(messages: Sequence[Message], declared: Sequence[str], *, where: str = "",
                  max_chars: int = MAX_RENDERED_CHARS,
                  max_variable_chars: int = MAX_VARIABLE_CHARS) -> None:
    """Publish-time proof that the templates render: with sample values (a short word, a
    number-like string) they must render, and their worst case, every variable at
    *max_variable_chars*, must stay under *max_chars*. Refuses with `TemplateRejected`."""
    for sample in ("sample", "12345"):
        try:
            render_messages(messages, declared, dict.fromkeys(declared, sample), max_chars=10**9)
        except RenderError as exc:
            raise TemplateRejected(f"{where}templates do not render with a sample value: {exc}") from None
    base = render_messages(messages, declared, dict.fromkeys(declared, ""), max_chars=10**9)
    worst = sum(len(m["content"]) for m in base)
    for var in declared:
        probe = render_messages(messages, declared, {**dict.fromkeys(declared, ""), var: "x" * 64},
                                max_chars=10**9)
        grown = sum(len(m["content"]) for m in probe) - sum(len(m["content"]) for m in base)
        copies = max(0, grown) / 64
        worst += int(copies * max_variable_chars)
    if worst > max_chars:
        raise TemplateRejected(
            f"{where}templates can render to {worst} characters (every variable at "
            f"{max_variable_chars} characters); the cap is {max_chars}: use each variable fewer times")
