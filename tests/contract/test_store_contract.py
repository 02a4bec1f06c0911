"""One contract, every store: the embedded SQLite store and the Redis store (real server).

One class per store facet (prompt_registry/store.py), so a facet's contract can be read, run
(`-k TestKeys`) and extended on its own, and each test is typed by the facet it exercises (a
test reaching outside its facet is a mypy error). `TestFacets` checks that both stores are
every facet and that `PromptStore` is exactly the facets' union. Every test runs on both stores
unless it is about one store's own mechanics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from prompt_registry import LabelConflict, PromptNotFound, PromptSpec, StoreUnavailable
from prompt_registry.loader import seed_store
from prompt_registry.redis_store import RedisPromptStore
from prompt_registry.sqlite_store import SqlitePromptStore
from prompt_registry.store import (
    FourEyesReader,
    FourEyesStore,
    GatedWriter,
    GatePolicyReader,
    GatePolicyStore,
    GateReader,
    KeyReader,
    KeyStore,
    LifecycleReader,
    LifecycleStore,
    MemoStore,
    PromptReader,
    PromptStore,
    PromptWriter,
    RolloutReader,
    RolloutStore,
    ScorecardReader,
    ScorecardStore,
)
from tests.scorecards import SAMPLE_SHA, make_record
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
StoreFactory = Callable[[], PromptStore]

# Every facet, readers before the stores extending them; PromptStore is their union.
FACETS: tuple[type, ...] = (PromptReader, PromptWriter, RolloutReader, RolloutStore,
                            ScorecardReader, ScorecardStore, GatePolicyReader, GatePolicyStore,
                            FourEyesReader, FourEyesStore, LifecycleReader, LifecycleStore,
                            KeyReader, KeyStore, MemoStore)
# Named combinations of facets (no methods of their own).
COMBINATIONS: tuple[type, ...] = (GateReader, GatedWriter)


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Returns a factory: each call opens another client of the same store (as another
    process would)."""
    opened: list[PromptStore] = []
    if request.param == "sqlite":
        path = tmp_path / "registry.db"

        def factory() -> PromptStore:
            s = SqlitePromptStore(path)
            opened.append(s)
            return s
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix: str = request.getfixturevalue("redis_prefix")

        def factory() -> PromptStore:
            s = RedisPromptStore(server.url, prefix=prefix)
            opened.append(s)
            return s
    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: StoreFactory) -> PromptStore:
    return make_store()


def _variant(spec: PromptSpec, i: int) -> PromptSpec:
    return spec.model_copy(update={"description": f"variant {i}"})


class TestFacets:
    """Both stores implement every facet, and the facets cover PromptStore exactly."""

    def test_every_store_is_every_facet(self, store: PromptStore) -> None:
        # isinstance on a runtime-checkable protocol checks method names only; signatures are
        # checked by mypy in test_facet_signatures_match_on_both_stores.
        missing = [f.__name__ for f in (*FACETS, *COMBINATIONS, PromptStore)
                   if not isinstance(store, f)]
        assert not missing, f"{type(store).__name__} lacks {missing}"

    def test_prompt_store_is_the_union_of_the_facets(self) -> None:
        """A method added to PromptStore alone (outside every facet) could only be typed by
        the whole store, and a method in two facets would blur what each grants."""
        def own(proto: type) -> set[str]:
            return {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}

        owners: dict[str, list[str]] = {}
        for facet in FACETS:
            for name in own(facet):
                owners.setdefault(name, []).append(facet.__name__)
        assert {n: o for n, o in owners.items() if len(o) > 1} == {}
        assert own(PromptStore) == {"close"}
        assert set(PromptStore.__mro__) >= set(FACETS)
        assert {c.__name__: own(c) for c in COMBINATIONS} == {c.__name__: set() for c in COMBINATIONS}

    def test_facet_signatures_match_on_both_stores(self, tmp_path: Path) -> None:
        """mypy checks each store against every facet's signatures (argument names, keyword-
        only markers, return types), which isinstance cannot. The drifted class is a control:
        it proves this mypy run compares signatures rather than treating imports as Any."""
        pytest.importorskip("mypy")
        facets = ", ".join(f.__name__ for f in (*FACETS, *COMBINATIONS))
        checks = "\n".join(
            f"def {cls.lower()}_as_{f.__name__.lower()}(s: {cls}) -> {f.__name__}:\n    return s\n"
            for cls in ("SqlitePromptStore", "RedisPromptStore")
            for f in (*FACETS, *COMBINATIONS, PromptStore))
        conformance = tmp_path / "conformance.py"
        conformance.write_text(
            "from prompt_registry.keys import ApiKeyRecord\n"
            "from prompt_registry.redis_store import RedisPromptStore\n"
            "from prompt_registry.sqlite_store import SqlitePromptStore\n"
            f"from prompt_registry.store import PromptStore, {facets}\n\n\n{checks}\n\n"
            + textwrap.dedent("""\
                class Drifted:
                    def get_key(self, key_id: int) -> ApiKeyRecord | None:
                        return None


                def drifted_as_keyreader(s: Drifted) -> KeyReader:
                    return s  # DRIFTED
                """))
        drifted_line = conformance.read_text().splitlines().index("    return s  # DRIFTED") + 1
        out = subprocess.run(
            [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-error-summary",
             "--cache-dir", str(tmp_path / "mypy-cache"), str(conformance)],
            cwd=ROOT, env={**os.environ, "MYPYPATH": str(ROOT)}, capture_output=True, text=True)
        errors = [line for line in out.stdout.splitlines() if ": error:" in line]
        assert [e for e in errors if f":{drifted_line}:" not in e] == [], out.stdout + out.stderr
        assert len(errors) == 1 and "Incompatible return value type" in errors[0], \
            "the drifted control was not reported: mypy is not checking signatures\n" + out.stdout


class TestPrompts:
    """PromptReader and PromptWriter: versions, labels, audit, change events."""

    def test_publish_numbers_versions_and_dedupes(self, store: PromptWriter,
                                                  example_spec: PromptSpec) -> None:
        first = store.publish(example_spec, actor="alice")
        again = store.publish(example_spec, actor="bob")
        second = store.publish(_variant(example_spec, 1), actor="alice", note="tighten counterfeit")
        assert (first.created, first.version.version) == (True, 1)
        assert (again.created, again.version.version) == (False, 1)
        assert (second.created, second.version.version) == (True, 2)
        got = store.get_version(example_spec.name, 2)
        assert got.spec == _variant(example_spec, 1)
        assert got.content_hash == _variant(example_spec, 1).content_hash()
        assert got.created_by == "alice"
        assert store.versions(example_spec.name) == [1, 2]
        assert store.list_prompts() == [example_spec.name]

    def test_labels_resolve_and_compare_and_set(self, store: PromptWriter,
                                                example_spec: PromptSpec) -> None:
        name = example_spec.name
        store.publish(example_spec, actor="a")
        store.publish(_variant(example_spec, 1), actor="a")
        assert store.set_label(name, "production", 1, actor="a") is None
        assert store.resolve(name, "production").version == 1
        with pytest.raises(LabelConflict):
            store.set_label(name, "production", 2, expected=2, actor="a")
        assert store.resolve(name, "production").version == 1
        assert store.set_label(name, "production", 2, expected=1, actor="b", note="promote") == 1
        assert store.resolve(name, "production").version == 2
        assert store.labels(name) == {"production": 2}
        entries = store.audit(name)
        assert [(e.action, e.label, e.from_version, e.to_version, e.actor) for e in entries] == [
            ("publish", None, None, 1, "a"), ("publish", None, None, 2, "a"),
            ("label", "production", None, 1, "a"), ("label", "production", 1, 2, "b")]
        assert entries[-1].note == "promote"
        assert entries[0].at <= entries[-1].at

    def test_expected_zero_means_label_must_be_unset(self, store: PromptWriter,
                                                     example_spec: PromptSpec) -> None:
        store.publish(example_spec, actor="a")
        store.set_label(example_spec.name, "canary", 1, expected=0, actor="a")
        with pytest.raises(LabelConflict):
            store.set_label(example_spec.name, "canary", 1, expected=0, actor="a")

    def test_unknown_things_are_named(self, store: PromptWriter, example_spec: PromptSpec) -> None:
        with pytest.raises(PromptNotFound, match="unknown prompt 'nope'"):
            store.resolve("nope", "production")
        with pytest.raises(PromptNotFound, match="unknown prompt 'nope'"):
            store.get_version("nope", 1)
        store.publish(example_spec, actor="a")
        with pytest.raises(PromptNotFound, match="no label 'canary'"):
            store.resolve(example_spec.name, "canary")
        with pytest.raises(PromptNotFound, match="no version 9"):
            store.set_label(example_spec.name, "canary", 9, actor="a")
        assert store.labels(example_spec.name) == {}
        assert [e.action for e in store.audit(example_spec.name)] == ["publish"]

    def test_concurrent_publishers_lose_no_version(self, make_store: StoreFactory,
                                                   example_spec: PromptSpec) -> None:
        make_store()
        results: list[int] = []
        errors: list[BaseException] = []
        workers, per_worker = 6, 5

        def publish(worker: int) -> None:
            s = make_store()
            try:
                for j in range(per_worker):
                    # Every worker also republishes one shared variant: it must dedup to one version.
                    results.append(s.publish(_variant(example_spec, worker * 100 + j), actor=f"w{worker}").version.version)
                    s.publish(_variant(example_spec, 9999), actor=f"w{worker}")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=publish, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        s = make_store()
        total = workers * per_worker + 1
        assert s.versions(example_spec.name) == list(range(1, total + 1))
        assert len(set(results)) == workers * per_worker
        assert len([e for e in s.audit(example_spec.name) if e.action == "publish"]) == total

    def test_concurrent_label_moves_exactly_one_wins(self, make_store: StoreFactory,
                                                     example_spec: PromptSpec) -> None:
        s = make_store()
        for i in range(8):
            s.publish(_variant(example_spec, i), actor="a")
        s.set_label(example_spec.name, "production", 1, actor="a")
        outcomes: list[str] = []
        barrier = threading.Barrier(7)

        def move(target: int) -> None:
            client = make_store()
            barrier.wait()
            try:
                client.set_label(example_spec.name, "production", target, expected=1, actor=f"m{target}")
                outcomes.append(f"won {target}")
            except LabelConflict:
                outcomes.append("conflict")

        threads = [threading.Thread(target=move, args=(v,)) for v in range(2, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1 and outcomes.count("conflict") == 6
        assert f"won {s.resolve(example_spec.name, 'production').version}" == winners[0]
        assert len([e for e in s.audit(example_spec.name) if e.action == "label"]) == 2

    def test_change_events_reach_other_clients(self, make_store: StoreFactory,
                                               example_spec: PromptSpec) -> None:
        writer: PromptWriter = make_store()
        watcher: PromptReader = make_store()
        seen: list[str | None] = []
        got = threading.Event()

        def on_change(name: str | None) -> None:
            seen.append(name)
            got.set()

        sub = watcher.subscribe(on_change)
        try:
            writer.publish(example_spec, actor="a")
            assert got.wait(5), "no change event within 5 s"
            assert seen[-1] in (example_spec.name, None)
        finally:
            sub.close()

    def test_seed_is_idempotent_and_never_moves_a_label(self, store: PromptStore,
                                                        example_spec: PromptSpec) -> None:
        seed_store(store, ROOT / "configs" / "prompts")
        store.publish(_variant(example_spec, 1), actor="a")
        store.set_label(example_spec.name, "production", 2, actor="a")
        seed_store(store, ROOT / "configs" / "prompts")
        assert store.resolve(example_spec.name, "production").version == 2
        assert len([e for e in store.audit(example_spec.name) if e.action == "publish"]) == 2

    def test_redis_down_is_store_unavailable(self, tmp_path: Path, example_spec: PromptSpec) -> None:
        server = RedisServer(tmp_path / "r").start()
        s = RedisPromptStore(server.url, prefix="down", timeout_s=0.5)
        s.publish(example_spec, actor="a")
        server.stop()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            s.resolve(example_spec.name, "production")
        with pytest.raises(StoreUnavailable):
            s.publish(_variant(example_spec, 1), actor="a")
        s.close()


class _RolloutsOverPrompts(PromptWriter, RolloutStore, Protocol):
    """A rollout names published versions and is audited with them."""


class TestRollouts:
    """RolloutReader and RolloutStore: compare-and-set on the revision, shared counters."""

    def test_rollouts_compare_and_set_and_stats(self, make_store: StoreFactory,
                                                example_spec: PromptSpec) -> None:
        from prompt_registry.rollouts import GateConfig, RolloutConflict, ShadowSpec, new_rollout

        s: _RolloutsOverPrompts = make_store()
        s.publish(example_spec, actor="a")
        s.publish(_variant(example_spec, 1), actor="a")
        r = new_rollout(example_spec.name, stable_version=1, canary_version=2, steps=[5, 50, 100],
                        shadows=[ShadowSpec(version=2, sample_rate=0.2)], step_hold_s=60,
                        gates=GateConfig(), auto=True, subject_key="seller_id", started_by="maria")
        s.put_rollout(r, expected_revision=None, actor="maria", note="start")
        with pytest.raises(RolloutConflict):  # one active rollout per prompt
            s.put_rollout(r, expected_revision=None, actor="x")
        stepped = r.changed(step_index=1)
        s.put_rollout(stepped, expected_revision=0, actor="controller", note="step")
        with pytest.raises(RolloutConflict):  # a second writer with the old revision loses
            s.put_rollout(r.changed(state="aborted"), expected_revision=0, actor="other")
        other: RolloutReader = make_store()
        got = other.get_rollout(example_spec.name)
        assert got is not None and got.weight == 50 and got.revision == 1
        assert [x.id for x in s.list_rollouts()] == [r.id]
        finished = stepped.changed(state="aborted")
        s.put_rollout(finished, expected_revision=1, actor="a")
        again = new_rollout(example_spec.name, stable_version=1, canary_version=2, steps=[5], shadows=[],
                            step_hold_s=0, gates=GateConfig(), auto=False, subject_key="seller_id", started_by="a")
        s.put_rollout(again, expected_revision=None, actor="a")  # a finished rollout can be replaced
        assert [e.action for e in s.audit(example_spec.name)][-4:] == ["rollout"] * 4

        s.add_rollout_stats(r.id, {"canary:requests": 3, "pair:2:agree": 1}, flips=['{"i":1}', '{"i":2}'], keep_flips=2)
        counter: RolloutStore = make_store()
        counter.add_rollout_stats(r.id, {"canary:requests": 2}, flips=['{"i":3}'], keep_flips=2)
        assert s.rollout_stats(r.id) == {"canary:requests": 5, "pair:2:agree": 1}
        assert s.rollout_flips(r.id) == ['{"i":3}', '{"i":2}']


class TestScorecards:
    """ScorecardReader and ScorecardStore, and the promotion gate reading them."""

    def test_scorecards_per_version_and_dataset_last_write_wins(self, make_store: StoreFactory,
                                                                example_spec: PromptSpec) -> None:
        from prompt_registry.gates import ScorecardMismatch

        s = make_store()
        name = example_spec.name
        h1 = s.publish(example_spec, actor="a").version.content_hash
        h2 = s.publish(_variant(example_spec, 1), actor="a").version.content_hash
        cards: ScorecardStore = s
        first = make_record(name, 1, h1, counts={"adult": (12, 1, 4)})
        assert cards.put_scorecard(first, actor="eval") is False
        other: ScorecardReader = make_store()
        assert other.get_scorecard(name, 1, SAMPLE_SHA) == first  # another client sees it
        other_data = make_record(name, 1, h1, sha="0" * 64)
        assert cards.put_scorecard(other_data, actor="eval") is False  # another dataset: another key
        second = make_record(name, 2, h2)
        cards.put_scorecard(second, actor="eval")
        rerun = make_record(name, 1, h1)
        assert cards.put_scorecard(rerun, actor="eval-again", note="after the model upgrade") is True
        assert cards.get_scorecard(name, 1, SAMPLE_SHA) == rerun
        assert cards.get_scorecard(name, 1, "f" * 64) is None
        assert cards.get_scorecard(name, 3, SAMPLE_SHA) is None
        assert [(r.version, r.dataset_sha256[:1]) for r in cards.list_scorecards(name)] in (
            [(1, "0"), (1, "e"), (2, "e")], [(1, "e"), (1, "0"), (2, "e")])
        assert {r.dataset_sha256 for r in cards.list_scorecards(name, 1)} == {SAMPLE_SHA, "0" * 64}
        assert cards.list_scorecards(name, 2) == [second] and cards.list_scorecards("nope") == []

        with pytest.raises(PromptNotFound, match="unknown prompt 'nope'"):
            cards.put_scorecard(make_record("nope", 1, h1), actor="x")
        with pytest.raises(PromptNotFound, match="no version 9"):
            cards.put_scorecard(make_record(name, 9, h1), actor="x")
        with pytest.raises(ScorecardMismatch):  # v2's content scored, stored as v1
            cards.put_scorecard(make_record(name, 1, h2), actor="x")
        audited = [e for e in s.audit(name) if e.action == "scorecard"]
        assert [(e.to_version, e.actor) for e in audited] == [(1, "eval"), (1, "eval"), (2, "eval"),
                                                               (1, "eval-again")]
        assert audited[0].note == ("scorecard on dataset e08b6d315ed6 (194 items): micro precision "
                                   "0.992, recall 0.969")  # 127/128, 127/131
        assert audited[-1].note.endswith("; replaces the earlier scorecard | after the model upgrade")

    def test_the_promotion_gate_reads_either_store(self, make_store: StoreFactory,
                                                   example_spec: PromptSpec) -> None:
        from prompt_registry import GateRefused
        from prompt_registry.gates import move_label
        from tests.scorecards import store_scorecard

        s = make_store()
        seed_store(s, ROOT / "configs" / "prompts")
        s.publish(_variant(example_spec, 1), actor="a")
        with pytest.raises(GateRefused, match="no stored scorecard of v2"):
            move_label(s, example_spec.name, "production", 2, actor="maria")
        store_scorecard(s, example_spec.name, 1)
        store_scorecard(make_store(), example_spec.name, 2, parse_failures=5)  # 5/194 = 0.026
        with pytest.raises(GateRefused, match=r"parse failure rate 0\.026 > 0\.020 \(n=194\)"):
            move_label(s, example_spec.name, "production", 2, actor="maria")
        store_scorecard(s, example_spec.name, 2)
        assert move_label(s, example_spec.name, "production", 2, actor="maria")[0] == 1
        assert s.audit(example_spec.name)[-1].note.startswith(
            "gate passed on dataset e08b6d315ed6 (8 checks) [policy: production v1's evaluation block")


class _LifecycleOverPrompts(PromptWriter, LifecycleStore, Protocol):
    """Version states belong to a published prompt and are audited with it."""


class TestLifecycle:
    """LifecycleReader and LifecycleStore: one record per prompt, compare-and-set on its
    revision, audited (action "lifecycle", to_version the version) and announced."""

    def test_lifecycle_compare_and_set_audit_and_events(self, make_store: StoreFactory,
                                                        example_spec: PromptSpec) -> None:
        from datetime import UTC, datetime

        from prompt_registry import LifecycleConflict, LifecycleRecord
        from prompt_registry.lifecycle import VersionStatus

        s: _LifecycleOverPrompts = make_store()
        name = example_spec.name
        status = VersionStatus(state="deprecated", reason="wrong model", set_by="lead",
                               set_at=datetime.now(UTC))
        first = LifecycleRecord(prompt=name, revision=0).with_state(1, status)
        with pytest.raises(PromptNotFound, match="unknown prompt"):
            s.put_lifecycle(first, expected_revision=0, actor="lead", version=1)
        s.publish(example_spec, actor="a")
        assert s.get_lifecycle(name) is None
        seen: list[str | None] = []
        other: LifecycleReader = make_store()
        sub = s.subscribe(seen.append)
        try:
            s.put_lifecycle(first, expected_revision=0, actor="lead", version=1, note="active -> deprecated")
            got = other.get_lifecycle(name)
            assert got is not None and got.revision == 1 and got.state_of(1) == "deprecated"
            assert got.state_of(2) == "active" and got.versions[1].reason == "wrong model"
            with pytest.raises(LifecycleConflict):  # a second writer that read revision 0 loses
                s.put_lifecycle(first, expected_revision=0, actor="other", version=1)
            undone = first.with_state(1, status.model_copy(update={"state": "active"}))
            s.put_lifecycle(undone, expected_revision=1, actor="lead", version=1, note="deprecated -> active")
            got = s.get_lifecycle(name)
            assert got is not None and got.revision == 2 and got.versions == {}
            deadline = time.monotonic() + 15  # a guard only (a loaded CI is slow)
            while name not in seen and time.monotonic() < deadline:
                time.sleep(0.05)
            assert name in seen  # announced: every gateway's cache drops its version states
        finally:
            sub.close()
        audited = [e for e in s.audit(name) if e.action == "lifecycle"]
        assert [(e.actor, e.label, e.to_version, e.note) for e in audited] == [
            ("lead", None, 1, "active -> deprecated"), ("lead", None, 1, "deprecated -> active")]


class _PoliciesOverPrompts(PromptWriter, GatePolicyStore, Protocol):
    """A gate policy belongs to a published prompt and is audited with it."""


class TestGatePolicies:
    """GatePolicyReader and GatePolicyStore: one record per prompt, compare-and-set on its
    revision, audited and announced; and the promotion gate judging by the policy in force,
    never by the candidate's own block (issue 16, finding 1), on either store."""

    def test_gate_policy_compare_and_set_and_audit(self, make_store: StoreFactory,
                                                   example_spec: PromptSpec) -> None:
        from datetime import UTC, datetime

        from prompt_registry import GatePolicy, GatePolicyConflict

        s: _PoliciesOverPrompts = make_store()
        name = example_spec.name

        def policy(revision: int, evaluation: object = example_spec.evaluation) -> GatePolicy:
            return GatePolicy(prompt=name, revision=revision, evaluation=evaluation,  # type: ignore[arg-type]
                              set_by="lead", set_at=datetime.now(UTC), reason="why")

        with pytest.raises(PromptNotFound, match="unknown prompt"):
            s.put_gate_policy(policy(1), expected_revision=0, actor="lead")
        s.publish(example_spec, actor="a")
        assert s.get_gate_policy(name) is None
        s.put_gate_policy(policy(1), expected_revision=0, actor="lead", note="first")
        other: GatePolicyReader = make_store()
        assert other.get_gate_policy(name) == policy(1).model_copy(
            update={"set_at": s.get_gate_policy(name).set_at})  # type: ignore[union-attr]
        with pytest.raises(GatePolicyConflict):  # a second writer that read revision 0 loses
            s.put_gate_policy(policy(1, None), expected_revision=0, actor="other")
        with pytest.raises(GatePolicyConflict):  # the revision must follow the expected one
            s.put_gate_policy(policy(3, None), expected_revision=1, actor="other")
        s.put_gate_policy(policy(2, None), expected_revision=1, actor="lead", note="no gate")
        got = s.get_gate_policy(name)
        assert got is not None and got.revision == 2 and got.evaluation is None
        audited = [e for e in s.audit(name) if e.action == "gate_policy"]
        assert [(e.actor, e.label, e.from_version, e.to_version, e.note) for e in audited] == [
            ("lead", "gate-policy", None, None, "first"), ("lead", "gate-policy", None, None, "no gate")]

    def test_a_version_cannot_bring_its_own_gate_on_either_store(self, make_store: StoreFactory,
                                                                 example_spec: PromptSpec) -> None:
        from prompt_registry import EvaluationSpec, GateRefused
        from prompt_registry.gates import move_label
        from tests.scorecards import store_scorecard

        s = make_store()
        name = example_spec.name
        seed_store(s, ROOT / "configs" / "prompts")
        lax = EvaluationSpec.model_validate({"dataset": {"sha256": "1" * 64},
                                             "criteria": [{"metric": "parse_failure_rate", "max": 0.02}]})
        v2 = s.publish(example_spec.model_copy(update={"evaluation": lax, "description": "lax"}),
                       actor="mallory").version.version
        store_scorecard(s, name, v2, items=20, sha="1" * 64)
        with pytest.raises(GateRefused, match="policy in force: production v1's evaluation block"):
            move_label(s, name, "production", v2, actor="mallory")
        assert s.labels(name)["production"] == 1
        # passing the policy in force moves it, and keeps v1's block in force for later moves
        store_scorecard(s, name, 1)
        store_scorecard(make_store(), name, v2)
        move_label(s, name, "production", v2, actor="maria")
        kept = make_store().get_gate_policy(name)
        assert kept is not None and kept.evaluation == example_spec.evaluation
        assert [e.action for e in s.audit(name)][-2:] == ["gate_policy", "label"]
        v3 = s.publish(example_spec.model_copy(update={"evaluation": lax, "description": "lax 3"}),
                       actor="mallory").version.version
        store_scorecard(s, name, v3, items=20, sha="1" * 64)
        with pytest.raises(GateRefused, match="policy in force: registry gate policy r1"):
            move_label(s, name, "production", v3, actor="mallory")


class TestAuditedRefusals:
    """PromptWriter.record_audit, and every promotion-gate refusal leaving exactly one
    `gate_refused` audit entry (issue 16, item 10), on either store."""

    def test_record_audit_is_one_announced_entry_and_refuses_owned_actions(
            self, make_store: StoreFactory, example_spec: PromptSpec) -> None:
        s: PromptWriter = make_store()
        name = example_spec.name
        with pytest.raises(PromptNotFound, match="unknown prompt"):
            s.record_audit(name, "gate_refused", actor="a")
        s.publish(example_spec, actor="a")
        for owned in ("publish", "label", "rollout", "scorecard", "gate_policy", ""):
            with pytest.raises(ValueError, match="cannot be recorded"):
                s.record_audit(name, owned, actor="mallory")
        seen: list[str | None] = []
        sub = make_store().subscribe(seen.append)
        try:
            s.record_audit(name, "gate_refused", label="production", from_version=1, to_version=2,
                           actor="alice", note="gate failed")
            deadline = time.monotonic() + 15  # a guard only (a loaded CI is slow)
            while name not in seen and None not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
            assert name in seen or None in seen, "the entry was announced"
        finally:
            sub.close()
        last = make_store().audit(name)[-1]
        assert (last.action, last.actor, last.label, last.from_version, last.to_version, last.note) == (
            "gate_refused", "alice", "production", 1, 2, "gate failed")
        assert [e.action for e in s.audit(name)] == ["publish", "gate_refused"]

    def test_a_refused_move_leaves_exactly_one_gate_refused_entry(
            self, make_store: StoreFactory, example_spec: PromptSpec) -> None:
        from prompt_registry import GateRefused
        from prompt_registry.gates import move_label

        s = make_store()
        name = example_spec.name
        seed_store(s, ROOT / "configs" / "prompts")
        v2 = s.publish(example_spec.model_copy(update={"description": "v2"}), actor="a").version.version
        before = len(s.audit(name))
        with pytest.raises(GateRefused) as refused:
            move_label(s, name, "production", v2, actor="mallory", note="ship it")
        entries = make_store().audit(name)[before:]
        assert [e.action for e in entries] == ["gate_refused"]
        (e,) = entries
        assert (e.actor, e.label, e.from_version, e.to_version) == ("mallory", "production", 1, v2)
        assert e.note == refused.value.report.summary() and e.note.startswith("gate failed")
        assert s.labels(name)["production"] == 1
        # other labels are not gated, and a passing or overridden move records no refusal
        move_label(s, name, "canary", v2, actor="a")
        assert [x.action for x in s.audit(name)[before:]] == ["gate_refused", "label"]
        n = len(s.audit(name))
        with pytest.raises(GateRefused):
            move_label(s, name, "production", v2, actor="bob", record_refusal=False)
        assert len(s.audit(name)) == n, "record_refusal=False: the caller records it itself"


class TestKeys:
    """KeyReader and KeyStore: records stored hashed, revocation replaces the record."""

    def test_api_keys_are_stored_hashed(self, store: KeyStore) -> None:
        from prompt_registry.keys import generate_key, parse_key, verify_secret

        key, record = generate_key("svc-listing", ["moderate"], created_by="ops")
        store.put_key(record)
        key_id, secret = parse_key(key)  # type: ignore[misc]
        got = store.get_key(key_id)
        assert got == record and secret not in got.model_dump_json()
        assert verify_secret(got, secret) and not verify_secret(got, secret + "x")
        store.put_key(record.model_copy(update={"revoked": True}))
        assert store.get_key(key_id).revoked is True  # type: ignore[union-attr]
        assert [k.key_id for k in store.list_keys()] == [key_id]
        assert store.get_key("000000000000") is None


class TestMemos:
    """MemoStore: request id -> verdict memo, expiring."""

    def test_verdict_memos_expire(self, store: MemoStore) -> None:
        store.remember_verdicts({"r1": '{"arm":"canary"}', "r2": '{"arm":"stable"}'}, ttl_s=60)
        assert store.recall_verdict("r1") == '{"arm":"canary"}'
        assert store.recall_verdict("nope") is None
        # A real expiry, on both stores (Redis keeps the time itself, so no injected clock).
        # Read back at once, then waited for: 3 s leaves a loaded machine room for the first
        # read (at 1 s it could come after the expiry), and the wait ends on the expiry itself.
        store.remember_verdicts({"r3": "{}"}, ttl_s=3)
        assert store.recall_verdict("r3") == "{}"
        deadline = time.monotonic() + 30
        while store.recall_verdict("r3") is not None:
            assert time.monotonic() < deadline, "a 3 s memo still there after 30 s"
            time.sleep(0.1)
        assert store.recall_verdict("r1") == '{"arm":"canary"}'  # only the expired one went

    def test_sqlite_deletes_expired_memos_through_an_index(self, tmp_path: Path) -> None:
        """Every flush of verdict memos also deletes the expired ones; that DELETE must not scan a
        week of canary traffic (it did: 23 ms per flush at 200,000 memos, 0.7 ms with the index)."""
        import sqlite3

        path = tmp_path / "registry.db"
        SqlitePromptStore(path).remember_verdicts({"r1": "{}"}, ttl_s=60)
        with sqlite3.connect(path) as con:
            plan = con.execute("EXPLAIN QUERY PLAN DELETE FROM verdict_memos WHERE expires_at < ?", (0.0,)).fetchall()
        assert any("USING INDEX verdict_memos_expiry" in str(row) for row in plan), plan
