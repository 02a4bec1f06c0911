from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from prompt_registry import PromptSpec, VerdictSchema
from prompt_registry.models import PolicyMeta


def test_verdict_schema_requires_the_fail_closed_decision() -> None:
    with pytest.raises(ValidationError, match="needs_review"):
        VerdictSchema(decisions=["allow", "block"], categories=["none"])


def test_verdict_values_must_be_identifiers() -> None:
    with pytest.raises(ValidationError, match="identifier"):
        VerdictSchema(decisions=["allow", "needs_review", 'x"|.*'], categories=["none"])


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"decision":"block","category":"counterfeit","confidence":0.87}', True),
        ('{"decision":"allow","category":"none","confidence":1.00}', True),
        ('{"decision":"allow","category":"none","confidence":1.5}', False),
        ('{"decision": "allow","category":"none","confidence":0.50}', False),
        ('{"decision":"approve","category":"none","confidence":0.50}', False),
        ('{"decision":"allow","category":"none"}', False),
    ],
)
def test_regex_is_the_exact_verdict_shape(example_spec: PromptSpec, text: str, ok: bool) -> None:
    assert bool(re.fullmatch(example_spec.verdict.regex(), text)) is ok


def test_json_schema_matches_verdict(example_spec: PromptSpec) -> None:
    schema = example_spec.verdict.json_schema()
    assert schema["properties"]["decision"]["enum"] == ["allow", "block", "needs_review"]
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"decision", "category", "confidence"}


def test_content_hash_ignores_change_note_and_author(example_spec: PromptSpec) -> None:
    other = example_spec.model_copy(update={"policy": PolicyMeta(
        policy_id=example_spec.policy.policy_id, owner=example_spec.policy.owner,
        change_note="different note", author="someone else")})
    assert other.content_hash() == example_spec.content_hash()
    changed = example_spec.model_copy(update={"description": "changed"})
    assert changed.content_hash() != example_spec.content_hash()


def test_example_prompt_covers_the_policy(example_spec: PromptSpec) -> None:
    assert set(example_spec.verdict.categories) == {
        "none", "counterfeit", "prohibited_item", "misleading_claim", "off_platform_payment",
        "adult", "hate_harassment"}
    # The policy text is a fixed system prefix; caller content sits in the user message.
    assert example_spec.messages[0].role == "system"
    assert "{{" not in example_spec.messages[0].content
    assert "{{ title|json }}" in example_spec.messages[-1].content
