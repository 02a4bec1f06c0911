from __future__ import annotations

import threading
from pathlib import Path

import pytest

from prompt_registry import LabelConflict, PromptNotFound, PromptSpec
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> SqlitePromptStore:
    s = SqlitePromptStore(tmp_path / "registry.db")
    yield s
    s.close()


def _variant(spec: PromptSpec, i: int) -> PromptSpec:
    return spec.model_copy(update={"description": f"variant {i}"})


def test_publish_numbers_versions_and_dedupes(store: SqlitePromptStore, example_spec: PromptSpec) -> None:
    first = store.publish(example_spec, actor="alice")
    again = store.publish(example_spec, actor="bob")
    second = store.publish(_variant(example_spec, 1), actor="alice")
    assert (first.created, first.version.version) == (True, 1)
    assert (again.created, again.version.version) == (False, 1)
    assert (second.created, second.version.version) == (True, 2)
    assert store.get_version(example_spec.name, 2).spec.description == "variant 1"


def test_labels_resolve_and_compare_and_set(store: SqlitePromptStore, example_spec: PromptSpec) -> None:
    store.publish(example_spec, actor="a")
    store.publish(_variant(example_spec, 1), actor="a")
    assert store.set_label(example_spec.name, "production", 1, actor="a") is None
    assert store.resolve(example_spec.name, "production").version == 1
    with pytest.raises(LabelConflict):
        store.set_label(example_spec.name, "production", 2, expected=2, actor="a")
    assert store.set_label(example_spec.name, "production", 2, expected=1, actor="a") == 1
    assert store.resolve(example_spec.name, "production").version == 2
    actions = [(e.action, e.label, e.from_version, e.to_version) for e in store.audit(example_spec.name)]
    assert actions == [("publish", None, None, 1), ("publish", None, None, 2),
                       ("label", "production", None, 1), ("label", "production", 1, 2)]


def test_unknown_things_are_named(store: SqlitePromptStore, example_spec: PromptSpec) -> None:
    with pytest.raises(PromptNotFound, match="unknown prompt 'nope'"):
        store.resolve("nope", "production")
    store.publish(example_spec, actor="a")
    with pytest.raises(PromptNotFound, match="no label 'canary'"):
        store.resolve(example_spec.name, "canary")
    with pytest.raises(PromptNotFound, match="no version 9"):
        store.set_label(example_spec.name, "canary", 9, actor="a")


def test_concurrent_publishers_lose_no_version(tmp_path: Path, example_spec: PromptSpec) -> None:
    path = tmp_path / "registry.db"
    SqlitePromptStore(path).close()
    results: list[int] = []
    errors: list[BaseException] = []

    def publish(worker: int) -> None:
        s = SqlitePromptStore(path)  # one connection per publisher, as separate processes would
        try:
            for j in range(5):
                results.append(s.publish(_variant(example_spec, worker * 100 + j), actor=f"w{worker}").version.version)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=publish, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == list(range(1, 31))


def test_seed_is_idempotent_and_never_moves_a_label(store: SqlitePromptStore, example_spec: PromptSpec) -> None:
    seed_store(store, ROOT / "configs" / "prompts")
    store.publish(_variant(example_spec, 1), actor="a")
    store.set_label(example_spec.name, "production", 2, actor="a")
    seed_store(store, ROOT / "configs" / "prompts")
    assert store.resolve(example_spec.name, "production").version == 2
    assert len([e for e in store.audit(example_spec.name) if e.action == "publish"]) == 2
