"""`modgate`: run the stack, the gateway or the serving layer, and build the tiny model.

    modgate up                 everything on this machine (Ray Serve + vLLM + gateway)
    modgate serving            only the Ray Serve app with the configured models
    modgate gateway            only the gateway, against serving.base_url
    modgate build-tiny-model   write the random tiny Llama used offline and in tests
    modgate check-config       validate a configuration file and say what it will run
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.decisions import decisions_app
from gateway.cli.deploy import deploy_app
from gateway.cli.eval import eval_app
from gateway.cli.feedback import feedback_app
from gateway.cli.latency import latency_app
from gateway.cli.registry import keys_app, prompts_app
from gateway.cli.replay import replay_app
from gateway.cli.report import report_app
from gateway.cli.rollouts import rollouts_app
from gateway.cli.samples import samples_app
from gateway.config import AppConfig, ConfigError, load_config

if TYPE_CHECKING:  # the store modules load on first use, not at every CLI start
    from gateway.cli.serve import Listeners
    from prompt_registry import KeyStore, PromptStore

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="modgate",
    help=(
        "modgate: a content-moderation gateway serving versioned prompts on vLLM via Ray Serve."
        "\n\n\b\nStart here:\n"
        "  modgate up                 everything on this machine (Ray Serve + vLLM + gateway)\n"
        "  modgate serving            only the Ray Serve app with the configured models\n"
        "  modgate gateway            only the gateway, against serving.base_url\n"
        "  modgate build-tiny-model   write the random tiny Llama used offline and in tests\n"
        "  modgate check-config       validate a configuration file and say what it will run\n"
        "  modgate prompts ...        publish, diff, label, roll back and audit prompt versions\n"
        "  modgate rollouts ...       canary and shadow a new prompt version; promote or abort on evidence\n"
        "  modgate keys ...           create, list and revoke API keys\n"
        "  modgate decisions ...      export (Parquet/CSV), tail and summarise every verdict\n"
        "  modgate eval ...           score prompt versions on a labelled dataset; compare two\n"
        "  modgate feedback ...       import reviewer labels; live precision/recall and reviewer agreement; disagreements as dataset rows\n"
        "  modgate report ops         HTML/Markdown operational report of a time window, with plots\n"
        "  modgate samples ...        the opt-in listing-content sample store: stats, delete an item, purge\n"
        "  modgate replay             recorded traffic through a candidate version, offline; agreement with production\n"
        "  modgate latency            p50/p95/p99 per request stage over a time window\n"
        "  modgate deploy ...         generate the KubeRay serveConfigV2 and the config JSON Schema\n"
        "\nEvery command takes --config (or MODGATE_CONFIG); the default is configs/modgate.yaml."
        "\nprompts, rollouts, keys, eval run and feedback import also take --url (or MODGATE_URL) "
        "to work on a remote gateway through its admin API, with the key in MODGATE_API_KEY or "
        "--key-file."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,  # inherited by every sub-command: -h works everywhere
)

app.add_typer(prompts_app, name="prompts")
app.add_typer(keys_app, name="keys")
app.add_typer(rollouts_app, name="rollouts")
app.add_typer(decisions_app, name="decisions", help="Export, tail and summarise the decision log "
              "(every verdict, for DuckDB or a spreadsheet).")
app.add_typer(eval_app, name="eval", help="Evaluate prompt versions on a labelled dataset: "
              "scorecards with confidence intervals and paired comparisons.")
app.add_typer(feedback_app, name="feedback", help="Reviewer feedback: import a review tool's "
              "labels; joined with the decision log, live precision and recall per version and "
              "agreement between reviewers; disagreements as dataset rows.")
app.add_typer(report_app, name="report", help="Operational report of a time window (HTML and "
              "Markdown, with plots).")
app.add_typer(latency_app)
app.add_typer(replay_app)
app.add_typer(samples_app, name="samples")
app.add_typer(deploy_app, name="deploy", help="Kubernetes deployment helpers: generate the "
              "RayService serveConfigV2 and the config JSON Schema.")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                 help="configuration file (default: configs/modgate.yaml)"),
]
HostOpt = Annotated[str | None, typer.Option("--host", help="gateway bind address (overrides config)")]
PortOpt = Annotated[int | None, typer.Option("--port", help="gateway port (overrides config)")]
ServingPortOpt = Annotated[
    int | None, typer.Option("--serving-port", help="Ray Serve HTTP port (overrides config)")]


def _err(message: str) -> None:
    typer.echo(f"modgate: error: {message}", err=True)


def _load(config: Path | None, host: str | None = None, port: int | None = None,
          serving_port: int | None = None) -> AppConfig:
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["gateway.host"] = host
    if port is not None:
        overrides["gateway.port"] = port
    if serving_port is not None:
        overrides["serving.ray.http_port"] = serving_port
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        _err(str(exc))
        raise typer.Exit(2) from None


def _open_store(cfg: AppConfig) -> PromptStore:
    from gateway.stores import open_store
    from prompt_registry import PromptFileError, RegistryError
    from prompt_registry.loader import seed_store

    try:
        store = open_store(cfg)
    except ConfigError as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    seed = cfg.seed_path()
    if seed is not None:
        try:
            names = seed_store(store, seed, label=cfg.gateway.default_label,
                               served_models=[m.name for m in cfg.serving.models])
        except PromptFileError as exc:
            _err(str(exc))
            raise typer.Exit(2) from None
        except RegistryError as exc:
            _err(f"registry: {exc}")
            raise typer.Exit(1) from None
        where = cfg.registry_path() if cfg.registry.store == "sqlite" else "redis"
        typer.echo(f"registry: {where} (seeded {', '.join(names) or 'nothing'} from {seed})")
    return store


def _local_keys(cfg: AppConfig, store: KeyStore) -> dict[str, str]:
    """On a store with no API keys, create a caller and an admin key for local use and keep
    them (mode 0600) in data_dir/local-keys.json, so the printed curl works out of the box."""
    from prompt_registry.keys import generate_key

    path = cfg.data_path() / "local-keys.json"
    if path.exists():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}
    if cfg.gateway.auth != "required" or store.list_keys():
        return {}
    keys = {}
    for name, scopes in (("local-caller", ["moderate"]), ("local-admin", ["admin"])):
        key, record = generate_key(name, scopes, created_by="modgate up")
        store.put_key(record)
        keys[name] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh, indent=2)
    typer.echo(f"auth: created API keys local-caller (moderate) and local-admin (admin) in {path}")
    return keys


def _start_serving(cfg: AppConfig) -> float:
    from serving.ray_app import start_serving, wait_until_serving

    t0 = time.monotonic()
    names = [m.name for m in cfg.serving.models]
    typer.echo(f"serving: starting Ray Serve with vLLM for {', '.join(names)} "
               "(about a minute on a 2-core CPU machine)...")
    start_serving(cfg.serving, cfg.data_path())

    def progress(waited: float, status: str) -> None:
        typer.echo(f"serving: waiting for models ({waited:.0f}s): {status}")

    wait_until_serving(cfg.serving.resolved_base_url(), names, cfg.serving.ray.start_timeout_s,
                       progress=progress)
    elapsed = time.monotonic() - t0
    reach = " (the gateway calls the models through Ray Serve deployment handles)" if (
        cfg.serving.transport == "handle") else ""
    typer.echo(f"serving: ready at {cfg.serving.resolved_base_url()} after {elapsed:.1f}s{reach}")
    return elapsed


def _stop_serving() -> None:
    from serving.ray_app import stop_serving

    stop_serving()


def _curl_example(cfg: AppConfig, key: str | None, port: int | None = None) -> str:
    """A curl to paste. The key itself is never printed (banners end up in captured logs): the
    command reads it from the 0600 keys file, and the banner shows only its prefix."""
    host = "127.0.0.1" if cfg.gateway.host in ("0.0.0.0", "::") else cfg.gateway.host
    body = {"item_id": "item-1001", "seller_id": "seller-42",
            "title": "Designer sneakers AAA replica 1:1 mirror quality",
            "description": "Same as the original, logo included. WhatsApp me to pay by bank transfer.",
            "locale": "en-US"}
    keys_file = cfg.data_path() / "local-keys.json"
    reader = (f"$({shlex.quote(sys.executable)} -c 'import json,sys; "
              f"print(json.load(open(sys.argv[1]))[\"local-caller\"])' {shlex.quote(str(keys_file))})")
    auth = f'-H "authorization: Bearer {reader}" ' if key else ""
    return (f"curl -s http://{host}:{port or cfg.gateway.port}/v1/moderate {auth}"
            f"-H 'content-type: application/json' -d '{json.dumps(body, ensure_ascii=False)}'")


def _bind_listeners(cfg: AppConfig) -> Listeners:
    """The gateway's ports, bound now (`gateway.cli.serve.Listeners`); exit 1 naming the port
    when it is taken."""
    from gateway.cli.serve import CannotListen, bind_listeners

    try:
        return bind_listeners(cfg)
    except CannotListen as exc:
        _err(str(exc))
        raise typer.Exit(1) from None


def _run_gateway(cfg: AppConfig, store: PromptStore, *, announce: bool, local_keys: bool = False,
                 listeners: Listeners | None = None) -> None:
    """Serve the gateway in this process, or in `gateway.workers` worker processes on one port
    (`gateway.cli.serve`), on *listeners* (bound here when not given). Either way the banner
    comes once the port answers."""
    held = listeners if listeners is not None else _bind_listeners(cfg)
    try:
        _serve_gateway(cfg, store, held, announce=announce, local_keys=local_keys)
    finally:
        held.close()


def _serve_gateway(cfg: AppConfig, store: PromptStore, listeners: Listeners, *, announce: bool,
                   local_keys: bool) -> None:
    # Only `modgate up` (one machine) mints local keys; deployed gateways use `modgate keys`.
    keys = _local_keys(cfg, store) if local_keys else {}
    from gateway.cli.serve import CannotListen, serve_app, serve_workers

    def banner(port: int) -> None:
        if not announce:
            return
        workers = cfg.gateway.workers
        typer.echo(f"gateway: listening on http://{cfg.gateway.host}:{port}"
                   + (f" with {workers} worker processes" if workers > 1 else "")
                   + " (Ctrl-C to stop). Try:\n")
        caller = keys.get("local-caller")
        if caller:
            typer.echo(f"auth: caller key {caller[:12]}… (full key in "
                       f"{cfg.data_path() / 'local-keys.json'}, mode 0600)")
        typer.echo(_curl_example(cfg, caller, port) + "\n", color=False)
        sys.stdout.flush()

    if cfg.gateway.workers > 1:
        try:
            ok = serve_workers(cfg, on_started=banner, echo=typer.echo, listeners=listeners)
        except CannotListen as exc:
            _err(str(exc))
            raise typer.Exit(1) from None
        if not ok:
            _err("the gateway workers could not start (their errors are above)")
            raise typer.Exit(1)
        return

    from gateway.bootstrap import build_gateway

    if not serve_app(cfg, build_gateway(cfg, store), on_started=lambda: banner(listeners.port),
                     sockets=[listeners.api],
                     metrics_sockets=[listeners.metrics] if listeners.metrics is not None else None):
        _err(f"gateway could not listen on {cfg.gateway.host}:{cfg.gateway.port}")
        raise typer.Exit(1)


@app.command()
def up(config: ConfigOpt = None, host: HostOpt = None, port: PortOpt = None,
       serving_port: ServingPortOpt = None) -> None:
    """Run the whole stack here: registry, Ray Serve + vLLM with the configured models, gateway.

    With the default config this builds a tiny random model on first start (no download),
    starts Ray Serve with vLLM's CPU engine, seeds the SQLite registry from configs/prompts/,
    and prints a curl command to try.
    """
    cfg = _load(config, host, port, serving_port)
    if cfg.serving.mode == "ray":
        # This process starts Ray and, with one gateway process, is the gateway too: `auto`
        # reaches the models through deployment handles here.
        transport = cfg.serving.transport_for(ray_driver=cfg.gateway.workers == 1)
        cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"transport": transport})})
    # The gateway's port first: taken, it fails now rather than after the models load, and
    # nothing Ray starts meanwhile can take it (gateway.cli.serve.Listeners).
    listeners = _bind_listeners(cfg)
    store = _open_store(cfg)
    started = cfg.serving.mode == "ray"
    try:
        if started:
            _start_serving(cfg)
        _run_gateway(cfg, store, announce=True, local_keys=True, listeners=listeners)
    finally:
        listeners.close()
        store.close()
        if started:
            typer.echo("stopping Ray Serve...")
            _stop_serving()


@app.command()
def serving(config: ConfigOpt = None, serving_port: ServingPortOpt = None) -> None:
    """Run only the Ray Serve app (OpenAI-compatible, at serving.base_url) until Ctrl-C."""
    cfg = _load(config, serving_port=serving_port)
    try:
        _start_serving(cfg)
        typer.echo("serving: Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_serving()


@app.command()
def gateway(config: ConfigOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Run only the gateway, against an already running model server (serving.base_url)."""
    cfg = _load(config, host, port)
    store = _open_store(cfg)
    try:
        _run_gateway(cfg, store, announce=True)
    finally:
        store.close()


@app.command("build-tiny-model")
def build_tiny_model_cmd(
    out: Annotated[Path, typer.Argument(help="directory to write the model into")],
    seed: Annotated[int, typer.Option(help="weight initialisation seed")] = 0,
) -> None:
    """Write a tiny random-weight Llama (tokenizer trained locally, chat template) for offline use.

    Its outputs are meaningless; it exists so the stack runs with no model download.
    """
    from serving.tiny_model import build_tiny_model

    try:
        path = build_tiny_model(out, seed=seed)
    except (FileExistsError, ValueError) as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    typer.echo(f"tiny model written to {path}")


@app.command("check-config")
def check_config(config: ConfigOpt = None) -> None:
    """Validate a configuration file and print what it will run."""
    cfg = _load(config)
    where = (cfg.registry_path() if cfg.registry.store == "sqlite"
             else cfg.registry.redis_url or f"${cfg.registry.redis_url_env}")
    typer.echo(f"ok: gateway on {cfg.gateway.host}:{cfg.gateway.port}, registry "
               f"{cfg.registry.store} at {where}, serving mode {cfg.serving.mode} "
               f"at {cfg.serving.resolved_base_url()}, models: "
               + ", ".join(f"{m.name} ({m.source})" for m in cfg.serving.models))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
