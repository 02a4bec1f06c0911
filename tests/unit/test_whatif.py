"""Threshold what-if on reviewer labels (issue 19 item 6): the logged verdicts decided again at
other operating points, with the serve-time function, and scored against reviewer labels.

The central check: a log recorded by the real gateway (FastAPI app, pipeline, decision log)
under one set of operating points, decided again by the what-if at another set, gives item by
item what the gateway itself decides when it serves with that other set - also when the
engine's top-k leaves probability mass unresolved (the bounds, not the point estimate, decide).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog, DecisionRecord
from gateway.quality.decisions import read_segments
from gateway.quality.live_quality import ALL_LOCALES, FeedbackLabel
from gateway.quality.whatif import (
    WhatIfAccumulator,
    logged_verdict,
    parse_point,
    redecide,
)
from gateway.verdict import Verdict, apply_thresholds
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.models import OperatingPoint, PromptSpec
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
CATS = [c for c in yaml.safe_load(PROMPT.read_text())["verdict"]["categories"] if c != "none"]
ITEMS = 48


def _spec_data(thresholds: dict[str, OperatingPoint] | None) -> dict[str, Any]:
    data = yaml.safe_load(PROMPT.read_text())
    if thresholds:
        data["thresholds"] = {c: p.model_dump() for c, p in thresholds.items()}
    return data


def _serve(tmp: Path, thresholds: dict[str, OperatingPoint] | None, top_k: int) -> dict[str, DecisionRecord]:
    """The shipped prompt served with *thresholds* by the real app (fake model, *top_k*
    alternatives per token); the decision record of each of ITEMS listings by item id."""
    tmp.mkdir(parents=True)
    (tmp / "prompts").mkdir()
    (tmp / "prompts" / "p.yaml").write_text(yaml.safe_dump(_spec_data(thresholds)))
    store = SqlitePromptStore(tmp / "r.db")
    try:
        seed_store(store, tmp / "prompts")
        key, record = generate_key("svc", ["moderate"], created_by="test")
        store.put_key(record)
        log = DecisionLog(tmp / "decisions", replica="gw-0")
        app = create_app(GatewaySettings(verdict_top_logprobs=top_k), store, FakeBackend(),
                         decision_log=log)
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            for i in range(ITEMS):
                r = client.post("/v1/moderate", json={
                    "item_id": f"it-{i}", "title": f"listing {i}", "description": "d",
                    "locale": "zh-CN" if i % 3 == 0 else "en-US"})
                assert r.status_code == 200, r.text
            client.portal.call(client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
    finally:
        store.close()
    return {r.item_id: r for r in read_segments(tmp / "decisions")}


def _points(block_at: float, review_at: float) -> dict[str, OperatingPoint]:
    return {c: OperatingPoint(block_at=block_at, review_at=review_at) for c in CATS}


# Operating points around the fake model's block probabilities (0.5-0.99 when it wrote block,
# 0.005-0.25 otherwise; with top_k 2 each lies within an unresolved band).
GRID: list[dict[str, OperatingPoint] | None] = [
    None, _points(0.0, 0.0), _points(0.75, 0.2), _points(0.9, 0.1), _points(1.0, 0.6),
    {CATS[0]: OperatingPoint(block_at=0.6, review_at=0.6)},
]


@pytest.fixture(scope="module", params=[20, 2], ids=["exact", "top2-unresolved"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[tuple[int, list[dict[str, DecisionRecord]]]]:
    k = request.param
    base = tmp_path_factory.mktemp(f"whatif-k{k}")
    yield k, [_serve(base / f"grid-{i}", t, k) for i, t in enumerate(GRID)]


def test_the_what_if_decides_as_the_gateway_serves(served: tuple[int, list[dict[str, DecisionRecord]]]) -> None:
    """Re-deciding the log of every grid point at every other grid point gives the decisions
    the gateway served at that other point, item by item."""
    k, logs = served
    first = logs[0]
    assert {r.item_id for r in first.values()} == {f"it-{i}" for i in range(ITEMS)}
    if k == 2:  # the inexact case is really exercised: the decision's own unresolved mass
        assert any((r.decision_unresolved or 0) > 0 for r in first.values())
        assert any(r.probability_unresolved != r.decision_unresolved for r in first.values())
    compared = 0
    for src in logs:
        for j, target in enumerate(GRID):
            for item, rec in src.items():
                served_rec = logs[j][item]
                v = logged_verdict(rec)
                assert v is not None
                cat = v.category or ""
                point = (target or {}).get(cat)
                assert redecide(v, cat, point) == served_rec.decision, (item, j, rec)
                compared += 1
    assert compared == len(GRID) ** 2 * ITEMS
    # the grid really moves decisions: not every point decides alike
    assert len({tuple(sorted((i, r.decision) for i, r in log.items())) for log in logs}) >= 4


def test_the_point_estimate_alone_would_disagree(served: tuple[int, list[dict[str, DecisionRecord]]]) -> None:
    """Why the log keeps the raw scores: with unresolved mass, thresholds on the rounded point
    estimate (or on bounds rebuilt from the larger unresolved mass of both fields) decide
    otherwise than the gateway somewhere on the grid; the what-if never does (test above).
    With exact probabilities the point estimate is the probability and agrees everywhere."""
    from gateway.verdict import ChoiceScores

    k, logs = served
    wrong = 0
    for j, target in enumerate(GRID):
        for item, rec in logs[0].items():
            if rec.block_probability is None or not target:
                continue
            u = rec.probability_unresolved or 0.0
            guess = Verdict(decision=rec.model_decision or rec.decision or "", category=rec.category,
                            confidence=None, decision_scores=ChoiceScores(
                                {"block": rec.block_probability * (1 - u)}, u))
            wrong += apply_thresholds(guess, target).decision != logs[j][item].decision
    assert (wrong > 0) if k == 2 else (wrong == 0)


def _labels(records: dict[str, DecisionRecord], gold: dict[str, tuple[str, str | None]]) -> dict[str, FeedbackLabel]:
    ts = datetime.now(UTC)
    return {records[i].request_id: FeedbackLabel(ts=ts, request_id=records[i].request_id,
                                                 decision=d, category=c)
            for i, (d, c) in gold.items()}


def test_current_point_reproduces_the_log_and_the_rates_match_a_served_run(
        served: tuple[int, list[dict[str, DecisionRecord]]]) -> None:
    """The summary numbers: at the current point nothing differs from the log; a what-if at
    another grid point has the block and review counts of the run served with it; precision
    and recall are counted by hand from the labels."""
    _, logs = served
    src, current, other = logs[2], GRID[2], GRID[3]
    assert current is not None and other is not None
    # reviewer: every item the model put in a category is right when its block probability >= .5
    gold = {i: (("block", r.category) if (r.block_probability or 0) >= 0.5 else ("allow", None))
            for i, r in src.items() if r.category not in (None, "none")}
    acc = WhatIfAccumulator(_labels(src, gold))
    for r in src.values():
        acc.add(r)
    spec = PromptSpec.model_validate(_spec_data(current))
    cat = CATS[0]
    [vw] = acc.results(lambda p, v: spec, points=[(cat, other[cat])], target=0.5)
    cw = next(c for c in vw.categories if c.category == cat)
    rows = {(r.scenario, r.locale): r for r in cw.rows}
    now = rows[("current", ALL_LOCALES)]
    assert now.differs_from_log == 0
    mine = [r for r in src.values() if r.category == cat]
    assert now.decisions == len(mine) and now.no_probability == 0
    assert now.blocked == sum(r.decision == "block" for r in mine)
    assert now.review == sum(r.decision == "needs_review" for r in mine)
    what = rows[("what-if", ALL_LOCALES)]
    served_other = [logs[3][r.item_id] for r in mine]
    assert what.blocked == sum(r.decision == "block" for r in served_other)
    assert what.review == sum(r.decision == "needs_review" for r in served_other)
    blocked = [r for r in served_other if r.decision == "block"]
    assert what.blocked_labelled == len(blocked)
    assert what.tp == sum(gold[r.item_id][0] == "block" for r in blocked)
    assert what.positives == sum(1 for d, c in gold.values() if d == "block" and c == cat)
    # the locales add up to all
    by_loc = [r for (s, loc), r in rows.items() if s == "what-if" and loc != ALL_LOCALES]
    assert {r.locale for r in by_loc} <= {"en-US", "zh-CN"}
    assert sum(r.decisions for r in by_loc) == what.decisions
    assert sum(r.tp for r in by_loc) == what.tp


def _rec(i: int, *, category: str, p: float | None, decision: str = "block", locale: str = "en-US",
         **kw: Any) -> DecisionRecord:
    return DecisionRecord(
        ts=datetime.now(UTC) - timedelta(minutes=5), request_id=f"r{i}", item_id=f"i{i}",
        subject="s", prompt_name="listing-moderation", prompt_version=1, arm="stable",
        decision=decision, category=category, model="m", latency_ms=1.0, locale=locale,
        block_probability=p, block_probability_low=p, decision_unresolved=None if p is None else 0.0,
        probability_unresolved=None if p is None else 0.0, **kw)


def test_decisions_without_a_probability_are_counted_and_decided_as_served() -> None:
    """No calibrated probability: shown in its own column, and decided as the gateway would
    (an allow fails closed to needs_review, a block stands), never dropped."""
    recs = [_rec(0, category="counterfeit", p=0.95), _rec(1, category="counterfeit", p=None),
            _rec(2, category="counterfeit", p=None, decision="needs_review", decided_by="fail_closed",
                 model_decision="allow"),
            _rec(3, category="counterfeit", p=0.2, decision="allow")]
    labels = {f"r{i}": FeedbackLabel(ts=datetime.now(UTC), request_id=f"r{i}", decision=d, category=c)
              for i, (d, c) in enumerate([("block", "counterfeit"), ("block", "counterfeit"),
                                          ("allow", None), ("block", "counterfeit")])}
    acc = WhatIfAccumulator(labels)
    for r in recs:
        acc.add(r)
    point = OperatingPoint(block_at=0.9, review_at=0.5)
    [vw] = acc.results(lambda p, v: None, points=[("counterfeit", point)])
    assert not vw.current_known
    cw = vw.categories[0]
    row = next(r for r in cw.rows if r.scenario == "what-if" and r.locale == ALL_LOCALES)
    assert (row.decisions, row.no_probability, row.labelled_no_probability) == (4, 2, 2)
    # r0 blocked by the point, r1 (no probability, model blocked) stands, r2 fails closed,
    # r3 (0.2 < 0.5) allowed
    assert (row.blocked, row.review) == (2, 1)
    assert (row.tp, row.blocked_labelled, row.positives) == (2, 2, 3)
    assert row.precision == 1.0 and row.recall == pytest.approx(2 / 3)
    assert row.recall_ci is not None and row.recall_ci[0] < 2 / 3 < row.recall_ci[1]
    off = acc.results(lambda p, v: None, points=[("counterfeit", None)])[0].categories[0]
    r_off = next(r for r in off.rows if r.scenario == "what-if" and r.locale == ALL_LOCALES)
    assert (r_off.blocked, r_off.review) == (2, 0)  # the model's own decisions: r2 allowed


def test_an_escalated_decision_is_counted() -> None:
    recs = [_rec(0, category="adult", p=0.9, escalation="needs_review", first_model="small")]
    acc = WhatIfAccumulator({"r0": FeedbackLabel(ts=datetime.now(UTC), request_id="r0",
                                                 decision="block", category="adult")})
    acc.add(recs[0])
    assert acc.results(lambda p, v: None)[0].escalated == 1


@pytest.mark.parametrize(("spec", "problem"), [
    ("counterfeit", "expected CATEGORY=BLOCK_AT:REVIEW_AT"),
    ("counterfeit=", "expected CATEGORY=BLOCK_AT:REVIEW_AT"),
    ("=0.8:0.4", "expected CATEGORY=BLOCK_AT:REVIEW_AT"),
    ("Counter Feit=0.8:0.4", "is not a category name"),
    ("counterfeit=0.8", "give both thresholds"),
    ("counterfeit=high:0.4", "BLOCK_AT 'high' is not a number"),
    ("counterfeit=0.8:1.5", "REVIEW_AT 1.5 is not a probability between 0 and 1"),
    ("counterfeit=nan:0.1", "BLOCK_AT nan is not a probability"),
    ("counterfeit=0.4:0.8", "REVIEW_AT (0.8) is above BLOCK_AT (0.4)"),
])
def test_a_bad_what_if_names_the_problem(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match="--what-if") as exc:
        parse_point(spec)
    assert problem in str(exc.value)


def test_what_if_specs_that_parse() -> None:
    assert parse_point("counterfeit=0.85:0.4") == ("counterfeit", OperatingPoint(block_at=0.85, review_at=0.4))
    assert parse_point(" adult = 1:1 ") == ("adult", OperatingPoint(block_at=1.0, review_at=1.0))
    assert parse_point("adult=OFF") == ("adult", None)


# -- the CLI and the report ---------------------------------------------------------------------


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    """A configuration whose data dir holds a decision log served (fake model) with
    thresholds on counterfeit, reviewer labels for it, and the registry that served it."""
    from gateway.config import load_config
    from gateway.stores import open_store

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    current = {CATS[0]: OperatingPoint(block_at=0.75, review_at=0.2)}
    (prompts / "p.yaml").write_text(yaml.safe_dump(_spec_data(current)))
    config["registry"]["seed_dir"] = str(prompts)
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    store = open_store(cfg)
    try:
        seed_store(store, prompts)
        key, record = generate_key("svc", ["moderate"], created_by="test")
        store.put_key(record)
        log_dir = cfg.data_path() / cfg.decision_log.dir
        log = DecisionLog(log_dir, replica="gw-0")
        app = create_app(GatewaySettings(), store, FakeBackend(), decision_log=log)
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            for i in range(150):
                r = client.post("/v1/moderate", json={
                    "item_id": f"it-{i}", "title": f"listing {i}", "description": "d",
                    "locale": "zh-CN" if i % 2 else "en-US"})
                assert r.status_code == 200, r.text
            client.portal.call(client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
    finally:
        store.close()
    recs = list(read_segments(log_dir))
    fb = cfg.data_path() / "feedback" / f"feedback-{datetime.now(UTC):%Y%m%d}-gw-0.jsonl"
    fb.parent.mkdir(parents=True)
    lines = [orjson.dumps({"ts": datetime.now(UTC).isoformat(), "request_id": r.request_id,
                           "decision": "block" if (r.block_probability or 0) >= 0.5 else "allow",
                           "category": r.category if (r.block_probability or 0) >= 0.5 else None})
             for r in recs if r.category not in (None, "none")]
    fb.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _cli(*args: str) -> Any:
    from gateway.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_feedback_quality_shows_the_what_if(configured: Path) -> None:
    cat = CATS[0]
    r = _cli("feedback", "quality", "--since", "1h", "--config", str(configured), "-q",
             "--what-if", f"{cat}=0.9:0.3", "--target-precision", "0.5")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "threshold what-if" in out
    assert f"{cat}" in out and "current 0.75:0.2" in out and "what-if 0.9:0.3" in out
    assert "zh-CN" in out and "en-US" in out and "no probability" in out
    j = _cli("feedback", "quality", "--since", "1h", "--config", str(configured), "--json",
             "--what-if", f"{cat}=0.9:0.3", "--target-precision", "0.5")
    assert j.exit_code == 0, j.output
    data = json.loads(j.output)
    [vw] = data["what_if"]
    assert vw["current"] == {cat: {"block_at": 0.75, "review_at": 0.2}}
    cw = next(c for c in vw["categories"] if c["category"] == cat)
    scen = {(x["scenario"], x["locale"]) for x in cw["rows"]}
    assert {("current", "all"), ("what-if", "all"), ("current", "zh-CN"), ("current", "en-US")} <= scen
    assert all(x["differs_from_log"] == 0 for x in cw["rows"] if x["scenario"] == "current")
    # the proposer of `eval thresholds`, on the labels: everything >= .5 is a confirmed block
    assert cw["proposal"]["block_at"] is not None, cw["proposal"]
    assert any(x["scenario"] == "proposed" for x in cw["rows"])


@pytest.mark.parametrize(("args", "problem"), [
    (["--what-if", "counterfeit=0.4:0.8"], "REVIEW_AT (0.8) is above BLOCK_AT (0.4)"),
    (["--what-if", "countrefeit=0.9:0.4"], "'countrefeit' is not a violation category of "
                                           "listing-moderation"),
    (["--target-precision", "1.5"], "--target-precision"),
])
def test_bad_what_if_options_are_usage_errors(configured: Path, args: list[str], problem: str) -> None:
    for cmd in (["feedback", "quality", "--since", "1h"], ["report", "ops", "--since", "1h"]):
        r = _cli(*cmd, "--config", str(configured), "-q", *args)
        assert r.exit_code == 2, r.output
        assert problem in r.output


def test_the_ops_report_has_the_what_if_and_its_plot(configured: Path, tmp_path: Path) -> None:
    cat = CATS[0]
    out = tmp_path / "rep"
    r = _cli("report", "ops", "--since", "1h", "--config", str(configured), "-q", "--out", str(out),
             "--what-if", f"{cat}=0.9:0.3", "--target-precision", "0.5")
    assert r.exit_code == 0, r.output
    md = (out / "ops-report.md").read_text()
    assert "## Threshold what-if on reviewer labels" in md
    assert "what-if 0.9:0.3" in md and "current 0.75:0.2" in md and "zh-CN" in md
    pngs = sorted(p.name for p in out.glob("ops-whatif-*.png"))
    assert pngs, list(out.iterdir())
    assert f"]({pngs[0]})" in md
    page = (out / "ops-report.html").read_text()
    assert "Threshold what-if on reviewer labels" in page
    assert pngs[0] not in page  # embedded as a data URI, like every plot of the report
    j = _cli("report", "ops", "--since", "1h", "--config", str(configured), "--json", "--out",
             str(out), "--what-if", f"{cat}=0.9:0.3")
    assert json.loads(j.output)["what_if"][0]["categories"]


def test_without_the_registry_the_current_points_are_unknown_and_said_so(configured: Path) -> None:
    from gateway.config import load_config

    load_config(configured).registry_path().unlink()
    cat = CATS[0]
    r = _cli("feedback", "quality", "--since", "1h", "--config", str(configured), "--json",
             "--what-if", f"{cat}=0.9:0.3")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    [vw] = data["what_if"]
    assert vw["current"] is None
    assert any("current operating points of the what-if are unknown" in n for n in data["notes"])
    cw = next(c for c in vw["categories"] if c["category"] == cat)
    assert {x["scenario"] for x in cw["rows"]} >= {"what-if"}
    assert "current" not in {x["scenario"] for x in cw["rows"]}
    # a category no verdict or label of the window used is still refused
    bad = _cli("feedback", "quality", "--since", "1h", "--config", str(configured), "-q",
               "--what-if", "countrefeit=0.9:0.3")
    assert bad.exit_code == 2 and "'countrefeit' is not a violation category" in bad.output


def test_an_empty_window_checks_the_category_against_the_registry(configured: Path) -> None:
    r = _cli("feedback", "quality", "--since", "2020-01-01", "--until", "2020-01-02",
             "--config", str(configured), "-q", "--what-if", "countrefeit=0.9:0.3")
    assert r.exit_code == 2, r.output
    assert "'countrefeit' is not a violation category of listing-moderation" in r.output
    ok = _cli("feedback", "quality", "--since", "2020-01-01", "--until", "2020-01-02",
              "--config", str(configured), "-q", "--what-if", f"{CATS[0]}=0.9:0.3")
    assert ok.exit_code == 0, ok.output
