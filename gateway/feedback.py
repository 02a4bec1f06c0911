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
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import orjson

__all__ = ["FeedbackLog"]

log = logging.getLogger("modgate.feedback")


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
