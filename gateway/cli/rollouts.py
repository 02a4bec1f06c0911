"""`modgate rollouts ...`: canary and shadow rollouts from the command line.

    modgate rollouts start listing-moderation --canary 2 --steps 5,25,50,100 --shadow 3:0.2
    modgate rollouts status listing-moderation [--watch 5]
    modgate rollouts step|pause|resume|promote|abort listing-moderation

A running gateway judges the rollout by its gates and steps, promotes or aborts it by itself
(`--manual` turns that off); every change, with its evidence, is in `modgate prompts audit`.
Promotion, automatic or by hand, goes through the promotion gate: a manual `promote` the gate
refuses exits with status 3 (an admin can `--override-gate --reason ... --admin-key ...`); an
automatic one pauses the rollout with the gate's findings.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from gateway.cli.promotion import AdminKeyOpt, OverrideOpt, ReasonOpt
from gateway.cli.registry import (
    ActorOpt,
    ConfigOpt,
    JsonOpt,
    NoteOpt,
    _actor,
    _fail,
    _out,
    _override,
    _store_and_config,
    gate_refused,
)
from gateway.rollouts.ops import apply_action, rollout_status, start_rollout
from prompt_registry import GateRefused
from prompt_registry.rollouts import GateConfig, ShadowSpec

__all__ = ["rollouts_app"]

rollouts_app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Canary and shadow rollouts of a new prompt version.\n\n\b\n"
         "  modgate rollouts start listing-moderation --canary 2 --steps 5,25,50,100 --shadow 3:0.2\n"
         "  modgate rollouts status listing-moderation [--watch 5]\n"
         "  modgate rollouts step|pause|resume|promote|abort listing-moderation\n\n"
         "A running gateway judges the rollout by its gates and steps, promotes or aborts it by "
         "itself (--manual turns that off); every change, with its evidence, is in "
         "`modgate prompts audit`.")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h") from None


def _shadow(text: str) -> ShadowSpec:
    try:
        version, _, rate = text.partition(":")
        return ShadowSpec(version=int(version), sample_rate=float(rate or 1.0))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not VERSION:RATE like 3:0.2") from None


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _print_status(st: dict[str, Any]) -> None:
    r = st["rollout"]
    canary = f"canary v{r['canary_version']} at {st['weight']}% (step {r['step_index'] + 1}/{len(r['steps'])})" \
        if r["canary_version"] else "no canary"
    typer.echo(f"{r['prompt']} rollout {r['id']} ({r['state']}, {'auto' if r['auto'] else 'manual'}): "
               f"stable v{r['stable_version']}, {canary}")
    if st["next_step_not_before"] and r["state"] == "running":
        typer.echo(f"  next step not before {st['next_step_not_before']}; gates say: {st['would_decide'] or 'wait'}")
    if r["state"] == "paused" and r.get("last_decision"):
        typer.echo(f"  paused: {r['last_decision']}")
    s = st["stats"]
    for arm in ("stable", "canary"):
        a = s.get(arm) or {}
        if a:
            typer.echo(f"  {arm:<7} requests {a['requests']:<7} verdicts {a['verdicts']:<7} errors {a['errors']:<5} "
                       f"parse failures {a['parse_failures']:<5} p95 {_fmt(a.get('p95_ms'), 0)} ms")
    typer.echo("  gates:")
    for g in st["gates"]:
        lo, hi = g["interval"]
        typer.echo(f"    {g['gate']:<34} {_fmt(g['value']):>7}  [{_fmt(lo)}, {_fmt(hi)}]  limit {_fmt(g['limit'])}"
                   f"  n={g['samples']:<6} {g['verdict'].upper()}")
    for version, p in sorted(s.get("pairs", {}).items()):
        typer.echo(f"  shadow v{version}: n={p['n']} agreement {_fmt(p['agreement'])} kappa {_fmt(p['kappa'])} "
                   f"(errors {p['errors']}, dropped {p['dropped']})")
    pg = st.get("promotion_gate")
    if pg is not None:
        if pg["verdict"] == "none":
            typer.echo("  promotion gate: none declared")
        else:
            typer.echo(f"  promotion gate (canary v{pg['version']} -> production): {pg['verdict'].upper()}")
            for c in pg["criteria"]:
                typer.echo(f"    {c['verdict'].upper():<5} {c['detail']}")
    if st["flips"]:
        typer.echo("  recent flips (stable -> candidate):")
        for f in st["flips"][:10]:
            a, b = f["stable"], f["candidate"]
            typer.echo(f"    {f['item_id']:<20} v{a['version']} {a['decision']}/{a['category']} -> "
                       f"v{b['version']} {b['decision']}/{b['category']}")


@rollouts_app.command("start")
def start_cmd(
    name: str,
    canary: Annotated[int | None, typer.Option("--canary", help="candidate version served to a sticky share of callers")] = None,
    steps: Annotated[str, typer.Option("--steps", help="canary weights in %, comma-separated")] = "5,25,50,100",
    shadow: Annotated[list[str] | None, typer.Option("--shadow", help="VERSION:RATE evaluated off the request path; repeatable")] = None,
    hold: Annotated[str, typer.Option("--hold", help="minimum time at each step (90s, 30m, 1h)")] = "1h",
    min_samples: Annotated[int, typer.Option("--min-samples", help="no automatic decision below this many samples")] = 200,
    max_parse_failure_rate: Annotated[float, typer.Option(help="abort above this (upper-bounded by a Wilson interval)")] = 0.02,
    max_error_rate: Annotated[float, typer.Option(help="abort above this")] = 0.02,
    min_agreement: Annotated[float, typer.Option(help="with the canary version shadowed: decision agreement needed")] = 0.8,
    max_flag_rate_drift: Annotated[float, typer.Option(help="largest allowed change in any category's flag rate")] = 0.1,
    max_p95_ms: Annotated[float | None, typer.Option("--max-p95-ms", help="canary p95 latency limit")] = None,
    subject_key: Annotated[str, typer.Option(help="stickiness: seller_id, item_id or subject")] = "seller_id",
    manual: Annotated[bool, typer.Option("--manual", help="never step/promote/abort automatically")] = False,
    note: NoteOpt = "", actor: ActorOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Start a rollout of NAME from its production version."""
    try:
        weights = [int(w) for w in steps.split(",") if w.strip()]
    except ValueError:
        raise _fail(f"--steps {steps!r}: expected comma-separated integers like 5,25,50,100", 2) from None
    gates = GateConfig(min_samples=min_samples, max_error_rate=max_error_rate,
                       max_parse_failure_rate=max_parse_failure_rate, min_agreement=min_agreement,
                       max_flag_rate_drift=max_flag_rate_drift, max_p95_latency_ms=max_p95_ms)
    if subject_key not in ("seller_id", "item_id", "subject"):
        raise _fail("--subject-key must be seller_id, item_id or subject", 2)
    with _store_and_config(config) as (store, cfg):
        label = cfg.gateway.default_label
        start_rollout(store, name, canary_version=canary, steps=weights,
                      shadows=[_shadow(s) for s in shadow or []], step_hold_s=_duration(hold), gates=gates,
                      auto=not manual, subject_key=subject_key, actor=_actor(actor), note=note,
                      production_label=label)
        st = rollout_status(store, name, production_label=label)
    _out(as_json, st, lambda: _print_status(st))


@rollouts_app.command("status")
def status_cmd(name: str, watch: Annotated[float | None, typer.Option("--watch", help="refresh every N seconds")] = None,
               config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Weights, sample counts, gate values with their intervals, next step, flipped items."""
    while True:
        with _store_and_config(config) as (store, cfg):
            st = rollout_status(store, name, production_label=cfg.gateway.default_label)
        if watch and not as_json:
            typer.echo("\x1b[2J\x1b[H", nl=False)
        _out(as_json, st, lambda st=st: _print_status(st))
        if not watch or st["rollout"]["state"] not in ("running", "paused"):
            return
        time.sleep(watch)


def _action(action: str) -> Any:
    def cmd(name: str, note: NoteOpt = "", actor: ActorOpt = None, config: ConfigOpt = None,
            as_json: JsonOpt = False) -> None:
        with _store_and_config(config) as (store, cfg):
            label = cfg.gateway.default_label
            apply_action(store, name, action, actor=_actor(actor), note=note, production_label=label)
            st = rollout_status(store, name, production_label=label)
        _out(as_json, st, lambda: _print_status(st))
    cmd.__doc__ = {
        "step": "Move the canary to the next weight now.",
        "pause": "Keep the current weight; the controller stops deciding.",
        "resume": "Let the controller decide again.",
        "abort": "Stop: canary weight back to 0, production unchanged.",
    }[action]
    return cmd


for _name in ("step", "pause", "resume", "abort"):
    rollouts_app.command(_name)(_action(_name))


@rollouts_app.command("promote")
def promote_cmd(name: str, note: NoteOpt = "", actor: ActorOpt = None,
                override_gate: OverrideOpt = False, reason: ReasonOpt = None,
                admin_key: AdminKeyOpt = None, config: ConfigOpt = None,
                as_json: JsonOpt = False) -> None:
    """Make the canary production now (compare-and-set on the production label), through the
    promotion gate: refused with exit status 3 unless the canary version's stored scorecard
    meets its prompt's criteria, or an admin overrides (--override-gate --reason --admin-key)."""
    with _store_and_config(config) as (store, cfg):
        label = cfg.gateway.default_label
        override = _override(store, cfg, override_gate, reason, admin_key)
        try:
            apply_action(store, name, "promote", actor=_actor(actor), note=note,
                         production_label=label, override=override)
        except GateRefused as exc:
            raise gate_refused(exc) from None
        st = rollout_status(store, name, production_label=label)
    _out(as_json, st, lambda: _print_status(st))

