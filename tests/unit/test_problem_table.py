"""The one error table: lookup along the class hierarchy, and docs that cannot drift from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.problems import (
    EDGE_PROBLEMS,
    PROBLEM_TABLE,
    CallerRateLimited,
    GatewayError,
    ModelSaturated,
    UnknownPrompt,
    error_types_markdown,
    problem_for,
)
from prompt_registry import StoreUnavailable
from serving import BackendBadRequest, BackendError, BackendUnavailable

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "failure-semantics.md"


def test_subclasses_inherit_their_parents_row() -> None:
    class FlakyEngine(BackendUnavailable):
        pass

    problem = problem_for(FlakyEngine("engine restarting"))
    assert problem is not None and (problem.status, problem.type, problem.retryable) == (
        503, "model_unavailable", True)


def test_unmapped_exceptions_are_not_problems() -> None:
    """A ValueError (or a bare GatewayError/BackendError) escaping is our bug: a 500 at the edge."""
    for exc in (ValueError("x"), KeyError("x"), GatewayError("x"), BackendError("x")):
        assert problem_for(exc) is None


def test_retry_after_and_field_travel_with_the_problem() -> None:
    limited = problem_for(CallerRateLimited("slow down", retry_after_s=0.25))
    assert limited is not None and (limited.status, limited.retry_after_s) == (429, 0.25)
    saturated = problem_for(ModelSaturated("full"))
    assert saturated is not None and saturated.retry_after_s == 1.0
    unknown = problem_for(UnknownPrompt("unknown prompt 'x'", field="model"))
    assert unknown is not None and unknown.fields == ({"field": "model", "problem": "unknown prompt 'x'"},)
    assert problem_for(StoreUnavailable("down")).type == "registry_unavailable"  # type: ignore[union-attr]
    assert problem_for(BackendBadRequest("400")).status == 502  # type: ignore[union-attr]


def test_a_type_means_one_status() -> None:
    """Two exception classes may share a type (the registry's and the gateway's unknown model),
    but a type always has the same status and retryability."""
    seen: dict[str, tuple[int, bool]] = {}
    for spec in PROBLEM_TABLE.values():
        assert seen.setdefault(spec.type, (spec.status, spec.retryable)) == (spec.status, spec.retryable)


def test_the_docs_table_is_the_generated_one() -> None:
    text = DOC.read_text()
    begin, end = "<!-- error-types:begin", "<!-- error-types:end -->"
    section = text[text.index(begin):text.index(end)]
    generated = section.split("-->\n", 1)[1]
    assert generated == error_types_markdown(), (
        "docs/failure-semantics.md's error table is out of date: regenerate it with "
        "`python -m gateway.problems` and paste it between the error-types markers")


def _known() -> dict[str, set[int]]:
    known: dict[str, set[int]] = {kind: set(statuses) for kind, (statuses, _) in EDGE_PROBLEMS.items()}
    for spec in PROBLEM_TABLE.values():
        known.setdefault(spec.type, set()).add(spec.status)
    return known


@pytest.mark.parametrize("doc", ["README.md", "docs/failure-semantics.md"])
def test_every_documented_status_and_type_is_real(doc: str) -> None:
    known = _known()
    mentions = re.findall(r"`(\d{3}) ([a-z_]+)`", (ROOT / doc).read_text())
    assert mentions, f"{doc} names no `NNN type` at all?"
    wrong = sorted({f"{status} {kind}" for status, kind in mentions
                    if int(status) not in known.get(kind, set())})
    assert not wrong, f"{doc} documents failures the gateway does not answer: {wrong}"


def test_every_error_the_adapters_raise_is_in_the_edge_table() -> None:
    """`ApiError(NNN, "type", ...)` and `_invalid(..., code="type")` in the server's source."""
    known = _known()
    found: set[tuple[int, str]] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        src = path.read_text()
        found |= {(int(s), k) for s, k in re.findall(r'ApiError\(\s*(\d{3}),\s*"([a-z_]+)"', src)}
        found |= {(400, k) for k in re.findall(r'_invalid\([^()]*?code="([a-z_]+)"(?!, status)', src, re.S)}
        found |= {(int(s), k) for k, s in re.findall(r'code="([a-z_]+)", status=(\d{3})', src)}
    assert found, "the scan found nothing: the pattern no longer matches the code"
    missing = sorted(f"{s} {k}" for s, k in found if s not in known.get(k, set()))
    assert not missing, f"raised but not in gateway.problems.EDGE_PROBLEMS: {missing}"
