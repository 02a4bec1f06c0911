"""`modgate feedback import` (issue #21 item 3): a review tool's CSV (with or without BOM) or
JSON Lines export, every row checked as POST /v1/feedback checks it, row-numbered problems,
nothing imported from a file with errors unless --skip-invalid, item ids resolved to the
newest decision, idempotent re-runs; and agreement between reviewers in `feedback quality`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

import gateway.cli.feedback as fb_cli
from gateway.api.app import create_app
from gateway.cli.main import app as cli
from gateway.config import GatewaySettings, load_config
from gateway.decision_log import DecisionLog, DecisionRecord
from gateway.feedback import FeedbackLog
from gateway.quality.agreement import ReviewerLabel, cohen_kappa, pair_agreement
from prompt_registry.keys import generate_key
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime.now(UTC) - timedelta(hours=2)


def _rec(request_id: str, item_id: str, ts: datetime, arm: str = "stable",
         decision: str = "block", category: str | None = "counterfeit") -> DecisionRecord:
    return DecisionRecord(
        ts=ts, request_id=request_id, item_id=item_id, subject="seller-1",
        prompt_name="listing-moderation", prompt_version=1, label="production", arm=arm,  # type: ignore[arg-type]
        shadow_of="req-x" if arm == "shadow" else None, decision=decision, category=category,
        confidence=0.9, fail_reason=None, model="tiny-llama", latency_ms=10.0,
        prompt_tokens=10, completion_tokens=5, locale="en-US", trace_id=None)


class Env:
    def __init__(self, config: Path, data: Path, key: str, key2: str, client: TestClient) -> None:
        self.config, self.data, self.key, self.key2, self.client = config, data, key, key2, client
        self.posts: list[dict[str, Any]] = []

    def run(self, *args: str, key: str | None = None) -> Result:
        env = {"MODGATE_API_KEY": key or self.key}
        return CliRunner().invoke(cli, ["feedback", *args, "--config", str(self.config)],
                                  env=env, catch_exceptions=False)

    def log(self) -> list[dict[str, Any]]:
        return [orjson.loads(x) for f in sorted((self.data / "feedback").glob("*.jsonl"))
                for x in f.read_bytes().splitlines()]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    from gateway.cli.main import _open_store

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    store = _open_store(cfg)
    key, record = generate_key("review-tool", ["feedback"], created_by="test")
    store.put_key(record)
    key2, record2 = generate_key("second-opinion", ["feedback"], created_by="test")
    store.put_key(record2)

    async def write() -> None:
        log = DecisionLog(cfg.data_path() / "decisions", replica="gw-0", fsync=False)
        log.append(_rec("req-old", "item-1", T0, decision="allow", category=None))
        log.append(_rec("req-new", "item-1", T0 + timedelta(minutes=5)))
        log.append(_rec("req-shadow", "item-1", T0 + timedelta(minutes=6), arm="shadow"))
        log.append(_rec("req-2", "item-2", T0 + timedelta(minutes=1)))
        log.append(_rec("req-3", "item-3", T0 + timedelta(minutes=2), decision="allow", category=None))
        await log.aclose()
    asyncio.run(write())

    app = create_app(GatewaySettings(rollout_controller=False), store, FakeBackend(),
                     feedback_log=FeedbackLog(cfg.data_path() / "feedback", replica="gw-0"))
    with TestClient(app) as client:
        e = Env(path, cfg.data_path(), key, key2, client)

        class Recording:
            """The TestClient as the CLI's HTTP client, remembering what was posted."""
            def __init__(self, url: str) -> None:
                pass

            def __enter__(self) -> Recording:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def post(self, path: str, **kw: Any) -> Any:
                e.posts.append({"path": path, **kw})
                return client.post(path, **kw)

        monkeypatch.setattr(fb_cli, "http_client", Recording)
        yield e
    store.close()


def _write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


GOOD_CSV = ("request_id,item_id,decision,category,reviewer,note\n"
            "req-2,,block,counterfeit,Ana,fake logo\n"
            ",item-1,allow,,Ana,\n"
            "req-3,,allow,none,Ben,\n")


@pytest.mark.parametrize("bom", [False, True])
def test_csv_with_or_without_bom_is_imported_and_item_ids_resolve_to_the_newest_decision(
        env: Env, tmp_path: Path, bom: bool) -> None:
    f = _write(tmp_path / "labels.csv", GOOD_CSV, bom=bom)
    r = env.run("import", str(f))
    assert r.exit_code == 0, r.output
    assert "3 label(s) recorded" in r.output
    got = {(x["request_id"], x["decision"], x["category"], x["display_name"]) for x in env.log()}
    assert got == {("req-2", "block", "counterfeit", "Ana"), ("req-new", "allow", None, "Ana"),
                   ("req-3", "allow", None, "Ben")}
    assert {x["reviewer"] for x in env.log()} == {"review-tool"}  # the key is the reviewer
    keys = [p["headers"]["idempotency-key"] for p in env.posts]
    assert len(set(keys)) == 3 and all(k.startswith("import-") for k in keys)


def test_rerunning_the_same_import_records_nothing_twice(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "labels.csv", GOOD_CSV)
    assert env.run("import", str(f)).exit_code == 0
    first = env.log()
    r = env.run("import", str(f))
    assert r.exit_code == 0, r.output
    assert env.log() == first
    assert [p["headers"]["idempotency-key"] for p in env.posts[:3]] == \
        [p["headers"]["idempotency-key"] for p in env.posts[3:]]


def test_jsonl_is_imported(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "labels.jsonl",
               json.dumps({"item_id": "item-2", "decision": "block", "category": "counterfeit",
                           "reviewer": "Ana"}) + "\n\n"
               + json.dumps({"request_id": "req-3", "decision": "allow"}) + "\n")
    r = env.run("import", str(f))
    assert r.exit_code == 0, r.output
    assert {x["request_id"] for x in env.log()} == {"req-2", "req-3"}


def test_a_file_with_errors_imports_nothing_and_names_every_row(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "labels.csv",
               "request_id,item_id,decision,category,reviewer,note\n"
               "req-2,,block,counterfeit,Ana,\n"           # row 2: fine
               "req-3,,block,weapons,Ana,\n"               # row 3: unknown category
               ",item-404,allow,,Ana,\n"                   # row 4: item never decided
               "req-2,,needs_review,,Ana,\n"               # row 5: not a label
               ",,allow,,Ana,\n"                           # row 6: no id
               "bad id!,,allow,,Ana,\n"                    # row 7: malformed id
               "req-3,,allow,counterfeit,Ana,\n", bom=True)  # row 8: contradiction
    r = env.run("import", str(f))
    assert r.exit_code == 1, r.output
    out = r.output
    for row, words in [(3, "'weapons' is not a category"), (4, "item_id item-404: no decision"),
                       (5, "'needs_review' is not a label"), (6, "request_id or item_id"),
                       (7, "request_id 'bad id!'"), (8, "contradicts itself")]:
        assert f"row {row}: " in out and words in out, (row, out)
    assert "row 2:" not in out
    assert "6 invalid row(s) of 7; nothing imported" in out
    assert env.posts == [] and env.log() == []

    r = env.run("import", str(f), "--skip-invalid")
    assert r.exit_code == 0, r.output
    assert [x["request_id"] for x in env.log()] == ["req-2"]


def test_dry_run_checks_without_a_key_or_sending(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "labels.csv", GOOD_CSV)
    r = CliRunner().invoke(cli, ["feedback", "import", str(f), "--dry-run", "--config",
                                 str(env.config)], env={"MODGATE_API_KEY": ""})
    assert r.exit_code == 0, r.output
    assert "3 row(s) valid" in r.output and env.posts == []


def test_unknown_columns_and_formats_are_refused(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "labels.csv", "request_id,verdict\nreq-2,block\n")
    r = env.run("import", str(f))
    assert r.exit_code == 1 and "unknown column(s) verdict" in r.output
    r = env.run("import", str(_write(tmp_path / "labels.xlsx", "x")))
    assert r.exit_code == 2 and "use a .csv or .jsonl" in r.output


def test_a_wrong_key_stops_the_import(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "labels.csv", GOOD_CSV)
    r = env.run("import", str(f), key="mgk_not-a-key")
    assert r.exit_code == 1 and "401" in r.output and len(env.posts) == 1


def test_kappa_is_undefined_when_both_answer_one_class() -> None:
    assert cohen_kappa([("allow", "allow")] * 5) is None
    assert cohen_kappa([("allow", "allow"), ("block/x", "block/x")]) == pytest.approx(1.0)
    assert cohen_kappa([("allow", "block/x"), ("block/x", "allow")]) == pytest.approx(-1.0)
    # the textbook example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> kappa 0.4
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    now = datetime.now(UTC)
    labels = [ReviewerLabel(now, f"r{i}", who, "allow") for i in range(3) for who in ("a", "b")]
    [pair] = pair_agreement(labels)
    assert (pair.common, pair.agreement, pair.kappa) == (3, 1.0, None)


def test_feedback_quality_shows_agreement_between_reviewers(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "a.csv", "request_id,decision,category\nreq-2,block,counterfeit\n"
                                   "req-3,allow,\nreq-new,allow,\n")
    assert env.run("import", str(f)).exit_code == 0
    g = _write(tmp_path / "b.csv", "request_id,decision,category\nreq-2,block,counterfeit\n"
                                   "req-3,block,counterfeit\nreq-new,allow,\n")
    assert env.run("import", str(g), key=env.key2).exit_code == 0
    r = env.run("quality", "--since", "1d", "--json")
    assert r.exit_code == 0, r.output
    [pair] = json.loads(r.output)["reviewer_agreement"]
    assert pair["reviewers"] == ["review-tool", "second-opinion"] and pair["common"] == 3
    assert pair["kappa"] == pytest.approx(0.4)
    r = env.run("quality", "--since", "1d")
    assert "agreement between reviewers" in r.output and "0.400" in r.output


def test_feedback_quality_says_undefined_not_one_for_a_single_class(env: Env, tmp_path: Path) -> None:
    f = _write(tmp_path / "a.csv", "request_id,decision\nreq-3,allow\nreq-new,allow\n")
    assert env.run("import", str(f)).exit_code == 0
    assert env.run("import", str(f), key=env.key2).exit_code == 0
    r = env.run("quality", "--since", "1d")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if "review-tool / second-opinion" in ln)
    assert line.split()[-1] == "undefined" and "1.000" not in line
