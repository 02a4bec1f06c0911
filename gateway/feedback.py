"""The reviewer feedback log (`POST /v1/feedback`, in `gateway.api.feedback`, appends to it).

Every label is appended to a feedback log (JSONL, one file per day and replica, under
`data_dir/feedback/`) to be joined with the decision log on `request_id` for precision and
recall per prompt version. A label for a request that was answered under a rollout is also
matched (through the verdict memo kept in the registry store) to the arm and version that
answered it, and counted as true/false positives per category for the rollout's precision and
recall gates.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from gateway.problems import InvalidLabel
from prompt_registry import FAIL_CLOSED_DECISION, VerdictSchema

__all__ = ["FeedbackLog", "FeedbackScan", "check_label", "feedback_lines"]

log = logging.getLogger("modgate.feedback")


_FILE = re.compile(r"^feedback-(\d{8})-.+\.jsonl$")  # as FeedbackLog names them


@dataclass
class FeedbackScan:
    """What `feedback_lines` went through: files of the days asked for, non-empty lines."""

    files: int = 0
    lines: int = 0


def feedback_lines(directory: Path | None, not_before: datetime | None = None,
                   counts: FeedbackScan | None = None) -> Iterator[bytes]:
    """Each non-empty line of the feedback files under *directory*, oldest day first, skipping
    files of days before *not_before* (a label comes after its decision) and unreadable files;
    *counts* gets the files and lines seen. Every reader of the feedback log (live quality,
    reviewer agreement, the review queue) starts here."""
    if directory is None or not directory.is_dir():
        return
    first_day = not_before.astimezone(UTC).strftime("%Y%m%d") if not_before else None
    for path in sorted(directory.iterdir()):
        m = _FILE.match(path.name)
        if m is None or (first_day is not None and m.group(1) < first_day):
            continue
        if counts is not None:
            counts.files += 1
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        for line in raw.splitlines():
            if line.strip():
                if counts is not None:
                    counts.lines += 1
                yield line


def check_label(schema: VerdictSchema, decision: str, category: str | None) -> str | None:
    """The label's category as counted (None for allow), or raise InvalidLabel naming the
    field. One rule for every way a label arrives: `POST /v1/feedback`, the console's review
    form and `modgate feedback import`."""
    if decision not in schema.decisions:
        raise InvalidLabel(f"{decision!r} is not a decision of this prompt "
                           f"({', '.join(schema.decisions)})", field="decision")
    if decision == FAIL_CLOSED_DECISION:
        raise InvalidLabel(f"{decision!r} is not a label: a reviewer decides (allow or block)",
                           field="decision")
    if category is not None and category not in schema.categories:
        raise InvalidLabel(f"{category!r} is not a category of this prompt "
                           f"({', '.join(schema.categories)})", field="category")
    if decision == "allow":
        if category not in (None, "none"):
            raise InvalidLabel(f"allow with category {category!r} contradicts itself: "
                               "allow has no category", field="category")
        return None
    if category in (None, "none"):
        raise InvalidLabel(f"{decision} needs the category that applies", field="category")
    return category


class FeedbackLog:
    """Append-only JSONL files, written in a worker thread; one file per UTC day and replica."""

    def __init__(self, directory: Path, *, replica: str | None = None) -> None:
        self.directory = directory
        self.replica = replica or socket.gethostname()
        self._lock = threading.Lock()

    def _append(self, line: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        day = datetime.now(UTC).strftime("%Y%m%d")
        with self._lock, (self.directory / f"feedback-{day}-{self.replica}.jsonl").open("ab") as fh:
            fh.write(line + b"\n")

    async def append(self, record: dict[str, object]) -> None:
        await asyncio.to_thread(self._append, orjson.dumps(record))
