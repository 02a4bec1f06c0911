"""`modgate replay` (`gateway.quality.replay`): recorded traffic (the sample store, or a dataset
file) through a candidate version, at a bounded rate and low priority, compared with what
production answered per category and locale, with the flipped items and their content."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.bootstrap import build_gateway
from gateway.cli import eval as eval_cli
from gateway.cli.main import app as cli
from gateway.config import load_config
from gateway.quality.replay import REPLAY_PRIORITY, RateLimitedBackend
from gateway.stores import open_store
from prompt_registry.keys import generate_key
from prompt_registry.loader import load_prompt_file, seed_store
from serving import ChatRequest
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
LISTINGS = [("oak-0", "oak table", "en-US"), ("oak-1", "oak shelf", "zh-CN"),
            ("rep-0", "replica watch", "en-US"), ("rep-1", "replica bag 复刻", "zh-CN"),
            ("oak-2", "oak chair", "en-US"), ("pil-0", "diet pills", "zh-CN")]


def _verdict(decision: str, category: str) -> str:
    return json.dumps({"decision": decision, "category": category, "confidence": 0.9})


def production(req: ChatRequest) -> str:
    text = req.messages[-1]["content"]
    if "replica" in text:
        return _verdict("block", "counterfeit")
    if "pills" in text:
        return _verdict("block", "prohibited_item")
    return _verdict("allow", "none")


def candidate(req: ChatRequest) -> str:
    """Flips two listings: the oak shelf to counterfeit, the replica watch to allow."""
    text = req.messages[-1]["content"]
    if "oak shelf" in text:
        return _verdict("block", "counterfeit")
    if "replica watch" in text:
        return _verdict("allow", "none")
    return production(req)


def test_the_rate_limiter_spaces_calls_evenly() -> None:
    now = [0.0]
    starts: list[float] = []

    async def sleep(s: float) -> None:
        now[0] += s

    class Inner(FakeBackend):
        async def chat(self, request: ChatRequest, *, timeout_s: float):  # type: ignore[no-untyped-def]
            starts.append(now[0])
            return await super().chat(request, timeout_s=timeout_s)

    limited = RateLimitedBackend(Inner(), 2.0, clock=lambda: now[0], sleep=sleep)
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=8)

    async def go() -> None:
        for _ in range(5):
            await limited.chat(req, timeout_s=1)
    asyncio.run(go())
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0]
    with pytest.raises(ValueError):
        RateLimitedBackend(Inner(), 0)


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    """A gateway (the real composition root) answered LISTINGS with v1, keeping every item's
    content in the sample store; v2 is published as the candidate."""
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    config["samples"] = {"enabled": True, "share": 1.0}
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    store = open_store(cfg)
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("svc", ["moderate"], created_by="test")
    store.put_key(record)
    reviewer, record = generate_key("ann", ["feedback"], created_by="test")
    store.put_key(record)
    app = build_gateway(cfg, store, backend=FakeBackend(responder=production))
    with TestClient(app) as client:
        for item, title, locale in LISTINGS:
            r = client.post("/v1/moderate", headers={"authorization": f"Bearer {key}"},
                            json={"item_id": item, "title": title, "description": f"about {title}",
                                  "locale": locale})
            assert r.status_code == 200, r.text
            if item == "oak-0":  # a reviewer disagrees with production on this one
                r = client.post("/v1/feedback", headers={"authorization": f"Bearer {reviewer}"},
                                json={"request_id": r.json()["request_id"], "decision": "block",
                                      "category": "counterfeit"})
                assert r.status_code == 202, r.text
    spec = load_prompt_file(ROOT / "configs" / "prompts" / "listing-moderation.yaml")
    store.publish(spec.model_copy(update={"description": "candidate v2"}), actor="test")
    store.close()
    return path


def _run(args: list[str], backend: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(eval_cli, "make_backend", lambda cfg: backend)
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_replay_of_the_sample_store_reports_agreement_and_flips(
        recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend(responder=candidate)
    out = tmp_path / "out"
    code, output = _run(["replay", "--config", str(recorded), "--prompt", "listing-moderation",
                         "--version", "2", "--since", "1h", "--rate", "50", "--out", str(out),
                         "--json"], backend, monkeypatch)
    assert code == 0, output
    report = json.loads(output)
    assert report["replayed"] == 6 and report["errors"] == 0 and report["unmatched"] == []
    assert report["overall"]["agree"] == 4 and report["overall"]["n"] == 6
    assert report["by_locale"]["en-US"] == {"n": 3, "agree": 2, "agreement": 2 / 3,
                                            "kappa": report["by_locale"]["en-US"]["kappa"]}
    assert report["by_locale"]["zh-CN"]["agree"] == 2
    assert report["by_production_class"]["allow"]["agree"] == 2
    assert report["by_production_class"]["block:counterfeit"] == {
        "n": 2, "agree": 1, "agreement": 0.5, "kappa": None}
    flips = {f["item_id"]: f for f in report["flips"]}
    assert set(flips) == {"oak-1", "rep-0"}
    assert (flips["oak-1"]["production"], flips["oak-1"]["candidate"]) == ("allow", "block:counterfeit")
    assert flips["oak-1"]["production_source"] == "decision_log"
    assert flips["rep-0"]["content"]["title"] == "replica watch"
    # low priority, one call per listing, the candidate's own prompt
    assert len(backend.requests) == 6
    assert {r.priority for r in backend.requests} == {REPLAY_PRIORITY}
    html = (out / "replay-v2.html").read_text()
    assert "oak shelf" in html and "block:counterfeit" in html and "<script" not in html
    assert "66.7 %" in (out / "replay-v2.md").read_text()
    # a second run answers from the eval cache: no model call
    again = FakeBackend(responder=candidate)
    code, output = _run(["replay", "--config", str(recorded), "--prompt", "listing-moderation",
                         "--version", "2", "--json", "--out", str(out)], again, monkeypatch)
    assert code == 0 and again.requests == [] and json.loads(output)["overall"]["agree"] == 4


def test_replay_of_a_dataset_matches_production_by_item_id(
        recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"item_id": item, "title": title, "description": f"about {title}", "locale": locale,
             "gold_decision": "allow", "gold_category": "none"} for item, title, locale in LISTINGS]
    rows.append({"item_id": "never-seen", "title": "a lamp", "description": "", "locale": "en-US",
                 "gold_decision": "allow", "gold_category": "none"})
    dataset = tmp_path / "replay.jsonl"
    dataset.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    code, output = _run(["replay", "--config", str(recorded), "--prompt", "listing-moderation",
                         "--version", "2", "--dataset", str(dataset), "--rate", "50",
                         "--out", str(tmp_path / "o")], FakeBackend(responder=candidate), monkeypatch)
    assert code == 0, output
    assert "agreement** with what production answered on 6 items" in output
    assert "never-seen" in output and "oak shelf" in output


def test_replay_refuses_what_it_cannot_do(recorded: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["replay", "--config", str(recorded), "--prompt", "listing-moderation"]
    code, output = _run([*base, "--version", "2", "--rate", "0"], FakeBackend(), monkeypatch)
    assert code == 2
    code, output = _run([*base, "--version", "2", "--since", "yesterday-ish"], FakeBackend(), monkeypatch)
    assert code == 2 and "--since" in output
    code, output = _run([*base, "--version", "2", "--since", "1h", "--until", "2h"], FakeBackend(),
                        monkeypatch)
    assert code == 2
    lone = tmp_path / "lone.jsonl"
    lone.write_text(json.dumps({"item_id": "never-seen", "title": "a lamp", "description": "",
                                "locale": "en-US", "gold_decision": "allow", "gold_category": "none"}) + "\n")
    code, output = _run([*base, "--version", "2", "--dataset", str(lone)], FakeBackend(), monkeypatch)
    assert code == 1 and "no row of the dataset" in output
    broken = FakeBackend()
    broken.error = RuntimeError("connection refused")
    code, output = _run([*base, "--version", "2", "--rate", "50", "--fresh",
                         "--out", str(tmp_path / "o")], broken, monkeypatch)
    assert code == 1 and "every one of the 6 model calls failed" in output


def test_disagreement_exports_take_content_from_the_sample_store(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "live.jsonl"
    result = CliRunner().invoke(cli, ["feedback", "disagreements", "--config", str(recorded),
                                      "--out", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 1
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["item_id"], row["title"], row["description"]) == ("oak-0", "oak table", "about oak table")
    assert (row["gold_decision"], row["gold_category"]) == ("block", "counterfeit")


def test_sampled_rows_without_a_title_are_left_out() -> None:
    from datetime import UTC, datetime

    from gateway.quality.replay import rows_from_samples
    from gateway.samples import Sample

    def sample(rid: str, content: dict[str, str]) -> Sample:
        return Sample(request_id=rid, item_id=rid, ts=datetime.now(UTC), prompt="p", version=1,
                      arm="stable", locale="en-US", decision="block", category="adult",
                      confidence=None, content=content)

    rows = rows_from_samples([sample("a", {"title": "t", "description": "d"}), sample("b", {"x": "y"})], {})
    assert [(r.row.item_id, r.production.source, r.row.gold_category) for r in rows] == [
        ("a", "sample_store", "adult")]  # type: ignore[union-attr]
