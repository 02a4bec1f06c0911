"""The README's rollout sample needs are computed, not typed by hand: they must equal what the
gates' own functions say of the defaults (#16)."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.cli.rollouts import defaults_help
from prompt_registry.rollouts import GateConfig, canary_verdicts_needed, samples_to_pass

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Canary and shadow rollouts")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_states_the_real_sample_needs_of_the_defaults() -> None:
    d = GateConfig()
    section = " ".join(_section().split())
    m = re.search(r"a step waits for at least \*\*([\d,]+)\*\* canary verdicts .*? the Wilson bound alone "
                  r"needs \*\*([\d,]+)\*\* at the default ([\d.]+) error and parse-failure limits.*?about "
                  r"\*\*([\d,]+)\*\* requests at a 5 % step", section)
    assert m, "the README no longer states the sample needs of the default gates"
    step, wilson, limit, requests = (m.group(i).replace(",", "") for i in range(1, 5))
    assert int(step) == canary_verdicts_needed(d)
    assert float(limit) == d.max_error_rate == d.max_parse_failure_rate
    assert int(wilson) == samples_to_pass(float(limit), d.confidence)
    assert int(requests) == round(int(step) / 0.05)


def test_cli_help_computes_the_same_figures() -> None:
    text = defaults_help()
    d = GateConfig()
    assert f"at least {canary_verdicts_needed(d)} canary verdicts" in text
    assert f"{samples_to_pass(0.02, d.confidence)} at a 0.02 limit" in text
