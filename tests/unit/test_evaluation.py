"""Offline evaluation: datasets, the resumable runner, scorecards, comparisons, reports, CLI."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import gateway.cli.eval as eval_cli
from gateway.pipeline import ModerationPipeline
from gateway.quality.evaluation import runner as runner_mod
from gateway.quality.evaluation.dataset import (
    Dataset,
    DatasetError,
    DatasetRow,
    load_dataset,
    read_dataset,
    schema_problems,
    write_csv,
    write_jsonl,
)
from gateway.quality.evaluation.report import write_comparison, write_scorecard
from gateway.quality.evaluation.runner import ItemResult, cache_path, run_eval
from gateway.quality.evaluation.scorecard import (
    Scorecard,
    build_scorecard,
    compare,
    mcnemar_exact,
    wilson,
)
from prompt_registry import PromptSpec, PromptVersion
from serving import BackendUnavailable, ChatRequest, ChatResult
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "datasets" / "listings-sample.jsonl"
SAMPLE_CSV = ROOT / "datasets" / "listings-sample.csv"
CATEGORIES = ["counterfeit", "prohibited_item", "misleading_claim", "off_platform_payment", "adult",
              "hate_harassment"]


def _version(spec: PromptSpec, n: int = 1, marker: str = "") -> PromptVersion:
    if marker:
        data = spec.model_dump()
        data["messages"][0]["content"] = marker + "\n" + data["messages"][0]["content"]
        spec = PromptSpec.model_validate(data)
    return PromptVersion(spec=spec, version=n, content_hash=spec.content_hash(),
                         created_at=datetime(2026, 1, 1, tzinfo=UTC))


def _row(item_id: str, decision: str = "allow", category: str = "none", locale: str = "en-US",
         title: str | None = None) -> DatasetRow:
    return DatasetRow(item_id=item_id, title=title or f"listing {item_id}",
                      description=f"description of {item_id}", locale=locale,
                      gold_decision=decision, gold_category=category, seller_id="s-1")


def _verdict(decision: str, category: str) -> str:
    return json.dumps({"decision": decision, "category": category, "confidence": 0.5},
                      separators=(",", ":"))


class CountingBackend(FakeBackend):
    """Answers from a table keyed by the listing title (default: allow) and counts calls."""

    def __init__(self, answers: dict[str, str] | None = None,
                 fail: Callable[[ChatRequest], Exception | None] | None = None) -> None:
        super().__init__(responder=self._answer)
        self.answers = answers or {}
        self.fail = fail
        self.calls = 0

    def _answer(self, request: ChatRequest) -> str:
        user = request.messages[-1]["content"]
        for title, text in self.answers.items():
            if title in user:
                return text
        return _verdict("allow", "none")

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        self.calls += 1
        if self.fail is not None and (exc := self.fail(request)) is not None:
            raise exc
        return await super().chat(request, timeout_s=timeout_s)


def _run(versions: list[PromptVersion], rows: list[DatasetRow], backend: FakeBackend, cache: Path, *,
         timeout_s: float = 5.0, priority: int = 5, use_cache: bool = True) -> list[ItemResult]:
    return asyncio.run(run_eval(versions, rows, backend, concurrency=4, cache_dir=cache,
                                priority=priority, timeout_s=timeout_s, progress=False,
                                use_cache=use_cache))


# -- datasets ----------------------------------------------------------------------------------


def test_validation_reports_every_problem_with_file_line_field(tmp_path: Path) -> None:
    good = {"item_id": "a-1", "title": "Lamp", "description": "", "locale": "en-US",
            "gold_decision": "allow", "gold_category": "none"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "item_id": "a-2", "locale": "english"}),
        "{not json",
        json.dumps({**good, "item_id": "a-3", "title": "", "gold_decision": "block"}),
        "",
        json.dumps({**good, "item_id": "a-1"}),
        json.dumps({**good, "item_id": "a 4", "colour": "red", "tags": ["OK?"]}),
        json.dumps({**good, "item_id": "a-5", "gold_category": "counterfeit", "seller_id": 7}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset, problems = read_dataset(path)
    assert dataset is None
    text = [str(p) for p in problems]
    f = str(path)
    assert f"{f}:2: locale: 'english' is not a locale like 'en-US' or 'zh-CN'" in text
    assert any(t.startswith(f"{f}:3: -: not valid JSON") for t in text)
    assert f"{f}:4: title: required, but empty or missing" in text
    assert f"{f}:4: gold_category: a 'block' needs the violated category, not 'none'" in text
    assert f"{f}:6: item_id: duplicate 'a-1' (first on line 1)" in text
    assert any(t.startswith(f"{f}:7: colour: unknown field") for t in text)
    assert any(t.startswith(f"{f}:7: item_id: 'a 4' is not an id") for t in text)
    assert any(t.startswith(f"{f}:7: tags: 'OK?'") for t in text)
    assert f"{f}:8: seller_id: must be a string, not int" in text
    assert f"{f}:8: gold_category: must be 'none' when gold_decision is 'allow', not 'counterfeit'" in text
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert len(err.value.problems) == len(problems) >= 10


def test_csv_validation_counts_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "item_id,title,description,locale,gold_decision,gold_category\n"
        'b-1,Lamp,"two\nlines",en-US,allow,none\n'
        "b-2,Chair,,en-US,allow\n"
        "b-3,Table,,xx_YY,maybe,none\n", encoding="utf-8")
    _, problems = read_dataset(path)
    text = [str(p) for p in problems]
    assert text == [f"{path}:4: -: 5 cells, but the header has 6 columns",
                    f"{path}:5: locale: 'xx_YY' is not a locale like 'en-US' or 'zh-CN'"]
    header = tmp_path / "header.csv"
    header.write_text("item_id,title,colour\n", encoding="utf-8")
    text = [str(p) for p in read_dataset(header)[1]]
    assert any(t.startswith(f"{header}:1: colour: unknown column") for t in text)
    assert f"{header}:1: locale: required column missing from the header" in text


def test_gold_labels_are_checked_against_the_prompt_schema(example_spec: PromptSpec) -> None:
    ds = Dataset(rows=(_row("x-1"), _row("x-2", "escalate", "weapons")), source="d.jsonl",
                 lines={"x-1": 1, "x-2": 2})
    text = [str(p) for p in schema_problems(ds, example_spec.verdict, example_spec.variables)]
    assert text == [
        "d.jsonl:2: gold_decision: 'escalate' is not a decision of the prompt (allow, block, needs_review)",
        "d.jsonl:2: gold_category: 'weapons' is not a category of the prompt (none, counterfeit, "
        "prohibited_item, misleading_claim, off_platform_payment, adult, hate_harassment)",
    ]
    assert schema_problems(ds, example_spec.verdict, ["title", "shop_name"])[0].field == "shop_name"


def test_jsonl_and_csv_round_trip_to_the_same_hash(tmp_path: Path) -> None:
    ds = load_dataset(SAMPLE)
    write_csv(ds.rows, tmp_path / "copy.csv")
    from_csv = load_dataset(tmp_path / "copy.csv")
    assert from_csv.rows == ds.rows
    assert from_csv.sha256 == ds.sha256 == load_dataset(SAMPLE_CSV).sha256
    shuffled = list(from_csv.rows)
    random.Random(3).shuffle(shuffled)
    write_jsonl(shuffled, tmp_path / "copy.jsonl")
    assert load_dataset(tmp_path / "copy.jsonl").sha256 == ds.sha256  # order does not matter
    # A spreadsheet that saves CRLF line endings and no BOM reads the same.
    crlf = (tmp_path / "copy.csv").read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    (tmp_path / "crlf.csv").write_text(crlf.replace("\n", "\r\n"), encoding="utf-8", newline="")
    assert load_dataset(tmp_path / "crlf.csv").sha256 == ds.sha256
    # Relabelling changes the dataset hash, not what the model sees (the cache key).
    first = ds.rows[0]
    relabelled = DatasetRow(**{**first.canonical(), "tags": tuple(first.tags), "notes": "changed"})
    assert relabelled.input_hash == first.input_hash
    assert Dataset(rows=(relabelled, *ds.rows[1:])).sha256 != ds.sha256


def test_shipped_sample_validates_and_covers_the_policy(example_spec: PromptSpec) -> None:
    ds = load_dataset(SAMPLE)
    assert schema_problems(ds, example_spec.verdict, example_spec.variables) == []
    assert len(ds) >= 150
    locales = Counter(r.locale for r in ds.rows)
    assert locales["zh-CN"] >= 50 and locales["en-US"] >= 50
    positives = Counter(r.gold_category for r in ds.rows if r.gold_decision != "allow")
    for cat in CATEGORIES:
        assert positives[cat] >= 12, (cat, positives[cat])
        assert any(r.locale == "zh-CN" and r.gold_category == cat for r in ds.rows), cat
    tags = Counter(t for r in ds.rows for t in r.tags)
    for tag in ("hard:secondhand-luxury", "hard:compatible", "hard:kitchen-knife", "hard:toy-gun",
                "hard:lingerie", "hard:herbal-tea", "hard:lookalike"):
        assert tags[tag] >= 2, tag
        assert all(r.gold_decision == "allow" for r in ds.rows
                   if tag in r.tags and tag != "hard:lookalike"), tag
    assert tags["obfuscated-contact"] >= 6 and tags["fake-reference-price"] >= 3
    assert tags["hidden-1to1"] >= 2 and tags["injection"] >= 6
    text = " ".join(r.title + " " + r.description for r in ds.rows)
    for needle in ("w.h.a.t.s.a.p.p", "V：abc123", "加薇", "ignore previous instructions",
                   "忽略之前的所有指令", "CBD-free"):
        assert needle.lower() in text.lower(), needle
    for r in ds.rows:
        if "injection" in r.tags:
            assert r.gold_decision == "needs_review", r.item_id
        if "obfuscated-contact" in r.tags:
            assert r.gold_category == "off_platform_payment", r.item_id
    assert len({(r.title, r.description) for r in ds.rows}) == len(ds)  # every row distinct


# -- metrics -----------------------------------------------------------------------------------

# Ten hand-labelled items (gold -> predicted by "a" and by "b") used by the metric tests.
SMALL = [
    # item, locale, gold,                         a,                                 b
    ("r1", "en-US", ("block", "counterfeit"), ("block", "counterfeit"), ("block", "counterfeit")),
    ("r2", "en-US", ("block", "counterfeit"), ("allow", "none"), ("block", "counterfeit")),
    ("r3", "en-US", ("needs_review", "counterfeit"), ("needs_review", "counterfeit"), ("allow", "none")),
    ("r4", "en-US", ("allow", "none"), ("block", "counterfeit"), ("allow", "none")),
    ("r5", "en-US", ("allow", "none"), ("allow", "none"), ("allow", "none")),
    ("r6", "zh-CN", ("block", "adult"), ("block", "hate_harassment"), ("block", "adult")),
    ("r7", "zh-CN", ("block", "adult"), "parse-failure", ("block", "adult")),
    ("r8", "zh-CN", ("needs_review", "none"), ("allow", "none"), ("needs_review", "none")),
    ("r9", "zh-CN", ("allow", "none"), "backend-error", ("allow", "none")),
    ("r10", "zh-CN", ("block", "off_platform_payment"), ("needs_review", "off_platform_payment"),
     ("block", "off_platform_payment")),
]


def _small_results(spec: PromptSpec, which: int, tmp_path: Path) -> tuple[PromptVersion, Dataset, list[ItemResult]]:
    version = _version(spec, which, marker=f"variant {which}")
    rows = [_row(i, *gold, locale=loc, title=f"title-{i}:") for i, loc, gold, _, _ in SMALL]
    answers: dict[str, str] = {}
    for item, _, _, a, b in SMALL:
        pred = a if which == 1 else b
        if pred == "parse-failure":
            answers[f"title-{item}:"] = "I think this is fine"
        elif pred != "backend-error":
            answers[f"title-{item}:"] = _verdict(*pred)
    backend = CountingBackend(answers, fail=lambda r: BackendUnavailable("engine down")
                              if "title-r9:" in r.messages[-1]["content"] and which == 1 else None)
    results = _run([version], rows, backend, tmp_path / f"cache{which}")
    return version, Dataset(rows=tuple(rows), source="small.jsonl"), results


def test_metrics_match_a_hand_computed_example(example_spec: PromptSpec, tmp_path: Path) -> None:
    version, ds, results = _small_results(example_spec, 1, tmp_path)
    sc = build_scorecard(version, ds, results)
    q = sc.overall
    cf, adult, hate, off = (q.category(c) for c in ("counterfeit", "adult", "hate_harassment",
                                                     "off_platform_payment"))
    assert cf and adult and hate and off
    # counterfeit: gold r1 r2 r3, predicted r1 r3 r4 -> TP 2, FP 1 (r4), FN 1 (r2)
    assert (cf.support, cf.predicted, cf.tp, cf.fp, cf.fn) == (3, 3, 2, 1, 1)
    assert cf.precision == pytest.approx(2 / 3) and cf.recall == pytest.approx(2 / 3)
    assert cf.f1 == pytest.approx(2 / 3)
    # adult: r6 predicted hate_harassment, r7 unparseable -> no predictions, recall 0
    assert (adult.tp, adult.fp, adult.fn, adult.precision, adult.recall, adult.f1) == (0, 0, 2, None, 0.0, 0.0)
    assert adult.precision_ci is None and adult.recall_ci == pytest.approx(wilson(0, 2))
    # hate_harassment: one false positive, no support -> precision 0, recall undefined
    assert (hate.support, hate.fp, hate.precision, hate.recall) == (0, 1, 0.0, None)
    assert (off.tp, off.precision, off.recall) == (1, 1.0, 1.0)  # needs_review counts as flagged
    # macro over categories with support (counterfeit, adult, off_platform): (2/3 + 0 + 1) / 3
    assert q.macro_precision == pytest.approx(5 / 9) and q.macro_recall == pytest.approx(5 / 9)
    assert q.macro_f1 == pytest.approx(5 / 9)
    # micro: TP 2+1, FP 1+1, FN 1+2
    assert (q.micro.tp, q.micro.fp, q.micro.fn) == (3, 2, 3)
    assert q.micro.precision == pytest.approx(3 / 5) and q.micro.recall == pytest.approx(1 / 2)
    # flagged: gold r1 r2 r3 r6 r7 r8 r10; predicted r1 r3 r4 r6 r7 r10 (r9 errored)
    assert (q.flagged.tp, q.flagged.fp, q.flagged.fn) == (5, 1, 2)
    # correct outcome: r1 r3 r5 r10; exact decision: r1 r3 r5 r6
    assert (q.correct, q.accuracy, q.decision_accuracy) == (4, 0.4, 0.4)
    assert (sc.rates["needs_review"].count, sc.rates["needs_review"].n) == (3, 9)
    assert (sc.rates["parse_failure"].count, sc.rates["error"].count, sc.rates["error"].n) == (1, 1, 10)
    assert sc.fail_reasons == {"unparseable_output": 1}
    assert sc.error_types == {"BackendUnavailable": 1}
    cm = {(g, p): sc.confusion[i][j] for i, g in enumerate(sc.labels) for j, p in enumerate(sc.columns)}
    assert cm[("none", "counterfeit")] == 1 and cm[("none", "error")] == 1 and cm[("none", "none")] == 1
    assert cm[("counterfeit", "counterfeit")] == 2 and cm[("counterfeit", "none")] == 1
    assert cm[("adult", "hate_harassment")] == 1 and cm[("adult", "needs_review")] == 1
    assert cm[("needs_review", "none")] == 1 and cm[("off_platform_payment", "off_platform_payment")] == 1
    assert sum(map(sum, sc.confusion)) == 10
    assert {loc: lq.n for loc, lq in sc.per_locale.items()} == {"en-US": 5, "zh-CN": 5}
    en_cf = sc.per_locale["en-US"].category("counterfeit")
    assert en_cf and (en_cf.tp, en_cf.fp, en_cf.fn) == (2, 1, 1)
    assert sc.tokens["total"] == sc.tokens["prompt"] + sc.tokens["completion"] > 0
    assert sc.latency_ms["p50"] is not None and sc.latency_ms["p95"] is not None
    # The JSON form reads back to the same scorecard.
    assert Scorecard.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc


def test_wilson_and_mcnemar_match_hand_computed_values() -> None:
    # Wilson, z = 1.959964, z^2 = 3.841459, n = 10, p = 0.8:
    #   centre = (p + z^2/2n) / (1 + z^2/n) = 0.992073 / 1.384146 = 0.716740
    #   half   = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 1.959964 * 0.160011 / 1.384146 = 0.226580
    assert wilson(8, 10) == pytest.approx((0.490162, 0.943318), abs=1e-5)
    # p = 0: centre = half = 0.192073 / 1.384146 = 0.138767 -> (0, 0.277533)
    assert wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)
    assert wilson(0, 0) is None
    # Exact McNemar = two-sided binomial test on the discordant pairs (b, c), p = 1/2:
    #   b=2, c=7: 2 * P(X <= 2 | n=9) = 2 * (1 + 9 + 36) / 512 = 0.1796875
    assert mcnemar_exact(2, 7) == pytest.approx(0.1796875)
    #   b=0, c=6: 2 * (1/64) = 0.03125;  b=c=0: no evidence either way, p = 1
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)
    assert mcnemar_exact(0, 0) == 1.0


def test_compare_counts_fixed_broken_changed_and_tests_them(example_spec: PromptSpec,
                                                            tmp_path: Path) -> None:
    va, ds, ra = _small_results(example_spec, 1, tmp_path)
    vb, _, rb = _small_results(example_spec, 2, tmp_path)
    a, b = build_scorecard(va, ds, ra), build_scorecard(vb, ds, rb)
    cmp = compare(a, b)
    # r9 errored in a: left out. Of the other 9: a right on r1 r3 r5 r10, b right on all but r3.
    assert (cmp.n, cmp.excluded_errors) == (9, 1)
    assert (cmp.both_correct, cmp.only_a_correct, cmp.only_b_correct, cmp.both_wrong) == (3, 1, 5, 0)
    assert cmp.mcnemar_p == pytest.approx(2 * (1 + 6) / 64)  # 0.21875
    assert (cmp.fixed, cmp.broken, cmp.changed) == (5, 1, 1)
    status = {c.item_id: c.status for c in cmp.items}
    assert status == {"r2": "fixed", "r4": "fixed", "r6": "fixed", "r7": "fixed", "r8": "fixed",
                      "r3": "broken", "r10": "changed"}
    assert cmp.items[0].status == "broken"
    cats = {d.category: d for d in cmp.categories}
    cf = cats["counterfeit"]
    assert (cf.recall_gained, cf.recall_lost, cf.fp_removed, cf.fp_added) == (1, 1, 1, 0)
    assert (cats["adult"].recall_gained, cats["adult"].recall_p) == (2, pytest.approx(0.5))
    assert cats["hate_harassment"].fp_removed == 1
    flagged = {d.category: d for d in cmp.overall}["flagged"]
    assert (flagged.recall_gained, flagged.recall_lost) == (2, 1)
    other = Scorecard.from_dict({**b.to_dict(), "dataset_sha256": "0" * 64})
    with pytest.raises(ValueError, match="different datasets"):
        compare(a, other)
    paths = {**write_scorecard(a, tmp_path / "out"), **write_comparison(cmp, tmp_path / "out")}
    md = (tmp_path / "out" / "compare-v1-v2.md").read_text(encoding="utf-8")
    assert "McNemar" in md and "| broken | r3 |" in md and "Which categories changed" in md
    for p in paths.values():
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- runner ------------------------------------------------------------------------------------


def test_requests_are_rendered_exactly_like_production(example_spec: PromptSpec, tmp_path: Path) -> None:
    version = _version(example_spec)
    rows = [_row("p-1", title="Lamp"), _row("p-2", locale="zh-CN", title="台灯")]
    backend = CountingBackend()
    _run([version], rows, backend, tmp_path / "cache", priority=7)
    by_title = {("台灯" if "台灯" in r.messages[-1]["content"] else "Lamp"): r for r in backend.requests}
    for row in rows:
        sent = by_title[row.title]
        _, expected = ModerationPipeline.build_chat(version, row.variables(), row.locale,
                                                    request_id="x", priority=7)
        assert sent.messages == expected.messages and sent.regex == example_spec.verdict.regex()
        assert (sent.model, sent.max_tokens, sent.priority) == (expected.model, expected.max_tokens, 7)
        assert sent.request_id and sent.request_id.startswith("eval-")
    assert "内容审核员" in by_title["台灯"].messages[0]["content"]  # the zh-CN variant


def test_second_run_is_served_from_the_cache(example_spec: PromptSpec, tmp_path: Path) -> None:
    v1, v2 = _version(example_spec, 1), _version(example_spec, 2, marker="v2")
    rows = [_row(f"c-{i}", title=f"title {i};") for i in range(12)]
    first = CountingBackend({"title 3;": _verdict("block", "adult")})
    results = _run([v1, v2], rows, first, tmp_path / "cache")
    assert first.calls == 24 and not any(r.cached for r in results)
    again = CountingBackend()
    cached = _run([v1, v2], rows, again, tmp_path / "cache")
    assert again.calls == 0 and all(r.cached for r in cached)
    key = [(r.version, r.item_id, r.decision, r.category, r.confidence) for r in results]
    assert [(r.version, r.item_id, r.decision, r.category, r.confidence) for r in cached] == key
    # use_cache=False asks again
    fresh = CountingBackend()
    _run([v1], rows, fresh, tmp_path / "cache", use_cache=False)
    assert fresh.calls == 12


def test_interrupted_run_computes_only_the_rest(example_spec: PromptSpec, tmp_path: Path) -> None:
    version = _version(example_spec)
    rows = [_row(f"i-{i}") for i in range(10)]
    cache = tmp_path / "cache"

    class Stalls(CountingBackend):
        async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
            if self.calls >= 5:
                await asyncio.Event().wait()  # hangs, like an engine that stopped answering
            return await super().chat(request, timeout_s=timeout_s)

    async def interrupted() -> None:
        task = asyncio.create_task(run_eval([version], rows, Stalls(), concurrency=1, cache_dir=cache,
                                            timeout_s=60.0, progress=False))
        path = cache_path(cache, version)
        deadline = time.monotonic() + 60  # a guard against a hang only
        while not path.exists() or len(path.read_text().splitlines()) < 5:
            assert time.monotonic() < deadline, "the evaluation cached fewer than 5 rows in 60 s"
            await asyncio.sleep(0.01)
        task.cancel()  # what Ctrl-C does to the running evaluation
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    path = cache_path(cache, version)
    assert len(path.read_text().splitlines()) == 5
    with path.open("a") as fh:
        fh.write('{"input_hash": "torn')  # killed mid-write: a torn last line
    rest = CountingBackend()
    results = _run([version], rows, rest, cache)
    assert rest.calls == 5 and sum(r.cached for r in results) == 5
    assert all(r.decision == "allow" for r in results)
    third = CountingBackend()
    _run([version], rows, third, cache)
    assert third.calls == 0


def test_backend_errors_are_errors_never_allow_and_not_cached(example_spec: PromptSpec, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    version = _version(example_spec)
    rows = [_row(f"e-{i}", "block", "counterfeit", title=f"err {i};") for i in range(6)]

    def fail(request: ChatRequest) -> Exception | None:
        user = request.messages[-1]["content"]
        if "err 0;" in user:
            return BackendUnavailable("connection refused")
        if "err 1;" in user:
            return RuntimeError("unexpected")
        return None

    class Slow(CountingBackend):
        async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
            if "err 2;" in request.messages[-1]["content"]:
                await asyncio.sleep(10)  # ignores its deadline
            return await super().chat(request, timeout_s=timeout_s)

    monkeypatch.setattr(runner_mod, "_GRACE_S", 0.0)
    backend = Slow({f"err {i};": _verdict("block", "counterfeit") for i in range(6)}, fail=fail)
    results = {r.item_id: r for r in _run([version], rows, backend, tmp_path / "cache", timeout_s=0.2)}
    assert results["e-0"].error_type == "BackendUnavailable"
    assert results["e-1"].error_type == "RuntimeError"
    assert results["e-2"].error_type == "TimeoutError"
    for i in range(3):
        r = results[f"e-{i}"]
        assert r.decision is None and r.category is None and r.error
    assert all(results[f"e-{i}"].decision == "block" for i in range(3, 6))
    sc = build_scorecard(version, Dataset(rows=tuple(rows)), list(results.values()))
    assert sc.rates["error"].count == 3
    assert sc.overall.flagged.fp == 0 and sc.overall.flagged.fn == 3  # misses, not allows
    assert len(cache_path(tmp_path / "cache", version).read_text().splitlines()) == 3
    retry = CountingBackend({f"err {i};": _verdict("block", "counterfeit") for i in range(6)})
    again = _run([version], rows, retry, tmp_path / "cache")
    assert retry.calls == 3 and all(r.decision == "block" and r.error_type is None for r in again)


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def eval_config(tmp_path: Path, example_spec: PromptSpec) -> Path:
    from gateway.config import load_config
    from gateway.stores import open_store
    from prompt_registry.loader import seed_store

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(path)
    store = open_store(cfg)
    try:
        seed_store(store, ROOT / "configs" / "prompts")  # v1
        store.publish(_version(example_spec, 2, marker="STRICT").spec, actor="test")  # v2
    finally:
        store.close()
    return path


def _oracle(error_rate_by_version: dict[str, float]) -> Callable[[ChatRequest], str]:
    """Answers the gold verdict, wrong on a stable share of items that depends on the version."""
    rows = load_dataset(SAMPLE).rows

    def respond(request: ChatRequest) -> str:
        system, user = request.messages[0]["content"], request.messages[-1]["content"]
        marker = "v2" if system.startswith("STRICT") else "v1"
        for row in rows:
            if json.dumps({"title": row.title, "description": row.description},
                          ensure_ascii=False) in user:
                rng = random.Random(f"{marker}:{row.item_id}")
                if rng.random() < error_rate_by_version[marker]:
                    return _verdict("allow", "none") if row.gold_flagged else _verdict("block", "adult")
                return _verdict(row.gold_decision, row.gold_category)
        return "not a verdict"
    return respond


def test_cli_run_end_to_end_with_an_injected_backend(eval_config: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    backends: list[CountingBackend] = []

    def make(cfg: object) -> CountingBackend:
        b = CountingBackend()
        b.responder = _oracle({"v1": 0.3, "v2": 0.1})
        backends.append(b)
        return b

    monkeypatch.setattr(eval_cli, "make_backend", make)
    runner = CliRunner()
    args = ["run", "--config", str(eval_config), "--prompt", "listing-moderation", "--version", "1",
            "--version", "2", "--dataset", str(SAMPLE), "--concurrency", "8"]
    result = runner.invoke(eval_cli.eval_app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    n = len(load_dataset(SAMPLE))
    assert backends[0].calls == 2 * n
    assert "listing-moderation v1 on" in result.output and "McNemar exact p =" in result.output
    assert "counterfeit" in result.output and "macro F1" in result.output
    out = tmp_path / "data" / "eval" / "listing-moderation" / load_dataset(SAMPLE).sha256[:12]
    for name in ("v1.json", "v1.md", "v1-pr.png", "v1-confusion.png", "v2.json", "v2.md", "v2-pr.png",
                 "v2-confusion.png", "compare-v1-v2.json", "compare-v1-v2.md", "compare-v1-v2-pr.png"):
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    cmp = json.loads((out / "compare-v1-v2.json").read_text())
    assert cmp["fixed"] > cmp["broken"] and cmp["mcnemar_p"] < 0.05
    assert "fixed" in (out / "compare-v1-v2.md").read_text(encoding="utf-8")
    v2 = json.loads((out / "v2.json").read_text())
    assert v2["overall"]["accuracy"] > json.loads((out / "v1.json").read_text())["overall"]["accuracy"]

    # Same command again: everything from the cache, nothing sent to the model.
    again = runner.invoke(eval_cli.eval_app, [*args, "--json"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert backends[1].calls == 0
    summary = json.loads(again.output)
    assert [s["cached"] for s in summary["scorecards"]] == [n, n]
    assert summary["comparisons"][0]["b"] == 2

    shown = runner.invoke(eval_cli.eval_app, ["show", "--config", str(eval_config), "--prompt",
                                              "listing-moderation", "--version", "2", "--dataset",
                                              str(SAMPLE_CSV)], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "listing-moderation v2 on" in shown.output and "v2.md" in shown.output


def test_cli_refuses_invalid_datasets_before_calling_the_model(eval_config: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    backend = CountingBackend()
    monkeypatch.setattr(eval_cli, "make_backend", lambda cfg: backend)
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,title,locale,gold_decision,gold_category\n"
                   "x-1,Lamp,en-US,allow,none\n"
                   "x-2,Knife,en-US,block,weapons\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(eval_cli.eval_app, ["run", "--config", str(eval_config), "--prompt",
                                               "listing-moderation", "--version", "1", "--dataset",
                                               str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:3: gold_category: 'weapons' is not a category of the prompt" in result.output
    assert backend.calls == 0
    checked = runner.invoke(eval_cli.eval_app, ["validate", str(SAMPLE)])
    assert checked.exit_code == 0 and checked.output.startswith(
        f"ok: {len(load_dataset(SAMPLE))} rows, sha256 {load_dataset(SAMPLE).sha256}")
    bad.write_text("item_id,title,locale,gold_decision,gold_category\nx 1,,en-US,allow,none\n",
                   encoding="utf-8")
    checked = runner.invoke(eval_cli.eval_app, ["validate", str(bad)])
    assert checked.exit_code == 1
    assert f"{bad}:2: item_id:" in checked.output and f"{bad}:2: title: required" in checked.output


def test_changing_only_the_promotion_criteria_reuses_cached_answers(example_spec: PromptSpec,
                                                                   tmp_path: Path) -> None:
    from prompt_registry.models import EvaluationSpec

    v1 = _version(example_spec, 1)
    gated = example_spec.model_copy(update={"evaluation": EvaluationSpec.model_validate({
        "dataset": {"sha256": "0" * 64}, "criteria": [{"metric": "parse_failure_rate", "max": 0.02}]})})
    v2 = PromptVersion(spec=gated, version=2, content_hash=gated.content_hash(),
                       created_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert v1.content_hash != v2.content_hash  # a new version in the registry ...
    rows = [_row(f"g-{i}") for i in range(4)]
    first = CountingBackend()
    _run([v1], rows, first, tmp_path / "cache")
    again = CountingBackend()
    results = _run([v2], rows, again, tmp_path / "cache")
    assert again.calls == 0 and all(r.cached for r in results)  # ... with the same answers
