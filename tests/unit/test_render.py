from __future__ import annotations

import pytest

from prompt_registry import Message, RenderError, TemplateRejected
from prompt_registry.render import check_messages, check_template, render_messages


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{{ title.__class__ }}", "attribute access"),
        ("{{ title['x'] }}", "item access"),
        ("{{ title.upper() }}", "call|attribute access"),
        ("{{ lipsum() }}", "function or method call"),
        ("{% import 'x' as y %}", "import"),
        ("{% include 'x' %}", "include"),
        ("{% set a = 1 %}{{ a }}", "set"),
        ("{% for c in title %}{{ c }}{% endfor %}", "for loop"),
        ("{{ title | attr('x') }}", "filter 'attr'"),
        ("{{ cycler }}", "undeclared variable"),
        ("{{ title ", "syntax error"),
    ],
)
def test_unsafe_templates_are_rejected(source: str, reason: str) -> None:
    with pytest.raises(TemplateRejected, match=reason):
        check_template(source, ["title"])


def test_allowed_constructs_pass() -> None:
    used = check_template(
        "{% if description %}{{ title | trim | upper }} {{ description | truncate(50) }}{% endif %}",
        ["title", "description"],
    )
    assert used == {"title", "description"}


def test_system_messages_may_not_use_variables() -> None:
    msgs = [Message(role="system", content="Policy for {{ locale }}"),
            Message(role="user", content="{{ title }}")]
    with pytest.raises(TemplateRejected, match="system messages hold fixed policy text"):
        check_messages(msgs, ["locale", "title"])


def test_caller_content_is_data_not_template_code() -> None:
    msgs = [Message(role="system", content="policy"), Message(role="user", content="T: {{ title }}")]
    hostile = "{{ ''.__class__.__mro__ }} {% include '/etc/passwd' %} {{ 7*7 }}"
    out = render_messages(msgs, ["title"], {"title": hostile})
    assert out == [{"role": "system", "content": "policy"},
                   {"role": "user", "content": f"T: {hostile}"}]


def test_missing_variable_is_a_render_error() -> None:
    msgs = [Message(role="user", content="{{ title }} {{ description }}")]
    with pytest.raises(RenderError, match="description"):
        render_messages(msgs, ["title", "description"], {"title": "x"})


def test_only_declared_variables_reach_the_template() -> None:
    msgs = [Message(role="user", content="{{ title }}")]
    out = render_messages(msgs, ["title"], {"title": "a", "seller_id": "secret"})
    assert out[0]["content"] == "a"


def test_one_context_per_render_and_the_same_text_as_jinja_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every message of a render reads one jinja context built once (building one per message
    was most of the render's cost), a message that reads no variable (the system message) is
    not rendered again at all, and the text is what `Template.render` gives, for every message
    of every locale of the shipped prompts."""
    from pathlib import Path

    from prompt_registry import render as render_mod
    from prompt_registry.loader import load_prompt_file

    built: list[object] = []
    context_class = render_mod._env.context_class

    class Counting(context_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(self)
            super().__init__(*args, **kwargs)

    values = {"title": 'Earbuds "sealed"\nbox', "description": "Ünïcode — 耳机", "locale": "en-US"}
    specs = sorted((Path(__file__).resolve().parents[2] / "configs" / "prompts").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_prompt_file(path)
        for locale in [spec.default_locale, *spec.locales]:
            _, templates = spec.select_locale(locale)
            render_messages(templates, spec.variables, values)  # compiles the list, once
            monkeypatch.setattr(render_mod._env, "context_class", Counting)
            built.clear()
            out = render_messages(templates, spec.variables, values)
            monkeypatch.setattr(render_mod._env, "context_class", context_class)
            assert len(built) == 1 and len(templates) > 1
            ctx = {v: values[v] for v in spec.variables}
            assert out == [{"role": m.role, "content": render_mod._compile(m.content).render(ctx)}
                           for m in templates]
            assert [isinstance(text, str) for _, text in render_mod._parts(templates)] == [
                m.role == "system" for m in templates]


def test_the_json_filter_is_json_dumps_without_ascii_escapes() -> None:
    """`|json` gives exactly `json.dumps(value, ensure_ascii=False)`: quotes, backslashes and
    control characters escaped, other text (any script, U+2028) as it is."""
    import json

    from prompt_registry.render import _json_string

    samples = ['a "b" \\ c', "line\nbreak\ttab\x00\x1f\x7f", "耳机 — Ünïcode \u2028\u2029 😀",
               "".join(map(chr, range(0, 0x250))), "LISTING>>> }]}", 12345, None]
    for value in samples:
        assert _json_string(value) == json.dumps(value if isinstance(value, str) else str(value),
                                                 ensure_ascii=False)
