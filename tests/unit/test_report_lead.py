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
