"""Reports and audit that lead with the point (#21 item 4, #19 item 6): tokens and cost per
version, each rollout of the window with its outcome, one readable line per audit event, the
shadow v1 x v2 table, per-locale numbers in the reader's time zone, the change against the
previous period, latency never shown as a version difference from run order, and one spelling
for a metric that cannot be computed."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from typer.testing import CliRunner

from gateway.cli.main import app
from gateway.config import ModelPrice
from gateway.decision_log import DecisionRecord
from gateway.pipeline import Evaluation
from gateway.quality.live_quality import FeedbackLabel
from gateway.quality.ops_report import build_report, ops_html, ops_markdown
from gateway.quality.reporting import MISSING
from gateway.recording import decision_record
from gateway.verdict import Verdict
from serving.protocol import ChatResult, Timings
from tests.unit.test_ops_report import T0, _labels, _records, sources
from tests.unit.test_reports import evaluated

FIXTURES = (sources, evaluated)  # shared with the ops report's and the eval report's tests

SHANGHAI = ZoneInfo("Asia/Shanghai")


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _rec(rid: str, ts: datetime, *, decision: str | None = "allow", category: str | None = None,
         locale: str = "en-US", arm: str = "stable", version: int = 1, model: str = "m-small",
         tokens: tuple[int | None, int | None, int | None] = (None, None, None),
         shadow_of: str | None = None, error: str | None = None) -> DecisionRecord:
    prompt_t, cached_t, completion_t = tokens
    return DecisionRecord(ts=ts, request_id=rid, item_id=f"item-{rid}", subject="s",
                          prompt_name="listing-moderation", prompt_version=version, arm=arm,
                          shadow_of=shadow_of, decision=None if error else decision,
                          category=category, error_type=error, model=model, latency_ms=10.0,
                          prompt_tokens=prompt_t, cached_prompt_tokens=cached_t,
                          completion_tokens=completion_t, locale=locale)


def _label(rid: str, decision: str, category: str | None = None) -> tuple[str, FeedbackLabel]:
    return rid, FeedbackLabel(ts=T0 + timedelta(hours=5), request_id=rid, decision=decision,
                              category=category)


# -- the decision log has what the report prices -------------------------------------------------


def test_the_decision_log_keeps_the_cached_prompt_tokens(store: Any) -> None:
    version = store.resolve("listing-moderation", "production")
    ev = Evaluation(version=version, label="production", arm="stable", locale="en-US", stale=False,
                    verdict=Verdict("allow", None, 0.9),
                    result=ChatResult(text="{}", finish_reason="stop", prompt_tokens=1750,
                                      completion_tokens=38, model="m", timings=Timings(12.0),
                                      cached_prompt_tokens=1536))
    rec = decision_record(ev, request_id="r1", item_id="i1", subject="s", arm="stable",
                          latency_ms=12.0, trace_id=None)
    assert (rec.prompt_tokens, rec.cached_prompt_tokens, rec.completion_tokens) == (1750, 1536, 38)
    assert type(rec).model_validate_json(rec.model_dump_json()).cached_prompt_tokens == 1536


# -- one readable line per audit event -----------------------------------------------------------


def test_prompts_audit_prints_one_short_line_per_event_and_the_evidence_in_json(sources: Path) -> None:
    human = _cli("prompts", "audit", "listing-moderation", "--config", str(sources))
    assert human.exit_code == 0, human.output
    entries = json.loads(_cli("prompts", "audit", "listing-moderation", "--config", str(sources),
                              "--json").output)["entries"]
    lines = human.output.splitlines()
    assert len(lines) == len(entries) + 1 and len(entries) == 4
    assert all(len(line) < 300 and "{" not in line for line in lines), lines
    rollout = next(e for e in entries if e["action"] == "rollout")
    rid = json.loads(rollout["note"])["rollout"]["id"]
    assert len(rollout["note"]) > 2000  # the evidence is all there in --json
    assert lines[3].endswith(
        f"alice  rollout {rid} start: stable v1, canary v2 at 5% (running) — start: canary v2 at "
        "5%, shadows v2@50%; GATE OVERRIDDEN by admin: no scorecard yet")
    assert "seed  label production set to v1 — initial production from listing-moderation.yaml; " \
           "GATE OVERRIDDEN by seed: bootstrap" in lines[1]
    assert lines[-1] == "(4 entries; the full evidence of each: modgate prompts audit " \
                        "listing-moderation --json)"


# -- the ops report opens with the point ---------------------------------------------------------


def _h2(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_ops_report_opens_with_volume_review_rate_precision_and_rollouts(
        sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "ops"
    r = _cli("report", "ops", "--config", str(sources), "--since", "3h", "--out", str(out))
    assert r.exit_code == 0, r.output
    page = (out / "ops-report.html").read_text(encoding="utf-8")
    assert _h2(page)[:3] == ["Headline", "Rollouts in the window", "Registry events"]
    first_table = page[page.index("<table>"):page.index("</table>")]
    for column in ("decisions", "review rate (95% CI)", "precision (95% CI)", "change"):
        assert "<th" in first_table and column in first_table, column
    # the headline numbers: 10 caller decisions, 3 of 9 verdicts needs_review, precision 2 of 3
    assert "<td>all</td>\n<td style=\"text-align:right\">10</td>" in first_table
    assert "33.3% (12.1%–64.6%)" in first_table and "0.67 (0.21–0.94)" in first_table
    # the CLI says it first too
    lines = r.output.splitlines()
    assert lines[1].startswith("headline") and lines[2].split()[:3] == ["locale", "decisions", "change"]
    assert any(line.startswith("rollout ") and line.endswith("running: v2 at 5%") for line in lines)


def test_registry_events_are_one_line_each_and_the_evidence_is_one_click_away(
        sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "ops"
    data = json.loads(_cli("report", "ops", "--config", str(sources), "--since", "3h", "--out",
                           str(out), "--json").stdout)
    rollout = next(e for e in data["events"] if e["action"] == "rollout")
    assert len(rollout["note"]) > 2000 and rollout["why"].startswith("start: canary v2 at 5%")
    md = (out / "ops-report.md").read_text(encoding="utf-8")
    table = md[md.index("| time | prompt | what | why | by |"):md.index("## Volume")]
    assert all(len(line) < 400 for line in table.splitlines()), table
    assert '"gate"' not in md and "salt" not in md
    page = (out / "ops-report.html").read_text(encoding="utf-8")
    details = re.findall(r"<details><summary>(.*?)</summary><pre>(.*?)</pre></details>", page, re.S)
    assert len(details) == 4
    summary, evidence = next(d for d in details if d[0].startswith("start: canary v2"))
    assert "&quot;verdict&quot;: &quot;fail&quot;" in evidence  # the gate report, in full
    assert "salt" not in evidence  # but not what decides which sellers get the canary


def test_every_rollout_of_the_window_is_listed_with_its_outcome(sources: Path, tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.rollouts.ops import apply_action, start_rollout
    from gateway.stores import open_store
    from prompt_registry import GateOverride
    from prompt_registry.rollouts import GateConfig

    store = open_store(load_config(sources))
    try:
        first = store.get_rollout("listing-moderation")
        apply_action(store, "listing-moderation", "abort", actor="bob", note="drift on zh-CN")
        second = start_rollout(store, "listing-moderation", canary_version=2, steps=[10, 100],
                               shadows=[], step_hold_s=60, gates=GateConfig(), auto=True,
                               subject_key="seller_id", actor="carol",
                               override=GateOverride(reason="retry", by="admin"))
    finally:
        store.close()
    assert first is not None
    data = json.loads(_cli("report", "ops", "--config", str(sources), "--since", "3h", "--out",
                           str(tmp_path / "ops"), "--json").stdout)
    got = [(r["id"], r["state"], r["outcome"]) for r in data["rollouts"]]
    assert got == [(first.id, "aborted", "aborted: v1 kept — drift on zh-CN (bob)"),
                   (second.id, "running", "running: v2 at 10%")], got
    md = (tmp_path / "ops" / "ops-report.md").read_text(encoding="utf-8")
    lead = md[:md.index("## Registry events")]
    assert f"`{first.id}`" in lead and f"`{second.id}`" in lead and "aborted: v1 kept" in lead


# -- tokens and cost, the shadow table -----------------------------------------------------------


def test_tokens_and_cost_per_version_at_the_configured_prices() -> None:
    recs = [_rec("a", T0, tokens=(2000, 1500, 40)),
            _rec("b", T0 + timedelta(minutes=1), tokens=(1000, None, 20)),
            _rec("c", T0 + timedelta(minutes=2), error="model_timeout"),
            _rec("d", T0 + timedelta(minutes=3), arm="canary", version=2, model="m-big",
                 tokens=(3000, 0, 100))]
    prices = {"m-small": ModelPrice(prompt_per_1k=0.10, completion_per_1k=0.40,
                                    cached_prompt_per_1k=0.02)}
    rep = build_report(recs, {}, start=T0, end=T0 + timedelta(hours=1), prices=prices,
                       currency="EUR")
    small, big = rep.tokens
    assert (small["version"], small["calls"], small["with_usage"], small["prompt_tokens"],
            small["cached_prompt_tokens"], small["completion_tokens"], small["cache_reported"]) \
        == (1, 3, 2, 3000, 1500, 60, 1)
    # 1,500 uncached prompt tokens at 0.10, 1,500 cached at 0.02, 60 completion at 0.40 per 1k
    assert small["cost"] == pytest.approx((1500 * 0.10 + 1500 * 0.02 + 60 * 0.40) / 1000)
    assert small["cost_per_1k_calls"] == pytest.approx(small["cost"] / 2 * 1000)
    assert (big["model"], big["cost"]) == ("m-big", None)
    md = ops_markdown(rep)
    assert "| v1 stable | `m-small` | 2 | 3,000 | 1,500 (1 reported) | 60 | 1,530 | 0.2040 | " \
           "102.0000 |" in md
    assert f"| v2 canary | `m-big` | 1 | 3,000 | 0 | 100 | 3,100 | {MISSING} | {MISSING} |" in md
    assert "cost (EUR)" in md and "No price in `reporting.prices` for `m-big`" in md


def test_the_configuration_takes_prices_per_model(tmp_path: Path) -> None:
    from gateway.config import ConfigError, load_config

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "modgate.yaml")
                            .read_text())
    config["reporting"] = {"currency": "USD", "prices": {"qwen": {
        "prompt_per_1k": 0.05, "completion_per_1k": 0.2, "cached_prompt_per_1k": 0.01}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_config(path).reporting.prices["qwen"].cached_prompt_per_1k == 0.01
    config["reporting"]["prices"]["qwen"]["prompt_per_1k"] = -1
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="reporting.prices.qwen.prompt_per_1k"):
        load_config(path)


def test_shadow_pairs_get_a_per_category_caller_by_shadow_table() -> None:
    rep = build_report(_records(), _labels(), start=T0, end=T0 + timedelta(hours=1))
    (pairs,) = rep.shadow_pairs
    assert (pairs["primary_version"], pairs["shadow_version"], pairs["pairs"]) == (1, 2, 3)
    assert {(c["primary"], c["shadow"]): c["n"] for c in pairs["counts"]} == {
        ("none", "counterfeit"): 1, ("counterfeit", "counterfeit"): 1, ("needs_review", "none"): 1}
    assert pairs["agreement"] == pytest.approx(1 / 3)
    md = ops_markdown(rep)
    assert "### v1 (caller) × v2 (shadow)" in md
    assert "| allow | 0 | 1 | 0 | 1 |" in md and "| counterfeit | 0 | 1 | 0 | 1 |" in md
    assert "| needs_review | 1 | 0 | 0 | 1 |" in md


# -- per locale, in the reader's time zone, against the previous period --------------------------


def _day_boundary_log() -> tuple[list[DecisionRecord], dict[str, FeedbackLabel]]:
    """Shanghai's midnight is 16:00 UTC. Two zh-CN decisions either side of it (same UTC day),
    one en-US decision; and a previous period (the 6 h before) with two decisions."""
    base = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    recs = [
        _rec("p1", base - timedelta(hours=3), decision="block", category="counterfeit"),
        _rec("p2", base - timedelta(hours=2), decision="needs_review", category=None),
        _rec("z1", base + timedelta(hours=3, minutes=30), decision="block",
             category="counterfeit", locale="zh-CN"),                      # 15:30 UTC = 23:30
        _rec("z2", base + timedelta(hours=4, minutes=30), decision="needs_review",
             category="off_platform_payment", locale="zh-CN"),             # 16:30 UTC = 00:30
        _rec("e1", base + timedelta(hours=5), decision="allow"),
    ]
    labels = dict([_label("p1", "allow"), _label("p2", "block", "adult"),
                   _label("z1", "block", "counterfeit"),
                   _label("z2", "block", "off_platform_payment"), _label("e1", "allow")])
    return recs, labels


def test_days_split_at_local_midnight_and_locales_apart() -> None:
    recs, labels = _day_boundary_log()
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    end = start + timedelta(hours=6)
    utc = build_report(recs, labels, start=start, end=end)
    sh = build_report(recs, labels, start=start, end=end, tz=SHANGHAI)
    assert [(d, h.locale, h.decisions) for d, h in utc.per_day] == [
        ("2026-03-01", "all", 3), ("2026-03-01", "en-US", 1), ("2026-03-01", "zh-CN", 2)]
    assert [(d, h.locale, h.decisions) for d, h in sh.per_day] == [
        ("2026-03-01", "all", 1), ("2026-03-01", "zh-CN", 1),
        ("2026-03-02", "all", 2), ("2026-03-02", "en-US", 1), ("2026-03-02", "zh-CN", 1)]
    head = {h.locale: h for h in sh.headline}
    assert (head["zh-CN"].decisions, head["zh-CN"].needs_review, head["zh-CN"].precision) == (2, 1, 1.0)
    assert (head["en-US"].decisions, head["en-US"].reviewed, head["en-US"].precision) == (1, 1, None)
    md = ops_markdown(sh)
    assert md.startswith("# Operations report: 2026-03-01 20:00 → 2026-03-02 02:00 Asia/Shanghai")
    assert "## Per day (Asia/Shanghai)" in md and "| 2026-03-02 | zh-CN | 1 | 100.0% | 1 |" in md
    assert "| v1 stable | zh-CN | 2 | 50.0% (9.5%–90.5%) | 2 | 1.00 (0.34–1.00) |" in md


def test_the_headline_shows_the_change_against_the_previous_period() -> None:
    recs, labels = _day_boundary_log()
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    rep = build_report(recs, labels, start=start, end=start + timedelta(hours=6),
                       previous_start=start - timedelta(hours=6))
    before = {h.locale: h for h in rep.headline_before or []}
    assert (before["all"].decisions, before["all"].review_rate, before["all"].precision) == (2, 0.5, 0.0)
    md = ops_markdown(rep)
    assert "change against the previous 6h (2026-03-01 06:00 → 2026-03-01 12:00)" in md
    # all: 3 decisions (+1, +50%), review rate 1/3 (-16.7 pp), precision 1.00 (+1.00)
    assert "| all | 3 | +1 (+50.0%) | 33.3% (6.1%–79.2%) | -16.7 pp | 3 | 1.00 (0.34–1.00) | +1.00 |" in md
    # zh-CN had no decision before: its rates have no previous value
    assert f"| zh-CN | 2 | +2 | 50.0% (9.5%–90.5%) | {MISSING} | 2 | 1.00 (0.34–1.00) | {MISSING} |" in md


def test_cli_tz_reads_times_in_the_zone_and_refuses_unknown_zones(sources: Path, tmp_path: Path) -> None:
    local = (datetime.now(SHANGHAI) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M")
    data = json.loads(_cli("report", "ops", "--config", str(sources), "--from", local, "--tz",
                           "Asia/Shanghai", "--out", str(tmp_path / "o"), "--json").stdout)
    assert data["tz"] == "Asia/Shanghai" and data["records"] == 13
    assert datetime.fromisoformat(data["start"]) == datetime.fromisoformat(local).replace(tzinfo=SHANGHAI)
    for command in (("report", "ops"), ("feedback", "quality")):
        for bad in ("Mars/Base", "../../etc/passwd", ""):
            r = CliRunner().invoke(app, [*command, "--config", str(sources), "--tz", bad])
            assert r.exit_code == 2, (command, bad, r.output)
            assert f"--tz {bad!r}: not an IANA time zone name" in r.output


def test_feedback_quality_leads_with_the_headline_per_locale(sources: Path) -> None:
    r = _cli("feedback", "quality", "--config", str(sources), "--since", "3h", "--tz",
             "Asia/Shanghai")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "(Asia/Shanghai)" in lines[0]
    assert lines[2].startswith("headline: what callers got") and "previous period" in lines[2]
    rows = {line.split()[0]: line.split() for line in lines[4:7]}
    assert rows["all"][:2] == ["all", "10"] and rows["en-US"][1] == "9" and rows["zh-CN"][1] == "1"
    # per version, the locales apart: v1 stable's zh-CN decision (s3) is a false positive
    v1 = lines.index("listing-moderation v1 stable: 3 of 6 decision(s) reviewed (50.0%)")
    assert any(line.split()[:4] == ["zh-CN", "1", "of", "1"] and "0.00 (0.00–0.79)" in line
               for line in lines[v1:v1 + 10])
    data = json.loads(_cli("feedback", "quality", "--config", str(sources), "--since", "3h",
                           "--json").output)
    assert [(h["locale"], h["decisions"]) for h in data["headline"]] == [
        ("all", 10), ("en-US", 9), ("zh-CN", 1)]
    assert data["previous"]["headline"] == []
    stable = next(v for v in data["versions"] if v["arm"] == "stable")
    assert [(x["locale"], x["reviewed"]) for x in stable["locales"]] == [("en-US", 2), ("zh-CN", 1)]


# -- latency is not a version difference ---------------------------------------------------------


def test_eval_run_does_not_present_latency_as_a_version_difference(evaluated: dict[str, Any]) -> None:
    summary = (evaluated["out"] / "report-v1-v2.md").read_text(encoding="utf-8")
    versions = summary[summary.index("## Versions"):summary.index("## Per category")]
    assert "ms" not in versions.split("Latency is not compared")[0]
    assert "Latency is not compared between versions" in versions
    for v in (1, 2):
        card = (evaluated["out"] / f"v{v}.md").read_text(encoding="utf-8")
        assert "a property of the run" in card and "not of the version" in card


# -- one spelling for a metric that cannot be computed -------------------------------------------

_OTHER_SPELLINGS = re.compile(r"(?<![\w/])n/a(?![\w/])|\|\s*-\s*\||\s-\s*$|\bN/A\b|\bNaN\b|\bnan\b|\bNone\b")


def _missing_problems(name: str, text: str) -> list[str]:
    return [f"{name}: {line.strip()[:160]}" for line in text.splitlines()
            if _OTHER_SPELLINGS.search(line)]


def test_one_spelling_for_a_metric_that_cannot_be_computed(
        sources: Path, tmp_path: Path, evaluated: dict[str, Any]) -> None:
    outputs: dict[str, str] = {}
    quality = _cli("feedback", "quality", "--config", str(sources), "--since", "3h")
    outputs["feedback quality"] = quality.output
    ops = _cli("report", "ops", "--config", str(sources), "--since", "3h", "--out",
               str(tmp_path / "ops"))
    outputs["report ops"] = ops.output
    outputs["ops-report.md"] = (tmp_path / "ops" / "ops-report.md").read_text(encoding="utf-8")
    for path in sorted(evaluated["out"].glob("*.md")):
        outputs[path.name] = path.read_text(encoding="utf-8")
    outputs["rollouts status"] = _cli("rollouts", "status", "listing-moderation", "--config",
                                      str(sources)).output
    outputs["rollouts --help"] = _cli("rollouts", "start", "--help").output
    problems = [p for name, text in outputs.items() for p in _missing_problems(name, text)]
    assert problems == []
    # and the metrics that cannot be computed are there, spelled the one way
    for name in ("feedback quality", "ops-report.md", "rollouts status"):
        assert MISSING in outputs[name], name


def test_the_scan_catches_the_old_spellings() -> None:
    assert _missing_problems("x", "| v2 shadow | 3 | 0 | n/a |")
    assert _missing_problems("x", "| prohibited_item | - | 0.00 |")
    assert _missing_problems("x", "  shadow v2: n=0 agreement - kappa -")
    assert not _missing_problems("x", f"| a | {MISSING} | 0.00 (0.00–0.79) | 2026-03-01 |")
    assert not _missing_problems("x", "rollout abc start: stable v1, canary v2 — why")


def test_ops_html_embeds_nothing_external() -> None:
    rep = build_report(_records(), _labels(), start=T0, end=T0 + timedelta(hours=1))
    page = ops_html(rep)
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_a_lifecycle_change_reads_as_what_moved_and_why() -> None:
    from prompt_registry.audit_text import one_line
    from prompt_registry.store import AuditEntry

    e = AuditEntry(at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC), actor="maria", action="lifecycle",
                   prompt="p", to_version=4, note="active -> blocked: names a model we do not serve")
    assert one_line(e) == ("2026-03-01 12:00:00 UTC  maria  v4 active → blocked — names a model "
                           "we do not serve")


def test_a_cascade_decision_counts_the_tokens_of_both_models() -> None:
    escalated = _rec("x", T0, decision="block", category="counterfeit", model="m-big",
                     tokens=(1800, 0, 30)).model_copy(update={
                         "escalation": "needs_review", "first_model": "m-small",
                         "first_decision": "needs_review", "first_prompt_tokens": 1200,
                         "first_completion_tokens": 12})
    stood = _rec("y", T0 + timedelta(minutes=1), tokens=(1200, 1000, 10))
    prices = {"m-small": ModelPrice(prompt_per_1k=0.1, completion_per_1k=0.4),
              "m-big": ModelPrice(prompt_per_1k=1.0, completion_per_1k=4.0)}
    rep = build_report([type(escalated).model_validate(escalated.model_dump()), stood], {},
                       start=T0, end=T0 + timedelta(hours=1), prices=prices)
    by_model = {t["model"]: t for t in rep.tokens}
    assert (by_model["m-small"]["calls"], by_model["m-small"]["prompt_tokens"],
            by_model["m-small"]["completion_tokens"]) == (2, 2400, 22)
    assert (by_model["m-big"]["calls"], by_model["m-big"]["prompt_tokens"]) == (1, 1800)
    assert by_model["m-small"]["cost"] == pytest.approx((2400 * 0.1 + 22 * 0.4) / 1000)
    assert by_model["m-big"]["cost"] == pytest.approx((1800 * 1.0 + 30 * 4.0) / 1000)
