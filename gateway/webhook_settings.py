"""Webhook configuration: the `webhooks:` block of the configuration file.

Kept apart from `gateway.webhooks` (the dispatcher, with aiohttp and the Prometheus
collectors) so that loading a configuration — which every CLI command does — does not import
an HTTP client it does not use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from gateway.webhooks import WebhookEvent

__all__ = ["EVENT_TYPES", "MIN_SECRET_BYTES", "WebhookSettings", "WebhookSubscriber"]

EVENT_TYPES: tuple[str, ...] = (
    "prompt.published", "label.moved", "rollout.started", "rollout.stepped", "rollout.paused",
    "rollout.resumed", "rollout.promoted", "rollout.aborted", "rollout.fallback", "rollout.changed",
    "gate.refused", "gate.policy_changed", "scorecard.stored",
    "approval.requested", "approval.approved", "approval.denied", "approval.expired",
    "approval.failed", "four_eyes.changed",
    "version.deprecated", "version.blocked", "version.reinstated",
)
MIN_SECRET_BYTES = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookSubscriber(_Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
                      description="names the subscriber in metrics and the delivery log")
    url: str = Field(..., description="http(s) URL the events are POSTed to")
    secret_env: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
                            description="environment variable holding the signing secret "
                            f"(at least {MIN_SECRET_BYTES} bytes); never the secret itself")
    events: list[str] = Field(default_factory=lambda: ["*"],
                              description="event types to send ('*': all)")
    prompts: list[str] = Field(default_factory=list, description="only these prompts (empty: all)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook URL is http:// or https:// with a host")
        if parts.username or parts.password:
            raise ValueError("no credentials in a webhook URL (the body is signed instead)")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e != "*" and e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type(s) {', '.join(unknown)}; one of "
                             f"{', '.join(EVENT_TYPES)} or '*'")
        if not v:
            raise ValueError("a subscriber needs at least one event type ('*' for all)")
        return v

    def wants(self, event: WebhookEvent) -> bool:
        return (("*" in self.events or event.type in self.events)
                and (not self.prompts or event.prompt in self.prompts))


class WebhookSettings(_Strict):
    subscribers: list[WebhookSubscriber] = Field(default_factory=list)
    dir: str = Field("webhooks", description="cursor and delivery log, relative to data_dir")
    replay_history: bool = Field(False, description="on the very first start (no cursor yet), "
                                 "also send the audit entries that already exist")
    poll_interval_s: float = Field(30.0, gt=0, description="re-read every prompt's audit log at "
                                   "least this often (changes announced by the store are read "
                                   "at once)")
    min_tick_s: float = Field(0.25, ge=0, description="at most one scan per this interval "
                              "(coalesces bursts of change announcements)")
    metrics_interval_s: float = Field(15.0, gt=0, description="refresh the rollout gauges this often")
    timeout_s: float = Field(10.0, gt=0, description="one delivery attempt, connect to answer")
    store_timeout_s: float = Field(10.0, gt=0, description="one registry read")
    max_attempts: int = Field(8, ge=1, le=100)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    queue_max: int = Field(1000, ge=1, description="events waiting per subscriber; beyond, dropped")
    drain_timeout_s: float = Field(5.0, ge=0, description="at shutdown, wait this long for queued "
                                   "deliveries; the rest is sent after the next start")
    delivery_log_max_bytes: int = Field(16 << 20, ge=4096)

    @field_validator("subscribers")
    @classmethod
    def _unique(cls, v: list[WebhookSubscriber]) -> list[WebhookSubscriber]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"subscriber name(s) used twice: {', '.join(dupes)}")
        return v
