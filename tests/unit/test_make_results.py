"""benchmarks/make_results.py: RESULTS.md regenerated from result files, deterministically, with
the locust sections of summarize_locust.py kept (or regenerated identically)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks import make_results, summarize_locust

ROOT = Path(__file__).resolve().parents[2]
REAL_SMOKE = ROOT / "benchmarks" / "results" / "locust" / "cpu-smoke"


def _write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _summary(profile: str, when: str, commit: str | None = "abc1234") -> dict:
    return {
        "benchmark": f"locust/{profile}", "command": f"python benchmarks/run_locust.py --profile {profile}",
        "when": when, "machine": "x86_64 python 3.11.7 (2 cpus)", "git_commit": commit, "profile": profile,
        "settings": {"users": 4, "spawn_rate": 2, "run_time": "45s", "wait": [0.0, 0.25], "processes": 1,
                     "zh_share": 0.3, "violating_share": 0.25, "sellers": 5000, "seller_skew": 0.8,
                     "prompts": "listing-moderation=3", "desc_median": 220, "desc_min": 20,
                     "desc_max": 2000, "zh_char_scale": 0.25},
        "requests": 365, "failures": 0, "error_rate": 0.0, "throughput_rps": 8.12,
        "throughput_all_users_rps": 8.31, "p50_ms": 330.0, "p95_ms": 550.0, "p99_ms": 790.0,
        "max_ms": 980.2, "client_exact_ms": {"p50": 334.0, "p95": 545.0, "p99": 786.0},
        "gateway_latency_ms": {"p50": 315.0, "p95": 529.0, "p99": 774.0},
        "endpoints": [{"name": "/v1/moderate [en-US]", "requests": 268, "rps": 5.96, "p50_ms": 330.0,
                       "p95_ms": 550.0, "p99_ms": 790.0, "error_rate": 0.0},
                      {"name": "/v1/moderate [zh-CN]", "requests": 97, "rps": 2.16, "p50_ms": 360.0,
                       "p95_ms": 570.0, "p99_ms": 850.0, "error_rate": 0.0}],
        "verdict_mix": {"decision": {"allow": 200, "block": 165}},
        "sellers_seen": 293, "sellers_in_several_arm_versions": 0, "locust_exit_code": 0,
    }


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """A benchmarks/ layout: results/ with sample files of every shape, and RESULTS.md next to it."""
    bench = tmp_path / "benchmarks"
    res = bench / "results"
    _write(res / "registry_resolve.json", {  # no commit recorded
        "benchmark": "registry_resolve", "command": "python benchmarks/registry_resolve.py ",
        "when": "2026-11-26T07:42:06+00:00", "machine": "x86_64 python 3.11.7", "calls": 200000,
        "median_us_per_resolve": 0.854, "worst_batch_us_per_resolve": 0.905, "target_us": 20.0,
        "meets_target": True})
    _write(res / "overhead.json", {
        "benchmark": "gateway_overhead", "command": "python benchmarks/overhead.py --duration 8",
        "when": "2026-11-26T08:46:22+00:00", "commit": "c069aaf", "machine": "x86_64 (2 cpus)",
        "targets": {"added_p50_ms_c1": 1.0, "gateway_rps_c32": 1500},
        "scenarios": [
            {"scenario": "plain", "added_p50_ms_c1": 0.9, "added_p99_ms_c1": 2.0, "gateway_rps_c32": 1600.0,
             "gateway_cpu_ms_per_request": 0.5, "gateway_rps_c32_rounds": [1402.0, 1600.0, 1611.0],
             "gateway_c1": {"p50_ms": 1.0, "non_2xx": 0},
             "direct_c1": {"p50_ms": 0.1}, "direct_c32": {"rps": 20000.0}, "gateway_c32": {"non_2xx": 0}},
            {"scenario": "rollout", "added_p50_ms_c1": 0.8, "added_p99_ms_c1": 2.0, "gateway_rps_c32": 1400.0,
             "gateway_cpu_ms_per_request": 0.6, "gateway_c1": {"p50_ms": 0.9, "non_2xx": 0},
             "direct_c1": {"p50_ms": 0.1}, "direct_c32": {"rps": 20000.0}, "gateway_c32": {"non_2xx": 0}},
            {"scenario": "plain-trace-100", "added_p50_ms_c1": 1.2, "added_p99_ms_c1": 40.0,
             "gateway_rps_c32": 700.0, "gateway_cpu_ms_per_request": 1.4,
             "gateway_c1": {"p50_ms": 1.3, "non_2xx": 0}, "direct_c1": {"p50_ms": 0.1},
             "direct_c32": {"rps": 20000.0}, "gateway_c32": {"non_2xx": 3}}]})
    _write(res / "overload.json", {
        "benchmark": "overload_shedding", "command": "python benchmarks/overload.py --duration 15",
        "when": "2026-11-26T08:29:58+00:00", "commit": "3fcf666", "machine": "x86_64 (2 cpus)",
        "setup": "stub engine 200 ms/answer; gateway max_inflight 16, max_queued 32",
        "load_requests": 1000, "load_non_2xx": 900, "share_429": 0.9, "probe_requests": 10, "probe_429": 9,
        "probe_200": 1, "first_429_after_s": 0.4, "p50_429_ms": 20.0, "p99_429_ms": 60.0,
        "rss_mb_before": 74.0, "rss_mb_max_during": 75.0, "rss_mb_after": 75.0})
    _write(res / "zz_future_bench.json", {  # a shape make_results does not know
        "benchmark": "cache_warmup", "when": "2027-01-01T00:00:00+00:00", "machine": "box",
        "command": "python benchmarks/cache_warmup.py", "warm_ms": 12.5,
        "phases": {"load": {"p50_ms": 3.25}, "serve": {"p50_ms": 1.5}}, "sizes": [1, 2, 3],
        "target_ms": 50, "meets_target": True})
    _write(res / "locust" / "gpu-saturate" / "summary.json", _summary("gpu-saturate", "2026-12-01T10:00:00+00:00"))
    _write(res / "locust" / "gpu-saturate" / "run.json", {"benchmark": "locust/gpu-saturate", "when": "x"})
    _write(res / "locust" / "gpu-saturate" / "locust_verdicts.json", {"counts": {}})
    return res, bench / "RESULTS.md"


def _run(res: Path, out: Path, *extra: str) -> int:
    return make_results.main(["--results-dir", str(res), "--out", str(out), *extra])


def test_generates_every_section(tree: tuple[Path, Path]) -> None:
    res, out = tree
    assert _run(res, out) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!-- GENERATED FILE: do not edit by hand.")
    for title in ("## Prompt label resolve (gateway hot path)", "## Gateway overhead (stub engine, wrk)",
                  "## Overload: fast 429s, flat memory", "## cache_warmup", "## Load test: `gpu-saturate`"):
        assert title in text
    # sections in file-name order, locust sections last
    order = [text.index(t) for t in ("## Gateway overhead", "## Overload", "## Prompt label resolve",
                                     "## cache_warmup", "## Load tests (locust)")]
    assert order == sorted(order)
    # figures, targets and verdicts
    assert "| median time per resolve (µs) | 0.854 |" in text
    assert "median < 20 µs per resolve" in text
    assert "| `plain-trace-100` | 1.2 | 40 |" in text
    assert "| 1,600 (median of 3: 1,402–1,611) | 20,000 |" in text
    assert "| 2 of 2 scenarios | yes |" in text  # plain-trace-100 shows the cost of tracing, not judged
    assert "| 1 of 2 scenarios (not: rollout) | **no** |" in text
    assert "**Target met:** partly met (1 of 2 criteria)." in text  # overhead
    assert "**Target met:** met." in text  # registry resolve, overload
    assert "- command: `python benchmarks/overhead.py --duration 8`" in text
    assert "- commit: c069aaf" in text
    # the unknown shape: every field, flattened and sorted; its own meets_target
    unknown = text[text.index("## cache_warmup"):text.index("## Load tests")]
    rows = [line.split(" | ")[0].lstrip("| ") for line in unknown.splitlines()
            if line.startswith("| ") and " | " in line and not line.startswith("| field")]
    assert rows[:6] == ["meets_target", "phases.load.p50_ms", "phases.serve.p50_ms", "sizes",
                        "target_ms", "warm_ms"]
    assert "| sizes | [1, 2, 3] |" in unknown
    assert "- command: `python benchmarks/cache_warmup.py`" in unknown
    # run.json and locust_verdicts.json are not results
    assert "run.json" not in text and "locust_verdicts" not in text
    # the locust section rebuilt from summary.json, in summarize_locust's marker format
    assert "<!-- locust:gpu-saturate begin (benchmarks/make_results.py, from summary.json) -->" in text
    assert "<!-- locust:gpu-saturate end -->" in text
    assert "| 365 | 8.12 | 8.31 | 330 | 550 | 790 | 980 | 0.00 % |" in text


def test_missing_commit_is_unknown(tree: tuple[Path, Path]) -> None:
    res, out = tree
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    resolve = text[text.index("## Prompt label resolve"):text.index("## cache_warmup")]
    assert "- commit: unknown" in resolve
    overview = next(line for line in text.splitlines() if line.startswith("| [Prompt label resolve"))
    assert overview.endswith("| 2026-11-26T07:42:06+00:00 | unknown |")
    # a locust run without a commit
    _write(res / "locust" / "gpu-saturate" / "summary.json",
           _summary("gpu-saturate", "2026-12-02T10:00:00+00:00", commit=None))
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert "- when: 2026-12-02T10:00:00+00:00; machine: x86_64 python 3.11.7 (2 cpus); commit: unknown" in text


def test_idempotent_and_check(tree: tuple[Path, Path]) -> None:
    res, out = tree
    assert _run(res, out) == 0
    first = out.read_bytes()
    assert _run(res, out) == 0
    assert out.read_bytes() == first
    assert _run(res, out, "--check") == 0
    _write(res / "single_request.json", {"benchmark": "single_request", "overhead_p50_ms": 2.0})
    assert _run(res, out, "--check") == 1
    assert out.read_bytes() == first  # --check writes nothing
    _run(res, out)
    assert "## Single request through a running stack" in out.read_text(encoding="utf-8")


def test_locust_marker_sections_preserved(tree: tuple[Path, Path]) -> None:
    res, out = tree
    kept = ("<!-- locust:gpu-saturate begin (benchmarks/summarize_locust.py) -->\n"
            "## Load test: `gpu-saturate`\n\nhand-made section, with a figure that is not in summary.json\n"
            "- when: 2026-12-01T10:00:00+00:00; machine: m; commit: abc1234\n"
            "<!-- locust:gpu-saturate end -->\n")
    orphan = ("<!-- locust:old-profile begin (benchmarks/summarize_locust.py) -->\n"
              "## Load test: `old-profile`\n\nno summary.json any more\n<!-- locust:old-profile end -->\n")
    out.write_text("# anything\n\nstale text\n\n" + kept + "\n" + orphan, encoding="utf-8")
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert kept in text and orphan in text
    assert "stale text" not in text
    assert text.index("locust:gpu-saturate begin") < text.index("locust:old-profile begin")  # sorted
    again = out.read_text(encoding="utf-8")
    _run(res, out)
    assert out.read_text(encoding="utf-8") == again

    # a new run of the profile (summary.json with another `when`): the old section is replaced
    _write(res / "locust" / "gpu-saturate" / "summary.json", _summary("gpu-saturate", "2026-12-03T00:00:00+00:00"))
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert "hand-made section" not in text and "when: 2026-12-03T00:00:00+00:00" in text
    assert orphan in text


def test_summarize_locust_and_make_results_cooperate(tree: tuple[Path, Path]) -> None:
    res, out = tree
    _run(res, out)
    section = "## Load test: `gpu-saturate`\n\n- when: 2026-12-01T10:00:00+00:00; machine: m; commit: x\nnew figures\n"
    summarize_locust.update_results_md(out, "gpu-saturate", section)  # what run_locust does after a run
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert "new figures" in text and text.count("<!-- locust:gpu-saturate begin") == 1
    summarize_locust.update_results_md(out, "gpu-ramp", "## Load test: `gpu-ramp`\n\nappended\n")
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert text.index("locust:gpu-ramp begin") < text.index("locust:gpu-saturate begin")
    assert text.startswith("<!-- GENERATED FILE")


@pytest.mark.skipif(not (REAL_SMOKE / "locust_stats.csv").exists(), reason="no recorded cpu-smoke run")
def test_locust_section_regenerated_identically(tmp_path: Path) -> None:
    bench = tmp_path / "benchmarks"
    run_dir = bench / "results" / "locust" / "cpu-smoke"
    run_dir.mkdir(parents=True)
    for f in REAL_SMOKE.iterdir():
        if f.suffix in (".csv", ".json", ".png"):
            shutil.copy(f, run_dir / f.name)
    expected_md = bench / "expected.md"
    d = summarize_locust.compute(run_dir)
    summarize_locust.update_results_md(expected_md, "cpu-smoke",
                                       summarize_locust.markdown("cpu-smoke", d, run_dir, bench))
    expected = make_results.existing_locust_blocks(expected_md.read_text(encoding="utf-8"))["cpu-smoke"]

    out = bench / "RESULTS.md"  # no section yet: regenerated from the run's files
    make_results.main(["--results-dir", str(bench / "results"), "--out", str(out)])
    assert make_results.existing_locust_blocks(out.read_text(encoding="utf-8"))["cpu-smoke"] == expected
    make_results.main(["--results-dir", str(bench / "results"), "--out", str(out), "--regenerate-locust"])
    assert make_results.existing_locust_blocks(out.read_text(encoding="utf-8"))["cpu-smoke"] == expected


def test_unreadable_result_fails_clearly(tree: tuple[Path, Path]) -> None:
    res, out = tree
    (res / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SystemExit, match="broken.json"):
        _run(res, out)


def test_non_object_result_is_listed(tree: tuple[Path, Path]) -> None:
    res, out = tree
    _write(res / "samples.json", [{"n": 1}, {"n": 2}])
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert "## samples" in text and "| [1].n | 2 |" in text and "- commit: unknown" in text


# --- the soak benchmark (benchmarks/soak.py -> soak.json -> its RESULTS.md section) ----------------


def _soak_doc(mode: str = "cpu-stack", *, failures: int = 0, dev: float = 1.5,
              records: int = 2400, expected: int = 2400) -> dict:
    def proc(label: str, ref: float, max_dev: float | None, flat: bool | None, note: str | None = None) -> dict:
        return {"label": label, "role": label, "pid": 1, "samples": 120, "rss_mb_warmup_end": ref,
                "rss_mb_min": ref, "rss_mb_max": ref * 1.01, "rss_mb_last": ref, "max_dev_pct": max_dev,
                "drift_pct": max_dev, "slope_mb_per_h": 0.5, "flat": flat, "note": note}

    return {
        "benchmark": "soak", "mode": mode, "mode_note": f"{mode} note",
        "command": "python benchmarks/soak.py", "when": "2026-12-01T10:00:00+00:00", "commit": "abc1234",
        "machine": "x86_64 python 3.11.7 (2 cpus)",
        "parameters": {"rate_rps": 4.0, "users": 8, "pacing_per_user_rps": 0.5, "duration_s": 600.0,
                       "warmup_s": 60.0, "sample_interval_s": 5.0, "tolerance_pct": 5.0,
                       "profile": "cpu-smoke"},
        "stack": {"start_s": 80.0, "exit_code": 0, "stopped_cleanly": True, "stop_s": 6.0, "left_behind": 0},
        "requests": {"sent": 2400, "answered": 2400 - failures, "unanswered": failures,
                     "by_status": {"200": 2400 - failures}, "failures": failures,
                     "errors": {"ConnectionRefusedError": failures} if failures else {},
                     "achieved_rps": 4.0, "achieved_rps_after_warmup": 3.99,
                     "latency_ms": {"p50": 330.0, "p95": 550.0, "p99": 790.0, "max": 980.0},
                     "locust_request_count": 2400, "locust_failure_count": failures},
        "decision_log": {"records": records, "expected_records": expected, "missing": max(0, expected - records),
                         "duplicates": 0, "unexpected": 0, "answers_without_request_id": 0,
                         "answered_4xx_not_recorded": 0, "torn_lines": 0, "bad_lines": 0, "match": records == expected},
        "rss": {"reference": "RSS at the end of the warm-up", "tolerance_pct": 5.0,
                "processes": [proc("vLLM EngineCore", 2100.0, dev, abs(dev) <= 5),
                              proc("ray raylet", 60.0, -0.4, True),
                              proc("ray idle worker (pid 9)", 0.0, None, None, "appeared after the warm-up")],
                "total": {"rss_mb_warmup_end": 3000.0, "rss_mb_min": 2990.0, "rss_mb_max": 3050.0,
                          "rss_mb_last": 3040.0, "max_dev_pct": 1.6}},
        "criteria": [], "passed": True, "plot": "soak_rss.png", "samples_file": "soak_rss_samples.csv",
    }


def test_soak_section(tree: tuple[Path, Path]) -> None:
    res, out = tree
    _write(res / "soak.json", _soak_doc())
    (res / "soak_rss.png").write_bytes(b"\x89PNG")
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    section = text[text.index("## Soak: 10 min at 4 req/s, CPU stack"):text.index("## cache_warmup")]
    assert "| vLLM EngineCore | 2,100 | 2,100 | 2,121 | 2,100 | +1.50 % |" in section
    assert "ray idle worker (pid 9) (appeared after the warm-up)" in section
    assert "![Soak: 10 min at 4 req/s, CPU stack: RSS over time](results/soak_rss.png)" in section
    assert "| zero errors | 0 failed of 2,400 requests | yes |" in section
    assert "2,400 records for 2,400 recorded answers (missing 0, twice 0, unexpected 0) | yes |" in section
    assert "**Target met:** met." in section
    assert "Other fields in the file" not in section  # every field has its place
    overview = next(line for line in text.splitlines() if line.startswith("| [Soak"))
    assert "2,400 requests at 3.99 req/s, 0 errors; RSS max deviation +1.50 % (vLLM EngineCore)" in overview
    assert "Upstream stub" not in section


def test_soak_section_judges_the_figures(tree: tuple[Path, Path]) -> None:
    res, out = tree
    _write(res / "soak.json", {**_soak_doc("upstream-stub", failures=3, dev=7.25, records=2396, expected=2397),
                               "other_stacks_during_run": ["pid 42: python -m gateway.cli.main up --config x.yaml"]})
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    section = text[text.index("## Soak: 10 min at 4 req/s, upstream stub"):text.index("## cache_warmup")]
    assert "**Upstream stub, not the CPU stack.**" in section
    assert "**Caveat:** 1 other stack(s) ran on this machine during the load" in section
    assert "| zero errors | 3 failed of 2,400 requests | **no** |" in section
    assert "outside: vLLM EngineCore | **no** |" in section
    assert "(missing 1, twice 0, unexpected 0) | **no** |" in section
    assert "**Target met:** not met." in section
    assert "](results/soak_rss.png)" not in section  # no plot file: no link


def test_soak_analysis_feeds_the_section(tree: tuple[Path, Path]) -> None:
    """soak.py's own figures (RSS per process, request/log matching) in the shape make_results reads."""
    from benchmarks import soak

    res, out = tree

    t0, mb = 1000.0, 1024 * 1024
    samples = []
    for i in range(13):  # every 5 s from t0 - 0; warm-up 20 s
        t = t0 + 5 * i
        samples.append(soak.Sample(t, "1:1", 1, "modgate up (gateway, Ray driver)", int((100 + 0.1 * i) * mb)))
        gcs_rss = int(50 * mb * (1 + 0.01 * max(0, i - 4)))  # grows in file-backed pages only
        samples.append(soak.Sample(t, "2:1", 2, "ray gcs_server", gcs_rss, 30 * mb, gcs_rss - 31 * mb, mb))
        if i >= 8:
            samples.append(soak.Sample(t, "3:1", 3, "ray idle worker", 20 * mb))
        if i <= 6:
            samples.append(soak.Sample(t, "4:1", 4, "ray idle worker", 20 * mb))
    rss = soak.analyse_rss(samples, t0, 20.0, 5.0)
    by = {e["label"]: e for e in rss["processes"]}
    assert by["modgate up (gateway, Ray driver)"]["flat"] is True
    gcs = by["ray gcs_server"]
    assert gcs["rss_mb_warmup_end"] == 50.0 and gcs["max_dev_pct"] == 8.0 and gcs["flat"] is False
    assert gcs["anon_mb_warmup_end"] == 30.0 and gcs["anon_max_dev_pct"] == 0.0
    assert gcs["file_shmem_mb_warmup_end"] == 20.0 and gcs["file_shmem_change_mb"] == 4.0
    assert by["modgate up (gateway, Ray driver)"]["anon_max_dev_pct"] is None  # parts not sampled
    assert by["ray idle worker (pid 3)"]["flat"] is None and by["ray idle worker (pid 3)"]["appeared_during_run"]
    assert by["ray idle worker (pid 4)"]["exited_during_run"] and by["ray idle worker (pid 4)"]["flat"] is True
    assert rss["not_flat"] == ["ray gcs_server"] and rss["judged"] == 3

    answers = [{"t": t0 + 1, "status": 200, "rid": "a", "ms": 300, "failed": False},
               {"t": t0 + 2, "status": 503, "rid": "b", "ms": 10, "failed": True},
               {"t": t0 + 3, "status": 422, "rid": "c", "ms": 5, "failed": True},
               {"t": t0 + 4, "status": 0, "rid": None, "ms": 90000, "failed": True},
               {"t": t0 + 30, "status": 200, "rid": "d", "ms": 300, "failed": False}]
    from collections import Counter

    dlog = soak.analyse_log(answers, Counter({"a": 1, "b": 1, "d": 2, "e": 1}), 0, {})
    assert (dlog["records"], dlog["expected_records"]) == (5, 3)
    assert (dlog["missing"], dlog["duplicates"], dlog["unexpected"]) == (0, 1, 1)
    assert dlog["answered_4xx_not_recorded"] == 1 and dlog["match"] is False
    assert soak.analyse_log(answers, Counter({"a": 1, "b": 1, "d": 1}), 0, {})["match"] is True
    req = soak.analyse_requests(answers, t0, 20.0, 60.0, {"requests": 5, "failures": 3, "errors": {}})
    assert (req["sent"], req["answered"], req["unanswered"], req["failures"]) == (5, 4, 1, 3)
    assert req["by_status"] == {"0": 1, "200": 2, "422": 1, "503": 1}

    for e in rss["processes"]:
        e.pop("_key")
    doc = {**_soak_doc(), "requests": req, "decision_log": dlog, "rss": rss,
           "criteria": soak.criteria(req, rss, dlog)}
    assert [c["pass"] for c in doc["criteria"]] == [False, False, False]
    _write(res / "soak.json", doc)
    _run(res, out)
    text = out.read_text(encoding="utf-8")
    assert "| ray gcs_server | 50 | 50.5 | 54 | 54 | +8.00 % | +8.00 % |" in text
    assert "outside: ray gcs_server | **no** |" in text
    assert "5 records for 3 recorded answers (missing 0, twice 1, unexpected 1) | **no** |" in text


def test_soak_roles() -> None:
    from benchmarks.soak import role_of

    assert role_of(["ray::ServeReplica:llm-app:LLMServer:tiny-llama"], "ray::ServeReplica") == \
        "Serve replica llm-app:LLMServer:tiny-llama"
    assert role_of(["ray::ServeController"], "ray::ServeCont") == "Serve controller"
    assert role_of(["ray::ProxyActor"], "ray::ProxyActor") == "Serve HTTP proxy"
    assert role_of(["ray::IDLE"], "ray::IDLE") == "ray idle worker"
    assert role_of(["VLLM::EngineCore"], "VLLM::EngineCor") == "vLLM EngineCore"
    assert role_of(["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"],
                   "python") == "vLLM API server"
    assert role_of(["/venv/bin/python", "/venv/bin/modgate", "up", "--config", "c.yaml"], "modgate") == \
        "gateway (modgate up)"
    assert role_of(["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--x"], "raylet") == \
        "ray raylet"
    assert role_of(["/venv/bin/python", "-u", "/venv/lib/python3.11/site-packages/ray/dashboard/agent.py"],
                   "python") == "ray dashboard agent"
    assert role_of(["/venv/bin/python", "/venv/site-packages/ray/_private/log_monitor.py"], "python") == \
        "ray log monitor"


def test_rss_parts_add_up_to_the_resident_set() -> None:
    import psutil

    from benchmarks import soak

    anon, file, shmem = soak.rss_parts(os.getpid())
    assert anon and file is not None and shmem is not None
    rss = psutil.Process().memory_info().rss
    assert abs(anon + file + shmem - rss) < 0.05 * rss
    assert soak.rss_parts(2 ** 22 + 7) == (None, None, None)  # no such process


def test_engine_throughput_section_judges_each_gateway_run_at_the_same_batch() -> None:
    cpu = {"cpu_s_by_role": {"vLLM worker (model runner)": 6.0, "vLLM EngineCore": 5.0,
                             "gateway (modgate up)": 1.5, "this process (the benchmark client)": 0.5},
           "cpu_s_engine": 11.0, "cpu_s_total": 13.0, "engine_share_of_cpu_used": 0.846}
    doc = {"model": {"num_layers": 4, "hidden_size": 256}, "policy_tokens": 3500, "items": 128,
           "warmup": 8, "concurrency": [128, 32], "same_batch_concurrency": 128, "target_ratio": 0.95,
           "results": [
               {"run": "direct", "concurrency": 128, "items_per_s": 20.0},
               {"run": "vllm_server", "concurrency": 128, "items_per_s": 19.0, "p50_ms": 900,
                "p99_ms": 1200, "statuses": {"200": 128}},
               {"run": "vllm_server", "concurrency": 32, "items_per_s": 17.0},
               {"run": "gateway_vllm", "concurrency": 128, "items_per_s": 19.2, "ratio_to_direct": 0.96,
                "ratio_to_vllm_server": 1.011, **cpu},
               {"run": "gateway_vllm", "concurrency": 32, "items_per_s": 15.0, "ratio_to_direct": 0.75},
               {"run": "gateway_http", "concurrency": 128, "items_per_s": 16.0, "ratio_to_direct": 0.8}]}
    r = make_results.render_engine_throughput(doc)
    assert [(c.criterion, c.ok) for c in r.checks] == [
        ("gateway_vllm with the whole batch in flight: ≥ 95 % of direct", True),
        ("gateway_http with the whole batch in flight: ≥ 95 % of direct", False)]
    assert make_results.verdict(r.checks) == "partly met (1 of 2 criteria)"
    body = "\n".join(r.body)
    assert "101.1 % of that server's throughput" in body
    assert "| gateway_vllm | gateway → vLLM's OpenAI server | 128 | 19.2 | 96 |" in body
    assert "| 84.6 % | 11 / 1.5 / 0.5 |" in body  # engine / serving path / the client
    assert r.result == "direct 20 items/s; best through the gateway 19.2 items/s (gateway_vllm, 128 in flight)"


def test_prefix_cache_section_judges_each_version() -> None:
    doc = {"transport": "handle", "policy_tokens": 1002, "items": 96, "concurrency": 8,
           "statuses": {"200": 96}, "target_hit_rate": 0.9, "versions": {
               "listing-moderation@v1": {"listings": 48, "input_tokens": 53000, "cached_input_tokens": 49000,
                                         "hit_rate": 0.9245, "ceiling": 0.94, "prefix_reuse": 0.98,
                                         "shared_prefix_tokens": 1040, "prompt_tokens_mean": 1104.2},
               "listing-moderation-b@v1": {"listings": 48, "input_tokens": 53000, "cached_input_tokens": 40000,
                                           "hit_rate": 0.7547}}}
    r = make_results.render_prefix_cache(doc)
    assert [(c.criterion, c.ok) for c in r.checks] == [
        ("listing-moderation@v1: hit rate > 90 %", True), ("listing-moderation-b@v1: hit rate > 90 %", False)]
    assert "| listing-moderation@v1 | 48 | 53,000 | 49,000 | 92.5 % | 94 % | 98 % | 1,040 | 1,104.2 |" in r.body
    assert r.result == "hit rate 92.5 %, 75.5 %"


def test_handle_hop_section_compares_batched_with_one_per_call() -> None:
    doc = {"duration_s": 4, "settings": [
        {"concurrency": 1, "max_size": 1, "max_wait_ms": 2, "max_hops": 4, "rps": 200, "mean_batch": 1},
        {"concurrency": 32, "max_size": 1, "max_wait_ms": 2, "max_hops": 4, "rps": 400, "mean_batch": 1},
        {"concurrency": 32, "max_size": 16, "max_wait_ms": 2, "max_hops": 2, "rps": 2000, "mean_batch": 10}]}
    r = make_results.render_handle_hop(doc)
    assert r.result == "at 32 in flight: 400 req/s one per call, 2,000 req/s with max_size 16"
    assert len([line for line in r.body if line.startswith("| 32 |")]) == 2


def _scenario(name: str, rps: float, p50: float, vs_floor: list[float], minus_floor: list[float],
              ratio: float = 0.1) -> dict:
    return {"scenario": name, "tracing_sample_ratio": ratio, "added_p50_ms_c1": round(p50 - 0.05, 3),
            "added_p99_ms_c1": 2.0, "gateway_rps_c32": rps, "gateway_cpu_ms_per_request": 0.5,
            "gateway_rps_c32_rounds": [rps - 10, rps, rps + 10],
            "rps_c32_vs_floor": sorted(vs_floor)[1], "rps_c32_vs_floor_rounds": vs_floor,
            "p50_ms_c1_minus_floor": sorted(minus_floor)[1], "p50_ms_c1_minus_floor_rounds": minus_floor,
            "gateway_c1": {"p50_ms": p50, "p99_ms": 3.0, "non_2xx": 0}, "direct_c1": {"p50_ms": 0.05},
            "direct_c32": {"rps": 20000.0}, "gateway_c32": {"non_2xx": 0}}


def test_overhead_against_the_floor(tmp_path: Path) -> None:
    """With a `floor` row, each scenario is judged as a ratio to it (issue 20's targets), tracing
    cost comes from the trace-off pair, and the LiteLLM figure is shown as a reference only."""
    res, out = tmp_path / "results", tmp_path / "RESULTS.md"
    _write(res / "overhead.json", {
        "benchmark": "gateway_overhead", "command": "python benchmarks/overhead.py --repeat 3",
        "when": "2026-12-03T18:00:00+00:00", "commit": "abc1234", "machine": "x86_64 (2 cpus)",
        "targets": {"rps_c32_vs_floor_min": {"plain": 0.8, "rollout": 0.7}, "p50_ms_c1_minus_floor_max": 0.2,
                    "tracing_cost_max": 0.1},
        "floor": "benchmarks/floor_gateway.py: FastAPI + pydantic + Jinja2 + aiohttp + orjson",
        "reference": "LiteLLM proxy 1.80: ~140 req/s at 32",
        "load": {"before": [1.5, 1.0, 0.5], "after": [2.0, 1.2, 0.6]}, "paired": True,
        "tracing_cost": {"with": "plain", "without": "plain-trace-off", "cost": 0.12,
                         "cost_rounds": [0.1, 0.12, 0.15], "target_max": 0.1},
        "scenarios": [
            _scenario("floor", 3000.0, 0.7, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], ratio=0.0),
            _scenario("plain", 2500.0, 0.85, [0.81, 0.83, 0.85], [0.1, 0.15, 0.3]),
            _scenario("plain-trace-off", 2800.0, 0.8, [0.9, 0.93, 0.95], [0.1, 0.1, 0.1], ratio=0.0),
            _scenario("rollout", 1900.0, 1.0, [0.6, 0.63, 0.66], [0.2, 0.3, 0.4])]})
    assert _run(res, out) == 0
    text = out.read_text(encoding="utf-8")
    assert "| `plain` | 2,500 (median of 3: 2,490–2,510) | 0.83 | 0.85 | 0.15 | 0.8 / 2 | 0.5 | 0 | " \
           "≥ 0.8 ×: yes | ≤ +0.2 ms: yes |" in text
    assert "| `rollout` | 1,900 (median of 3: 1,890–1,910) | 0.63 | 1 | 0.3 | 0.95 / 2 | 0.5 | 0 | " \
           "≥ 0.7 ×: **no** | ≤ +0.2 ms: **no** |" in text
    assert "| `plain-trace-off` |" in text and "| `floor` |" in text
    assert "| `plain`: ≥ 0.8 × the floor's req/s at 32 connections | 0.83 (rounds 0.81, 0.83, 0.85) | yes |" in text
    assert "| tracing at 10 % costs ≤ 10 % of req/s @32 (`plain` vs `plain-trace-off`) | 12 % (rounds 10 %, " \
           "12 %, 15 %) | **no** |" in text
    assert "Reference (recorded, not measured here): LiteLLM proxy 1.80: ~140 req/s at 32." in text
    assert "Run with `--paired`: each scenario ran at the same time as a floor gateway on the same CPU" in text
    assert "**Target met:** partly met (2 of 5 criteria)." in text
    assert "plain 0.83 × floor @32, p50 +0.15 ms; rollout 0.63 × floor @32, p50 +0.3 ms; tracing costs 12 %" in text
    assert "Other fields in the file" not in text


def test_overhead_cpu_ab(tmp_path: Path) -> None:
    """overhead_cpu.py --ab: one row per checkout, each change against the row above it."""
    res, out = tmp_path / "results", tmp_path / "RESULTS.md"
    _write(res / "overhead_cpu_ab.json", {
        "benchmark": "overhead_cpu_ab", "command": "python benchmarks/overhead_cpu.py --ab a b",
        "when": "2026-12-03T18:00:00+00:00", "commit": "abc1234", "machine": "x86_64 (2 cpus)",
        "scenario": "plain", "concurrency": 32, "requests_per_round": 300, "rounds": 40,
        "load": {"before": [9.0, 8.0, 7.0], "after": [10.0, 8.5, 7.2]},
        "arms": [{"tree": "ab-base", "commit": "d973f34", "subject": "before", "cpu_us_per_request_median": 800.0,
                  "cpu_us_per_request_min": 700.0, "vs_first": 1.0, "non_200": 0,
                  "cpu_us_per_request_rounds": [800.0]},
                 {"tree": "ab-render", "commit": "80e769e", "subject": "render: one context", "vs_first": 0.95,
                  "cpu_us_per_request_median": 760.0, "cpu_us_per_request_min": 690.0, "non_200": 0,
                  "cpu_us_per_request_rounds": [760.0]}]})
    assert _run(res, out) == 0
    text = out.read_text(encoding="utf-8")
    assert "| `ab-render` | 80e769e | render: one context | 760 | 690 | 0.95 | 0 |" in text
    assert "step by step: ab-render -5 %" in text
    assert "40 rounds of 300 requests per checkout" in text and "Other fields in the file" not in text
    assert "× the floor |" not in text


def test_overhead_cpu_ab_with_the_floor(tmp_path: Path) -> None:
    """overhead_cpu.py --ab ... --floor: the floor is a row with its own wording, not a step,
    and every row is also a ratio to it."""
    res, out = tmp_path / "results", tmp_path / "RESULTS.md"
    arm = {"cpu_us_per_request_min": 1.0, "non_200": 0, "cpu_us_per_request_rounds": [1.0]}
    _write(res / "overhead_cpu_ab.json", {
        "benchmark": "overhead_cpu_ab", "command": "python benchmarks/overhead_cpu.py --ab a b --floor",
        "when": "2026-12-03T18:00:00+00:00", "commit": "abc1234", "machine": "x86_64 (2 cpus)",
        "scenario": "plain", "concurrency": 32, "requests_per_round": 300, "rounds": 40,
        "load": {"before": [9.0, 8.0, 7.0], "after": [10.0, 8.5, 7.2]},
        "arms": [{**arm, "tree": "a", "scenario": "plain", "commit": "1111111", "subject": "before",
                  "cpu_us_per_request_median": 600.0, "vs_first": 1.0, "vs_floor": 2.4},
                 {**arm, "tree": "b", "scenario": "plain", "commit": "2222222", "subject": "a cut",
                  "cpu_us_per_request_median": 570.0, "vs_first": 0.95, "vs_floor": 2.28},
                 {**arm, "tree": "floor", "scenario": "floor", "commit": "2222222", "subject": "a cut",
                  "cpu_us_per_request_median": 250.0, "vs_first": 0.417, "vs_floor": 1.0}]})
    assert _run(res, out) == 0
    text = out.read_text(encoding="utf-8")
    assert "| checkout | commit | change | CPU per request, median (µs) | min (µs) | × the first | × the floor | non-200 |" in text
    assert "| `b` | 2222222 | a cut | 570 | 1 | 0.95 | 2.28 | 0 |" in text
    assert "| `floor` | 2222222 | the floor gateway (benchmarks/floor_gateway.py) | 250 | 1 | 0.417 | 1 | 0 |" in text
    assert "step by step: b -5 %, b at 2.28 × the floor's CPU per request" in text
