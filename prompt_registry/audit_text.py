"""One readable line per audit event: what moved, why, by whom (#21).

An audit entry's note can be long: a rollout transition stores JSON with the gate report, the
evidence and the whole rollout; a gate override carries the gate's summary. `prompts audit`,
the ops report and anything else that lists events show `describe(entry)` instead: a short
`what` and `why`, and the full note as `evidence`, one `--json` (or, in the HTML report, one
click) away. Pure: no store, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from prompt_registry.store import AuditEntry

__all__ = ["WHY_CHARS", "AuditLine", "describe", "one_line"]

WHY_CHARS = 160  # the `why` of a line is cut here (with "…"); the evidence keeps everything


@dataclass(frozen=True, slots=True)
class AuditLine:
    what: str
    why: str
    by: str
    evidence: dict[str, Any] | str  # the note: parsed when it is JSON, else the text


def _v(n: int | None) -> str:
    return "(unset)" if n is None else f"v{n}"


def _short(text: str) -> str:
    """The note as a reason: parts joined by ' | ' kept, a gate override's quoted gate summary
    dropped (the evidence has it), one line, at most WHY_CHARS characters."""
    parts = []
    for part in text.split(" | "):
        part = " ".join(part.split())
        if part.startswith("GATE OVERRIDDEN") and " (gate " in part:
            part = part[:part.index(" (gate ")]
        if part:
            parts.append(part)
    out = "; ".join(parts)
    return out if len(out) <= WHY_CHARS else out[:WHY_CHARS - 1].rstrip() + "…"


def _json_note(note: str) -> dict[str, Any] | None:
    if not note.startswith("{"):
        return None
    try:
        value = json.loads(note)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _evidence(detail: dict[str, Any]) -> dict[str, Any]:
    """A rollout note without the stored rollout's salt (it decides which sellers get the
    canary, and a report is mailed around)."""
    snap = detail.get("rollout")
    if isinstance(snap, dict) and "salt" in snap:
        detail = {**detail, "rollout": {k: v for k, v in snap.items() if k != "salt"}}
    return detail


def _rollout(e: AuditEntry, detail: dict[str, Any] | None) -> tuple[str, str]:
    if detail is None:  # a note from before the notes were JSON
        return (f"rollout {e.label}: stable {_v(e.from_version)}, canary {_v(e.to_version)}",
                _short(e.note))
    snap = detail.get("rollout")
    rid = snap.get("id") if isinstance(snap, dict) else None
    action = str(detail.get("action") or e.label or "changed")
    name = f"rollout {rid}" if isinstance(rid, str) else "rollout"
    canary = f"canary {_v(e.to_version)}" if e.to_version is not None else "no canary"
    weight = detail.get("weight")
    at = f" at {weight}%" if isinstance(weight, int) and e.to_version is not None else ""
    what = f"{name} {action}: stable {_v(e.from_version)}, {canary}{at} ({e.label})"
    reasons = [str(detail.get("note") or "")]
    for key in ("gate_note", "override"):
        value = detail.get(key)
        if isinstance(value, str) and value.startswith("GATE OVERRIDDEN"):
            reasons.append(value)
    gate = detail.get("gate")
    if isinstance(gate, dict) and gate.get("verdict") and not any(
            r.startswith("GATE OVERRIDDEN") for r in reasons):
        reasons.append(f"promotion gate: {gate['verdict']}")
    return what, _short(" | ".join(r for r in reasons if r))


def describe(e: AuditEntry) -> AuditLine:
    """What the entry moved, why (short), by whom, and its full evidence."""
    detail = _json_note(e.note)
    why = _short(e.note)
    if e.action == "publish":
        what = f"published {_v(e.to_version)}"
    elif e.action == "label":
        what = (f"label {e.label} set to {_v(e.to_version)}" if e.from_version is None
                else f"label {e.label}: {_v(e.from_version)} → {_v(e.to_version)}")
    elif e.action == "rollout":
        what, why = _rollout(e, detail)
    elif e.action == "scorecard":
        what = f"scorecard of {_v(e.to_version)} stored"
    elif e.action == "gate_policy":
        what = "gate policy changed"
    elif e.action == "lifecycle":  # note: "<old> -> <new>: <reason>"
        states, _, reason = e.note.partition(": ")
        what = f"{_v(e.to_version)} {states.replace(' -> ', ' → ')}" if reason else \
            f"state of {_v(e.to_version)} changed"
        why = _short(reason) if reason else why
    elif e.action == "gate_refused":
        what = f"gate refused moving {e.label} {_v(e.from_version)} → {_v(e.to_version)}"
    elif e.action.startswith("approval_"):
        what = f"approval {e.action.removeprefix('approval_')}: {e.label} → {_v(e.to_version)}"
    elif e.action == "four_eyes":
        what = "four-eyes setting changed"
    else:
        what = e.action + (f" {_v(e.to_version)}" if e.to_version is not None else "")
    if detail is not None and e.action != "rollout":  # a JSON note: its own words, if any
        why = _short(str(detail.get("note") or detail.get("reason") or ""))
    return AuditLine(what=what, why=why, by=e.actor,
                     evidence=_evidence(detail) if detail is not None else e.note)


def one_line(e: AuditEntry) -> str:
    """`2025-03-01 12:00:00 UTC  alice  label production: v1 → v2 — ship v2`"""
    line = describe(e)
    at = (e.at.astimezone(UTC) if e.at.tzinfo else e.at).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{at}  {line.by}  {line.what}" + (f" — {line.why}" if line.why else "")
