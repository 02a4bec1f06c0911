"""Calibrated verdict probabilities from token log-probabilities, and operating points.

The maths is checked on hand-built token sequences whose answers are worked out in the
comments; the backends on the OpenAI wire shape (vLLM's `logprobs.content`) and the fake's
own tokens; the serve-time rule end to end through /v1/moderate and the decision log.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog
from gateway.quality.decisions import read_segments
from gateway.quality.evaluation.calibration import calibration, proposals_yaml, propose, reliability
from gateway.quality.evaluation.scorecard import ItemOutcome
from gateway.verdict import ChoiceScores, Verdict, apply_thresholds, parse_verdict, score_field
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.models import OperatingPoint, PromptSpec, VerdictSchema
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from serving.http_backend import OpenAIHttpBackend, build_chat_body, parse_logprobs
from serving.protocol import ChatRequest, ChatResult, TokenLogprob
from tests.handler_server import HandlerServer

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = VerdictSchema(decisions=["allow", "block", "needs_review"],
                       categories=["none", "counterfeit", "adult"], confidence=False)
HEAD = '{"decision":"'
L = math.log


def T(token: str, p: float, *alts: tuple[str, float]) -> TokenLogprob:  # noqa: N802
    return TokenLogprob(token=token, logprob=L(p), top=tuple((a, L(q)) for a, q in alts))


def _tokens(decision: TokenLogprob, category: TokenLogprob, tail: str = '"}') -> list[TokenLogprob]:
    return [T(HEAD, 1.0), decision, T('","category":"', 1.0), category, T(tail, 1.0)]


def _text(tokens: list[TokenLogprob]) -> str:
    return "".join(t.token for t in tokens)


# -- the maths ---------------------------------------------------------------------------------


def test_single_token_values_renormalise_over_the_allowed_ones() -> None:
    # decision position: block .6, allow .2, a forbidden "yes" .15, rest .05 unlisted.
    # Allowed listed mass .8 + unlisted .05 = .85: block .6/.85, allow .2/.85, unresolved .05/.85.
    toks = _tokens(T("block", .6, ("block", .6), ("allow", .2), ("yes", .15)),
                   T("adult", .9, ("adult", .9), ("none", .1)))
    v = parse_verdict(_text(toks), "stop", SCHEMA, logprobs=toks)
    s = v.decision_scores
    assert s is not None
    assert s.attributed == pytest.approx({"block": .6 / .85, "allow": .2 / .85, "needs_review": 0.0})
    assert s.unresolved == pytest.approx(.05 / .85)
    assert not s.exact
    # point estimate from what was resolved: .6 / .8
    assert v.decision_probability == pytest.approx(.75, abs=1e-6)
    assert s.bounds("block") == pytest.approx((.6 / .85, .65 / .85))
    assert v.category_probability == pytest.approx(.9) and v.category_scores is not None
    assert v.category_scores.exact


def test_engine_masked_alternatives_give_an_exact_distribution() -> None:
    # vLLM masks forbidden tokens to -inf (sent as -9999.0) before computing logprobs.
    dec = TokenLogprob("allow", L(.7), (("allow", L(.7)), ("needs", L(.2)), ("block", L(.1)),
                                        ("x", -9999.0)))
    toks = [T(HEAD, 1.0), dec, T("\",\"category\":\"", 1.0), T("none", 1.0, ("none", 1.0)), T('"}', 1.0)]
    s = score_field(toks, _text(toks), len(HEAD), "allow", SCHEMA.decisions)
    assert s is not None and s.exact
    assert s.attributed == pytest.approx({"allow": .7, "needs_review": .2, "block": .1})


def test_multi_token_values_follow_the_generated_path_through_the_shared_prefix() -> None:
    # allowed: allow, needs_review, needs_escalation. Token 1: "need" .6 (shared by two values),
    # "allow" .3, forbidden "xyz" .05, .05 unlisted: denominator .95.
    # allow = .3/.95; unresolved .05/.95; path weight .6/.95.
    # Token 2 "s_" is certain. Token 3: "review" .75, "esc" .25: needs_review = .6/.95 * .75,
    # needs_escalation = .6/.95 * .25.
    allowed = ["allow", "needs_review", "needs_escalation"]
    toks = [T(HEAD, 1.0), T("need", .6, ("need", .6), ("allow", .3), ("xyz", .05)),
            T("s_", 1.0, ("s_", 1.0)), T("review", .75, ("review", .75), ("esc", .25)), T('"', 1.0)]
    s = score_field(toks, _text(toks), len(HEAD), "needs_review", allowed)
    assert s is not None
    assert s.attributed == pytest.approx({"allow": .3 / .95, "needs_review": .6 / .95 * .75,
                                          "needs_escalation": .6 / .95 * .25})
    assert s.unresolved == pytest.approx(.05 / .95)


def test_a_shared_alternative_off_the_generated_path_stays_unresolved() -> None:
    # "n" (.2) could begin needs_review or needs_escalation; the engine did not say which.
    allowed = ["allow", "needs_review", "needs_escalation"]
    toks = [T(HEAD, 1.0), T("allow", .8, ("allow", .8), ("n", .2)), T('"', 1.0)]
    s = score_field(toks, _text(toks), len(HEAD), "allow", allowed)
    assert s is not None
    assert s.attributed == pytest.approx({"allow": .8, "needs_review": 0.0, "needs_escalation": 0.0})
    assert s.unresolved == pytest.approx(.2)
    assert s.bounds("needs_review") == pytest.approx((0.0, .2))


def test_a_token_straddling_the_value_start_and_a_value_that_prefixes_another() -> None:
    # ":"block" style merge: the token carries the opening quote; "block" vs "block_hard" differ
    # only at the closing quote, decided by the token after.
    allowed = ["allow", "block", "block_hard"]
    text = '{"decision":"block"}'
    toks = [T('{"decision":', 1.0), T('"block', .9, ('"block', .9), ('"allow', .1)),
            T('"}', .7, ('"}', .7), ("_hard", .3))]
    s = score_field(toks, text, len(HEAD), "block", allowed)
    assert s is not None and s.exact
    assert s.attributed == pytest.approx({"allow": .1, "block": .9 * .7, "block_hard": .9 * .3})


def test_a_stop_token_after_the_answer_is_not_part_of_it() -> None:
    # vLLM lists the stop token (here the tiny model's <|end|>) among the generated tokens.
    toks = _tokens(T("block", .6, ("block", .6), ("allow", .4)), T("adult", 1.0))
    v = parse_verdict(_text(toks), "stop", SCHEMA, logprobs=[*toks, T("<|end|>", 1.0)])
    assert v.decision_probability == pytest.approx(.6)


def test_unusable_token_streams_give_no_probability() -> None:
    toks = _tokens(T("block", .6, ("block", .6)), T("adult", 1.0))
    text = _text(toks)
    assert parse_verdict(text, "stop", SCHEMA, logprobs=toks[:-1]).decision_scores is None  # do not spell the text
    assert parse_verdict(text, "stop", SCHEMA).decision_probability is None  # no logprobs at all
    zero = _tokens(TokenLogprob("block", -math.inf, ()), T("adult", 1.0))
    assert parse_verdict(_text(zero), "stop", SCHEMA, logprobs=zero).decision_scores is None
    spaced = '{"decision": "block","category":"adult"}'
    assert parse_verdict(spaced, "stop", SCHEMA, logprobs=[T(spaced, 1.0)]).decision_scores is None


def test_probabilities_never_change_a_verdict_or_its_failure() -> None:
    toks = _tokens(T("allow", .01, ("allow", .01), ("block", .99)), T("none", 1.0))
    v = parse_verdict(_text(toks), "stop", SCHEMA, logprobs=toks)
    assert (v.decision, v.decided_by) == ("allow", "model")
    assert v.decision_probability == pytest.approx(.01)
    broken = parse_verdict(_text(toks)[:-1], "stop", SCHEMA, logprobs=toks)
    assert (broken.decision, broken.fail_reason, broken.decided_by) == (
        "needs_review", "unparseable_output", "fail_closed")
    assert broken.decision_probability is None


# -- operating points --------------------------------------------------------------------------

POINT = {"counterfeit": OperatingPoint(block_at=.8, review_at=.3)}


def _scored(decision: str, category: str, p_block: float, unresolved: float = 0.0) -> Verdict:
    rest = 1.0 - p_block - unresolved
    scores = ChoiceScores({"block": p_block, "allow": rest, "needs_review": 0.0}, unresolved)
    return Verdict(decision, category, None, decision_scores=scores)


@pytest.mark.parametrize(("p_block", "unresolved", "expected"), [
    (.8, 0.0, "block"), (.95, 0.0, "block"), (.79, 0.0, "needs_review"), (.3, 0.0, "needs_review"),
    (.29, 0.0, "allow"), (0.0, 0.0, "allow"),
    (.75, .1, "needs_review"),   # may be .85 or .75: not proven above block_at
    (.2, .05, "allow"),          # at most .25 < .3
    (.2, .15, "needs_review"),   # may reach .35
])
def test_operating_point_bands_on_the_bounds(p_block: float, unresolved: float, expected: str) -> None:
    for model_said in ("allow", "block", "needs_review"):
        v = apply_thresholds(_scored(model_said, "counterfeit", p_block, unresolved), POINT)
        assert (v.decision, v.decided_by, v.model_decision) == (expected, "threshold", model_said)


def test_categories_without_a_point_and_failures_stay_with_the_model() -> None:
    v = _scored("allow", "adult", .99)
    assert apply_thresholds(v, POINT) == v
    failed = Verdict("needs_review", None, None, fail_reason="invalid_verdict", decided_by="fail_closed")
    assert apply_thresholds(failed, POINT) == failed


def test_no_probability_fails_closed_only_where_the_model_allowed() -> None:
    allowed = apply_thresholds(Verdict("allow", "counterfeit", .9), POINT)
    assert (allowed.decision, allowed.decided_by, allowed.model_decision) == (
        "needs_review", "fail_closed", "allow")
    for decision in ("block", "needs_review"):
        v = Verdict(decision, "counterfeit", .9)
        assert apply_thresholds(v, POINT) == v


def _spec(**thresholds: dict[str, float]) -> PromptSpec:
    data = yaml.safe_load((ROOT / "configs/prompts/listing-moderation.yaml").read_text())
    if thresholds:
        data["thresholds"] = thresholds
    return PromptSpec.model_validate(data)


def test_thresholds_are_validated_against_the_schema() -> None:
    with pytest.raises(ValidationError, match="review_at"):
        _spec(counterfeit={"block_at": .3, "review_at": .5})
    with pytest.raises(ValidationError, match="not a violation category"):
        _spec(spam={"block_at": .9, "review_at": .5})
    with pytest.raises(ValidationError, match="not a violation category"):
        _spec(none={"block_at": .9, "review_at": .5})
    with pytest.raises(ValidationError):
        _spec(counterfeit={"block_at": 1.2, "review_at": .5})
    data = _spec().model_dump()
    data["verdict"]["decisions"] = ["allow", "needs_review"]
    data["thresholds"] = {"adult": {"block_at": .9, "review_at": .1}}
    with pytest.raises(ValidationError, match="lacks block"):
        PromptSpec.model_validate(data)


def test_thresholds_ship_with_the_version_but_do_not_change_cached_answers() -> None:
    plain, with_points = _spec(), _spec(counterfeit={"block_at": .9, "review_at": .4})
    other = _spec(counterfeit={"block_at": .95, "review_at": .4})
    assert len({plain.content_hash(), with_points.content_hash(), other.content_hash()}) == 3
    assert plain.answer_hash() == with_points.answer_hash() == other.answer_hash()
    # a version without thresholds hashes as before they existed
    data = plain.model_dump(mode="json")
    data["policy"].pop("change_note")
    data["policy"].pop("author")
    assert data.pop("thresholds") is None and data["evaluation"] is not None
    assert data.pop("reasoning") is None and data.pop("cascade") is None  # other optional blocks
    assert plain.content_hash() == hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- backends ----------------------------------------------------------------------------------


REQ = ChatRequest(model="m", messages=[{"role": "user", "content": "a listing"}], max_tokens=64,
                  regex=SCHEMA.regex(), top_logprobs=20)


def _vllm_logprobs(tokens: list[TokenLogprob]) -> dict:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
                         "top_logprobs": [{"token": a, "logprob": lp, "bytes": None} for a, lp in t.top]}
                        for t in tokens]}


def _http_chat(tokens: list[TokenLogprob], seen: dict) -> ChatResult:
    def handler(req: httpx.Request) -> httpx.Response:
        seen["body"] = orjson.loads(req.content)
        return httpx.Response(200, json={
            "model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": len(tokens)},
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"content": _text(tokens)},
                         "logprobs": _vllm_logprobs(tokens)}]})

    async def go() -> ChatResult:
        async with HandlerServer(handler) as server:
            backend = OpenAIHttpBackend(server.base_url)
            try:
                return await backend.chat(REQ, timeout_s=5)
            finally:
                await backend.aclose()
    return asyncio.run(go())


def _fake_chat(request: ChatRequest = REQ) -> ChatResult:
    return asyncio.run(FakeBackend().chat(request, timeout_s=5))


@pytest.mark.parametrize("backend", ["http", "fake"])
def test_backend_contract_logprobs_spell_the_text_and_score_the_verdict(backend: str) -> None:
    """Both backends: asked for log-probabilities, the tokens spell the text exactly and the
    generated token is among the alternatives; the verdict gets probabilities."""
    seen: dict = {}
    reference = _fake_chat()
    result = _http_chat(list(reference.logprobs or ()), seen) if backend == "http" else reference
    assert result.logprobs is not None
    assert _text(list(result.logprobs)) == result.text
    assert all(any(a == t.token for a, _ in t.top) for t in result.logprobs)
    v = parse_verdict(result.text, result.finish_reason, SCHEMA, logprobs=result.logprobs)
    assert v.decision_scores is not None and v.decision_scores.exact
    assert v.category_scores is not None and v.category_scores.exact
    assert v.decision_probability == max(v.decision_scores.attributed.values())  # greedy
    if backend == "http":
        assert (seen["body"]["logprobs"], seen["body"]["top_logprobs"]) == (True, 20)


def test_no_logprobs_asked_none_returned() -> None:
    assert "logprobs" not in build_chat_body(ChatRequest(model="m", messages=[], max_tokens=8))
    plain = ChatRequest(model="m", messages=REQ.messages, max_tokens=64, regex=SCHEMA.regex())
    assert _fake_chat(plain).logprobs is None
    assert _fake_chat(plain).text == _fake_chat().text


def test_fake_top_k_is_truncated_like_an_engine_and_the_missing_mass_is_bounded() -> None:
    result = _fake_chat(ChatRequest(model="m", messages=REQ.messages, max_tokens=64,
                                    regex=SCHEMA.regex(), top_logprobs=1))
    v = parse_verdict(result.text, "stop", SCHEMA, logprobs=result.logprobs)
    s = v.decision_scores
    assert s is not None and not s.exact
    p = v.decision_probability
    assert p == 1.0  # from what is present: only the generated value
    lo, hi = s.bounds(v.decision) or (0, 0)
    assert lo < 1.0 == pytest.approx(hi)


@pytest.mark.parametrize("block", [None, [], {"content": None}, {"content": [{"token": 1, "logprob": 0}]},
                                   {"content": [{"token": "a"}]}, {"content": [{"token": "a", "logprob": True}]}])
def test_malformed_logprobs_are_dropped_not_fatal(block: object) -> None:
    assert parse_logprobs(block) is None


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def thresholded(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """The shipped prompt with an operating point at 0 for every violation category: any
    verdict in one is blocked by the threshold."""
    data = yaml.safe_load((ROOT / "configs/prompts/listing-moderation.yaml").read_text())
    cats = [c for c in data["verdict"]["categories"] if c != "none"]
    data["thresholds"] = {c: {"block_at": 0.0, "review_at": 0.0} for c in cats}
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.yaml").write_text(yaml.safe_dump(data))
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, tmp_path / "prompts")
    key, record = generate_key("svc", ["moderate"], created_by="test")
    store.put_key(record)
    log = DecisionLog(tmp_path / "decisions", replica="gw-0")
    app = create_app(GatewaySettings(), store, FakeBackend(), decision_log=log)
    with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
        yield client, tmp_path / "decisions"
    store.close()


def test_thresholds_decide_at_serve_time_and_are_recorded(thresholded: tuple[TestClient, Path]) -> None:
    client, log_dir = thresholded
    bodies = []
    for i in range(12):
        r = client.post("/v1/moderate", json={"item_id": f"it-{i}", "title": f"listing {i}",
                                              "description": "d"})
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    by_threshold = [b for b in bodies if b["category"] != "none"]
    by_model = [b for b in bodies if b["category"] == "none"]
    assert by_threshold and by_model  # the fake's hash gives both kinds over 12 listings
    assert all(b["decision"] == "block" and b["decided_by"] == "threshold" for b in by_threshold)
    assert all(b["decided_by"] == "model" for b in by_model)
    assert all(0.5 <= b["decision_probability"] <= 0.99 for b in bodies)
    assert all(b["category_probability"] is not None and b["confidence"] is not None for b in bodies)
    client.portal.call(client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
    records = {r.item_id: r for r in read_segments(log_dir)}
    for b in bodies:
        rec = records[b["item_id"]]
        assert (rec.decision, rec.decided_by, rec.decision_probability) == (
            b["decision"], b["decided_by"], b["decision_probability"])
        assert rec.probability_unresolved == 0.0 and rec.block_probability is not None
        if b["decided_by"] == "threshold":
            assert rec.model_decision in {"allow", "block", "needs_review"}


# -- evaluation: reliability, ECE and proposed operating points ----------------------------------

Z = 1.959963984540054


def wilson_low(k: int, n: int) -> float:
    """The 95% Wilson lower bound, written out (an independent check of the library's)."""
    p = k / n
    centre = p + Z * Z / (2 * n)
    spread = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return (centre - spread) / (1 + Z * Z / n)


def _item(i: int, *, category: str = "counterfeit", block_p: float | None = None, positive: bool = False,
          p: float | None = None, confidence: float | None = None, right: bool = True,
          **kw: object) -> ItemOutcome:
    gold = ("block", "counterfeit") if positive else ("allow", "none")
    decision = gold[0] if right else ("allow" if gold[0] == "block" else "block")
    base = dict(item_id=f"i{i}", locale="en-US", gold_decision=gold[0], gold_category=gold[1],
                gold_label=gold[1], decision=decision, category=category, confidence=confidence,
                predicted_label=category, correct=right, fail_reason=None, error_type=None,
                decision_probability=p, block_probability=block_p)
    base.update(kw)
    return ItemOutcome(**base)  # type: ignore[arg-type]


def test_reliability_bins_and_ece_by_hand() -> None:
    # bins [0,.1): (.05 wrong) gap .05; [.1,.2): .15 right + .15 wrong, acc .5, gap .35 each;
    # [.9,1]: .95 right, .95 right, 1.0 wrong: mean .9667, acc .6667, gap .3 each.
    # ECE = (.05 + 2*.35 + 3*.3) / 6 = .275
    pairs = [(.05, False), (.15, False), (.15, True), (.95, True), (.95, True), (1.0, False)]
    rel = reliability(pairs)
    assert rel.ece == pytest.approx(.275)
    assert [b.n for b in rel.bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 3]
    assert rel.bins[9].accuracy == pytest.approx(2 / 3) and rel.bins[9].mean_p == pytest.approx(2.9 / 3)
    assert reliability([(.75, True), (.75, True), (.75, True), (.75, False)]).ece == pytest.approx(0.0)
    assert reliability([]).ece is None
    with pytest.raises(ValueError):
        reliability([(1.5, True)])


def test_calibration_of_both_numbers_leaves_out_items_without_one() -> None:
    items = [_item(0, p=.9, confidence=.6), _item(1, p=.9, confidence=.6, right=False),
             _item(2, p=None, confidence=.6),
             _item(3, p=.9, confidence=.6, error_type="BackendTimeout", decision=None)]
    cal = calibration(items)
    assert (cal["decision_probability"].n, cal["decision_probability"].left_out) == (2, 2)
    assert cal["decision_probability"].ece == pytest.approx(.4)   # .9 said, .5 right
    assert (cal["confidence"].n, cal["confidence"].ece) == (3, pytest.approx(abs(.6 - 2 / 3)))
    # a threshold's decision is not the model's: calibration judges the generated one
    flipped = _item(4, p=.8, decision="needs_review", model_decision="allow", decided_by="threshold")
    assert calibration([flipped])["decision_probability"].ece == pytest.approx(.2)


def test_proposed_operating_point_on_a_known_curve() -> None:
    # block probability, positive?: .9 T, .8 T, .7 T, .6 F, .5 T, .4 F, .3 F, .2 F
    # Blocking at .7: 3/3, Wilson lower 3/(3+z^2) = .4385 >= .4; at .8 (2/2) .342, at .5 (4/5)
    # .3755, at .6 (3/4) .3006: so block_at = .7, coverage 3/8.
    # Allowing below .5 (.4, .3, .2 all negative): 3/3 -> .4385; below .6: 3/4; below .7: 4/5.
    marks = [(.9, True), (.8, True), (.7, True), (.6, False), (.5, True), (.4, False), (.3, False), (.2, False)]
    items = [_item(i, block_p=s, positive=pos) for i, (s, pos) in enumerate(marks)]
    noise = [_item(20, category="adult", block_p=.99), _item(21, block_p=None),
             _item(22, block_p=.99, fail_reason="invalid_verdict"),
             _item(23, block_p=.99, error_type="BackendTimeout")]
    (p,) = propose(items + noise, ["counterfeit"], target=.4)
    assert (p.population, p.positives) == (8, 4)
    assert [c.threshold for c in p.curve] == [.9, .8, .7, .6, .5, .4, .3, .2]
    for c in p.curve:
        assert c.precision_low == pytest.approx(wilson_low(c.positives, c.selected))
    assert p.block_at == .7 and p.block_point is not None
    assert (p.block_point.selected, p.block_point.coverage) == (3, 3 / 8)
    assert p.block_point.precision_low == pytest.approx(3 / (3 + Z * Z))
    assert (p.review_at, p.allow_selected) == (.5, 3)
    assert p.allow_precision_low == pytest.approx(wilson_low(3, 3))
    # unreachable target: nothing proposed
    (none,) = propose(items, ["counterfeit"], target=.95)
    assert none.block_at is None and none.review_at is None


def test_ties_are_one_threshold_and_no_allow_band_means_review_at_zero() -> None:
    items = [_item(0, block_p=.8, positive=True), _item(1, block_p=.8, positive=True),
             _item(2, block_p=.8, positive=True), _item(3, block_p=.8, positive=True),
             _item(4, block_p=.1, positive=True)]
    (p,) = propose(items, ["counterfeit"], target=.5)
    assert [(c.threshold, c.selected) for c in p.curve] == [(.8, 4), (.1, 5)]
    assert p.block_at == .1  # 5/5 has the higher lower bound and the most coverage
    assert p.review_at == 0.0 and p.allow_precision_low is None


def test_the_yaml_snippet_is_a_valid_thresholds_block() -> None:
    marks = [(.9, True), (.8, True), (.7, True), (.6, False), (.5, True), (.4, False), (.3, False), (.2, False)]
    items = [_item(i, block_p=s, positive=pos) for i, (s, pos) in enumerate(marks)]
    proposals = propose(items, ["counterfeit", "adult"], target=.4)
    snippet = proposals_yaml(proposals, target=.4, source="test")
    block = yaml.safe_load(snippet)
    assert block == {"thresholds": {"counterfeit": {"block_at": .7, "review_at": .5}}}
    assert "# adult: not proposed" in snippet
    spec = _spec(**block["thresholds"])
    assert spec.thresholds == {"counterfeit": OperatingPoint(block_at=.7, review_at=.5)}
    nothing = proposals_yaml(propose(items, ["adult"], target=.4), target=.4, source="test")
    assert yaml.safe_load(nothing) is None


def test_eval_run_then_thresholds_from_the_cli(tmp_path: Path) -> None:
    """`modgate eval run` against the fake engine writes calibration into the scorecard and
    report; `modgate eval thresholds` proposes from it, with its plot and YAML."""
    from typer.testing import CliRunner

    import gateway.cli.eval as eval_cli
    from gateway.config import load_config
    from gateway.stores import open_store

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    store = open_store(load_config(path))
    try:
        seed_store(store, ROOT / "configs" / "prompts")
    finally:
        store.close()
    sample = ROOT / "datasets" / "listings-sample.jsonl"
    common = ["--config", str(path), "--prompt", "listing-moderation", "-v", "1", "--dataset", str(sample)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_cli, "make_backend", lambda cfg: FakeBackend())
        run = CliRunner().invoke(eval_cli.eval_app, ["run", *common, "--json"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    out = Path(orjson.loads(run.stdout)["out_dir"])
    sc = orjson.loads((out / "v1.json").read_bytes())
    cal = sc["calibration"]
    assert cal["decision_probability"]["n"] == cal["confidence"]["n"] == len(sc["items"]) > 100
    assert 0.0 <= cal["decision_probability"]["ece"] <= 1.0
    assert all(0.5 <= i["decision_probability"] <= 0.99 for i in sc["items"])
    assert (out / "v1-reliability.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "v1-coverage.png").read_bytes().startswith(b"\x89PNG")
    md = (out / "v1.md").read_text()
    assert "## Calibration" in md and "calibrated (log-probabilities)" in md

    r = CliRunner().invoke(eval_cli.eval_app, ["thresholds", *common, "--target-precision", "0.5",
                                               "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = orjson.loads(r.stdout)
    assert {c["category"] for c in got["categories"]} == set(sc["categories"])
    assert Path(got["paths"]["png"]).read_bytes().startswith(b"\x89PNG")
    assert Path(got["paths"]["yaml"]).read_text() == got["yaml"]
    block = yaml.safe_load(got["yaml"]) or {}
    _spec(**(block.get("thresholds") or {}))  # pastes into the prompt file as it is
    text = CliRunner().invoke(eval_cli.eval_app, ["thresholds", *common], catch_exceptions=False)
    assert text.exit_code == 0 and "block_at" in text.stdout and "# target:" in text.stdout
    missing = CliRunner().invoke(eval_cli.eval_app, ["thresholds", *common[:-4], "-v", "9", "--dataset",
                                                     str(sample)])
    assert missing.exit_code == 2 and "eval run" in missing.output
