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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["HARMONY_MARKER", "HarmonyAnswer", "split_harmony"]

HARMONY_MARKER = "<|channel|>"
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
