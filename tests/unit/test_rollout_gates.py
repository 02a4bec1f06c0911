"""The live rollout gates (`prompt_registry.rollouts.evaluate_gates`) reading typed
`RolloutStats`: which evidence each gate reads, and that missing evidence means waiting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.rollouts.ops import decide
from prompt_registry.rollout_stats import (
    ArmStats,
    CategoryFeedback,
    FeedbackStats,
    LatencySketch,
    PairStats,
    RolloutStats,
    build_rollout_stats,
    sketch_index,
)
from prompt_registry.rollouts import (
    GateConfig,
    GateResult,
    Rollout,
    ShadowSpec,
    evaluate_gates,
    new_rollout,
)


def _rollout(**gates: object) -> Rollout:
    return new_rollout("p", stable_version=1, canary_version=2, steps=[50, 100],
                       shadows=[ShadowSpec(version=2, sample_rate=1.0)], step_hold_s=0,
                       gates=GateConfig(**{"min_samples": 100, **gates}), auto=True,  # type: ignore[arg-type]
                       subject_key="seller_id", started_by="test")


def _by_name(gates: list[GateResult]) -> dict[str, GateResult]:
    return {g.name: g for g in gates}


def _healthy(n: int = 1000) -> dict[str, int]:
    """Counters of a canary and stable that behave alike, with n verdicts each."""
    out: dict[str, int] = {}
    for arm in ("stable", "canary"):
        out |= {f"{arm}:requests": n, f"{arm}:verdicts": n, f"{arm}:flag:spam": n // 10, f"{arm}:lat:100": n}
    return out | {"pair:2:n": n, "pair:2:agree": n}


def test_healthy_canary_passes_every_gate() -> None:
    r = _rollout()
    gates = evaluate_gates(r, build_rollout_stats(_healthy()))
    assert [g.name for g in gates] == ["error_rate", "parse_failure_rate", "disagreement_rate",
                                       "flag_rate_drift[spam]"]
    assert all(g.verdict == "pass" for g in gates)
    assert decide(r, gates, datetime.now(UTC)) == "step"


def test_no_evidence_means_wait() -> None:
    gates = evaluate_gates(_rollout(max_p95_latency_ms=200.0), RolloutStats())
    assert {g.name: g.verdict for g in gates} == {
        "error_rate": "wait", "parse_failure_rate": "wait", "p95_latency_ms": "wait",
        "disagreement_rate": "wait", "flag_rate_drift": "wait"}


def test_parse_failures_and_errors_are_judged_on_the_canary_only() -> None:
    raw = _healthy() | {"canary:parse_failures": 100, "stable:errors": 500, "stable:parse_failures": 500}
    g = _by_name(evaluate_gates(_rollout(), build_rollout_stats(raw)))
    assert g["parse_failure_rate"].verdict == "fail" and g["parse_failure_rate"].value == 0.1
    assert g["error_rate"].verdict == "pass"


def test_disagreement_reads_the_canary_versions_pair() -> None:
    raw = _healthy()
    raw |= {"pair:2:agree": 600, "pair:3:n": 1000, "pair:3:agree": 1000}  # v3 agrees, but is not the canary
    g = _by_name(evaluate_gates(_rollout(), build_rollout_stats(raw)))
    assert g["disagreement_rate"].verdict == "fail" and g["disagreement_rate"].value == pytest.approx(0.4)
    unshadowed = {k: v for k, v in _healthy().items() if not k.startswith("pair:")}
    assert _by_name(evaluate_gates(_rollout(), build_rollout_stats(unshadowed)))["disagreement_rate"].verdict == "wait"


def test_flag_drift_reports_the_worst_category() -> None:
    raw = _healthy() | {"canary:flag:scam": 300, "stable:flag:scam": 10}
    g = _by_name(evaluate_gates(_rollout(), build_rollout_stats(raw)))
    assert "flag_rate_drift[spam]" not in g
    assert g["flag_rate_drift[scam]"].verdict == "fail"
    assert g["flag_rate_drift[scam]"].value == pytest.approx(0.29)


def _sketch(**ms_counts: int) -> LatencySketch:
    return LatencySketch({sketch_index(float(ms.removeprefix("ms"))): n for ms, n in ms_counts.items()})


def test_p95_latency_gate_reads_the_sketch() -> None:
    slow = ArmStats(requests=200, verdicts=200, latency=_sketch(ms100=150, ms5000=50), recorded=True)
    fast = ArmStats(requests=200, verdicts=200, latency=_sketch(ms100=200), recorded=True)
    r = _rollout(max_p95_latency_ms=400.0)
    assert _by_name(evaluate_gates(r, RolloutStats(canary=slow)))["p95_latency_ms"].verdict == "fail"
    assert _by_name(evaluate_gates(r, RolloutStats(canary=fast)))["p95_latency_ms"].value == pytest.approx(100.0, rel=0.01)
    assert _by_name(evaluate_gates(r, RolloutStats(canary=fast)))["p95_latency_ms"].verdict == "pass"


def test_p95_gate_judges_the_true_p95_not_a_bucket_edge() -> None:
    """Finding: with histogram buckets 200/400 a true p95 of 287 ms read as 400 ms, so a 350 ms
    limit failed a canary that meets it."""
    canary = ArmStats(requests=200, verdicts=200, latency=_sketch(ms150=185, ms287=15), recorded=True)
    g = _by_name(evaluate_gates(_rollout(max_p95_latency_ms=350.0), RolloutStats(canary=canary)))["p95_latency_ms"]
    assert g.verdict == "pass" and g.value == pytest.approx(287.0, rel=0.01)


def test_feedback_gates_per_category() -> None:
    canary = ArmStats(feedback=FeedbackStats(80, {"spam": CategoryFeedback(tp=20, fp=60, fn=0)}), recorded=True)
    stable = ArmStats(feedback=FeedbackStats(80, {"scam": CategoryFeedback(tp=60, fn=0)}), recorded=True)
    r = _rollout(min_precision=0.9, max_recall_drop=0.1, min_feedback=50, min_agreement=None,
                 max_flag_rate_drift=None)
    g = _by_name(evaluate_gates(r, RolloutStats(stable=stable, canary=canary,
                                                pairs={2: PairStats(2, n=10, agree=10)})))
    assert g["imprecision[spam]"].verdict == "fail" and g["imprecision[spam]"].samples == 80
    # scam: stable found 60 of 60, the canary was never labelled on scam: wait, not a crash
    assert g["recall_drop[scam]"].verdict == "wait" and g["recall_drop[scam]"].samples == 0
    assert "imprecision[scam]" not in g  # precision is judged on the canary's own flags
