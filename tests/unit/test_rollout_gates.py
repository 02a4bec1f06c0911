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
    canary_verdicts_needed,
    evaluate_gates,
    new_rollout,
    sample_needs,
    samples_to_pass,
    wilson_interval,
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


# -- gates that cannot be measured, gates switched off, samples needed (#16 item 3) ---------

def _unshadowed(**gates: object) -> Rollout:
    return new_rollout("p", stable_version=1, canary_version=2, steps=[50, 100], shadows=[],
                       step_hold_s=0, gates=GateConfig(**{"min_samples": 100, **gates}), auto=True,  # type: ignore[arg-type]
                       subject_key="seller_id", started_by="test")


def test_a_canary_that_is_not_shadowed_skips_agreement_and_steps() -> None:
    """Finding: the agreement gate waited at n = 0 forever when the canary version was not
    shadowed, so such a canary never moved."""
    r = _unshadowed()
    raw = {k: v for k, v in _healthy().items() if not k.startswith("pair:")}
    g = _by_name(evaluate_gates(r, build_rollout_stats(raw)))
    assert g["disagreement_rate"].verdict == "skip"
    assert "not shadowed" in g["disagreement_rate"].note
    assert decide(r, list(g.values()), datetime.now(UTC)) == "step"


def test_every_gate_can_be_switched_off() -> None:
    off = dict(max_error_rate=None, max_parse_failure_rate=None, min_agreement=None, max_flag_rate_drift=None,
               max_p95_latency_ms=None, min_precision=None, max_recall_drop=None)
    assert evaluate_gates(_rollout(**off), build_rollout_stats(_healthy())) == []
    on = _by_name(evaluate_gates(_rollout(max_p95_latency_ms=500.0, min_precision=0.9, max_recall_drop=0.1),
                                 build_rollout_stats(_healthy())))
    # precision and recall gates with no reviewer label yet: visible, waiting, with their needs
    assert on["imprecision"].verdict == "wait" and on["imprecision"].needs == 50
    assert on["recall_drop"].verdict == "wait" and on["recall_drop"].needs == 50


def test_samples_to_pass_is_the_smallest_n_a_perfect_record_passes() -> None:
    for limit in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001):
        for conf in (0.9, 0.95, 0.99):
            n = samples_to_pass(limit, conf)
            assert n is not None
            assert wilson_interval(0, n, conf)[1] <= limit
            assert n == 1 or wilson_interval(0, n - 1, conf)[1] > limit
    assert samples_to_pass(0.02, 0.95) == 189
    assert samples_to_pass(0.0, 0.95) is None and samples_to_pass(1.0, 0.95) == 1


def test_status_says_how_many_more_samples_each_gate_needs() -> None:
    """Finding: with the default 0.02 limits a gate needs ~189 canary samples whatever
    --min-samples says, and status only said WAIT."""
    r = _unshadowed(min_samples=30)
    raw = {"canary:requests": 50, "canary:verdicts": 50, "stable:requests": 50, "stable:verdicts": 50}
    g = _by_name(evaluate_gates(r, build_rollout_stats(raw)))
    assert g["error_rate"].verdict == "wait" and g["error_rate"].needs == 189 and g["error_rate"].more == 139
    assert g["error_rate"].as_dict()["more"] == 139
    assert sample_needs(r.gates)["parse_failure_rate"] == 189
    assert sample_needs(GateConfig()) == {"error_rate": 200, "parse_failure_rate": 200,
                                          "disagreement_rate": 200, "flag_rate_drift": 200}
    assert canary_verdicts_needed(GateConfig(min_samples=30)) == 189
    assert canary_verdicts_needed(GateConfig(max_error_rate=0.0)) is None
