"""Closing the loop and the operational report: reviewer labels joined with the decision log
(live precision and recall per version), disagreements exported as dataset rows, and
`modgate report ops` — every number checked against a small hand-computed log."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
import yaml
from typer.testing import CliRunner

from gateway.cli.feedback import feedback_app
from gateway.cli.report import report_app
from gateway.decision_log import DecisionRecord
from gateway.quality.evaluation.dataset import read_dataset
from gateway.quality.evaluation.scorecard import wilson
from gateway.quality.live_quality import FeedbackLabel, live_quality, read_feedback
from gateway.quality.ops_report import build_report, choose_bucket

ROOT = Path(__file__).resolve().parents[2]
# The window of the test log: the last hour before now (registry events are stamped with the
# real clock, so the log must be recent for them to fall inside the window).
T0 = (datetime.now(UTC) - timedelta(minutes=70)).replace(second=0, microsecond=0)

# (request id, item, arm, version, decision, category, fail_reason, error_type, latency, minute)
LOG = [
    ("s1", "item-1", "stable", 1, "allow", None, None, None, 100.0, 1),
    ("s2", "item-2", "stable", 1, "allow", None, None, None, 200.0, 2),
    ("s3", "item-3", "stable", 1, "block", "counterfeit", None, None, 300.0, 3),
    ("s4", "item-4", "stable", 1, "needs_review", None, "unparseable_output", None, 400.0, 4),
    ("s5", "item-5", "stable", 1, "needs_review", "off_platform_payment", None, None, 500.0, 5),
    ("s6", "item-6", "stable", 1, None, None, None, "model_timeout", 9000.0, 6),
    ("c1", "item-7", "canary", 2, "allow", None, None, None, 10.0, 7),
    ("c2", "item-8", "canary", 2, "block", "counterfeit", None, None, 20.0, 8),
    ("c3", "item-9", "canary", 2, "block", "adult", None, None, 30.0, 9),
    ("c4", "item-1", "canary", 2, "needs_review", None, None, None, 40.0, 40),
    # shadow evaluations of v2 on sampled stable requests
    ("s1-shadow-v2", "item-1", "shadow", 2, "block", "counterfeit", None, None, 50.0, 11),
    ("s3-shadow-v2", "item-3", "shadow", 2, "block", "counterfeit", None, None, 60.0, 12),
    ("s4-shadow-v2", "item-4", "shadow", 2, "allow", None, None, None, 70.0, 13),
]

# (request id, decision, category, reviewer, minutes after T0)
LABELS = [
    ("s1", "allow", None, "bob", 20),                   # superseded by the next label
    ("s1", "block", "counterfeit", "alice", 21),
    ("s2", "allow", None, "alice", 22),
    ("s3", "allow", None, "alice", 23),
    ("c2", "block", "counterfeit", "carol", 24),
    ("c3", "needs_review", "adult", "carol", 25),       # same outcome label as block/adult
    ("c4", "block", "prohibited_item", "carol", 45),
    ("zzz", "block", "adult", "carol", 26),             # no such request in the log
]


def _records() -> list[DecisionRecord]:
    out = []
    for rid, item, arm, version, decision, category, fail, error, latency, minute in LOG:
        out.append(DecisionRecord(
            ts=T0 + timedelta(minutes=minute), request_id=rid, item_id=item, subject="seller-1",
            prompt_name="listing-moderation", prompt_version=version,
            label="production" if arm == "stable" else None, arm=arm,
            shadow_of=rid.split("-shadow")[0] if arm == "shadow" else None, decision=decision,
            category=category, confidence=0.9 if decision else None, fail_reason=fail,
            error_type=error, model="tiny-llama", latency_ms=latency,
            locale="zh-CN" if item == "item-3" else "en-US"))
    return out


def _labels() -> dict[str, FeedbackLabel]:
    out: dict[str, FeedbackLabel] = {}
    for rid, decision, category, reviewer, minute in LABELS:
        out[rid] = FeedbackLabel(ts=T0 + timedelta(minutes=minute), request_id=rid,
                                 decision=decision, category=category, reviewer=reviewer)
    return out


def _write_sources(data: Path) -> None:
    seg = data / "decisions" / "gw-0" / f"decisions-{T0:%Y%m%dT%H%M%S}-000001.jsonl"
    seg.parent.mkdir(parents=True)
    seg.write_bytes(b"".join(orjson.dumps(r.model_dump(), option=orjson.OPT_APPEND_NEWLINE)
                             for r in _records()))
    fb = data / "feedback" / f"feedback-{T0:%Y%m%d}-gw-0.jsonl"
    fb.parent.mkdir(parents=True)
    lines = [orjson.dumps({"ts": (T0 + timedelta(minutes=m)).isoformat(), "request_id": rid,
                           "decision": d, "category": c, "reviewer": who, "note": "",
                           "rollout_id": None, "arm": None, "prompt_name": None,
                           "prompt_version": None}) for rid, d, c, who, m in LABELS]
    fb.write_bytes(b"\n".join(lines) + b"\n{torn")


@pytest.fixture
def sources(tmp_path: Path, example_spec: Any) -> Path:
    """A configuration whose data dir holds the log above, its feedback and a registry with
    v1 in production, v2 published and a rollout of v2 started."""
    from gateway.config import load_config
    from gateway.rollouts.ops import start_rollout
    from gateway.stores import open_store
    from prompt_registry import GateOverride
    from prompt_registry.loader import seed_store
    from prompt_registry.rollouts import GateConfig, ShadowSpec

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    _write_sources(tmp_path / "data")
    store = open_store(load_config(path))
    try:
        seed_store(store, ROOT / "configs" / "prompts")
        data = example_spec.model_dump()
        data["messages"][0]["content"] = "STRICT\n" + data["messages"][0]["content"]
        store.publish(type(example_spec).model_validate(data), actor="test")
        start_rollout(store, "listing-moderation", canary_version=2, steps=[5, 50, 100],
                      shadows=[ShadowSpec(version=2, sample_rate=0.5)], step_hold_s=60,
                      gates=GateConfig(), auto=True, subject_key="seller_id", actor="alice",
                      override=GateOverride(reason="no scorecard yet", by="admin"))
    finally:
        store.close()
    return path


def _invoke(app: typer.Typer, name: str, *args: str) -> Any:
    root = typer.Typer()
    root.add_typer(app, name=name)
    return CliRunner().invoke(root, [name, *args], catch_exceptions=False)


# -- live precision and recall -----------------------------------------------------------------


def test_live_quality_matches_a_hand_computed_example() -> None:
    by = {(q.version, q.arm): q for q in live_quality(_records(), _labels())}
    assert list(by) == [(1, "stable"), (2, "canary"), (2, "shadow")]
    # stable v1: s1 (allow, gold counterfeit) is a miss; s3 (counterfeit, gold allow) a false
    # positive; s2 right. The newer of s1's two labels counts.
    st = by[(1, "stable")]
    assert (st.decisions, st.reviewed) == (6, 3)
    cf = st.quality.category("counterfeit")
    assert cf and (cf.tp, cf.fp, cf.fn, cf.precision, cf.recall) == (0, 1, 1, 0.0, 0.0)
    assert (st.quality.flagged.tp, st.quality.flagged.fp, st.quality.flagged.fn) == (0, 1, 1)
    # canary v2: c2 counterfeit right; c3 block/adult vs gold needs_review/adult is right (same
    # outcome label); c4 needs_review without a category misses prohibited_item.
    ca = by[(2, "canary")]
    assert (ca.decisions, ca.reviewed) == (4, 3)
    assert (ca.quality.micro.tp, ca.quality.micro.fp, ca.quality.micro.fn) == (2, 0, 1)
    assert ca.quality.micro.precision == 1.0 and ca.quality.micro.recall == pytest.approx(2 / 3)
    assert ca.quality.micro.recall_ci == pytest.approx(wilson(2, 3))
    assert (ca.quality.flagged.tp, ca.quality.flagged.fn) == (3, 0)
    # shadow v2 is scored with the labels of the requests it shadowed: s1 right, s3 wrong.
    sh = by[(2, "shadow")]
    cf = sh.quality.category("counterfeit")
    assert (sh.decisions, sh.reviewed) == (3, 2)
    assert cf and (cf.tp, cf.fp, cf.fn, cf.precision, cf.recall) == (1, 1, 0, 0.5, 1.0)


def test_feedback_files_keep_the_newest_label_and_skip_bad_lines(tmp_path: Path) -> None:
    _write_sources(tmp_path)
    fb = read_feedback(tmp_path / "feedback", T0)
    assert fb.bad_lines == 1 and fb.lines == len(LABELS) + 1
    assert len(fb.labels) == 7 and fb.labels["s1"].decision == "block"
    assert read_feedback(tmp_path / "feedback", T0 + timedelta(days=1)).labels == {}
    assert read_feedback(tmp_path / "missing").labels == {}


def test_cli_feedback_quality(sources: Path) -> None:
    r = _invoke(feedback_app, "feedback", "quality", "--config", str(sources), "--since", "3h")
    assert r.exit_code == 0, r.output
    assert "13 decision(s) read" in r.output and "6 for these decisions" in r.output
    assert "listing-moderation v2 canary: 3 of 4 decision(s) reviewed (75.0%)" in r.output
    r = _invoke(feedback_app, "feedback", "quality", "--config", str(sources), "--json")
    data = json.loads(r.output)
    shadow = next(v for v in data["versions"] if v["arm"] == "shadow")
    assert shadow["micro"]["precision"] == 0.5 and data["matched"] == 6
    r = _invoke(feedback_app, "feedback", "quality", "--config", str(sources), "--since", "soon")
    assert r.exit_code == 2 and "--since: cannot read 'soon'" in r.output


# -- disagreements -----------------------------------------------------------------------------


def test_disagreements_export_validates_and_pending_rows_say_what_is_missing(
        sources: Path, tmp_path: Path) -> None:
    content = tmp_path / "listings.csv"
    with content.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "description", "locale", "price"])
        w.writerow(["item-1", "Nike AJ1 1:1 mirror", "best quality", "en-US", "80"])
        w.writerow(["item-3", "正品 手表", "专柜验货", "zh-CN", "1200"])
    out = tmp_path / "live.jsonl"
    r = _invoke(feedback_app, "feedback", "disagreements", "--config", str(sources), "--since",
                "3h", "--out", str(out), "--content", str(content))
    assert r.exit_code == 0, r.output
    assert "13 decision(s) read: 3 item(s) with a disagreement" in r.output
    assert f"wrote 2 dataset row(s) to {out}" in r.output
    ds, problems = read_dataset(out)
    assert ds is not None, problems
    rows = {row.item_id: row for row in ds.rows}
    # item-1: the canary's needs_review (c4, newest) against the reviewer's prohibited_item; the
    # older disagreement on it (s1: a shadow flip the reviewer sided with v2 on) is counted.
    one = rows["item-1"]
    assert (one.gold_decision, one.gold_category) == ("block", "prohibited_item")
    assert one.tags == ("disagreement:feedback", "source:live", "wrong:v2")
    assert "request c4" in one.notes and "1 earlier request(s)" in one.notes
    # item-3: stable v1 and shadow v2 both flagged counterfeit, the reviewer allowed it.
    three = rows["item-3"]
    assert (three.title, three.locale, three.gold_decision, three.gold_category) == (
        "正品 手表", "zh-CN", "allow", "none")
    assert set(three.tags) == {"source:live", "disagreement:feedback", "wrong:v1", "wrong:v2"}
    assert "v1 stable block/counterfeit" in three.notes and "reviewer alice: allow/none" in three.notes
    # item-4: a shadow flip nobody reviewed, and no content: pending, with blanks to fill in.
    pending = tmp_path / "live.pending.csv"
    with pending.open(encoding="utf-8-sig", newline="") as fh:
        prow = list(csv.DictReader(fh))
    assert [p["item_id"] for p in prow] == ["item-4"]
    assert prow[0]["title"] == "" and prow[0]["gold_decision"] == ""
    assert prow[0]["notes"].startswith("TO FILL IN: gold_decision and gold_category")
    assert "disagreement:shadow-flip" in prow[0]["tags"]
    bad, problems = read_dataset(pending)
    assert bad is None and {p.field for p in problems} >= {"title", "gold_decision"}

    # The export is what `eval validate` and `eval run` take.
    from gateway.cli.eval import eval_app
    checked = CliRunner().invoke(eval_app, ["validate", str(out)])
    assert checked.exit_code == 0 and checked.output.startswith("ok: 2 rows")

    # Without content every disagreement is pending; items already in a dataset are left out.
    r = _invoke(feedback_app, "feedback", "disagreements", "--config", str(sources), "--since",
                "3h", "--out", str(tmp_path / "ids.csv"), "--exclude-dataset", str(out), "--json")
    summary = json.loads(r.output)
    assert (summary["rows"], summary["pending"], summary["excluded"]) == (0, 1, 2)
    assert summary["out"] is None and not (tmp_path / "ids.csv").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--out", "x.xlsx"), "use a .jsonl or .csv file name"),
    (("--out", "/nonexistent-dir/x.jsonl"), "does not exist"),
    (("--out", "x.jsonl", "--content", "/nonexistent.csv"), "cannot read"),
    (("--out", "x.jsonl", "--until", "2020-01-01", "--since", "2021-01-01"), "must be before"),
])
def test_disagreements_usage_errors(sources: Path, args: tuple[str, ...], message: str) -> None:
    r = _invoke(feedback_app, "feedback", "disagreements", "--config", str(sources), *args)
    assert r.exit_code == 2, r.output
    assert "modgate: error:" in r.output and message in r.output


def test_content_file_needs_item_id_and_title(sources: Path, tmp_path: Path) -> None:
    content = tmp_path / "c.csv"
    content.write_text("id,name\n1,x\n", encoding="utf-8")
    r = _invoke(feedback_app, "feedback", "disagreements", "--config", str(sources),
                "--out", str(tmp_path / "x.jsonl"), "--content", str(content))
    assert r.exit_code == 2 and "needs the column(s) item_id, title" in r.output


# -- the operational report --------------------------------------------------------------------


def test_choose_bucket() -> None:
    assert choose_bucket(T0, T0 + timedelta(hours=1))[0] == "1min"
    assert choose_bucket(T0, T0 + timedelta(hours=24))[0] == "30min"
    assert choose_bucket(T0, T0 + timedelta(days=7))[0] == "3h"
    assert choose_bucket(T0, T0 + timedelta(days=400))[0] == "7D"


def test_ops_numbers_match_a_hand_computed_example() -> None:
    rep = build_report(_records(), _labels(), start=T0, end=T0 + timedelta(hours=1))
    vol = {(r["version"], r["arm"]): r for r in rep.volume}
    assert [(k, v["decisions"], v["errors"]) for k, v in vol.items()] == [
        ((1, "stable"), 6, 1), ((2, "canary"), 4, 0), ((2, "shadow"), 3, 0)]
    assert vol[(1, "stable")]["traffic_share"] == pytest.approx(0.6)
    assert vol[(2, "canary")]["traffic_share"] == pytest.approx(0.4)
    assert vol[(2, "shadow")]["traffic_share"] is None
    mix = {(r["version"], r["arm"]): r for r in rep.verdict_mix}
    assert mix[(1, "stable")]["counts"] == {"none": 2, "counterfeit": 1, "needs_review": 1,
                                            "off_platform_payment": 1, "error": 1}
    assert mix[(1, "stable")]["shares"]["none"] == pytest.approx(2 / 6)
    assert rep.outcomes == ["none", "adult", "counterfeit", "off_platform_payment",
                            "needs_review", "error"]
    rev = {(r["version"], r["arm"]): r for r in rep.review}
    # stable: 5 verdicts, 2 needs_review (one of them an unparseable output)
    assert (rev[(1, "stable")]["answered"], rev[(1, "stable")]["needs_review"]) == (5, 2)
    assert rev[(1, "stable")]["rate"] == pytest.approx(0.4)
    assert rev[(1, "stable")]["ci"] == pytest.approx(wilson(2, 5))
    assert rev[(1, "stable")]["parse_failure_rate"] == pytest.approx(0.2)
    assert rev[(2, "canary")]["rate"] == pytest.approx(0.25)
    lat = {(r["version"], r["arm"]): r for r in rep.latency}
    # stable answered 100..500 ms (the 9 s timeout has no verdict): linear interpolation
    assert (lat[(1, "stable")]["p50_ms"], lat[(1, "stable")]["p95_ms"],
            lat[(1, "stable")]["p99_ms"]) == pytest.approx((300.0, 480.0, 496.0))
    assert (lat[(2, "canary")]["p50_ms"], lat[(2, "canary")]["p95_ms"]) == pytest.approx((25.0, 38.5))
    assert rep.errors == {"model_timeout": 1} and rep.fail_reasons == {"unparseable_output": 1}
    assert (rep.feedback_labels, rep.feedback_matched) == (7, 6)
    assert [(q.version, q.arm, q.reviewed) for q in rep.live] == [
        (1, "stable", 3), (2, "canary", 3), (2, "shadow", 2)]


def test_cli_report_ops_writes_markdown_and_self_contained_html(sources: Path, tmp_path: Path) -> None:
    out = tmp_path / "ops"
    r = _invoke(report_app, "report", "ops", "--config", str(sources), "--from", "3h",
                "--out", str(out), "--json", "--prompt", "listing-moderation")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["records"] == 13 and data["feedback"]["matched"] == 6
    assert {e["action"] for e in data["events"]} == {"publish", "label", "rollout"}
    assert data["rollouts"][0]["canary_version"] == 2
    assert data["paths"]["html"] == str(out / "ops-report.html")
    md = (out / "ops-report.md").read_text(encoding="utf-8")
    for text in ("## Volume per prompt version and arm", "| v1 stable | 6 | 1 | 60.0% |",
                 "## Verdict mix per category", "## Review rate", "40.0% (",
                 "## Precision and recall from reviewer feedback", "## Latency",
                 "| v1 stable | 5 | 300.0 | 480.0 | 496.0 |", "published v2",
                 "label production set to v1", "start: stable v1, canary v2 at 5% (running)",
                 "running: v2 at 5%", "`model_timeout` ×1", "![decisions over time"):
        assert text in md, text
    for png in ("ops-volume.png", "ops-verdict-mix.png", "ops-review-rate.png",
                "ops-latency.png", "ops-feedback.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    page = (out / "ops-report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 5
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert 'src="ops-' not in page


def test_cli_report_ops_empty_window_and_errors(sources: Path, tmp_path: Path) -> None:
    r = _invoke(report_app, "report", "ops", "--config", str(sources), "--since", "2020-01-01",
                "--until", "2020-01-02", "--out", str(tmp_path / "empty"))
    assert r.exit_code == 0, r.output
    assert "0 decision(s)" in r.output and "ops-report.html" in r.output
    md = (tmp_path / "empty" / "ops-report.md").read_text(encoding="utf-8")
    assert "No decisions in the window." in md
    r = _invoke(report_app, "report", "ops", "--config", str(sources), "--since", "next week")
    assert r.exit_code == 2 and "--since: cannot read" in r.output
    r = _invoke(report_app, "report", "ops", "--config", str(tmp_path / "nope.yaml"))
    assert r.exit_code == 2 and "modgate: error:" in r.output
