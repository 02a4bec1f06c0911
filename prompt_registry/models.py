"""Prompt version model: what a prompt-ops specialist publishes and the gateway serves.

Internal models are strict (unknown keys are errors) and frozen (a published version never
changes). A `PromptSpec` is what a file declares; a `PromptVersion` is a spec the store has
numbered. The verdict schema turns into the exact output shape the model must produce, as a
JSON schema (for OpenAI-style servers) and as a regular expression with no free whitespace
(for constrained decoding that always yields a parseable verdict, even from a random model).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prompt_registry.locales import match_locale

__all__ = [
    "EACH_CATEGORY",
    "FAIL_CLOSED_DECISION",
    "MAX_VERSION",
    "DatasetRef",
    "EvaluationSpec",
    "CascadeSpec",
    "GateCriterion",
    "LocaleVariant",
    "Message",
    "OperatingPoint",
    "PolicyMeta",
    "PromptSpec",
    "PromptVersion",
    "ReasoningSpec",
    "SamplingParams",
    "VerdictSchema",
]

FAIL_CLOSED_DECISION = "needs_review"
MAX_VERSION = 2**31 - 1  # version numbers on the wire are bounded (stores use 64-bit integers)
_IDENT = r"^[a-z][a-z0-9_]{0,47}$"
_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
PROMPT_NAME_PATTERN = _NAME  # the one rule for prompt names, also checked by the gateway before any lookup


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Strict):
    role: Literal["system", "user"]
    content: str = Field(..., min_length=1)


class SamplingParams(_Strict):
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(64, ge=8, le=1024)
    seed: int | None = None


class ReasoningSpec(_Strict):
    """A model that reasons before it answers (gpt-oss-safeguard: harmony `analysis` channel,
    then the verdict on the `final` channel). The verdict grammar applies to the final answer
    only (vLLM's harmony parser turns the version's regex into a structural tag for the final
    channel), so the reasoning itself is free text bounded by `max_tokens`.

    The request's `max_tokens` becomes this budget plus `sampling.max_tokens` (the verdict's
    own allowance): a model that is still reasoning when the budget runs out stops with
    `finish_reason: length` and the verdict is `needs_review` (`truncated_output`), never a
    guess. The reasoning text (the rationale) is kept in memory with the answer, never in logs,
    spans, metrics or the decision log; the opt-in sample store keeps it with a sampled item's
    listing content (gateway/samples.py)."""

    effort: Literal["low", "medium", "high"] = Field(
        "low", description="sent as `reasoning_effort` (gpt-oss reads it as `Reasoning: <level>` "
        "in its system message); low reasons the shortest")
    max_tokens: int = Field(1024, ge=16, le=32768, description="reasoning budget in tokens; the "
                            "request's max_tokens is this plus sampling.max_tokens")


EscalationTrigger = Literal["needs_review", "low_confidence", "low_margin"]


class CascadeSpec(_Strict):
    """A second, larger model that answers again when the first one is unsure: a
    `needs_review` verdict (including every fail-closed one); with `low_margin`, a verdict
    whose calibrated decision margin (gateway/verdict.py, `Verdict.decision_margin`) is below
    `min_margin`, or that has no calibrated probability at all (escalated as
    `margin_unavailable`: fail closed); with `low_confidence`, a verdict whose self-reported
    confidence is below `min_confidence` (kept for the versions stored with it; prefer
    `low_margin`, which is measured from the model's token probabilities rather than a number
    it writes). The second answer replaces the first; both are recorded in the decision log.
    Part of the version (and its content hash), so a cascade ships, canaries and rolls back
    with the prompt it belongs to."""

    model: str = Field(..., min_length=1, description="the model the escalated call goes to "
                       "(must be served, like the version's own model)")
    escalate_on: list[EscalationTrigger] = Field(
        default_factory=lambda: list[EscalationTrigger](["needs_review"]), min_length=1,
        description="needs_review: the first verdict is needs_review (fail-closed ones "
        "included); low_margin: its calibrated decision margin (probability of the generated "
        "decision minus the next most likely one) is below min_margin, or it has no calibrated "
        "probability (escalated as margin_unavailable); low_confidence: its self-reported "
        "confidence is below min_confidence (prefer low_margin)")
    min_confidence: float | None = Field(None, gt=0, le=1, description="with low_confidence: "
                                         "escalate verdicts whose confidence is below this")
    min_margin: float | None = Field(None, gt=0, le=1, description="with low_margin: escalate "
                                     "verdicts whose calibrated decision margin is below this")
    sampling: SamplingParams | None = Field(None, description="the second model's sampling "
                                            "(default: the version's)")
    reasoning: ReasoningSpec | None = Field(None, description="the second model reasons first "
                                            "(e.g. gpt-oss-safeguard); default: it does not")

    @model_validator(mode="after")
    def _triggers(self) -> CascadeSpec:
        if len(set(self.escalate_on)) != len(self.escalate_on):
            raise ValueError("escalate_on: values must be unique")
        if ("low_confidence" in self.escalate_on) != (self.min_confidence is not None):
            raise ValueError("escalate_on: low_confidence and min_confidence go together "
                             "(give both or neither)")
        if ("low_margin" in self.escalate_on) != (self.min_margin is not None):
            raise ValueError("escalate_on: low_margin and min_margin go together "
                             "(give both or neither)")
        return self


class PolicyMeta(_Strict):
    policy_id: str = Field(..., min_length=1)
    owner: str = Field(..., min_length=1)
    change_note: str = ""
    author: str = ""


class VerdictSchema(_Strict):
    """The structured verdict a prompt asks the model for."""

    decisions: list[str] = Field(..., min_length=2)
    categories: list[str] = Field(..., min_length=1)
    confidence: bool = True

    @field_validator("decisions", "categories")
    @classmethod
    def _identifiers(cls, values: list[str]) -> list[str]:
        for v in values:
            if not re.match(_IDENT, v):
                raise ValueError(f"{v!r} is not a lower_snake_case identifier")
        if len(set(values)) != len(values):
            raise ValueError("values must be unique")
        return values

    @field_validator("decisions")
    @classmethod
    def _fail_closed_target(cls, values: list[str]) -> list[str]:
        if FAIL_CLOSED_DECISION not in values:
            raise ValueError(f"decisions must include {FAIL_CLOSED_DECISION!r} (the fail-closed verdict)")
        return values

    def json_schema(self) -> dict[str, Any]:
        props: dict[str, Any] = {
            "decision": {"type": "string", "enum": list(self.decisions)},
            "category": {"type": "string", "enum": list(self.categories)},
        }
        required = ["decision", "category"]
        if self.confidence:
            props["confidence"] = {"type": "number", "minimum": 0, "maximum": 1}
            required.append("confidence")
        return {"type": "object", "properties": props, "required": required,
                "additionalProperties": False}

    def regex(self) -> str:
        """Exact verdict shape, key order fixed, no whitespace, bounded length. Built once per
        distinct schema: it is on every request's path."""
        return _verdict_regex(tuple(self.decisions), tuple(self.categories), self.confidence)


_LOCALE = r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?$"  # canonical BCP 47 (locales.py)


class LocaleVariant(_Strict):
    """The same policy written for another market/language; same variables and verdict."""

    messages: list[Message] = Field(..., min_length=1)


@lru_cache(maxsize=256)
def _verdict_regex(decisions: tuple[str, ...], categories: tuple[str, ...], confidence: bool) -> str:
    dec = "|".join(re.escape(d) for d in decisions)
    cat = "|".join(re.escape(c) for c in categories)
    out = r'\{"decision":"(' + dec + r')","category":"(' + cat + r')"'
    if confidence:
        out += r',"confidence":(0\.[0-9]{2}|1\.00)'
    return out + r"\}"


EACH_CATEGORY = "*"
AGGREGATES = ("micro", "flagged")  # summed violation categories; flag vs allow
NO_CATEGORY = "none"
Metric = Literal["precision", "recall", "f1", "accuracy", "parse_failure_rate", "error_rate",
                 "needs_review_rate"]
_CATEGORY_METRICS = ("precision", "recall", "f1")
_HIGHER_IS_BETTER = ("precision", "recall", "f1", "accuracy")


class DatasetRef(_Strict):
    """The labelled dataset a prompt is judged on, pinned by its content hash (what
    `modgate eval validate FILE` prints), so a gate always means the same items."""

    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$",
                        description="sha256 of the dataset's canonical content")
    path: str = Field("", description="where the dataset lives (for people and hints only)")


class GateCriterion(_Strict):
    """One condition a version's stored scorecard must meet before it may become production.

    Exactly one of `min`, `max` (absolute thresholds on the value `bound` names: the lower or
    upper end of the 95 % Wilson interval, or the point estimate) or `max_drop_vs_production`
    (the point estimate may be at most this far below the current production version's, on the
    same dataset). `category` is a violation category of the verdict schema, `*` (every
    category, each on its own; categories where the metric is undefined are skipped), `micro`
    or `flagged`; it is required for precision, recall and f1 and not allowed otherwise.
    """

    metric: Metric
    category: str | None = None
    bound: Literal["lower", "estimate", "upper"] = "estimate"
    min: float | None = Field(None, ge=0, le=1)
    max: float | None = Field(None, ge=0, le=1)
    max_drop_vs_production: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _one_condition(self) -> GateCriterion:
        given = [k for k in ("min", "max", "max_drop_vs_production") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of min, max, max_drop_vs_production"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.metric in _CATEGORY_METRICS and self.category is None:
            raise ValueError(f"{self.metric} needs a category (a category name, '*', 'micro' "
                             "or 'flagged')")
        if self.metric not in _CATEGORY_METRICS and self.category is not None:
            raise ValueError(f"{self.metric} is not per category; remove 'category'")
        if self.metric == "f1" and self.bound != "estimate":
            raise ValueError("f1 has no interval; use bound: estimate")
        if self.max_drop_vs_production is not None:
            if self.metric not in _HIGHER_IS_BETTER:
                raise ValueError("max_drop_vs_production applies to precision, recall, f1 and "
                                 "accuracy")
            if self.bound != "estimate":
                raise ValueError("max_drop_vs_production compares point estimates; use bound: "
                                 "estimate")
        return self

    def describe(self) -> str:
        what = self.metric.replace("_", " ")
        if self.category is not None:
            what = f"{self.category} {what}"
        if self.max_drop_vs_production is not None:
            return f"{what} at most {self.max_drop_vs_production:.3f} below production"
        side = {"lower": " lower bound", "upper": " upper bound", "estimate": ""}[self.bound]
        if self.min is not None:
            return f"{what}{side} >= {self.min:.3f}"
        return f"{what}{side} <= {self.max:.3f}"


class OperatingPoint(_Strict):
    """A category's operating point on the calibrated block probability (the engine's
    token log-probabilities at the verdict's decision, renormalised over the allowed
    decisions; see gateway/verdict.py). For a verdict in this category: at or above
    `block_at` the answer is `block`, from `review_at` up to `block_at` it is `needs_review`,
    below `review_at` it is `allow`, whatever decision the model wrote."""

    block_at: float = Field(..., ge=0, le=1, description="block when the block probability is at "
                            "or above this")
    review_at: float = Field(..., ge=0, le=1, description="allow below this; needs_review from "
                             "here up to block_at")

    @model_validator(mode="after")
    def _ordered(self) -> OperatingPoint:
        if self.review_at > self.block_at:
            raise ValueError(f"review_at ({self.review_at}) must not be above block_at "
                             f"({self.block_at})")
        return self


class EvaluationSpec(_Strict):
    """How a prompt is judged before a version may become production: a pinned dataset and the
    criteria its stored scorecard must meet. A prompt without one has no promotion gate."""

    dataset: DatasetRef
    criteria: list[GateCriterion] = Field(..., min_length=1)


class PromptSpec(_Strict):
    """A prompt as written in a file under version control.

    `messages` are written for `default_locale`; `locales` holds variants for other locales.
    One version covers every variant, so a label always points at a consistent set.
    """

    name: str = Field(..., pattern=_NAME)
    description: str = ""
    variables: list[str] = Field(default_factory=list)
    default_locale: str = Field("en-US", pattern=_LOCALE)
    messages: list[Message] = Field(..., min_length=1)
    locales: dict[str, LocaleVariant] = Field(default_factory=dict)
    verdict: VerdictSchema
    model: str = Field(..., min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    policy: PolicyMeta
    evaluation: EvaluationSpec | None = Field(
        None, description="promotion gate: dataset and criteria (none: no gate)")
    reasoning: ReasoningSpec | None = Field(
        None, description="the model reasons before its verdict (gpt-oss-safeguard): effort and "
        "token budget")
    cascade: CascadeSpec | None = Field(
        None, description="escalate unsure verdicts to a second, larger model")
    thresholds: dict[str, OperatingPoint] | None = Field(
        None, description="per violation category: the operating point applied at serve time to "
                          "the calibrated block probability of a verdict in that category (none: "
                          "the model's decision stands)")

    @field_validator("variables")
    @classmethod
    def _variables(cls, values: list[str]) -> list[str]:
        for v in values:
            if not re.match(_IDENT, v):
                raise ValueError(f"variable {v!r} is not a lower_snake_case identifier")
        if len(set(values)) != len(values):
            raise ValueError("variables must be unique")
        return values

    @model_validator(mode="after")
    def _templates_are_safe(self) -> PromptSpec:
        # Imported here: render imports this module for its types.
        from prompt_registry.render import check_messages

        check_messages(self.messages, self.variables)
        for loc, variant in self.locales.items():
            if not re.match(_LOCALE, loc):
                raise ValueError(f"locales: {loc!r} is not a locale like 'zh-CN'")
            if loc == self.default_locale:
                raise ValueError(f"locales: {loc!r} is the default locale; put it in 'messages'")
            check_messages(variant.messages, self.variables, where=f"locales.{loc}.")
        if self.evaluation is not None:
            known = [c for c in self.verdict.categories if c != NO_CATEGORY]
            for i, crit in enumerate(self.evaluation.criteria):
                cat = crit.category
                if cat is not None and cat not in known and cat != EACH_CATEGORY and cat not in AGGREGATES:
                    raise ValueError(
                        f"evaluation.criteria.{i}.category: {cat!r} is not a violation category of "
                        f"the verdict schema; one of {', '.join(known)}, '*', 'micro', 'flagged'")
        if self.cascade is not None:
            if self.cascade.model == self.model:
                raise ValueError("cascade.model: the second model must differ from `model` "
                                 "(asking the same model again gives the same answer)")
            if "low_confidence" in self.cascade.escalate_on and not self.verdict.confidence:
                raise ValueError("cascade.escalate_on: low_confidence needs verdict.confidence: "
                                 "true (the model must report a confidence)")
        if self.thresholds:
            known = [c for c in self.verdict.categories if c != NO_CATEGORY]
            for cat in self.thresholds:
                if cat not in known:
                    raise ValueError(f"thresholds: {cat!r} is not a violation category of the "
                                     f"verdict schema; one of {', '.join(known)}")
            missing = [d for d in ("allow", "block") if d not in self.verdict.decisions]
            if missing:
                raise ValueError("thresholds decide between allow, needs_review and block; the "
                                 f"verdict schema lacks {', '.join(missing)}")
        return self

    def second_spec(self) -> PromptSpec | None:
        """The spec the cascade's model answers: the same prompt, locale variants and verdict
        schema, with the cascade's model, sampling (default: this version's) and reasoning.
        None without a cascade. Its answer hash keys the second model's cached evaluation
        answers, like any version's."""
        c = self.cascade
        if c is None:
            return None
        return self.model_copy(update={"model": c.model, "sampling": c.sampling or self.sampling,
                                       "reasoning": c.reasoning, "cascade": None})

    def max_output_tokens(self) -> int:
        """What a request may generate: the verdict's allowance plus the reasoning budget."""
        return self.sampling.max_tokens + (self.reasoning.max_tokens if self.reasoning else 0)

    def models(self) -> tuple[str, ...]:
        """Every model this version calls: its own and the cascade's. All must be served."""
        return (self.model,) if self.cascade is None else (self.model, self.cascade.model)

    def select_locale(self, locale: str | None) -> tuple[str, list[Message]]:
        """Messages for a caller's locale, matched as `prompt_registry.locales.match_locale`
        says (exact, same language and script, same language, default)."""
        used = match_locale(locale, self.locales, self.default_locale)
        return used, (self.messages if used == self.default_locale else self.locales[used].messages)

    def check_renders(self) -> None:
        """Publish-time proof that every locale's templates render with sample values and stay
        under the rendered-size cap in their worst case (`render.check_renders`); raises
        TemplateRejected. Not a validator: a version stored before the check existed must
        still load (and is capped at render time like any other)."""
        from prompt_registry.render import check_renders

        check_renders(self.messages, self.variables)
        for loc, variant in self.locales.items():
            check_renders(variant.messages, self.variables, where=f"locales.{loc}.")

    def content_hash(self) -> str:
        """Hash of what changes behaviour, or how a version is judged; the change note and
        author do not count. A spec without an evaluation block hashes as it did before the
        block existed, so registries seeded earlier keep their versions (the same holds for the
        optional `reasoning`, `cascade` and `thresholds` blocks, and for the cascade's optional
        fields: a cascade without `min_margin` hashes as it did before the field existed)."""
        data = self.model_dump(mode="json")
        data["policy"].pop("change_note", None)
        data["policy"].pop("author", None)
        for optional in ("evaluation", "reasoning", "cascade", "thresholds"):
            if data.get(optional) is None:
                data.pop(optional, None)
        if data.get("cascade") is not None:
            for key in ("sampling", "reasoning", "min_confidence", "min_margin"):
                if data["cascade"].get(key) is None:
                    data["cascade"].pop(key)
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def answer_hash(self) -> str:
        """Hash of what decides the model's answers: the content hash without the evaluation
        block and the thresholds. Evaluation results (the model's raw answers and
        log-probabilities) are cached under it, so changing only a version's promotion criteria
        or operating points does not send the dataset through the model again."""
        return self.model_copy(update={"evaluation": None, "thresholds": None}).content_hash()


class PromptVersion(_Strict):
    """A numbered, immutable version of a prompt."""

    spec: PromptSpec
    version: int = Field(..., ge=1)
    content_hash: str
    created_at: datetime
    created_by: str = ""

    @property
    def name(self) -> str:
        return self.spec.name
