"""Shadow evaluation: candidate prompt versions judged on live traffic, off the request path.

Owned by the app lifespan. `submit` never waits and never raises: when `max_pending`
evaluations are already queued or running the shadow is dropped and counted. Each evaluation
runs under its own timeout, at the lowest engine priority, is never retried, refuses to queue
for an engine slot (`queue=False`: a saturated model drops shadows rather than delaying
callers), and is its own trace linked to the primary request's span. Results go to the rollout
recorder (comparison with the verdict the caller got) and never to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link

from gateway import cascade
from gateway.decision_log import DecisionLog
from gateway.pipeline import Evaluation, ModerationPipeline
from gateway.recording import decision_row
from gateway.rollouts.recorder import RolloutRecorder
from gateway.telemetry import Attr
from prompt_registry.rollouts import Rollout
from serving.resilience import no_retries

__all__ = ["ShadowDispatcher"]

log = logging.getLogger("modgate.shadow")


class ShadowDispatcher:
    def __init__(self, pipeline: ModerationPipeline, recorder: RolloutRecorder, *,
                 max_concurrency: int = 4, max_pending: int = 64, timeout_s: float = 10.0,
                 priority: int = 0, decision_log: DecisionLog | None = None) -> None:
        self._log = decision_log
        self._pipeline = pipeline
        self._recorder = recorder
        self._sem = asyncio.Semaphore(max_concurrency)
        self._max_pending = max_pending
        self._timeout_s = timeout_s
        self._priority = priority
        self._tasks: set[asyncio.Task[None]] = set()
        self.submitted = 0
        self.dropped = 0
        self.failed = 0
        self.completed = 0

    def submit(self, rollout: Rollout, version: int, primary: Evaluation, variables: Mapping[str, object],
               locale: str | None, *, request_id: str, item_id: str, subject: str = "") -> bool:
        if len(self._tasks) >= self._max_pending:
            self.dropped += 1
            self._recorder.dropped(rollout.id, version)
            self._pipeline.metrics.shadow_dropped.labels(prompt=rollout.prompt, version=str(version)).inc()
            return False
        self.submitted += 1
        link = Link(trace.get_current_span().get_span_context())
        task = asyncio.ensure_future(self._run(rollout, version, primary, dict(variables), locale,
                                               request_id, item_id, subject, link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, rollout: Rollout, version: int, primary: Evaluation, variables: dict[str, object],
                   locale: str | None, request_id: str, item_id: str, subject: str, link: Link) -> None:
        tracer = self._pipeline.tracer
        candidate = None
        started = time.perf_counter()
        # A new root span (context=Context()) linked to the primary: shadow work is not part of
        # the caller's latency, so it must not appear as a child of the caller's request.
        with tracer.start_as_current_span("shadow evaluation", context=Context(), links=[link],
                                          attributes={Attr.SHADOW_OF: request_id, Attr.TRAFFIC_ARM: "shadow",
                                                      Attr.PROMPT_NAME: rollout.prompt,
                                                      Attr.PROMPT_VERSION: version}):
            try:
                async with self._sem:
                    resolved = await self._pipeline.resolve(rollout.prompt, version=version, arm="shadow")
                    with no_retries():  # shadows are never retried
                        ev = await asyncio.wait_for(cascade.evaluate(
                            self._pipeline, resolved, variables, locale, request_id=f"{request_id}-shadow-v{version}",
                            timeout_s=self._timeout_s, label=None, arm="shadow", priority=self._priority,
                            queue=False), self._timeout_s)
                    candidate = ev.verdict
                    self.completed += 1
                    if self._log is not None:
                        self._log.append(decision_row(
                            ev, request_id=f"{request_id}-shadow-v{version}", item_id=item_id,
                            subject=subject, arm="shadow", shadow_of=request_id,
                            latency_ms=(time.perf_counter() - started) * 1000.0, trace_id=None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a shadow failure is counted, never raised
                self.failed += 1
                log.debug("shadow v%d of %s failed: %s", version, rollout.prompt, exc)
        self._recorder.pair(rollout.id, version, primary.verdict, candidate, request_id=request_id,
                            item_id=item_id, stable_version=primary.version.version)
        if candidate is not None:
            m = self._pipeline.metrics
            m.child(m.shadow_comparisons, prompt=rollout.prompt, stable_version=str(primary.version.version),
                    candidate_version=str(version),
                    agree=str(candidate.decision == primary.verdict.decision).lower()).inc()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
