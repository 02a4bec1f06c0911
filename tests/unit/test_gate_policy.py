"""Issue 16, items 1 and 6: a version never defines its own promotion gate, and a version naming
a model the serving layer does not serve is refused.

Finding 1 (reproduced): a v3 whose `evaluation:` block named a 20-item dataset and one lax
criterion (parse-failure rate <= 0.02) became production with "promotion gate: PASS", no admin
key, no override, because the gate read the candidate's own block first. Finding 5: a version
naming `qwen-does-not-exist` was published and rolled out, and callers got 502s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prompt_registry import (
    GatePolicyConflict,
    GatePolicyInvalid,
    GateRefused,
    PromptFileError,
    PromptSpec,
    UnservedModel,
    check_model_served,
)
from prompt_registry.gates import (
    at_least_as_strict,
    compare_blocks,
    evaluation_hash,
    gate_report,
    move_label,
)
from prompt_registry.loader import load_gate_policy_file, seed_store
from prompt_registry.models import EvaluationSpec
from prompt_registry.ops import publish_file, rollback, set_gate_policy, set_label
from prompt_registry.sqlite_store import SqlitePromptStore
from tests.scorecards import SAMPLE_SHA, store_scorecard

ROOT = Path(__file__).resolve().parents[2]
NAME = "listing-moderation"
LAX_SHA = "1" * 64  # a 20-item dataset the candidate chose for itself
LAX = {"dataset": {"sha256": LAX_SHA, "path": "datasets/tiny.jsonl"},
       "criteria": [{"metric": "parse_failure_rate", "max": 0.02}]}


def block(data: dict) -> EvaluationSpec:
    return EvaluationSpec.model_validate(data)


def with_block(spec: PromptSpec, evaluation: dict | None, tag: str) -> PromptSpec:
    return spec.model_copy(update={"evaluation": None if evaluation is None else block(evaluation),
                                   "description": tag})


def production_block(spec: PromptSpec) -> dict:
    assert spec.evaluation is not None
    return spec.evaluation.model_dump(mode="json")


def labels_audit(store: SqlitePromptStore) -> list[str]:
    return [e.note for e in store.audit(NAME) if e.action == "label"]


# -- finding 1: the candidate's own block never judges it ----------------------------------------

def test_a_version_cannot_bring_its_own_lax_gate(store: SqlitePromptStore, example_spec: PromptSpec) -> None:
    v2 = store.publish(with_block(example_spec, LAX, "lax"), actor="mallory").version.version
    store_scorecard(store, NAME, v2, items=20, sha=LAX_SHA)  # passes the lax criterion
    v1_policy = evaluation_hash(example_spec.evaluation)[:12]

    with pytest.raises(GateRefused) as info:
        move_label(store, NAME, "production", v2, actor="mallory")
    message = str(info.value)
    assert f"policy in force: production v1's evaluation block (policy {v1_policy})" in message
    assert "no stored scorecard of v2 on dataset e08b6d315ed6" in message
    assert "v2's own evaluation block (dataset 111111111111, 1 criterion) is not at least as strict" in message
    assert store.labels(NAME)["production"] == 1
    report = info.value.report
    assert report.policy is not None and report.policy.source == "production"
    assert report.candidate_block == "not_stricter" and report.dataset_sha256 == SAMPLE_SHA


def test_passing_the_policy_in_force_keeps_it_in_force(store: SqlitePromptStore,
                                                       example_spec: PromptSpec) -> None:
    """v2 (lax block) may become production by passing v1's policy; the move must not make v2's
    lax block the policy for every later move: v1's block is kept in force in the registry."""
    v2 = store.publish(with_block(example_spec, LAX, "lax"), actor="maria").version.version
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    v1_policy = evaluation_hash(example_spec.evaluation)
    previous, report = move_label(store, NAME, "production", v2, actor="maria")
    assert previous == 1 and report is not None and report.verdict == "pass"
    entries = store.audit(NAME)
    kept, moved = entries[-2], entries[-1]
    assert (kept.action, kept.label, kept.actor) == ("gate_policy", "gate-policy", "maria")
    assert kept.note.startswith(f"r1 (policy {v1_policy[:12]}): production v1's evaluation block kept in force")
    assert moved.note == (f"gate passed on dataset e08b6d315ed6 (8 checks) [policy: production v1's "
                          f"evaluation block (policy {v1_policy[:12]})] | production v1's evaluation "
                          "block kept in force as registry gate policy r1")
    record = store.get_gate_policy(NAME)
    assert record is not None and record.revision == 1 and record.sha256 == v1_policy

    # v3 with the same lax block, scored only on its own dataset: judged by the kept policy
    v3 = store.publish(with_block(example_spec, LAX, "lax again"), actor="mallory").version.version
    store_scorecard(store, NAME, v3, items=20, sha=LAX_SHA)
    with pytest.raises(GateRefused, match=r"policy in force: registry gate policy r1 \(policy "
                       + v1_policy[:12]):
        move_label(store, NAME, "production", v3, actor="mallory")
    # rolling back is still never gated
    assert rollback(store, NAME, "production", actor="maria") == (v2, 1)


def test_dropping_the_block_keeps_the_policy_for_later_moves(store: SqlitePromptStore,
                                                             example_spec: PromptSpec) -> None:
    v2 = store.publish(with_block(example_spec, None, "no block"), actor="maria").version.version
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    move_label(store, NAME, "production", v2, actor="maria")
    v3 = store.publish(with_block(example_spec, None, "no block either"), actor="maria").version.version
    report = gate_report(store, NAME, v3)
    assert report.policy is not None and report.policy.source == "registry"
    assert report.verdict == "fail" and report.candidate_block == "absent"
    assert "v3 declares no evaluation block; the policy in force still applies" in report.message()


def test_a_stricter_block_is_fine_and_takes_over(store: SqlitePromptStore, example_spec: PromptSpec) -> None:
    strict = production_block(example_spec)
    strict["criteria"][0]["min"] = 0.8  # counterfeit precision lower bound >= 0.80 (was 0.75)
    strict["criteria"].append({"metric": "error_rate", "max": 0.01})
    v2 = store.publish(with_block(example_spec, strict, "strict"), actor="maria").version.version
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    report = gate_report(store, NAME, v2)
    assert report.candidate_block == "stricter" and report.policy is not None
    assert report.policy.source == "production" and len(report.results) == 8  # v1's checks
    move_label(store, NAME, "production", v2, actor="maria")
    assert store.get_gate_policy(NAME) is None  # nothing loosened: no need to keep v1's
    v3 = store.publish(with_block(example_spec, strict, "strict v3"), actor="maria").version.version
    after = gate_report(store, NAME, v3)
    assert after.policy is not None and after.policy.describe() == "production v2's evaluation block"


def test_strictness_is_judged_conservatively(example_spec: PromptSpec) -> None:
    base = production_block(example_spec)
    policy = block(base)

    def variant(**changes: object) -> EvaluationSpec:
        data = yaml.safe_load(yaml.safe_dump(base))
        for index, values in changes.items():
            data["criteria"][int(index.removeprefix("c"))].update(values)
        return block(data)

    assert compare_blocks(policy, policy) == "same"
    assert compare_blocks(None, policy) == "absent" and compare_blocks(None, None) == "same"
    assert compare_blocks(policy, None) == "stricter"  # a gate where there was none
    assert at_least_as_strict(variant(c0={"min": 0.9}), policy)
    assert not at_least_as_strict(variant(c0={"min": 0.7}), policy)
    # a lower bound >= x implies the estimate >= x, not the other way round
    est = block({**base, "criteria": [{**base["criteria"][0], "bound": "estimate"}]})
    assert at_least_as_strict(policy, est) and not at_least_as_strict(est, policy)
    assert at_least_as_strict(variant(c1={"max_drop_vs_production": 0.01}), policy)
    assert not at_least_as_strict(variant(c1={"max_drop_vs_production": 0.2}), policy)
    assert not at_least_as_strict(variant(c2={"max": 0.5}), policy)
    assert not at_least_as_strict(block({**base, "criteria": base["criteria"][:2]}), policy)
    assert not at_least_as_strict(block({**base, "dataset": {"sha256": LAX_SHA}}), policy)
    assert compare_blocks(block(LAX), policy) == "not_stricter"


def test_an_ungated_prompt_takes_a_new_block_only_as_an_addition(tmp_path: Path,
                                                                 example_spec: PromptSpec) -> None:
    """Nothing in force (no production yet, or no block anywhere): the candidate's block can
    only add a gate, so it applies; seeding records the bootstrap override."""
    s = SqlitePromptStore(tmp_path / "bare.db")
    bare = with_block(example_spec, None, "bare")
    s.publish(bare, actor="t")
    _, first = move_label(s, NAME, "production", 1, actor="t")
    assert first is not None and first.verdict == "none"
    assert labels_audit(s)[-1] == "no gate policy in force"
    gated = s.publish(with_block(example_spec, LAX, "gated"), actor="t").version.version
    report = gate_report(s, NAME, gated)
    assert report.policy is not None and report.policy.source == "candidate"
    assert report.verdict == "fail"  # no scorecard on its own dataset yet
    s.close()


# -- the policy as its own protected, audited change -------------------------------------------

def test_set_gate_policy_is_audited_with_a_diff_and_compare_and_set(store: SqlitePromptStore,
                                                                    example_spec: PromptSpec) -> None:
    v1_hash = evaluation_hash(example_spec.evaluation)[:12]
    with pytest.raises(GatePolicyInvalid, match="needs a reason"):
        set_gate_policy(store, NAME, block(LAX), actor="lead", reason="  ")
    bad = {**LAX, "criteria": [{"metric": "recall", "category": "counterfit", "min": 0.5}]}
    with pytest.raises(GatePolicyInvalid, match="'counterfit' is not a violation category"):
        set_gate_policy(store, NAME, block(bad), actor="lead", reason="typo")

    dry = set_gate_policy(store, NAME, block(LAX), actor="lead", reason="try", dry_run=True)
    assert not dry.written and store.get_gate_policy(NAME) is None
    assert dry.diff.startswith(f"--- production v1's evaluation block (policy {v1_hash})\n"
                               "+++ registry gate policy r1")
    assert "-  sha256: e08b6d315ed6" in dry.diff and "+  sha256: '1111111111" in dry.diff
    assert "-- metric: precision\n-  category: counterfeit\n-  bound: lower\n-  min: 0.75\n" in dry.diff
    assert "- counterfeit precision lower bound >= 0.750" in dry.changes

    change = set_gate_policy(store, NAME, block(LAX), actor="lead", reason="new small set",
                             expected_revision=0)
    assert change.written and change.after.revision == 1
    entry = store.audit(NAME)[-1]
    assert (entry.action, entry.actor) == ("gate_policy", "lead")
    assert entry.note.startswith(f"r1 (policy {change.after.sha256[:12]}) replaces production v1's "
                                 f"evaluation block (policy {v1_hash}): dataset e08b6d315ed6 -> "
                                 "111111111111; - counterfeit precision lower bound >= 0.750")
    assert entry.note.endswith("| new small set")
    with pytest.raises(GatePolicyConflict, match="at revision 1, not 0"):
        set_gate_policy(store, NAME, None, actor="lead", reason="x", expected_revision=0)

    # the registry's policy is now what judges, for every version
    v2 = store.publish(with_block(example_spec, None, "v2"), actor="maria").version.version
    store_scorecard(store, NAME, v2, items=20, sha=LAX_SHA)
    _, report = move_label(store, NAME, "production", v2, actor="maria")
    assert report is not None and report.verdict == "pass"
    assert labels_audit(store)[-1].endswith(
        f"[policy: registry gate policy r1 (policy {change.after.sha256[:12]})]")

    # "no gate" is a policy too, set the same way
    set_gate_policy(store, NAME, None, actor="lead", reason="incident: gate off for a day")
    v3 = store.publish(with_block(example_spec, LAX, "v3"), actor="maria").version.version
    none = gate_report(store, NAME, v3)
    assert none.verdict == "none" and none.policy is not None
    assert none.summary() == f"registry gate policy r2: no gate (policy {evaluation_hash(None)[:12]})"


def test_gate_policy_files(tmp_path: Path) -> None:
    plain = tmp_path / "policy.yaml"
    plain.write_text(yaml.safe_dump(LAX))
    assert load_gate_policy_file(plain) == block(LAX)
    prompt = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
    assert load_gate_policy_file(prompt).dataset.sha256 == SAMPLE_SHA
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"dataset": {"sha256": "abc"}, "criteria": []}))
    with pytest.raises(GatePolicyInvalid, match=f"(?s){broken}.*dataset.sha256"):
        load_gate_policy_file(broken)


# -- finding 5: a model the serving layer does not serve -----------------------------------------

def test_publishing_an_unserved_model_is_refused(store: SqlitePromptStore, example_spec: PromptSpec,
                                                 tmp_path: Path) -> None:
    data = example_spec.model_dump(mode="json")
    data["model"] = "qwen-does-not-exist"
    data["description"] = "v2"
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(UnservedModel) as info:
        publish_file(store, path, actor="maria", served_models=["tiny-llama", "qwen-0.5b"])
    assert str(info.value) == ("listing-moderation names model 'qwen-does-not-exist', which the "
                               "serving layer does not serve (served: qwen-0.5b, tiny-llama)")
    assert isinstance(info.value, PromptFileError)  # a version that fails validation
    assert store.versions(NAME) == [1]  # nothing written
    # without a serving configuration (None) nothing is checked
    assert publish_file(store, path, actor="maria")[0].version.version == 2
    # a version published before the check existed cannot become production
    with pytest.raises(UnservedModel, match="listing-moderation v2 names model 'qwen-does-not-exist'"):
        set_label(store, NAME, "production", 2, actor="maria", served_models=["tiny-llama"])
    assert store.labels(NAME)["production"] == 1


def test_check_model_served_and_seeding(tmp_path: Path, example_spec: PromptSpec) -> None:
    check_model_served(example_spec, ["tiny-llama"])
    check_model_served(example_spec, None)
    with pytest.raises(UnservedModel, match=r"served: none"):
        check_model_served(example_spec, [])
    s = SqlitePromptStore(tmp_path / "seed.db")
    with pytest.raises(UnservedModel, match="listing-moderation.yaml: listing-moderation names model "
                       "'tiny-llama', which the serving layer does not serve"):
        seed_store(s, ROOT / "configs" / "prompts", served_models=["qwen"])
    assert s.list_prompts() == []
    assert seed_store(s, ROOT / "configs" / "prompts", served_models=["tiny-llama"]) == [NAME]
    s.close()
