"""Promotion gates: criteria as declared in a prompt file, judged on hand-made scorecards whose
numbers are worked out here by hand; the one label-move check (refuse, pass, override,
inheritance, rollback, seeding); the controller holding a rollout the gate refuses; `modgate
eval run` storing its scorecards."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from prompt_registry import GateOverride, GateRefused, PromptFileError, PromptSpec
from prompt_registry.gates import (
    ScorecardMismatch,
    evaluate_gate,
    evaluation_hash,
    gate_report,
    move_label,
)
from prompt_registry.loader import BOOTSTRAP_REASON, parse_prompt_text, seed_store
from prompt_registry.models import EvaluationSpec
from prompt_registry.ops import rollback
from prompt_registry.sqlite_store import SqlitePromptStore
from tests.scorecards import SAMPLE_SHA, make_record, store_scorecard

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
NAME = "listing-moderation"
Z2 = 1.959963984540054 ** 2  # z of a 95 % interval, squared


def spec_of(criteria: list[dict], sha: str = SAMPLE_SHA) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"dataset": {"sha256": sha, "path": "datasets/x.jsonl"},
                                          "criteria": criteria})


def judge(criteria: list[dict], cand: object, prod: object = None, production_version: int | None = 1):
    return evaluate_gate(spec_of(criteria), cand, prod, prompt=NAME, version=2,  # type: ignore[arg-type]
                         production_version=production_version, declared_by=2)


def rec(version: int = 2, **kw: object):
    return make_record(NAME, version, f"hash{version}", **kw)  # type: ignore[arg-type]


# -- pure evaluation, numbers by hand ----------------------------------------------------------

def test_precision_lower_bound_by_hand() -> None:
    crit = [{"metric": "precision", "category": "counterfeit", "bound": "lower", "min": 0.75}]
    # 27/27: the Wilson lower bound of a proportion of 1 is n / (n + z^2) = 27 / 30.84 = 0.875
    ok = judge(crit, rec())
    assert ok.verdict == "pass"
    assert ok.results[0].value == pytest.approx(27 / (27 + Z2))
    assert ok.results[0].detail == "counterfeit precision lower bound 0.875 >= 0.750 (n=27)"
    # 20 right of 26 flagged: p = 0.769, Wilson lower bound
    # (p + z²/2n - z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n) = 0.579
    p, n = 20 / 26, 26
    low = (p + Z2 / (2 * n) - math.sqrt(Z2) * math.sqrt(p * (1 - p) / n + Z2 / (4 * n * n))) / (1 + Z2 / n)
    bad = judge(crit, rec(counts={"counterfeit": (20, 6, 7)}))
    assert bad.verdict == "fail" and bad.results[0].value == pytest.approx(low) and round(low, 3) == 0.579
    assert bad.failures[0].detail == "counterfeit precision lower bound 0.579 < 0.750 (n=26)"
    assert "counterfeit precision lower bound 0.579 < 0.750" in bad.message()
    assert "dataset e08b6d315ed6 (datasets/x.jsonl, 194 items)" in bad.message()
    # the point estimate (0.769) clears the same bar: only the bound makes it fail
    assert judge([{**crit[0], "bound": "estimate"}], rec(counts={"counterfeit": (20, 6, 7)})).verdict == "pass"


def test_recall_drop_against_production_by_hand() -> None:
    crit = [{"metric": "recall", "category": "*", "max_drop_vs_production": 0.05}]
    prod = rec(1, counts={"misleading_claim": (20, 0, 4), "adult": (16, 0, 0)})
    # misleading_claim 18/24 = 0.750 vs 20/24 = 0.833: 0.083 below, more than 0.05
    # prohibited_item 26/27 = 0.963 vs 1.000: 0.037 below, allowed
    cand = rec(counts={"misleading_claim": (18, 0, 6), "prohibited_item": (26, 0, 1)})
    report = judge(crit, cand, prod)
    assert report.verdict == "fail"
    assert len(report.results) == 6  # one per category
    assert [r.category for r in report.failures] == ["misleading_claim"]
    assert report.failures[0].detail == ("misleading_claim recall 0.750 is 0.083 below production "
                                         "v1's 0.833 (allowed drop 0.050)")
    assert report.failures[0].baseline == pytest.approx(20 / 24)
    # exactly at the limit passes: 19/20 = 0.95 vs 20/20, drop 0.05
    edge = judge(crit, rec(counts={"off_platform_payment": (19, 0, 1)}),
                 rec(1, counts={"off_platform_payment": (20, 0, 0)}))
    assert edge.verdict == "pass"
    # better than production always passes
    assert judge(crit, rec(), prod).verdict == "pass"


def test_rates_accuracy_and_upper_bounds_by_hand() -> None:
    crit = [{"metric": "parse_failure_rate", "max": 0.02}]
    assert judge(crit, rec(parse_failures=3)).verdict == "pass"      # 3/194 = 0.015
    bad = judge(crit, rec(parse_failures=4))                          # 4/194 = 0.021
    assert bad.verdict == "fail" and bad.failures[0].detail == "parse failure rate 0.021 > 0.020 (n=194)"
    # 0 errors of 194: Wilson upper bound z²/(n + z²) = 0.0194
    up = judge([{"metric": "error_rate", "bound": "upper", "max": 0.02}], rec())
    assert up.verdict == "pass" and up.results[0].value == pytest.approx(Z2 / (194 + Z2))
    assert judge([{"metric": "error_rate", "bound": "upper", "max": 0.019}], rec()).verdict == "fail"
    # accuracy: correct 194 - 6 fp - 7 fn = 181 of 194 = 0.933
    acc = judge([{"metric": "accuracy", "min": 0.94}], rec(counts={"counterfeit": (20, 6, 7)}))
    assert acc.failures[0].detail == "accuracy 0.933 < 0.940 (n=194)"


def test_undefined_metrics_missing_scorecards_and_no_production() -> None:
    no_counterfeit = rec(counts={"counterfeit": (0, 0, 27)})  # never predicted: precision undefined
    named = judge([{"metric": "precision", "category": "counterfeit", "min": 0.5}], no_counterfeit)
    assert named.verdict == "fail" and named.failures[0].detail == "counterfeit precision undefined (no predictions)"
    each = judge([{"metric": "precision", "category": "*", "min": 0.5}], no_counterfeit)
    assert each.verdict == "pass" and "counterfeit" not in [r.category for r in each.results]

    missing = judge([{"metric": "recall", "category": "*", "max_drop_vs_production": 0.03}], None)
    assert missing.verdict == "fail" and missing.items is None
    assert "no stored scorecard of v2 on dataset e08b6d315ed6" in missing.message()
    assert ("to score it: modgate eval run --prompt listing-moderation --version 1 --version 2 "
            "--dataset datasets/x.jsonl") in missing.message()

    relative = [{"metric": "recall", "category": "adult", "max_drop_vs_production": 0.03}]
    no_prod_card = judge(relative, rec())
    assert no_prod_card.verdict == "fail"
    assert "no stored scorecard of production v1 on this dataset" in no_prod_card.failures[0].detail
    first = judge(relative, rec(), production_version=None)
    assert first.verdict == "pass" and "no production version" in first.results[0].detail


@pytest.mark.parametrize(
    ("evaluation", "needle"),
    [
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": [{"metric": "precision", "category": "counterfit",
                                                           "min": 0.9}]},
         "evaluation.criteria.0.category: 'counterfit' is not a violation category"),
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": [{"metric": "recall", "category": "adult",
                                                           "min": 0.9, "max_drop_vs_production": 0.1}]},
         "evaluation.criteria.0: give exactly one of min, max, max_drop_vs_production"),
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": [{"metric": "precision", "min": 0.9}]},
         "evaluation.criteria.0: precision needs a category"),
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": [{"metric": "accuracy", "category": "adult",
                                                           "min": 0.9}]},
         "accuracy is not per category"),
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": [{"metric": "parse_failure_rate",
                                                           "max_drop_vs_production": 0.1}]},
         "max_drop_vs_production applies to precision, recall, f1 and accuracy"),
        ({"dataset": {"sha256": "abc"}, "criteria": [{"metric": "accuracy", "min": 0.9}]},
         "evaluation.dataset.sha256"),
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": []}, "evaluation.criteria"),
        ({"dataset": {"sha256": SAMPLE_SHA}, "criteria": [{"metric": "recall", "category": "adult",
                                                           "min": 1.5}]},
         "evaluation.criteria.0.min"),
    ],
)
def test_bad_evaluation_blocks_name_the_field(evaluation: dict, needle: str) -> None:
    data = yaml.safe_load(PROMPT.read_text())
    data["evaluation"] = evaluation
    with pytest.raises(PromptFileError) as info:
        parse_prompt_text(yaml.safe_dump(data, allow_unicode=True), source="p.yaml")
    assert "p.yaml" in str(info.value) and needle in str(info.value)


def test_content_hash_of_a_prompt_without_a_gate_is_unchanged(example_spec: PromptSpec) -> None:
    bare = example_spec.model_copy(update={"evaluation": None})
    data = bare.model_dump(mode="json")
    data["policy"].pop("change_note"), data["policy"].pop("author"), data.pop("evaluation")
    data.pop("reasoning"), data.pop("cascade"), data.pop("thresholds")  # optional blocks added later (absent: not hashed)
    before = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert bare.content_hash() == before  # registries seeded before gates existed keep their versions
    assert example_spec.evaluation is not None and example_spec.content_hash() != before
    looser = example_spec.evaluation.model_copy(update={"criteria": example_spec.evaluation.criteria[1:]})
    assert example_spec.model_copy(update={"evaluation": looser}).content_hash() != example_spec.content_hash()


# -- the one label-move check, on a store ----------------------------------------------------------

@pytest.fixture
def reg(store: SqlitePromptStore, example_spec: PromptSpec) -> SqlitePromptStore:
    """Seeded (v1 production) plus v2, a reworded v1 with the same evaluation block."""
    store.publish(example_spec.model_copy(update={"description": "v2"}), actor="t")
    return store


def _notes(store: SqlitePromptStore) -> list[str]:
    return [e.note for e in store.audit(NAME) if e.action == "label"]


def test_seed_records_the_bootstrap_override(reg: SqlitePromptStore) -> None:
    first = [e for e in reg.audit(NAME) if e.action == "label"][0]
    assert first.actor == "seed" and first.to_version == 1
    assert f"GATE OVERRIDDEN by seed: {BOOTSTRAP_REASON}" in first.note
    assert "no stored scorecard of v1" in first.note


def test_refused_then_passing_then_override(reg: SqlitePromptStore) -> None:
    with pytest.raises(GateRefused) as info:
        move_label(reg, NAME, "production", 2, actor="maria")
    assert "no stored scorecard of v2" in str(info.value)
    assert reg.labels(NAME)["production"] == 1 and len(_notes(reg)) == 1  # nothing written

    store_scorecard(reg, NAME, 2, counts={"counterfeit": (20, 6, 7)})
    with pytest.raises(GateRefused) as info:
        move_label(reg, NAME, "production", 2, actor="maria")
    failed = [r.detail for r in info.value.report.failures]
    # v1 has no scorecard: the recall criterion cannot compare, and says so
    assert "counterfeit precision lower bound 0.579 < 0.750 (n=26)" in failed
    assert any("no stored scorecard of production v1" in d for d in failed)

    previous, report = move_label(reg, NAME, "production", 2, actor="boss", note="hotfix",
                                  override=GateOverride(reason="legal asked for it today", by="admin key boss"))
    assert previous == 1 and report is not None and report.verdict == "fail"
    entry = [e for e in reg.audit(NAME) if e.action == "label"][-1]
    assert entry.actor == "boss" and entry.note.startswith("hotfix | GATE OVERRIDDEN by admin key boss: "
                                                           "legal asked for it today (gate failed on")
    assert "counterfeit precision lower bound 0.579 < 0.750" in entry.note

    # back to v1 by rollback: not judged
    assert rollback(reg, NAME, "production", actor="maria") == (2, 1)
    # with passing scorecards for both versions the move goes through, and says so
    store_scorecard(reg, NAME, 1)
    store_scorecard(reg, NAME, 2)  # replaces the failing one
    previous, report = move_label(reg, NAME, "production", 2, actor="maria")
    assert report is not None and report.verdict == "pass" and previous == 1
    policy = evaluation_hash(reg.get_version(NAME, 1).spec.evaluation)[:12]
    assert _notes(reg)[-1] == (f"gate passed on dataset e08b6d315ed6 (8 checks) [policy: production "
                               f"v1's evaluation block (policy {policy})]")


def test_gate_is_only_on_the_production_label_and_not_on_no_op_moves(reg: SqlitePromptStore) -> None:
    assert move_label(reg, NAME, "canary", 2, actor="maria") == (None, None)
    assert move_label(reg, NAME, "production", 1, actor="maria") == (1, None)  # already there
    with pytest.raises(GateRefused):  # the first move of a gated label is judged too
        move_label(reg, NAME, "live", 2, actor="maria", production_label="live")


def test_dropping_the_evaluation_block_does_not_drop_the_gate(reg: SqlitePromptStore, example_spec: PromptSpec) -> None:
    v3 = reg.publish(example_spec.model_copy(update={"evaluation": None, "description": "v3"}), actor="t").version
    report = gate_report(reg, NAME, v3.version)
    assert report.declared_by == 1 and report.verdict == "fail"  # production's block applies
    assert report.policy is not None and report.policy.source == "production"
    with pytest.raises(GateRefused):
        move_label(reg, NAME, "production", v3.version, actor="maria")


def test_prompts_without_an_evaluation_block_have_no_gate(tmp_path: Path, example_spec: PromptSpec) -> None:
    s = SqlitePromptStore(tmp_path / "bare.db")
    bare = example_spec.model_copy(update={"evaluation": None})
    s.publish(bare, actor="t")
    s.publish(bare.model_copy(update={"description": "v2"}), actor="t")
    move_label(s, NAME, "production", 1, actor="t")
    previous, report = move_label(s, NAME, "production", 2, actor="t")
    assert previous == 1 and report is not None and report.verdict == "none"
    assert _notes(s)[-1] == "no gate policy in force"
    s.close()


def test_a_scorecard_must_match_the_version_it_is_stored_under(reg: SqlitePromptStore) -> None:
    with pytest.raises(ScorecardMismatch, match="was computed for content"):
        reg.put_scorecard(make_record(NAME, 2, reg.get_version(NAME, 1).content_hash), actor="t")
    assert reg.list_scorecards(NAME) == []


def test_concurrent_move_is_a_conflict_not_a_stale_promotion(reg: SqlitePromptStore) -> None:
    from prompt_registry import LabelConflict

    store_scorecard(reg, NAME, 1)
    store_scorecard(reg, NAME, 2)
    with pytest.raises(LabelConflict):
        move_label(reg, NAME, "production", 2, expected=2, actor="maria")


# -- eval run stores its scorecards --------------------------------------------------------------

def test_eval_run_stores_scorecards_and_reports_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        example_spec: PromptSpec) -> None:
    from gateway.cli import eval as eval_cli
    from gateway.config import load_config
    from gateway.quality.evaluation.dataset import load_dataset
    from gateway.stores import open_store
    from serving import ChatRequest
    from serving.fake_backend import FakeBackend

    sample = ROOT / "datasets" / "listings-sample.jsonl"
    rows = load_dataset(sample).rows

    def respond(request: ChatRequest) -> str:
        """The gold verdict, except v2 (marked STRICT, en-US only) calls counterfeits 'allow'."""
        strict = request.messages[0]["content"].startswith("STRICT")
        user = request.messages[-1]["content"]
        row = next(r for r in rows if json.dumps(r.title, ensure_ascii=False) in user
                   and json.dumps(r.description, ensure_ascii=False) in user)
        decision, category = row.gold_decision, row.gold_category
        if strict and category == "counterfeit":
            decision, category = "allow", "none"
        return json.dumps({"decision": decision, "category": category, "confidence": 0.9},
                          separators=(",", ":"))

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    store = open_store(load_config(path))
    seed_store(store, ROOT / "configs" / "prompts")
    messages = [example_spec.messages[0].model_copy(update={"content": "STRICT " + example_spec.messages[0].content}),
                *example_spec.messages[1:]]
    store.publish(example_spec.model_copy(update={"messages": messages}), actor="t")
    monkeypatch.setattr(eval_cli, "make_backend", lambda cfg: FakeBackend(responder=respond))
    result = CliRunner().invoke(eval_cli.eval_app, [
        "run", "--config", str(path), "--prompt", NAME, "--version", "1", "--version", "2",
        "--dataset", str(sample), "--no-progress"], env={"MODGATE_ACTOR": "maria"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"registry: scorecard of {NAME} v1 on dataset e08b6d315ed6 stored" in result.output
    assert "promotion gate of v2 -> production: FAIL" in result.output
    # 15 en-US counterfeits missed of 27: recall 12/27 = 0.444
    assert "FAIL  counterfeit recall 0.444 is 0.556 below production v1's 1.000 (allowed drop 0.050)" \
        in result.output, result.output
    cards = store.list_scorecards(NAME)
    assert [(c.version, c.dataset_sha256, c.items, c.created_by) for c in cards] == [
        (1, SAMPLE_SHA, 194, "maria"), (2, SAMPLE_SHA, 194, "maria")]
    assert cards[0].categories["counterfeit"].recall == 1.0 and cards[1].categories["counterfeit"].tp == 12
    with pytest.raises(GateRefused, match="counterfeit recall 0.444 is 0.556 below"):
        move_label(store, NAME, "production", 2, actor="maria")
    assert [e.action for e in store.audit(NAME)][-3:] == ["scorecard", "scorecard", "gate_refused"]
    store.close()
