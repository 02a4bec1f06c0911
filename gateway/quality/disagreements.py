"""Disagreements on live traffic, exported as new rows of a labelled dataset.

Two kinds, found in the decision log and the reviewer-feedback log over a time window:

- **feedback mismatch**: a reviewer labelled a request (`POST /v1/feedback`) and a verdict on
  it — the one the caller got, or a shadow version's — has another outcome label (the offline
  scorecard's rule: `block` and `needs_review` with the same category agree; see
  gateway/quality/evaluation/scorecard.py);
- **shadow flip**: a shadow version's verdict differs from the verdict the caller got (another
  decision or another outcome label), the rule of the rollout's flip list.

One row per item (the newest disagreeing request; earlier ones are counted in `notes`), in the
dataset format `modgate eval validate` and `modgate eval run` read (gateway/quality/evaluation/dataset.py).
The gold label is the reviewer's; tags say why the row is there (`source:live`,
`disagreement:feedback`, `disagreement:shadow-flip`, `wrong:v<N>` for every version whose
verdict differs from the reviewer's) and `notes` what each version and the reviewer said.

Listing content: the decision log never stores titles or descriptions (on purpose: it is an
audit log of decisions kept on gateway disks, safe to export to spreadsheets). A dataset row
needs the title the model saw, so content comes from a file the caller exports from the listing
store, keyed by `item_id` (`read_content`). Rows that cannot be complete — no reviewer label
(an unreviewed shadow flip) or no content — are not guessed: they go to a separate "pending"
CSV in the same column layout with the missing cells blank, for someone to fill in.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from gateway.decision_log import DecisionRecord
from gateway.quality.evaluation.dataset import FIELDS, DatasetProblem, DatasetRow, _row_from_mapping
from gateway.quality.evaluation.scorecard import outcome_label
from gateway.quality.live_quality import FeedbackLabel, gold_of, verdict_text

__all__ = ["Disagreement", "ExportResult", "ListingContent", "build_rows", "find_disagreements",
           "read_content", "write_pending"]

CONTENT_FIELDS = ("item_id", "title", "description", "locale", "seller_id")


@dataclass(frozen=True, slots=True)
class _Verdict:
    ts: datetime
    request_id: str
    item_id: str
    prompt: str
    version: int
    arm: str
    decision: str | None
    category: str | None
    error_type: str | None
    locale: str | None

    @property
    def label(self) -> str:
        return outcome_label(self.decision, self.category, error=self.error_type is not None)

    @property
    def text(self) -> str:
        return f"v{self.version} {self.arm} {verdict_text(self.decision, self.category, self.error_type)}"


def _verdict(rec: DecisionRecord) -> _Verdict | None:
    """The verdict of a moderation record; None for a raw_chat record (no prompt, no verdict)."""
    if rec.prompt_name is None or rec.prompt_version is None:
        return None
    return _Verdict(ts=rec.ts, request_id=rec.request_id, item_id=rec.item_id,
                    prompt=rec.prompt_name, version=rec.prompt_version, arm=rec.arm,
                    decision=rec.decision, category=rec.category, error_type=rec.error_type,
                    locale=rec.locale)


@dataclass
class Disagreement:
    request_id: str
    item_id: str
    prompt: str
    ts: datetime
    locale: str | None
    verdicts: list[_Verdict]              # the caller's first (when logged), then shadows
    label: FeedbackLabel | None
    feedback: bool                        # a verdict differs from the reviewer's label
    shadow_flip: bool                     # a shadow verdict differs from the caller's
    wrong_versions: list[int]             # versions whose verdict differs from the label
    earlier: int = 0                      # older disagreeing requests for the same item

    @property
    def kinds(self) -> list[str]:
        return [k for k, on in (("feedback", self.feedback), ("shadow-flip", self.shadow_flip)) if on]


def find_disagreements(records: Iterable[DecisionRecord], labels: dict[str, FeedbackLabel], *,
                       prompt: str | None = None) -> tuple[list[Disagreement], int]:
    """Disagreements among *records*, one per item (the newest request), and the number of
    records read. Backend failures (no verdict) are not disagreements."""
    primaries: dict[str, _Verdict] = {}
    shadows: dict[str, list[_Verdict]] = {}
    n = 0
    for rec in records:
        if prompt is not None and rec.prompt_name != prompt:
            continue
        n += 1
        verdict = _verdict(rec)
        if verdict is None:
            continue
        if rec.arm == "shadow" and rec.shadow_of:
            shadows.setdefault(rec.shadow_of, []).append(verdict)
        else:
            primaries[rec.request_id] = verdict
    by_item: dict[str, Disagreement] = {}
    counts: dict[str, int] = {}
    for rid in dict.fromkeys([*primaries, *shadows]):
        primary = primaries.get(rid)
        side = shadows.get(rid, [])
        verdicts = [v for v in [primary, *side] if v is not None and v.error_type is None]
        if not verdicts:
            continue
        label = labels.get(rid)
        wrong: list[int] = []
        if label is not None:
            gold = outcome_label(*gold_of(label))
            wrong = list(dict.fromkeys(v.version for v in verdicts if v.label != gold))
        flip = primary is not None and primary.error_type is None and any(
            s.error_type is None and (s.decision != primary.decision or s.label != primary.label)
            for s in side)
        if not wrong and not flip:
            continue
        first = verdicts[0]
        d = Disagreement(request_id=rid, item_id=first.item_id, prompt=first.prompt,
                         ts=max(v.ts for v in verdicts),
                         locale=primary.locale if primary is not None else first.locale,
                         verdicts=verdicts, label=label, feedback=bool(wrong), shadow_flip=flip,
                         wrong_versions=wrong)
        counts[d.item_id] = counts.get(d.item_id, 0) + 1
        old = by_item.get(d.item_id)
        if old is None or d.ts >= old.ts:
            by_item[d.item_id] = d
    out = sorted(by_item.values(), key=lambda d: (d.ts, d.item_id))
    for d in out:
        d.earlier = counts[d.item_id] - 1
    return out, n


# -- listing content ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListingContent:
    item_id: str
    title: str
    description: str = ""
    locale: str = ""
    seller_id: str = ""


def read_content(path: Path) -> tuple[dict[str, ListingContent], list[str]]:
    """Listing content by item id from a CSV (header row) or JSONL file with `item_id` and
    `title` and optionally `description`, `locale`, `seller_id`; other columns are ignored,
    so an export of the listing table works as it is. Returns the content and the problems
    (`file:line: reason`)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        return {}, [f"{path}: cannot read: {exc.strerror or exc}"]
    except UnicodeDecodeError:
        return {}, [f"{path}: not UTF-8 (save the file as UTF-8)"]
    records: list[tuple[int, dict[str, object]]] = []
    problems: list[tuple[int, str]] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((n, f"{path}:{n}: not valid JSON: {exc.msg}"))
                continue
            if not isinstance(data, dict):
                problems.append((n, f"{path}:{n}: each line must be a JSON object"))
                continue
            records.append((n, data))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ("item_id", "title") if c not in header]
        if missing:
            return {}, [f"{path}:1: the header needs the column(s) {', '.join(missing)} "
                        f"(found: {', '.join(header) or 'nothing'})"]
        reader.fieldnames = header
        try:
            for row in reader:
                records.append((reader.line_num, dict(row)))
        except csv.Error as exc:
            problems.append((reader.line_num, f"{path}:{reader.line_num}: malformed CSV: {exc}"))
    else:
        return {}, [f"{path}: unknown format: use .csv (with a header row) or .jsonl"]
    content: dict[str, ListingContent] = {}
    for n, data in records:
        raw = {k: data.get(k) for k in CONTENT_FIELDS}
        bad = [k for k, v in raw.items() if v is not None and not isinstance(v, str)]
        if bad:
            problems.append((n, f"{path}:{n}: {', '.join(bad)}: must be text"))
            continue
        values = {k: v for k, v in raw.items() if isinstance(v, str)}  # absent or null: missing
        item_id = values.get("item_id", "").strip()
        if not item_id:
            problems.append((n, f"{path}:{n}: item_id: required, but empty or missing"))
            continue
        content[item_id] = ListingContent(
            item_id=item_id, title=values.get("title", ""),
            description=values.get("description", ""),
            locale=values.get("locale", "").strip(), seller_id=values.get("seller_id", "").strip())
    return content, [text for _, text in sorted(problems, key=lambda p: p[0])]


# -- dataset rows ------------------------------------------------------------------------------


@dataclass
class ExportResult:
    rows: list[DatasetRow] = field(default_factory=list)
    pending: list[dict[str, str]] = field(default_factory=list)   # FIELDS, blanks to fill in
    no_label: int = 0
    no_content: int = 0
    invalid: int = 0
    excluded: int = 0


def _fmt_ts(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%SZ")


def _notes(d: Disagreement) -> str:
    kinds = " + ".join({"feedback": "reviewer", "shadow-flip": "shadow flip"}[k] for k in d.kinds)
    parts = [f"live disagreement ({kinds}), request {d.request_id} at {_fmt_ts(d.ts)}: "
             + "; ".join(f"{v.text}" for v in d.verdicts)]
    if d.label is not None:
        gold = "/".join(gold_of(d.label))
        who = f" {d.label.reviewer}" if d.label.reviewer else ""
        note = f" ({d.label.note})" if d.label.note else ""
        parts.append(f"reviewer{who}: {gold}{note}")
    if d.earlier:
        parts.append(f"{d.earlier} earlier request(s) for this item disagreed too")
    return "; ".join(parts)


def _tags(d: Disagreement) -> list[str]:
    tags = ["source:live", *(f"disagreement:{k}" for k in d.kinds)]
    tags += [f"wrong:v{v}" for v in d.wrong_versions]
    return tags


def build_rows(disagreements: Iterable[Disagreement], content: dict[str, ListingContent], *,
               exclude: set[str] | frozenset[str] = frozenset()) -> ExportResult:
    """Complete dataset rows (reviewer label and content known) and pending ones."""
    out = ExportResult()
    for d in disagreements:
        if d.item_id in exclude:
            out.excluded += 1
            continue
        c = content.get(d.item_id)
        gold = gold_of(d.label) if d.label is not None else ("", "")
        data: dict[str, object] = {
            "item_id": d.item_id, "title": c.title if c else "",
            "description": c.description if c else "",
            "locale": (c.locale if c and c.locale else d.locale) or "",
            "seller_id": c.seller_id if c else "", "gold_decision": gold[0],
            "gold_category": gold[1], "notes": _notes(d), "tags": _tags(d)}
        todo = []
        if d.label is None:
            out.no_label += 1
            todo.append("gold_decision and gold_category (no reviewer label yet)")
        if c is None or not c.title.strip():
            out.no_content += 1
            todo.append("title and description (listing content is not in the decision log)")
        if not todo:
            problems: list[DatasetProblem] = []
            row = _row_from_mapping(data, "export", 0, problems)
            if row is not None:
                out.rows.append(row)
                continue
            out.invalid += 1
            todo.append("fix " + "; ".join(f"{p.field}: {p.reason}" for p in problems))
        data["notes"] = f"TO FILL IN: {'; '.join(todo)}. {data['notes']}"
        data["tags"] = ";".join(_tags(d))
        out.pending.append({k: str(data[k]) for k in FIELDS})
    return out


def write_pending(rows: list[dict[str, str]], path: Path) -> None:
    """Pending rows as CSV in the dataset's column layout (UTF-8 with a byte-order mark, as
    `write_csv` writes datasets), so a filled-in file validates with `modgate eval validate`."""
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(FIELDS)
        for row in rows:
            writer.writerow([row[f] for f in FIELDS])
