"""Labelled evaluation datasets: one listing per row with its gold verdict.

A row is flat, so the same file round-trips through a spreadsheet:

    item_id, title, description, locale, seller_id, gold_decision, gold_category, notes, tags

- `item_id`: unique in the file, the API's id syntax (`[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`).
- `title` (required), `description` (may be empty), `locale` (`en-US`, `zh-CN`, ...).
- `seller_id`: optional (empty cell / null).
- `gold_decision`, `gold_category`: the verdict a careful human gives under the prompt's policy.
  Checked against the prompt's verdict schema when an evaluation starts
  (`schema_problems`): both must be values of the schema, `allow` needs category `none`,
  `block` needs a category other than `none`.
- `notes`: free text (why the label is what it is). `tags`: short labels such as
  `hard:lookalike` or `injection`; a JSON list in JSONL, one cell joined by `;` in CSV.

Files: JSONL (`.jsonl`/`.ndjson`, one object per line, blank lines ignored) or CSV (`.csv`,
header row, any column order). Both are UTF-8; CSV is written with a byte-order mark so
spreadsheet programs detect UTF-8 (and read with or without one). Validation reports every
problem as `file:line: field: reason` and `load_dataset` refuses an invalid file.

A dataset's identity is `Dataset.sha256`: the sha256 of its canonical content (rows sorted by
`item_id`, each row as JSON with sorted keys, no whitespace, UTF-8; tags sorted and
de-duplicated; CRLF in text normalised to LF), so the same rows give the same hash whether they
came from CSV or JSONL. Each row also has `input_hash`, the hash of what the model sees (id,
seller, title, description, locale): results are cached by it, so relabelling a row does not
force the model to run again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompt_registry import VerdictSchema

__all__ = [
    "FIELDS",
    "Dataset",
    "DatasetError",
    "DatasetProblem",
    "DatasetRow",
    "load_dataset",
    "read_dataset",
    "schema_problems",
    "write_csv",
    "write_dataset",
    "write_jsonl",
]

FIELDS = ("item_id", "title", "description", "locale", "seller_id", "gold_decision",
          "gold_category", "notes", "tags")
REQUIRED = ("item_id", "title", "locale", "gold_decision", "gold_category")
ALLOW = "allow"
BLOCK = "block"
NO_CATEGORY = "none"
# Variables a prompt may declare that a dataset row provides (as the API request does).
ROW_VARIABLES = ("item_id", "seller_id", "title", "description", "locale")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Z][A-Za-z]{1,3})?$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_TAG = re.compile(r"^[a-z0-9][a-z0-9_.:/-]{0,63}$")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True, slots=True)
class DatasetProblem:
    file: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.reason}"


class DatasetError(Exception):
    """An invalid dataset; `problems` lists every problem found, in file order."""

    def __init__(self, problems: Sequence[DatasetProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class DatasetRow:
    item_id: str
    title: str
    description: str
    locale: str
    gold_decision: str
    gold_category: str
    seller_id: str | None = None
    notes: str = ""
    tags: tuple[str, ...] = ()

    def canonical(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "title": self.title, "description": self.description,
                "locale": self.locale, "seller_id": self.seller_id,
                "gold_decision": self.gold_decision, "gold_category": self.gold_category,
                "notes": self.notes, "tags": list(self.tags)}

    @property
    def gold_flagged(self) -> bool:
        return self.gold_decision != ALLOW

    def variables(self) -> dict[str, object]:
        """The variables a prompt is rendered with, as the API passes a request's fields."""
        return {"item_id": self.item_id, "seller_id": self.seller_id, "title": self.title,
                "description": self.description, "locale": self.locale}

    @property
    def input_hash(self) -> str:
        """sha256 of what the model sees; the key of cached results (labels excluded)."""
        return _sha256(self.variables())


@dataclass(frozen=True, slots=True)
class Dataset:
    rows: tuple[DatasetRow, ...]
    source: str = "<memory>"
    # item_id -> line in the source file (1-based; the header is line 1 in CSV)
    lines: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def sha256(self) -> str:
        return dataset_sha256(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def dataset_sha256(rows: Iterable[DatasetRow]) -> str:
    ordered = sorted(rows, key=lambda r: r.item_id)
    return _sha256([r.canonical() for r in ordered])


def _sha256(data: object) -> str:
    text = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- parsing -----------------------------------------------------------------------------------


def _text(value: str) -> str:
    return value.replace("\r\n", "\n").replace("\r", "\n")


def _parse_tags(value: object) -> tuple[list[str] | None, str | None]:
    if value is None:
        return [], None
    if isinstance(value, str):
        items = value.split(";")
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        items = list(value)
    else:
        return None, "must be a list of strings or one string joined by ';'"
    tags = sorted({t.strip() for t in items if t.strip()})
    bad = [t for t in tags if not _TAG.match(t)]
    if bad:
        return None, (f"{', '.join(repr(t) for t in bad)}: tags are lower-case words like "
                      "'hard:lookalike' (letters, digits, _ . : / -)")
    return tags, None


def _row_from_mapping(data: dict[str, Any], file: str, line: int,
                      problems: list[DatasetProblem]) -> DatasetRow | None:
    start = len(problems)

    def bad(name: str, reason: str) -> None:
        problems.append(DatasetProblem(file, line, name, reason))

    for key in data:
        if key not in FIELDS:
            bad(key, f"unknown field (expected: {', '.join(FIELDS)})")
    values: dict[str, str] = {}
    for name in FIELDS[:-1]:
        raw = data.get(name)
        if raw is None:
            raw = ""
        if not isinstance(raw, str):
            bad(name, f"must be a string, not {type(raw).__name__}")
            continue
        values[name] = _text(raw) if name in ("title", "description", "notes") else raw.strip()
    for name in REQUIRED:
        if name in values and not values[name].strip():
            bad(name, "required, but empty or missing")
    item_id, locale = values.get("item_id", ""), values.get("locale", "")
    if item_id and not _ID.match(item_id):
        bad("item_id", f"{item_id!r} is not an id (letters, digits, . _ : -; at most 128)")
    seller = values.get("seller_id", "")
    if seller and not _ID.match(seller):
        bad("seller_id", f"{seller!r} is not an id (letters, digits, . _ : -; at most 128)")
    if locale and not _LOCALE.match(locale):
        bad("locale", f"{locale!r} is not a locale like 'en-US' or 'zh-CN'")
    for name in ("gold_decision", "gold_category"):
        v = values.get(name, "")
        if v and not _LABEL.match(v):
            bad(name, f"{v!r} is not a lower_snake_case label")
    decision, category = values.get("gold_decision", ""), values.get("gold_category", "")
    if decision == ALLOW and category and category != NO_CATEGORY:
        bad("gold_category", f"must be '{NO_CATEGORY}' when gold_decision is '{ALLOW}', not {category!r}")
    if decision == BLOCK and category == NO_CATEGORY:
        bad("gold_category", f"a '{BLOCK}' needs the violated category, not '{NO_CATEGORY}'")
    tags, reason = _parse_tags(data.get("tags"))
    if reason:
        bad("tags", reason)
    if len(problems) > start:
        return None
    return DatasetRow(item_id=item_id, title=values["title"], description=values["description"],
                      locale=locale, gold_decision=decision, gold_category=category,
                      seller_id=seller or None, notes=values["notes"], tags=tuple(tags or ()))


def _read_jsonl(text: str, file: str, problems: list[DatasetProblem]) -> list[tuple[int, DatasetRow | None]]:
    out: list[tuple[int, DatasetRow | None]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(DatasetProblem(file, n, "-", f"not valid JSON: {exc.msg} (column {exc.colno})"))
            out.append((n, None))
            continue
        if not isinstance(data, dict):
            problems.append(DatasetProblem(file, n, "-", "each line must be a JSON object"))
            out.append((n, None))
            continue
        out.append((n, _row_from_mapping(data, file, n, problems)))
    return out


def _read_csv(text: str, file: str, problems: list[DatasetProblem]) -> list[tuple[int, DatasetRow | None]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        problems.append(DatasetProblem(file, 1, "-", f"malformed CSV: {exc}"))
        return []
    header = [h.strip() for h in header]
    header_ok = True
    for col in header:
        if col not in FIELDS:
            problems.append(DatasetProblem(file, 1, col or "(empty)",
                                           f"unknown column (expected: {', '.join(FIELDS)})"))
            header_ok = False
    for col in REQUIRED:
        if col not in header:
            problems.append(DatasetProblem(file, 1, col, "required column missing from the header"))
            header_ok = False
    dupes = sorted({c for c in header if header.count(c) > 1})
    for col in dupes:
        problems.append(DatasetProblem(file, 1, col, "column appears more than once"))
        header_ok = False
    if not header_ok:
        return []
    out: list[tuple[int, DatasetRow | None]] = []
    line = reader.line_num
    try:
        for cells in reader:
            start, line = line + 1, reader.line_num  # a quoted cell may span several lines
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                problems.append(DatasetProblem(
                    file, start, "-", f"{len(cells)} cells, but the header has {len(header)} columns"))
                out.append((start, None))
                continue
            out.append((start, _row_from_mapping(dict(zip(header, cells, strict=True)), file, start,
                                                 problems)))
    except csv.Error as exc:
        problems.append(DatasetProblem(file, reader.line_num, "-", f"malformed CSV: {exc}"))
    return out


def read_dataset(path: Path) -> tuple[Dataset | None, list[DatasetProblem]]:
    """Read and validate *path*; every problem is returned, and no dataset when there is one."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [DatasetProblem(file, 0, "-", f"cannot read: {exc.strerror or exc}")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return None, [DatasetProblem(file, line, "-", "not UTF-8 (save the file as UTF-8)")]
    problems: list[DatasetProblem] = []
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        parsed = _read_jsonl(text, file, problems)
    elif suffix == ".csv":
        parsed = _read_csv(text, file, problems)
    else:
        return None, [DatasetProblem(file, 0, "-", "unknown format: use .jsonl (or .ndjson) or .csv")]
    seen: dict[str, int] = {}
    rows: list[DatasetRow] = []
    for line, row in parsed:
        if row is None:
            continue
        if row.item_id in seen:
            problems.append(DatasetProblem(file, line, "item_id",
                                           f"duplicate {row.item_id!r} (first on line {seen[row.item_id]})"))
            continue
        seen[row.item_id] = line
        rows.append(row)
    if not parsed and not problems:
        problems.append(DatasetProblem(file, 1, "-", "no rows"))
    problems.sort(key=lambda p: p.line)
    if problems:
        return None, problems
    return Dataset(rows=tuple(rows), source=file, lines=seen), []


def load_dataset(path: Path) -> Dataset:
    """Read *path*; raise DatasetError listing every problem if it is invalid."""
    dataset, problems = read_dataset(path)
    if dataset is None:
        raise DatasetError(problems)
    return dataset


def schema_problems(dataset: Dataset, schema: VerdictSchema,
                    variables: Sequence[str] = ()) -> list[DatasetProblem]:
    """Gold labels that are not values of *schema*, and prompt variables a row cannot provide."""
    problems: list[DatasetProblem] = []
    for name in variables:
        if name not in ROW_VARIABLES:
            problems.append(DatasetProblem(dataset.source, 1, name, (
                f"the prompt declares variable {name!r}, which a dataset row does not provide "
                f"(rows provide {', '.join(ROW_VARIABLES)})")))
    need_seller = "seller_id" in variables
    for row in dataset.rows:
        line = dataset.lines.get(row.item_id, 0)
        if row.gold_decision not in schema.decisions:
            problems.append(DatasetProblem(dataset.source, line, "gold_decision", (
                f"{row.gold_decision!r} is not a decision of the prompt "
                f"({', '.join(schema.decisions)})")))
        if row.gold_category not in schema.categories:
            problems.append(DatasetProblem(dataset.source, line, "gold_category", (
                f"{row.gold_category!r} is not a category of the prompt "
                f"({', '.join(schema.categories)})")))
        if need_seller and row.seller_id is None:
            problems.append(DatasetProblem(dataset.source, line, "seller_id",
                                           "the prompt uses seller_id, so every row needs one"))
    return problems


# -- writing -----------------------------------------------------------------------------------


def write_jsonl(rows: Iterable[DatasetRow], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row.canonical(), ensure_ascii=False) + "\n")


def write_csv(rows: Iterable[DatasetRow], path: Path) -> None:
    # utf-8-sig: spreadsheet programs need the byte-order mark to read UTF-8 (CJK) correctly.
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(FIELDS)
        for row in rows:
            data = row.canonical()
            data["seller_id"] = row.seller_id or ""
            data["tags"] = ";".join(row.tags)
            writer.writerow([data[f] for f in FIELDS])


def write_dataset(rows: Iterable[DatasetRow], path: Path) -> None:
    """Write JSONL or CSV, by the file's suffix."""
    if path.suffix.lower() == ".csv":
        write_csv(rows, path)
    elif path.suffix.lower() in _JSONL_SUFFIXES:
        write_jsonl(rows, path)
    else:
        raise ValueError(f"{path}: unknown format: use .jsonl (or .ndjson) or .csv")
