from __future__ import annotations

import random
import string

import pytest

from gateway.verdict import parse_verdict
from prompt_registry import PromptSpec


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ('{"decision":"allow","category":"none","confidence":0.9', "length", "truncated_output"),
        ('{"decision":"allow","category":"none","confidence":0.90}', "length", "truncated_output"),
        ("allow", "stop", "unparseable_output"),
        ("", "stop", "unparseable_output"),
        ('["allow"]', "stop", "invalid_verdict"),
        ('{"decision":"ALLOW","category":"none","confidence":0.9}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"weapons","confidence":0.9}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"none"}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"none","confidence":0.9,"x":1}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"none","confidence":true}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"none","confidence":"0.9"}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"none","confidence":1.2}', "stop", "invalid_verdict"),
        ('{"decision":"allow","category":"none","confidence":NaN}', "stop", "unparseable_output"),
    ],
)
def test_bad_output_fails_closed(example_spec: PromptSpec, text: str, finish: str, reason: str) -> None:
    v = parse_verdict(text, finish, example_spec.verdict)
    assert v.decision == "needs_review"
    assert v.fail_reason == reason
    assert v.category is None


def test_valid_output_is_used(example_spec: PromptSpec) -> None:
    v = parse_verdict('{"decision":"block","category":"counterfeit","confidence":0.87}', "stop",
                      example_spec.verdict)
    assert (v.decision, v.category, v.confidence, v.fail_reason) == ("block", "counterfeit", 0.87, None)


def test_random_garbage_never_becomes_allow(example_spec: PromptSpec) -> None:
    rng = random.Random(7)
    alphabet = string.printable + '{}":,'
    base = '{"decision":"allow","category":"none","confidence":0.50}'
    for _ in range(3000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        else:  # mutate one character of a valid allow verdict
            i = rng.randrange(len(base))
            text = base[:i] + rng.choice(alphabet) + base[i + 1:]
        v = parse_verdict(text, "stop", example_spec.verdict)
        if v.decision == "allow":
            # Only a byte-for-byte valid verdict may say allow.
            assert v.fail_reason is None and v.category in example_spec.verdict.categories
            assert 0 <= (v.confidence or 0) <= 1
