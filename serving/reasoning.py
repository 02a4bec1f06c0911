"""Answers of models that reason before they answer, in OpenAI's harmony format (gpt-oss,
gpt-oss-safeguard).

A harmony completion is a sequence of assistant messages on named channels:

    <|channel|>analysis<|message|>…the model's reasoning…<|end|>
    <|start|>assistant<|channel|>final<|message|>{"decision":"block",…}<|return|>

(the final message may carry `<|constrain|>json` after its channel name). Only the `final`
channel is the answer; `analysis` is the rationale. vLLM (0.32, started with
`--reasoning-parser openai_gptoss`) splits them itself: the chat completion's
`message.content` is the final channel and `message.reasoning` (`reasoning_content` in older
servers) the analysis, and the version's verdict regex constrains the final channel only (its
harmony parser wraps it in a structural tag after an optional, free analysis message). A
server without the parser (or a recorded raw completion) hands back the channel markers in the
text; `split_harmony` reads that form the same way.

Fail closed: a completion without a complete final message (the reasoning ran out of tokens,
the model stopped inside the analysis, an unknown channel) has no answer: its final text is
empty, which the verdict parser turns into `needs_review`. Nothing here guesses a verdict from
the reasoning.

The reasoning is listing-derived text: callers keep it in `ChatResult.reasoning` (not in its
repr) and must never log it or put it on a span.

Log-probabilities of the final answer
-------------------------------------
vLLM reports a log-probability for every generated token, the reasoning's included (its
`logprobs.content` covers the whole completion, decoded token by token with the special
tokens as their text, while `message.content` is only the final channel). The calibrated
probability (gateway/verdict.py) is read at the verdict's token positions, so `answer_tokens`
cuts the tokens of the last final message's body out of the completion: the tokens after a
`<|channel|>` token, a header naming the `final` channel (`final`, `final <|constrain|>json`)
and a `<|message|>` token, up to the message's end. The markers must be whole tokens (the
special tokens): the same characters written by the model inside its reasoning are ordinary
pieces (`<|`, `channel`, `|>`) and are never taken for a marker. The slice counts only when its
tokens spell the final text the server returned; otherwise (special tokens reported as empty
strings, a final message the server read differently, no final message) there are none and
the probabilities stay null, as for an engine that sends no log-probabilities.

What the number then means: the model's probability of each allowed value *given the
prompt and the reasoning it wrote*, not averaged over the reasoning it might have written.
vLLM applies the verdict grammar inside the final channel only, so at those positions the
reported distribution is masked to the allowed values exactly as for a model that does not
reason. Whether it is calibrated is measured, as for any version, by `modgate eval run`
(reliability diagram, ECE) before operating points or a cascade's `low_margin` rely on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.protocol import TokenLogprob

__all__ = ["HARMONY_MARKER", "HarmonyAnswer", "answer_tokens", "split_harmony"]

HARMONY_MARKER = "<|channel|>"
_MESSAGE_TOKEN = "<|message|>"
_MESSAGE_ENDS = frozenset({"<|end|>", "<|return|>", "<|call|>", "<|start|>"})
_CHANNEL_NAME = re.compile(r"\s*([a-z]+)(?=\s|<\|constrain\|>|$)")
_MESSAGE = re.compile(
    r"(?:<\|start\|>assistant)?<\|channel\|>(?P<channel>[a-z]+)(?P<header>[^<]*(?:<\|constrain\|>[^<]*)?)"
    r"<\|message\|>(?P<body>.*?)(?P<end><\|end\|>|<\|return\|>|<\|call\|>|(?=<\|start\|>)|$)",
    re.DOTALL)


@dataclass(frozen=True, slots=True)
class HarmonyAnswer:
    """A harmony completion read apart. `final` is None when no final message was completed
    (the caller fails closed); `analysis` joins every analysis message (the rationale)."""

    final: str | None
    analysis: str | None = field(default=None, repr=False)
    channels: tuple[str, ...] = ()


def split_harmony(text: str, *, stopped: bool) -> HarmonyAnswer:
    """Read a raw harmony completion (special tokens kept). A final message counts only when
    it ended: with `<|return|>` or `<|end|>`, or at the end of the text when the generation
    *stopped* on a stop token (`finish_reason: stop`; servers leave `<|return|>` out of the
    text). A final channel cut off mid-answer (`length`) is not an answer. Text outside any
    channel message is ignored."""
    finals: list[str] = []
    analysis: list[str] = []
    channels: list[str] = []
    for m in _MESSAGE.finditer(text):
        channel, body, end = m.group("channel"), m.group("body"), m.group("end")
        channels.append(channel)
        ended = end in ("<|return|>", "<|end|>") or (stopped and m.end() == len(text))
        if channel == "analysis":
            analysis.append(body)
        elif channel == "final" and ended:
            finals.append(body)
    return HarmonyAnswer(final=finals[-1] if finals else None,
                         analysis="\n".join(analysis) if analysis else None,
                         channels=tuple(channels))


def answer_tokens(tokens: Sequence[TokenLogprob], text: str) -> tuple[TokenLogprob, ...] | None:
    """The tokens that spell *text*, the final answer of a completion that may have reasoned
    first (module doc): all of *tokens* when they already begin with it, else the body of the
    last final-channel message when that begins with it; None when neither does (no
    calibrated probability rather than one read at the wrong positions)."""
    if not text:
        return None
    if "".join(t.token for t in tokens).startswith(text):
        return tuple(tokens)
    start: int | None = None
    channel_at: int | None = None
    for i, t in enumerate(tokens):
        if t.token == HARMONY_MARKER:
            channel_at = i
        elif t.token == _MESSAGE_TOKEN and channel_at is not None:
            header = _CHANNEL_NAME.match("".join(x.token for x in tokens[channel_at + 1:i]))
            if header is not None and header.group(1) == "final":
                start = i + 1
            channel_at = None
    if start is None:
        return None
    end = next((j for j in range(start, len(tokens)) if tokens[j].token in _MESSAGE_ENDS), len(tokens))
    body = tuple(tokens[start:end])
    return body if "".join(t.token for t in body).startswith(text) else None
