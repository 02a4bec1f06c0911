"""docs/capacity.md is what benchmarks/capacity_plan.py computes from the recorded measurements,
and the script's arithmetic and GPU constants are the ones the repository states."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from benchmarks import capacity_plan

ROOT = Path(__file__).resolve().parents[2]


def test_the_doc_is_the_scripts_output() -> None:
    doc = (ROOT / "docs" / "capacity.md").read_text()
    assert doc == capacity_plan.build(), (
        "docs/capacity.md is stale: python benchmarks/capacity_plan.py --write docs/capacity.md")


def test_gpu_constants_are_the_ones_gpu_md_states() -> None:
    text = (ROOT / "benchmarks" / "GPU.md").read_text()
    assert f"~{capacity_plan.GPU_SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s" in text
    assert f"~{capacity_plan.PREFIX_TOKENS:,} tokens" in text
    assert f"~{capacity_plan.ITEM_TOKENS} tokens" in text
    assert f"~{capacity_plan.VERDICT_TOKENS}-token" in text
    models = capacity_plan.gpu_models()
    llama = next(m for m in models if m["name"] == "llama-3.1-8b-instruct")
    stated = int(re.search(r"~(\d+) items/s with it", text).group(1))  # type: ignore[union-attr]
    assert abs(capacity_plan.per_gpu_items_per_s(llama) - stated) / stated < 0.02
    no_cache = {**llama, "prefix_caching": False}
    assert round(capacity_plan.per_gpu_items_per_s(no_cache)) == 40  # GPU.md: ~40 without
    # A reasoning model is decode-bound: its figure is read from GPU.md's own table.
    for m in models:
        if m["reasoning"]:
            assert capacity_plan.per_gpu_items_per_s(m) == capacity_plan.reasoning_items_per_s()
            assert f"~{capacity_plan.reasoning_items_per_s():.0f}–" in text


def _measured() -> dict[str, Any]:
    run = {"workers": 1, "offered_rps": 100.0, "achieved_rps": 100.0, "latency_p50_ms": 3.0,
           "latency_p99_ms": 9.0, "gateway_cpu_ms_per_request": 1.0, "redis_commands_per_request": 10.0,
           "redis_commands_per_request_by_command": {"evalsha": 1.0, "zrem": 1.0},
           "redis_usec_per_request": 50.0, "idle_commands_per_s": 2.0, "probe_visibility_p95_ms": 5.0,
           "rollout_requests_counted": 1000, "requests_answered_200": 1000, "verdict_memos_written": 1000,
           "moderations_answered_total": 1000, "decision_log_records": 1050,
           "decision_log_bytes_per_record": 500.0, "memo_bytes": 200, "limiter_fallbacks": 0,
           "sample_store_bytes_per_row": 1000.0, "sample_content_chars": 250,
           "limited": {"200": 100, "allowed_at_least": 90, "allowed_at_most": 101},
           "uptime_before": "load average: 1.00, 1.00, 1.00", "uptime_after": "load average: 2.00, 1, 1",
           "checks": {"rollout_counters_exact": True, "one_memo_per_request": True,
                      "caller_limit_held": True, "every_move_seen_by_every_worker": True}}
    two = {**copy.deepcopy(run), "workers": 2, "redis_commands_per_request": 11.0, "idle_commands_per_s": 4.0}
    return {"when": "2026-12-03T00:00:00+00:00", "commit": "abc", "scenario": "s", "runs": [run, two]}


def test_plan_arithmetic_from_the_measurements() -> None:
    pod = {"cpu_request": 0.5, "cpu_limit": 2.0, "hpa_utilization": 0.7, "min_replicas": 2, "max_replicas": 10}
    models = capacity_plan.gpu_models()
    p = capacity_plan.plan(_measured(), pod, models)
    small, _, big = p["rows"]
    assert big["peak_rps"] == 100_000_000 / 86400 * 5
    # 5787 req/s x 1 ms = 5.79 cores; 0.35 core per pod -> 17 pods (above the HPA's max of 10)
    assert big["pods"] == 17 and big["pods_above_hpa_max"]
    assert small["pods"] == 2  # never below minReplicas
    assert big["redis_ops_peak"] == big["peak_rps"] * 10.0 + 17 * 2.0
    assert big["decision_log_gb_day"] == 100_000_000 * 1.05 * 500 / 1e9
    assert big["memo_gb"] == 100_000_000 * 7 * 200 / 1e9
    assert big["sample_gb_day"] == 100_000_000 * 0.05 * 1000 / 1e9  # samples.share's default
    assert big["sample_gb_retained"] == big["sample_gb_day"] * 14
    text = capacity_plan.render(_measured(), pod, models)
    assert "| gateway pods (HPA steady state) | 2 | 2 | 17 (raise `maxReplicas`) |" in text
    assert "from 10.0 with 1 gateway process(es) to 11.0 with 2 (+10%)" in text


def test_a_failed_check_is_reported_not_hidden() -> None:
    measured = _measured()
    measured["runs"][1]["checks"]["caller_limit_held"] = False
    measured["runs"][1]["limiter_fallbacks"] = 12
    pod = capacity_plan.gateway_pod_settings()
    text = capacity_plan.render(measured, pod, capacity_plan.gpu_models())
    assert "Checks that did not hold in this run: N = 2: caller_limit_held" in text
    assert "Redis answered late: 12" in text


def test_the_recorded_measurement_is_the_benchmarks_shape() -> None:
    doc = json.loads((ROOT / "benchmarks" / "results" / "redis_capacity.json").read_text())
    assert doc["benchmark"] == "redis_capacity"
    assert sorted(r["workers"] for r in doc["runs"]) == [1, 2, 4]
    for r in doc["runs"]:
        assert r["decision_log_streams"] == r["workers"]  # one decision-log stream per process
