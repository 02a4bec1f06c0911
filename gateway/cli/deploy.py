"""`modgate deploy ...`: files the Kubernetes deployment (k8s/) is built from.

    modgate deploy serve-config   the RayService serveConfigV2 (Ray Serve LLM app) for a config
    modgate deploy json-schema    the JSON Schema of the configuration file format

Both write deterministic text; `--check` compares instead of writing and exits 1 with a unified
diff when the file on disk is stale, so CI can insist that committed files are regenerated.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated

import typer

from gateway.config import AppConfig, ConfigError, load_config

__all__ = ["deploy_app", "render_json_schema"]

deploy_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=("Kubernetes deployment helpers: generate the RayService serveConfigV2 and the config "
          "JSON Schema. See k8s/README.md."),
)

CheckOpt = Annotated[bool, typer.Option(
    "--check", help="do not write; exit 1 and print a unified diff if OUT differs from what "
                    "would be written (for CI)")]


def _err(message: str) -> None:
    typer.echo(f"modgate: error: {message}", err=True)


def _emit(text: str, out: Path, *, check: bool, regenerate: str) -> None:
    """Write *text* to *out*, or with *check* compare it and exit 1 on a difference."""
    if check:
        try:
            current = out.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current == text:
            typer.echo(f"ok: {out} is up to date")
            return
        diff = difflib.unified_diff(
            [] if current is None else current.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=f"{out} (on disk)" if current is not None else "/dev/null",
            tofile=f"{out} (generated)")
        typer.echo("".join(diff), nl=False)
        state = "is missing" if current is None else "is out of date"
        typer.echo(f"modgate: {out} {state}; regenerate it with: {regenerate}", err=True)
        raise typer.Exit(1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        _err(f"cannot write {out}: {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")


@deploy_app.command("serve-config")
def serve_config_cmd(
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="modgate configuration whose serving.models become the Ray Serve "
                               "LLM app (e.g. configs/examples/prod-cluster.yaml)")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="file to write, e.g. k8s/overlays/prod-gpu/serve-config.yaml")],
    check: CheckOpt = False,
) -> None:
    """Write the RayService serveConfigV2 for the models in a configuration.

    The output is a Ray Serve config document: one application, route prefix "/",
    import_path ray.serve.llm:build_openai_app, and one LLMConfig per entry in
    serving.models (the same mapping `modgate serving` uses locally). The k8s overlays load
    it into RayService spec.serveConfigV2. Models with a tiny: source are rejected (they only
    exist on the machine that built them). Exit codes: 0 ok, 1 --check found a difference,
    2 invalid configuration.
    """
    from serving.serve_config import render_serve_config_yaml

    try:
        cfg = load_config(config)
        text = render_serve_config_yaml(cfg.serving, app_name=cfg.serving.ray.app_name)
    except (ConfigError, ValueError) as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    _emit(text, out, check=check,
          regenerate=f"modgate deploy serve-config --config {config} --out {out}")


def render_json_schema() -> str:
    """JSON Schema of the configuration file (pretty, stable key order, trailing newline)."""
    schema = AppConfig.model_json_schema()
    # base_dir is set by load_config from the file's location; it is not a file setting.
    schema.get("properties", {}).pop("base_dir", None)
    if "base_dir" in schema.get("required", []):
        schema["required"].remove("base_dir")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


@deploy_app.command("json-schema")
def json_schema_cmd(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="file to write, normally configs/modgate.schema.json")],
    check: CheckOpt = False,
) -> None:
    """Write the JSON Schema of modgate configuration files.

    Editors use it to complete and check config YAML (e.g. a
    `# yaml-language-server: $schema=...` comment). Generated from the same pydantic models
    that validate configs at start-up. Exit codes: 0 ok, 1 --check found a difference.
    """
    _emit(render_json_schema(), out, check=check,
          regenerate=f"modgate deploy json-schema --out {out}")
