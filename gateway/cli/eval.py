"""`modgate eval ...`: measure prompt versions on a labelled dataset before they meet traffic.

    modgate eval validate datasets/listings-sample.jsonl
    modgate eval run --prompt listing-moderation --version 1 --version 2 \\
        --dataset datasets/listings-sample.jsonl
    modgate eval show --prompt listing-moderation --version 2 --dataset datasets/listings-sample.jsonl
    modgate eval report --prompt listing-moderation --version 1 --version 2 \\
        --dataset datasets/listings-sample.jsonl
    modgate eval thresholds --prompt listing-moderation --version 1 \\
        --dataset datasets/listings-sample.jsonl --target-precision 0.9

`run` renders every listing with each version exactly as `/v1/moderate` does and calls the
model server the configuration names (`serving.base_url`, or the local Ray Serve app) at a
lower vLLM priority than caller traffic. Answers are cached under `<data_dir>/eval/cache`, so a
re-run (after Ctrl-C, or with a new version) only computes what is missing; backend errors are
not cached and are retried. Scorecards (JSON, Markdown, PNG) go to
`<data_dir>/eval/<prompt>/<dataset sha256[:12]>/` unless `--out` is given; with two or more
versions each later version is compared with the first. Next to them: per-item results
(`v<N>-items.csv` for a spreadsheet, `v<N>-items.parquet` for DuckDB) and the run's summary
(`report-v1-v2.md`) and self-contained HTML report (`report-v1-v2.html`, plots embedded).
`report` rewrites all of these from the stored scorecards, without calling the model.

A version with a `cascade:` is evaluated as production serves it (its own model, then the
cascade's model where the verdict escalates): that is its scorecard. Both models are also
scored alone on every item, and `v<N>-cascade.md` / `.json` compare quality, tokens and
latency of the cascade with each model alone.

With `--url` (or MODGATE_URL) `run` works with a remote gateway's registry: the versions are
read and the scorecards stored (audited, under the API key's name, scope `prompts:publish`)
through its admin API, and the promotion gate's verdict is the gateway's. The evaluation itself
still runs here, against the model server this configuration names: it needs vLLM's output
constraint and a low priority, which the gateway's public /v1 routes do not pass through, so a
scorecard computed through them would not measure what production serves. `validate`, `show`
and `report` only read local files and need no gateway.

Each scorecard carries the calibration of the version (reliability diagram and expected
calibration error of the calibrated probability and of the self-reported confidence) and
per-category precision-coverage curves; `thresholds` proposes operating points from them
(it reads local files only).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.client import KeyFileOpt, UrlOpt, open_client, prompt_version
from gateway.config import AppConfig, ConfigError, load_config

if TYPE_CHECKING:
    from gateway.quality.evaluation.dataset import Dataset
    from gateway.quality.evaluation.scorecard import Comparison, Scorecard
    from prompt_registry import PromptVersion
    from serving import InferenceBackend

__all__ = ["actor_name", "eval_app", "make_backend"]

eval_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                       context_settings={"help_option_names": ["-h", "--help"]},
                       help="Evaluate prompt versions on a labelled dataset: scorecards with "
                            "confidence intervals, and paired comparisons of two versions.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
PromptOpt = Annotated[str, typer.Option("--prompt", "-p", help="prompt name in the registry")]
DatasetOpt = Annotated[Path, typer.Option("--dataset", "-d", help="labelled dataset (.jsonl or .csv)")]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o", help="output directory (default: <data_dir>/eval/<prompt>/<dataset sha256[:12]>)")]


def actor_name() -> str:
    """Who `eval run` records as storing its scorecards: MODGATE_ACTOR, else the first
    non-empty login name of LOGNAME, USER, LNAME, USERNAME, else the process's account written
    as `uid <n> (<name>)`. An empty $USER (a container, cron, CI) thus never records a bare
    `root` as if a person named root had acted: set MODGATE_ACTOR there."""
    import os

    for var in ("MODGATE_ACTOR", "LOGNAME", "USER", "LNAME", "USERNAME"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    uid = os.getuid()
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def make_backend(cfg: AppConfig) -> InferenceBackend:
    """The backend `run` calls; tests replace this function to inject a fake."""
    from serving.http_backend import OpenAIHttpBackend

    return OpenAIHttpBackend(cfg.serving.resolved_base_url())


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


def _config(config: Path | None) -> AppConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _dataset(path: Path) -> Dataset:
    from gateway.quality.evaluation.dataset import read_dataset

    dataset, problems = read_dataset(path)
    if dataset is None:
        for p in problems:
            typer.echo(str(p), err=True)
        raise _fail(f"{path}: {len(problems)} problem(s); nothing was run", 2)
    return dataset


def _default_out(cfg: AppConfig, prompt: str, dataset: Dataset) -> Path:
    return cfg.data_path() / "eval" / prompt / dataset.sha256[:12]


def _summary(sc: Scorecard) -> list[str]:
    from gateway.quality.evaluation.report import _ci, _f, _pct

    q = sc.overall
    lines = [(f"{sc.prompt} v{sc.version} on {q.n} items (dataset sha256 {sc.dataset_sha256[:12]}, "
             f"{sc.cached} cached)"),
             f"  {'category':<22}{'support':>8}  {'precision (95% CI)':<20}{'recall (95% CI)':<20}"]
    for s in [*q.categories, q.micro, q.flagged]:
        lines.append(f"  {s.category:<22}{s.support:>8}  {_ci(s.precision, s.precision_ci):<20}"
                     f"{_ci(s.recall, s.recall_ci):<20}")
    r = sc.rates
    lines.append(f"  macro F1 {_f(q.macro_f1)}  accuracy {_pct(q.accuracy)}  needs_review "
                 f"{_pct(r['needs_review'].rate)}  parse failures {r['parse_failure'].count}  "
                 f"errors {r['error'].count}")
    return lines


def _comparison_line(cmp: Comparison) -> str:
    from gateway.quality.evaluation.report import _p

    return (f"v{cmp.a_version} -> v{cmp.b_version}: McNemar exact p = {_p(cmp.mcnemar_p)} "
            f"(fixed {cmp.fixed}, broken {cmp.broken}, changed {cmp.changed}; {cmp.n} items)")


def _cascade_lines(summary: dict[str, Any]) -> str:
    """v<N>'s cascade against each of its models alone, a line per arm."""
    from gateway.quality.evaluation.report import _f

    out = [f"v{summary['version']} cascade: escalated {summary['escalated']} of {summary['items']} "
           f"({', '.join(f'{k} {v}' for k, v in sorted(summary['by_trigger'].items())) or 'none'})"]
    for arm, name in (("first", "first alone"), ("second", "second alone"), ("cascade", "cascade")):
        a = summary["arms"][arm]
        out.append(f"  {name:<13}{a['model']:<40} macro F1 {_f(a['macro_f1'])}  needs_review "
                   f"{_f(a['needs_review_rate'])}  tokens {a['tokens']['total']}  p95 "
                   f"{_f(a['latency_ms']['p95'], 0)} ms")
    return "\n".join(out)


async def _evaluate(backend: InferenceBackend, versions: list[PromptVersion], dataset: Dataset, *,
                    concurrency: int, cache_dir: Path, priority: int, timeout_s: float,
                    progress: bool, use_cache: bool) -> tuple[list[Any], list[Any]]:
    """Results of every version (a cascade version's are the cascade's), and the cascade runs
    (each model alone and the cascade) of the versions that have one."""
    from gateway.quality.evaluation.cascade import run_cascades
    from gateway.quality.evaluation.runner import run_eval

    kwargs: dict[str, Any] = dict(concurrency=concurrency, cache_dir=cache_dir, priority=priority,
                                  timeout_s=timeout_s, progress=progress, use_cache=use_cache)
    plain = [v for v in versions if v.spec.cascade is None]
    cascaded = [v for v in versions if v.spec.cascade is not None]
    try:
        results = await run_eval(plain, list(dataset.rows), backend, **kwargs) if plain else []
        runs = await run_cascades(cascaded, list(dataset.rows), backend, **kwargs) if cascaded else []
    finally:
        await backend.aclose()
    return [*results, *(r for run in runs for r in run.cascade)], runs


@eval_app.command("run")
def run_cmd(
    prompt: PromptOpt,
    version: Annotated[list[int], typer.Option("--version", "-v", help="prompt version; repeat to "
                                               "compare (each later version against the first)")],
    dataset_path: DatasetOpt,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=256,
                                             help="model calls in flight")] = 4,
    out: OutOpt = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="seconds per call "
                                                  "(default: gateway.request_timeout_s)")] = None,
    priority: Annotated[int, typer.Option("--priority", help="vLLM priority (higher = after "
                                          "caller traffic, which uses 0)")] = 5,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore cached answers and ask the model "
                                        "again (e.g. after changing the weights behind a model name)")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="progress bar on stderr (only on a terminal)")] = True,
    config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate one or more versions of a prompt on a labelled dataset and write scorecards.

    The scorecards are stored in the registry (audited) as by MODGATE_ACTOR, else the login
    name ($LOGNAME, $USER), else `uid <n> (<account>)`: set MODGATE_ACTOR where $USER is empty.

    With --url the versions come from, and the scorecards go to, the remote gateway's registry
    (as the API key, which needs prompts:read and prompts:publish); the model calls still go to
    this configuration's serving.base_url, with the output constraint production uses.
    """
    from gateway.quality.evaluation.dataset import schema_problems
    from gateway.quality.evaluation.report import (
        write_comparison,
        write_run_report,
        write_scorecard,
    )
    from gateway.quality.evaluation.scorecard import build_scorecard, compare

    cfg = _config(config)
    dataset = _dataset(dataset_path)
    numbers = list(dict.fromkeys(version))
    with open_client(config, url, key_file) as client:
        versions = [prompt_version(client.version(prompt, n)) for n in numbers]
    problems = []
    for v in versions:
        problems += [(v.version, p) for p in schema_problems(dataset, v.spec.verdict, v.spec.variables)]
    if problems:
        for n, p in problems:
            typer.echo(f"{p} (prompt v{n})", err=True)
        raise _fail(f"{dataset_path}: {len(problems)} problem(s) against the prompt's verdict "
                    "schema; nothing was run", 2)
    out_dir = out or _default_out(cfg, prompt, dataset)
    cache_dir = cfg.data_path() / "eval" / "cache"
    backend = make_backend(cfg)
    try:
        results, cascade_runs = asyncio.run(_evaluate(
            backend, versions, dataset, concurrency=concurrency, cache_dir=cache_dir,
            priority=priority, timeout_s=timeout or cfg.gateway.request_timeout_s,
            progress=progress and not as_json, use_cache=not fresh))
    except KeyboardInterrupt:
        raise _fail(f"interrupted: the answers so far are kept in {cache_dir}; run the same "
                    "command again to continue", 130) from None
    scorecards = [build_scorecard(v, dataset, [r for r in results if r.version == v.version])
                  for v in versions]
    # The registry keeps each scorecard (prompt, version, dataset sha256): promotion gates read it.
    from gateway.cli.promotion import store_scorecards

    with open_client(config, url, key_file) as client:  # --json: `prompts scorecards NAME --json`
        lines = store_scorecards(client, scorecards, actor=actor_name(), out_dir=str(out_dir))
    if not as_json:
        typer.echo("\n".join(lines))
    written = {sc.version: write_scorecard(sc, out_dir, dataset) for sc in scorecards}
    comparisons = [compare(scorecards[0], sc) for sc in scorecards[1:]]
    compared = [(c, write_comparison(c, out_dir)) for c in comparisons]
    run_report = write_run_report(scorecards, comparisons, out_dir)
    errors = sum(sc.rates["error"].count for sc in scorecards)
    from gateway.quality.evaluation.cascade import cascade_summary, write_cascade_report

    cascades = [cascade_summary(run, dataset) for run in cascade_runs]
    cascade_paths = {c["version"]: write_cascade_report(c, out_dir) for c in cascades}

    if as_json:
        typer.echo(json.dumps({
            "out_dir": str(out_dir),
            "dataset": {"source": dataset.source, "sha256": dataset.sha256, "rows": len(dataset)},
            "scorecards": [{
                "version": sc.version, "version_hash": sc.version_hash,
                "macro_f1": sc.overall.macro_f1, "accuracy": sc.overall.accuracy,
                "categories": {s.category: {"support": s.support, "precision": s.precision,
                                            "recall": s.recall, "f1": s.f1}
                               for s in sc.overall.categories},
                "errors": sc.rates["error"].count, "cached": sc.cached,
                "paths": {k: str(p) for k, p in written[sc.version].items()},
            } for sc in scorecards],
            "comparisons": [{
                "a": c.a_version, "b": c.b_version, "mcnemar_p": c.mcnemar_p, "fixed": c.fixed,
                "broken": c.broken, "changed": c.changed, "n": c.n,
                "paths": {k: str(p) for k, p in paths.items()},
            } for c, paths in compared],
            "report": {k: str(p) for k, p in run_report.items()},
            "cascades": [{**c, "paths": {k: str(p) for k, p in cascade_paths[c["version"]].items()}}
                         for c in cascades],
        }, indent=2, ensure_ascii=False))
    else:
        for sc in scorecards:
            typer.echo("\n".join(_summary(sc)))
        for c, _ in compared:
            typer.echo(_comparison_line(c))
        for summary in cascades:
            typer.echo(_cascade_lines(summary))
        typer.echo(f"reports: {out_dir} (HTML: {run_report['html'].name}; per item: "
                   "v<N>-items.csv / .parquet)")
    if errors:
        raise _fail(f"{errors} call(s) failed and got no verdict (they count as misses in the "
                    "scorecards); run the same command again to retry only those")


@eval_app.command("validate")
def validate_cmd(file: Annotated[Path, typer.Argument(help="dataset (.jsonl or .csv)")],
                 as_json: JsonOpt = False) -> None:
    """Check a dataset: every problem as file:line: field: reason, or its row count and hash."""
    from collections import Counter

    from gateway.quality.evaluation.dataset import read_dataset

    dataset, problems = read_dataset(file)
    if as_json:
        typer.echo(json.dumps({
            "ok": dataset is not None, "problems": [str(p) for p in problems],
            "rows": len(dataset) if dataset else None,
            "sha256": dataset.sha256 if dataset else None}, indent=2, ensure_ascii=False))
    if dataset is None:
        if not as_json:
            for p in problems:
                typer.echo(str(p))
        raise _fail(f"{file}: {len(problems)} problem(s)")
    if not as_json:
        typer.echo(f"ok: {len(dataset)} rows, sha256 {dataset.sha256}")
        locales = Counter(r.locale for r in dataset.rows)
        labels = Counter(f"{r.gold_decision}/{r.gold_category}" for r in dataset.rows)
        typer.echo("  locales: " + ", ".join(f"{k} {v}" for k, v in sorted(locales.items())))
        typer.echo("  gold:    " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))


@eval_app.command("show")
def show_cmd(prompt: PromptOpt,
             version: Annotated[int, typer.Option("--version", "-v", help="prompt version")],
             dataset_path: DatasetOpt, out: OutOpt = None,
             markdown: Annotated[bool, typer.Option("--markdown", help="print the full Markdown "
                                                    "report")] = False,
             config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Print the stored scorecard of a version on a dataset (written by `eval run`)."""
    from gateway.quality.evaluation.report import scorecard_markdown, scorecard_paths
    from gateway.quality.evaluation.scorecard import Scorecard

    cfg = _config(config)
    dataset = _dataset(dataset_path)
    paths = scorecard_paths(out or _default_out(cfg, prompt, dataset), version)
    try:
        data = json.loads(paths["json"].read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(f"no scorecard for {prompt} v{version} on this dataset at {paths['json']}; "
                    f"run `modgate eval run --prompt {prompt} --version {version} --dataset "
                    f"{dataset_path}` first") from None
    if data.get("prompt") != prompt or data.get("dataset_sha256") != dataset.sha256:
        raise _fail(f"{paths['json']} is a scorecard of {data.get('prompt')} on dataset "
                    f"{str(data.get('dataset_sha256'))[:12]}, not of {prompt} on "
                    f"{dataset.sha256[:12]}")
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    sc = Scorecard.from_dict(data)
    if markdown:
        typer.echo(scorecard_markdown(sc), nl=False)
        return
    typer.echo("\n".join(_summary(sc)))
    typer.echo(f"report: {paths['markdown']}")


def _stored_scorecard(out_dir: Path, prompt: str, version: int, dataset: Dataset,
                      dataset_path: Path) -> Scorecard:
    """The scorecard `eval run` stored for *version* in *out_dir*, or a CLI error saying how
    to get one."""
    from gateway.quality.evaluation.report import load_scorecard

    try:
        return load_scorecard(out_dir, prompt, version, dataset.sha256)
    except FileNotFoundError:
        raise _fail(f"no scorecard for {prompt} v{version} on this dataset in {out_dir}; run "
                    f"`modgate eval run --prompt {prompt} --version {version} --dataset "
                    f"{dataset_path}` first", 2) from None
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


@eval_app.command("report")
def report_cmd(
    prompt: PromptOpt,
    version: Annotated[list[int], typer.Option("--version", "-v", help="an evaluated version; "
                                               "repeat to compare (each later one against the first)")],
    dataset_path: DatasetOpt, out: OutOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Rewrite the reports of versions already evaluated, without calling the model.

    Reads the scorecards `eval run` stored (v<N>.json) and writes again: Markdown, PNG plots,
    per-item CSV and Parquet, comparisons, the run summary (report-v<A>-v<B>.md) and the
    self-contained HTML report (report-v<A>-v<B>.html). Use it to compare versions evaluated
    in separate runs, or after upgrading modgate.

    \b
    Example:
      modgate eval report --prompt listing-moderation -v 1 -v 2 \\
          --dataset datasets/listings-sample.jsonl
      # then open <data_dir>/eval/listing-moderation/<sha>/report-v1-v2.html
    """
    from gateway.quality.evaluation.report import (
        write_comparison,
        write_run_report,
        write_scorecard,
    )
    from gateway.quality.evaluation.scorecard import compare

    cfg = _config(config)
    dataset = _dataset(dataset_path)
    out_dir = out or _default_out(cfg, prompt, dataset)
    scorecards = [_stored_scorecard(out_dir, prompt, n, dataset, dataset_path)
                  for n in dict.fromkeys(version)]
    for sc in scorecards:
        write_scorecard(sc, out_dir, dataset)
    comparisons = [compare(scorecards[0], sc) for sc in scorecards[1:]]
    for c in comparisons:
        write_comparison(c, out_dir)
    paths = write_run_report(scorecards, comparisons, out_dir)
    if as_json:
        typer.echo(json.dumps({"out_dir": str(out_dir),
                               "report": {k: str(p) for k, p in paths.items()}}, indent=2))
        return
    for c in comparisons:
        typer.echo(_comparison_line(c))
    typer.echo(f"reports: {out_dir}\n  summary: {paths['markdown'].name}\n  HTML:    "
               f"{paths['html'].name}")


@eval_app.command("thresholds")
def thresholds_cmd(
    prompt: PromptOpt,
    version: Annotated[int, typer.Option("--version", "-v", help="an evaluated version")],
    dataset_path: DatasetOpt,
    target_precision: Annotated[float, typer.Option(
        "--target-precision", min=0.5, max=1.0,
        help="the 95% Wilson lower bound of precision each operating point must reach")] = 0.9,
    out: OutOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Propose per-category operating points (thresholds) from a version's stored scorecard.

    For each violation category, among the verdicts the model put in it: the precision-coverage
    curve of blocking every verdict whose calibrated block probability is at or above a
    threshold, and the lowest threshold whose precision lower bound (95% Wilson) reaches
    --target-precision (`block_at`); below it, the highest threshold under which allowing is
    as precise (`review_at`, 0 when none is). Prints a `thresholds:` block to paste into the
    prompt file (a new version ships, canaries and rolls back with it) and writes
    v<N>-thresholds.png and v<N>-thresholds.yaml next to the scorecard. Does not call the
    model: run `modgate eval run` first. A positive is what the scorecard counts for the
    category (gold decision not allow, gold category the category).

    \b
    Example:
      modgate eval thresholds --prompt listing-moderation -v 1 \\
          --dataset datasets/listings-sample.jsonl --target-precision 0.9
    """
    from gateway.quality.evaluation.calibration import proposals_yaml, propose, thresholds_plot

    cfg = _config(config)
    dataset = _dataset(dataset_path)
    out_dir = out or _default_out(cfg, prompt, dataset)
    sc = _stored_scorecard(out_dir, prompt, version, dataset, dataset_path)
    scored = sum(1 for o in sc.items if o.block_probability is not None)
    if not scored:
        raise _fail(f"the scorecard of {prompt} v{version} has no calibrated probabilities (the "
                    "engine sent no log-probabilities, or the answers were cached before they were "
                    f"asked for); run `modgate eval run --prompt {prompt} --version {version} "
                    f"--dataset {dataset_path} --fresh`", 2)
    proposals = propose(sc.items, sc.categories, target_precision)
    snippet = proposals_yaml(proposals, target=target_precision,
                             source=f"{prompt} v{version} on {dataset.source} (sha256 "
                                    f"{dataset.sha256[:12]}, {scored} item(s) with a probability)")
    png = thresholds_plot(proposals, out_dir / f"v{version}-thresholds.png",
                          f"{prompt} v{version}: precision against coverage (target "
                          f"{target_precision:g})", target_precision)
    yaml_path = out_dir / f"v{version}-thresholds.yaml"
    yaml_path.write_text(snippet, encoding="utf-8")
    if as_json:
        typer.echo(json.dumps({"target_precision": target_precision, "scored_items": scored,
                               "categories": [p.to_dict() for p in proposals], "yaml": snippet,
                               "paths": {"png": str(png), "yaml": str(yaml_path)}},
                              indent=2, ensure_ascii=False))
        return
    typer.echo(f"{'category':<22}{'items':>6}{'positive':>9}  {'block_at':>8}  {'coverage':>8}  "
               f"{'precision (lower)':<18}{'review_at':>9}")
    for p in proposals:
        bp = p.block_point
        typer.echo(f"{p.category:<22}{p.population:>6}{p.positives:>9}  "
                   + (f"{p.block_at:>8.4f}  {bp.coverage:>8.0%}  {bp.precision:.3f} ({bp.precision_low:.3f})"
                      f"{'':<4}{p.review_at or 0.0:>9.4f}" if bp is not None and p.block_at is not None
                      else f"{'-':>8}  {'-':>8}  {'not reached':<18}{'-':>9}"))
    typer.echo("")
    typer.echo(snippet, nl=False)
    typer.echo(f"plot: {png}\nsnippet: {yaml_path}")
