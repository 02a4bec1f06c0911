"""`modgate replay`: run recorded traffic through a candidate version offline and report its
agreement with what production answered.

    modgate replay --prompt listing-moderation --version 2 --since 7d --rate 2
    modgate replay --prompt listing-moderation --version 2 --dataset datasets/listings-sample.jsonl

Recorded traffic is the sample store (`samples:` in the configuration; listing content kept for a
share of traffic) within `--since`/`--until`, or a dataset file (`--dataset`, the `datasets/`
format; production's answer is the decision log's newest decision for each item id). The
candidate is rendered, called and parsed by the evaluation runner (the same code as `modgate
eval run`, sharing its answer cache under `<data_dir>/eval/cache`), against the model server the
configuration names, at most `--rate` calls per second and at vLLM priority 10 (after live
traffic, shadows and evaluations). The gateway's own routes are not used: they do not carry the
verdict constraint and priority a replay needs, and a replay must not add decisions to the log.

Writes `replay-v<N>.json`, `.md` and `.html` to `--out` (default
`<data_dir>/replay/<prompt>/<UTC timestamp>`). Exit codes: 0 done, 1 nothing to replay or every
call failed, 2 bad input.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gateway.cli import eval as eval_cli
from gateway.cli.decisions import _range
from gateway.cli.eval import _config, _fail
from gateway.cli.registry import store_for
from gateway.config import AppConfig

if TYPE_CHECKING:
    from gateway.quality.replay import Replayed, ReplayItem
    from gateway.samples import SampleStore

__all__ = ["replay_app"]

replay_app = typer.Typer(add_completion=False, rich_markup_mode=None)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]



def _samples(cfg: AppConfig) -> SampleStore | None:
    from gateway.samples import open_configured

    try:
        return open_configured(cfg, cleanup=True)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


@replay_app.command("replay")
def replay_cmd(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="prompt name in the registry")],
    version: Annotated[int, typer.Option("--version", "-v", min=1, help="the candidate version")],
    since: Annotated[str | None, typer.Option("--since", help="sample store rows from (ISO 8601 or "
                                              "a duration before now: 24h, 7d); default: all kept")] = None,
    until: Annotated[str | None, typer.Option("--until", help="... up to (exclusive)")] = None,
    dataset_path: Annotated[Path | None, typer.Option("--dataset", "-d", help="replay a dataset file "
                                                      "instead of the sample store")] = None,
    rate: Annotated[float, typer.Option("--rate", min=0.05, max=1000.0, help="model calls per "
                                        "second at most")] = 2.0,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=64,
                                             help="model calls in flight at most")] = 4,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="replay at most this many "
                                              "rows (the newest)")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="seconds per call "
                                                  "(default: gateway.request_timeout_s)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report directory")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore cached answers")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="progress bar on stderr (only on a terminal)")] = True,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Replay recorded traffic (the sample store, or --dataset) through a candidate version at a
    bounded rate and low priority; report agreement with production per category and locale,
    with the flipped items (and their listing content when the sample store has it)."""
    from gateway.quality.decisions import read_segments
    from gateway.quality.evaluation.dataset import DatasetError, load_dataset
    from gateway.quality.replay import (
        production_answers,
        replay,
        replay_markdown,
        rows_from_dataset,
        rows_from_samples,
        write_report,
    )
    from gateway.samples import content_for

    cfg = _config(config)
    start, end = _range(since, until)
    if dataset_path is not None and (since or until):
        raise _fail("--since/--until select sample store rows; a --dataset is replayed whole", 2)
    with store_for(cfg) as store:
        candidate = store.get_version(prompt, version)
    log_dir = cfg.data_path() / cfg.decision_log.dir
    by_request, by_item = production_answers(read_segments(log_dir, start)) if log_dir.exists() else ({}, {})
    samples = _samples(cfg)
    rows: list[Replayed]
    if dataset_path is not None:
        try:
            dataset = load_dataset(dataset_path)
        except DatasetError as exc:
            raise _fail(str(exc), 2) from None
        rows = rows_from_dataset(list(dataset.rows), by_item)
        source = f"dataset {dataset_path}"
    else:
        if samples is None:
            raise _fail("no sample store to replay (samples.enabled is off, or nothing was kept "
                        "yet); pass --dataset FILE to replay a dataset", 1)
        recent = samples.recent(since=start, until=end, prompt=prompt)
        rows = rows_from_samples(list(reversed(recent)), by_request)
        source = "sample store"
    if limit is not None:
        rows = rows[-limit:]
    if not rows:
        raise _fail(f"nothing to replay from the {source}", 1)
    if all(r.production is None for r in rows):
        raise _fail(f"no row of the {source} has a production answer in the decision log "
                    f"({log_dir}); nothing to compare with", 1)
    timeout_s = timeout or cfg.gateway.request_timeout_s
    # A call waits for its slot inside the runner's per-call deadline: keep that wait short.
    concurrency = max(1, min(concurrency, math.floor(rate * timeout_s / 2)))

    def content(items: Sequence[ReplayItem]) -> Mapping[str, Mapping[str, str]]:
        return content_for(samples, request_ids=[i.request_id for i in items if i.request_id],
                           item_ids=[i.item_id for i in items])

    backend = eval_cli.make_backend(cfg)
    cache_dir = cfg.data_path() / "eval" / "cache"

    async def run() -> object:
        try:
            return await replay(candidate, rows, backend, rate=rate, concurrency=concurrency,
                                cache_dir=cache_dir, timeout_s=timeout_s,
                                progress=progress and not as_json, source=source,
                                window=(start, end), content=content, use_cache=not fresh)
        finally:
            await backend.aclose()

    try:
        report = asyncio.run(run())
    except KeyboardInterrupt:
        raise _fail(f"interrupted: the answers so far are kept in {cache_dir}; run the same "
                    "command again to continue", 130) from None
    finally:
        if samples is not None:
            samples.close()
    from gateway.quality.replay import ReplayReport

    assert isinstance(report, ReplayReport)
    out_dir = out or cfg.data_path() / "replay" / prompt / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = write_report(report, out_dir)
    if as_json:
        typer.echo(json.dumps({**report.as_dict(), "paths": {k: str(p) for k, p in paths.items()}},
                              ensure_ascii=False, indent=2))
    else:
        typer.echo(replay_markdown(report, max_flips=20).rstrip())
        typer.echo(f"\nreport: {paths['html']} (and .md, .json)")
    if report.items and report.errors == len(report.items):
        raise _fail(f"every one of the {report.errors} model calls failed; is the model server "
                    f"at {cfg.serving.resolved_base_url()} up?", 1)
