"""What one gateway worker process knows about its siblings (`gateway.workers` above 1).

`modgate gateway` / `modgate up` with `gateway.workers: N` start N worker processes that serve
one port (`gateway.cli.workers` is the supervisor). Each worker builds the same app as a single
process does (`gateway.bootstrap.build_gateway`), with a `WorkerContext` that changes three
things:

* the decision log and the feedback log are written under a replica name carrying the worker
  index (`<host>-w<index>`), so no two processes ever append to the same file, and the readers,
  which already merge replicas by time, merge the workers too;
* the in-memory caller limits live in a table shared by the workers (`limits.SharedCallerTable`)
  in the run directory, so they hold for the gateway, not per process;
* webhook deliveries run in worker 0 only: the dispatcher keeps one cursor file per data_dir.

`/metrics` aggregation needs no wiring here: the supervisor sets `PROMETHEUS_MULTIPROC_DIR` to
the run directory's `metrics/` before it starts the workers, so prometheus-client keeps every
metric in per-process files there, and the exposition (`gateway.api.ops`) sums them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MULTIPROC_ENV", "WorkerContext", "multiprocess_dir"]

# prometheus-client reads this at import time: set before a worker imports anything.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory prometheus-client keeps this process's metrics in, when it does."""
    return os.environ.get(MULTIPROC_ENV) or None


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """Worker *index* of *count*, with the supervisor's per-run directory *run_dir*."""

    index: int
    count: int
    run_dir: Path

    @property
    def metrics_dir(self) -> Path:
        return self.run_dir / "metrics"

    @property
    def limits_path(self) -> Path:
        return self.run_dir / "caller-limits.bin"

    @property
    def replica(self) -> str:
        """This worker's replica name in the decision and feedback logs."""
        return f"{socket.gethostname() or 'replica'}-w{self.index}"

    @property
    def delivers_webhooks(self) -> bool:
        return self.index == 0
