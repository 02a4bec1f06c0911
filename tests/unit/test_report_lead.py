"""Reports and audit that lead with the point (#21 item 4, #19 item 6): tokens and cost per
version, each rollout of the window with its outcome, one readable line per audit event, the
shadow v1 x v2 table, per-locale numbers in the reader's time zone, the change against the
previous period, and one spelling for a metric that cannot be computed."""

from __future__ import annotations

from typing import Any

from gateway.pipeline import Evaluation
from gateway.recording import decision_record
from gateway.verdict import Verdict
from serving.protocol import ChatResult, Timings


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

from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from gateway.cli.main import app  # noqa: E402
from tests.unit.test_ops_report import sources  # noqa: E402,F401  (the fixture)


def test_prompts_audit_prints_one_short_line_per_event_and_the_evidence_in_json(sources: Path) -> None:
    human = CliRunner().invoke(app, ["prompts", "audit", "listing-moderation", "--config", str(sources)])
    assert human.exit_code == 0, human.output
    data = CliRunner().invoke(app, ["prompts", "audit", "listing-moderation", "--config",
                                    str(sources), "--json"])
    entries = __import__("json").loads(data.output)["entries"]
    lines = human.output.splitlines()
    assert len(lines) == len(entries) + 1 and len(entries) == 4
    assert all(len(line) < 300 and "{" not in line for line in lines), lines
    rollout = next(e for e in entries if e["action"] == "rollout")
    rid = __import__("json").loads(rollout["note"])["rollout"]["id"]
    assert len(rollout["note"]) > 2000  # the evidence is all there in --json
    assert lines[3].endswith(
        f"alice  rollout {rid} start: stable v1, canary v2 at 5% (running) — start: canary v2 at "
        "5%, shadows v2@50%; GATE OVERRIDDEN by admin: no scorecard yet")
    assert "seed  label production set to v1 — initial production from listing-moderation.yaml; " \
           "GATE OVERRIDDEN by seed: bootstrap" in lines[1]
    assert lines[-1] == "(4 entries; the full evidence of each: modgate prompts audit " \
                        "listing-moderation --json)"
