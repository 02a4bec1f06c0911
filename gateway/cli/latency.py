"""`modgate latency`: where the time goes, per stage, over a time window, from a running gateway.

Scrapes the gateway's `/metrics` twice, `--window` apart, subtracts the `modgate_stage_seconds`
histograms and prints p50/p95/p99 per stage (auth, prompt.resolve, prompt.render, queue,
backend, verdict.validate, total), by prompt version and arm. Percentiles are interpolated
within histogram buckets, as Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Annotated

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli.feedback import MISSING

__all__ = ["latency_app", "stage_percentiles"]

latency_app = typer.Typer(add_completion=False, rich_markup_mode=None,
                          context_settings={"help_option_names": ["-h", "--help"]})

Key = tuple[str, str, str, str]  # stage, prompt, version, arm


def _buckets(text: str) -> dict[Key, dict[float, float]]:
    out: dict[Key, dict[float, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        if family.name != "modgate_stage_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                lb = sample.labels
                key = (lb["stage"], lb["prompt"], lb["version"], lb["arm"])
                out[key][float(lb["le"])] = sample.value
    return out


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0
    if total <= 0:
        return None
    rank = q * total
    prev_edge, prev_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if edge == float("inf"):
                return prev_edge
            span = count - prev_count
            return prev_edge + (edge - prev_edge) * ((rank - prev_count) / span if span else 1.0)
        prev_edge, prev_count = edge, count
    return prev_edge


def stage_percentiles(before: str, after: str) -> list[dict[str, object]]:
    """Per-stage percentiles (ms) of what happened between two /metrics scrapes."""
    a, b = _buckets(before), _buckets(after)
    rows = []
    for key in sorted(b):
        diff = {le: b[key][le] - a.get(key, {}).get(le, 0.0) for le in b[key]}
        n = diff.get(float("inf"), 0.0)
        if n <= 0:
            continue
        stage, prompt, version, arm = key
        row: dict[str, object] = {"stage": stage, "prompt": prompt, "version": version, "arm": arm,
                                  "count": int(n)}
        for q in (0.5, 0.95, 0.99):
            v = _quantile(q, diff)
            row[f"p{int(q * 100)}_ms"] = None if v is None else round(v * 1000, 3)
        rows.append(row)
    order = ["auth", "prompt.resolve", "prompt.render", "queue", "backend", "verdict.validate", "total"]
    rows.sort(key=lambda r: (str(r["prompt"]), str(r["version"]), str(r["arm"]),
                             order.index(str(r["stage"])) if r["stage"] in order else 99))
    return rows


@latency_app.command()
def latency(
    url: Annotated[str, typer.Option("--url", help="the gateway's base URL")] = "http://127.0.0.1:8080",
    window: Annotated[float, typer.Option("--window", help="seconds between the two scrapes")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """p50/p95/p99 per request stage over the next WINDOW seconds, by prompt version and arm
    (a percentile that cannot be computed reads "undefined")."""
    try:
        before = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
        time.sleep(window)
        after = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        typer.echo(f"modgate: error: cannot scrape {url}/metrics: {exc}", err=True)
        raise typer.Exit(1) from None
    rows = stage_percentiles(before, after)
    if as_json:
        typer.echo(json.dumps({"window_s": window, "stages": rows}, indent=2))
        return
    if not rows:
        typer.echo(f"no moderation requests in the last {window:.0f}s")
        return
    typer.echo(f"{'prompt':<22}{'v':>3} {'arm':<8}{'stage':<18}{'count':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for r in rows:
        typer.echo(f"{str(r['prompt'])[:21]:<22}{r['version']!s:>3} {r['arm']!s:<8}{r['stage']!s:<18}{r['count']:>8}"
                   + "".join(f"{MISSING if r[k] is None else r[k]:>10}" for k in ("p50_ms", "p95_ms", "p99_ms")))
