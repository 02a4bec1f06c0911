"""Locale tags as callers send them (BCP 47, loosely), and which prompt variant serves each.

Callers send `zh_CN`, `ZH-cn`, `zh-Hans-CN`, `es-419` or `en`: all are locales, not errors.
`normalize_locale` turns a tag into its canonical form (language lower case, script title
case, region upper case or three digits, `_` read as `-`); anything else is refused with a
message. `match_locale` picks the prompt variant for a requested locale:

1. the exact variant (canonical forms compared);
2. a variant of the same language *and script* (the script inferred where the tag has none:
   Chinese in TW, HK or MO is Traditional, `Hant`; otherwise Simplified, `Hans`);
3. a variant of the same language in another script (a Traditional request served by the
   Simplified variant when there is no Traditional one: a documented fallback, visible in the
   answer's `prompt.locale`);
4. the prompt's default locale.

`guess_locale` picks a language from the text itself when the caller sent no locale (the
OpenAI moderation route has no locale field): Han characters mean Chinese (Traditional when
the text uses characters only Traditional Chinese writes), otherwise no guess (the prompt's default locale serves).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["LocaleError", "guess_locale", "match_locale", "normalize_locale"]

_TAG = re.compile(r"^(?P<lang>[A-Za-z]{2,3})(?:[-_](?P<script>[A-Za-z]{4}))?"
                  r"(?:[-_](?P<region>[A-Za-z]{2}|[0-9]{3}))?$")
_TRADITIONAL_REGIONS = frozenset({"TW", "HK", "MO"})
_HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
# Characters written only in Traditional Chinese, common in listings (a cheap, sufficient
# signal: a text with none of them is read as Simplified, the larger market).
_TRADITIONAL_ONLY = frozenset("這個們來時會說對後過還麼與為錢買賣貨價劃點見讓給從當發現體")


class LocaleError(ValueError):
    """A tag that is not a locale."""


@lru_cache(maxsize=1024)  # on every moderation's path; a refusal (an exception) is not cached
def normalize_locale(tag: str) -> str:
    """`zh_cn` → `zh-CN`, `ZH-hans-cn` → `zh-Hans-CN`, `es-419` stays; raises LocaleError."""
    m = _TAG.match(tag.strip()) if len(tag) <= 16 else None
    if m is None:
        raise LocaleError(f"{tag[:32]!r} is not a locale like 'en-US', 'zh-CN' or 'zh-Hant-TW'")
    out = m["lang"].lower()
    if m["script"]:
        out += "-" + m["script"].title()
    if m["region"]:
        out += "-" + m["region"].upper()
    return out


def _parts(tag: str) -> tuple[str, str | None, str | None]:
    m = _TAG.match(tag)
    assert m is not None
    lang = m["lang"].lower()
    script = m["script"].title() if m["script"] else None
    region = m["region"].upper() if m["region"] else None
    if lang == "zh" and script is None:
        script = "Hant" if region in _TRADITIONAL_REGIONS else "Hans"
    return lang, script, region


def match_locale(requested: str | None, available: Iterable[str], default: str) -> str:
    """The variant (one of *available*, or *default*) that serves *requested*."""
    if not requested:
        return default
    return _match_locale(requested, tuple(available), default)


@lru_cache(maxsize=1024)  # every moderation asks it, with a handful of distinct arguments
def _match_locale(requested: str, available: tuple[str, ...], default: str) -> str:
    try:
        want = normalize_locale(requested)
    except LocaleError:
        return default
    variants = sorted({*available, default})
    canon = {normalize_locale(v): v for v in variants}
    if want in canon:
        return canon[want]
    lang, script, _ = _parts(want)
    parts = {v: _parts(normalize_locale(v)) for v in variants}
    same_script = [v for v in variants if parts[v][:2] == (lang, script)]
    if same_script:
        return default if default in same_script else same_script[0]
    same_lang = [v for v in variants if parts[v][0] == lang]
    if same_lang:
        return default if default in same_lang else same_lang[0]
    return default


def guess_locale(text: str) -> str | None:
    """A locale for *text* when the caller sent none (see the module docstring); None: no
    signal, use the prompt's default locale."""
    if _HAN.search(text):
        return "zh-TW" if any(ch in _TRADITIONAL_ONLY for ch in text) else "zh-CN"
    return None
