"""`modgate rollouts ...`: canary and shadow rollouts from the command line.

    modgate rollouts start listing-moderation --canary 2 --steps 5,25,50,100 --shadow 3:0.2
    modgate rollouts status listing-moderation [--watch 5]
    modgate rollouts step|pause|resume|promote|abort listing-moderation

A running gateway judges the rollout by its gates and steps, promotes or aborts it by itself
(`--manual` turns that off); every change, with its evidence, is in `modgate prompts audit`.
With `--url` (or MODGATE_URL) every command acts on a remote gateway through its admin API: a
start or change is then authorised by the API key's scopes (`labels:write` and
`labels:protected`), not by access to the store.
Promotion, automatic or by hand, goes through the promotion gate: a manual `promote` the gate
refuses exits with status 3 (an admin can `--override-gate --reason ... --admin-key ...`); an
automatic one pauses the rollout with the gate's findings.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any

import typer

from gateway.cli.client import (
    ClientError,
    GateRefusal,
    KeyFileOpt,
    RegistryClient,
    UrlOpt,
    open_client,
)
from gateway.cli.promotion import AdminKeyOpt, OverrideOpt, ReasonOpt
from gateway.cli.registry import (
    ActorOpt,
    ConfigOpt,
    JsonOpt,
    NoteOpt,
    _actor,
    _fail,
    _out,
    asked_override,
    gate_refused,
)
from gateway.quality.reporting import MISSING
from prompt_registry.rollouts import (
    UNPROVEN_MAX_WEIGHT,
    GateConfig,
    ShadowSpec,
    canary_verdicts_needed,
    sample_needs,
)

__all__ = ["rollouts_app"]

rollouts_app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    help="Canary and shadow rollouts of a new prompt version.\n\n\b\n"
         "  modgate rollouts start listing-moderation --canary 2 --steps 5,25,50,100 --shadow 3:0.2\n"
         "  modgate rollouts status listing-moderation [--watch 5]\n"
         "  modgate rollouts step|pause|resume|promote|abort listing-moderation\n"
         "  modgate rollouts list [listing-moderation]; modgate rollouts show ID\n\n"
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
    version, _, rate = text.partition(":")
    try:
        number, share = int(version), float(rate or 1.0)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not VERSION:RATE like 3:0.2") from None
    if not 0.0 < share <= 1.0:  # the shape is right: say what is wrong with the rate
        raise typer.BadParameter(f"{text!r}: the rate {rate} is a share of traffic, in (0, 1] "
                                 "(0.2 shadows 20 % of requests)")
    try:
        return ShadowSpec(version=number, sample_rate=share)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r}: {exc}") from None


# --gate NAME=VALUE: short name -> (GateConfig field, type, can be switched off)
GATE_OPTIONS: dict[str, tuple[str, type, bool]] = {
    "error_rate": ("max_error_rate", float, True),
    "parse_failure_rate": ("max_parse_failure_rate", float, True),
    "p95_ms": ("max_p95_latency_ms", float, True),
    "agreement": ("min_agreement", float, True),
    "flag_drift": ("max_flag_rate_drift", float, True),
    "precision": ("min_precision", float, True),
    "recall_drop": ("max_recall_drop", float, True),
    "min_samples": ("min_samples", int, False),
    "min_feedback": ("min_feedback", int, False),
    "confidence": ("confidence", float, False),
}


def _gate_setting(text: str) -> tuple[str, float | int | None]:
    """`NAME=VALUE` or `NAME=off` of --gate as (GateConfig field, value)."""
    name, sep, raw = text.partition("=")
    fields = {field: (field, kind, off) for field, kind, off in GATE_OPTIONS.values()}
    spec = GATE_OPTIONS.get(name.strip()) or fields.get(name.strip())
    if not sep or spec is None:
        raise typer.BadParameter(f"{text!r}: expected NAME=VALUE or NAME=off, NAME one of "
                                 f"{', '.join(GATE_OPTIONS)}")
    field, kind, off = spec
    raw = raw.strip().lower()
    if raw in ("off", "none", "no"):
        if not off:
            raise typer.BadParameter(f"{name} cannot be switched off")
        return field, None
    try:
        return field, kind(raw)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: {raw!r} is not a {kind.__name__}") from None


def defaults_help() -> str:
    """What the default gates are and what they need, computed from GateConfig."""
    d = GateConfig()
    needs = sample_needs(d)
    canary = canary_verdicts_needed(d)
    bare = sample_needs(GateConfig(min_samples=1))
    per5 = MISSING if canary is None else f"{canary / 0.05:,.0f}"
    return (f"Defaults: error_rate {d.max_error_rate}, parse_failure_rate {d.max_parse_failure_rate}, "
            f"agreement {d.min_agreement} (only when the canary version is shadowed), flag_drift "
            f"{d.max_flag_rate_drift}, p95_ms off, precision off, recall_drop off, min_samples "
            f"{d.min_samples}, min_feedback {d.min_feedback}, confidence {d.confidence}. "
            f"A rate gate passes only when the upper {d.confidence:.0%} Wilson bound is under its "
            f"limit, so even a perfect canary needs samples: {bare.get('error_rate')} at a "
            f"{d.max_error_rate} limit, whatever --min-samples says. With the defaults a step waits "
            f"for at least {canary} canary verdicts (about {per5} requests at a 5% step; "
            f"error_rate {needs.get('error_rate')}, parse_failure_rate {needs.get('parse_failure_rate')}, "
            f"flag_drift {needs.get('flag_rate_drift')}, agreement {needs.get('disagreement_rate')} "
            "shadow comparisons). `rollouts status` shows what each gate still needs.")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return MISSING
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _latency(lat: dict[str, Any]) -> str:
    if not lat.get("n"):
        return "latency -"
    text = " ".join(f"{q} {_fmt(lat.get(q), 0)}" for q in ("p50", "p95", "p99")) + " ms"
    return text + (" (incl. old histogram buckets: upper estimates)" if lat.get("from_old_buckets") else "")


def _print_arms(st: dict[str, Any]) -> None:
    s = st["stats"]
    for arm in ("stable", "canary"):
        a = s.get(arm) or {}
        if a:
            typer.echo(f"  {arm:<7} requests {a['requests']:<7} verdicts {a['verdicts']:<7} errors {a['errors']:<5} "
                       f"parse failures {a['parse_failures']:<5} {_latency(a.get('latency_ms') or {})}")


def _print_status(st: dict[str, Any]) -> None:
    r = st["rollout"]
    if r["state"] not in ("running", "paused"):
        typer.echo(f"{r['prompt']} rollout {r['id']} ({r['state']}): {st['outcome']}")
        typer.echo(f"  started {r['started_at'][:19]} by {r['started_by'] or '-'}: stable v{r['stable_version']}, "
                   f"canary {'v' + str(r['canary_version']) if r['canary_version'] else '-'}; "
                   f"last decision: {r['last_decision'] or '-'}")
        _print_arms(st)
        final = st.get("final_evidence") or []
        if final:
            typer.echo("  gates at the last transition: "
                       + ", ".join(f"{g['gate']} {g['verdict'].upper()}" for g in final))
        return
    canary = f"canary v{r['canary_version']} at {st['weight']}% (step {r['step_index'] + 1}/{len(r['steps'])})" \
        if r["canary_version"] else "no canary"
    typer.echo(f"{r['prompt']} rollout {r['id']} ({r['state']}, {'auto' if r['auto'] else 'manual'}): "
               f"stable v{r['stable_version']}, {canary}")
    typer.echo("  serving: " + ", ".join(f"v{x['version']} ({x['arm']}) {x['share']}%" for x in st["serving"]))
    if st["next_step_not_before"] and r["state"] == "running":
        typer.echo(f"  next step not before {st['next_step_not_before']}; gates say: {st['would_decide'] or 'wait'}")
    if r["state"] == "paused" and r.get("last_decision"):
        typer.echo(f"  paused: {r['last_decision']}")
    _print_arms(st)
    s = st["stats"]
    typer.echo("  gates:")
    for g in st["gates"]:
        lo, hi = g["interval"]
        more = g.get("more")
        need = "" if g["verdict"] in ("pass", "fail", "skip") else (
            "  (can never pass at this limit)" if g.get("needs") is None and g["verdict"] == "wait"
            else f"  needs {more} more" if more else "")
        note = f"  {g['note']}" if g.get("note") and g["verdict"] in ("wait", "skip") else ""
        typer.echo(f"    {g['gate']:<34} {_fmt(g['value']):>7}  [{_fmt(lo)}, {_fmt(hi)}]  limit {_fmt(g['limit'])}"
                   f"  n={g['samples']:<6} {g['verdict'].upper()}{need}{note}")
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


@rollouts_app.command("start", help="Start a rollout of NAME from its production version.\n\n"
                      "A canary version that fails its promotion gate does not start without an admin "
                      "override (--override-gate --reason --admin-key; exit status 3 otherwise), and "
                      "one that has not passed it never gets more than --max-unproven-weight (50%) of "
                      "traffic: only the promotion, through the gate, gives it all.\n\n"
                      "The gates judge the canary at every step; set or switch them off with "
                      "--gate NAME=VALUE|off. " + defaults_help())
def start_cmd(
    name: str,
    canary: Annotated[int | None, typer.Option("--canary", help="candidate version served to a sticky share of callers")] = None,
    steps: Annotated[str, typer.Option("--steps", help="canary weights in %, comma-separated")] = "5,25,50,100",
    shadow: Annotated[list[str] | None, typer.Option("--shadow", help="VERSION:RATE evaluated off the request path; repeatable")] = None,
    hold: Annotated[str, typer.Option("--hold", help="minimum time at each step (90s, 30m, 1h)")] = "1h",
    gate: Annotated[list[str] | None, typer.Option(
        "--gate", metavar="NAME=VALUE|off",
        help="set or switch off a gate; repeatable. NAME: error_rate, parse_failure_rate, p95_ms, "
             "agreement, flag_drift, precision, recall_drop (each a limit, or `off`), min_samples, "
             "min_feedback, confidence. E.g. --gate p95_ms=350 --gate agreement=off --gate "
             "precision=0.9")] = None,
    min_samples: Annotated[int | None, typer.Option("--min-samples", help="no automatic decision below this many samples (same as --gate min_samples=N)")] = None,
    max_parse_failure_rate: Annotated[float | None, typer.Option(help="same as --gate parse_failure_rate=X")] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="same as --gate error_rate=X")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="same as --gate agreement=X (judged only when the canary version is shadowed)")] = None,
    max_flag_rate_drift: Annotated[float | None, typer.Option(help="same as --gate flag_drift=X: largest allowed change in any category's flag rate")] = None,
    max_p95_ms: Annotated[float | None, typer.Option("--max-p95-ms", help="same as --gate p95_ms=X: canary p95 latency limit")] = None,
    subject_key: Annotated[str, typer.Option(help="stickiness: seller_id, item_id or subject")] = "seller_id",
    manual: Annotated[bool, typer.Option("--manual", help="never step/promote/abort automatically")] = False,
    max_unproven_weight: Annotated[int, typer.Option(
        "--max-unproven-weight", min=0, max=99,
        help="the most traffic (%) the canary gets while it has not passed its promotion gate; "
             "past it the next step is the promotion itself, through the gate")] = UNPROVEN_MAX_WEIGHT,
    on_refused: Annotated[str, typer.Option(
        "--on-promotion-refused", help="where the canary goes when the gate refuses its "
        "promotion: last_safe (the last step within --max-unproven-weight) or zero")] = "last_safe",
    override_gate: OverrideOpt = False, reason: ReasonOpt = None, admin_key: AdminKeyOpt = None,
    note: NoteOpt = "", actor: ActorOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
    key_file: KeyFileOpt = None, as_json: JsonOpt = False,
) -> None:
    try:
        weights = [int(w) for w in steps.split(",") if w.strip()]
    except ValueError:
        raise _fail(f"--steps {steps!r}: expected comma-separated integers like 5,25,50,100", 2) from None
    settings: dict[str, Any] = {k: v for k, v in (
        ("min_samples", min_samples), ("max_error_rate", max_error_rate),
        ("max_parse_failure_rate", max_parse_failure_rate), ("min_agreement", min_agreement),
        ("max_flag_rate_drift", max_flag_rate_drift), ("max_p95_latency_ms", max_p95_ms)) if v is not None}
    settings.update(_gate_setting(g) for g in gate or [])
    try:
        gates = GateConfig(**settings)
    except ValueError as exc:
        raise _fail(f"--gate: {exc}", 2) from None
    if subject_key not in ("seller_id", "item_id", "subject"):
        raise _fail("--subject-key must be seller_id, item_id or subject", 2)
    if on_refused not in ("last_safe", "zero"):
        raise _fail("--on-promotion-refused must be last_safe or zero", 2)
    override = asked_override(override_gate, reason, admin_key)
    # The admin API's start body (`gateway.api.rollouts.RolloutStart`), whichever side runs it.
    body = {"canary_version": canary, "steps": weights,
            "shadows": [_shadow(s).model_dump(mode="json") for s in shadow or []],
            "step_hold_s": _duration(hold), "gates": gates.model_dump(mode="json"), "auto": not manual,
            "subject_key": subject_key, "note": note, "max_unproven_weight": max_unproven_weight,
            "on_promotion_refused": on_refused}
    with open_client(config, url, key_file) as client:
        try:
            st = client.start_rollout(name, body, actor=_actor(actor), override=override)
        except GateRefusal as exc:
            raise gate_refused(exc, before=f"rollout of {name} v{canary} not started:") from None
    _out(as_json, st, lambda: _print_status(st))


@rollouts_app.command("status")
def status_cmd(name: str, watch: Annotated[float | None, typer.Option("--watch", help="refresh every N seconds")] = None,
               config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
               as_json: JsonOpt = False) -> None:
    """Weights, sample counts, gate values with their intervals, next step, flipped items."""
    while True:
        with open_client(config, url, key_file) as client:
            st = client.rollout_status(name)
        if watch and not as_json:
            typer.echo("\x1b[2J\x1b[H", nl=False)
        _out(as_json, st, functools.partial(_print_status, st))
        if not watch or st["rollout"]["state"] not in ("running", "paused"):
            return
        time.sleep(watch)


def _action(action: str) -> Any:
    def cmd(name: str, note: NoteOpt = "", actor: ActorOpt = None, config: ConfigOpt = None,
            url: UrlOpt = None, key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
        with open_client(config, url, key_file) as client:
            st = client.rollout_action(name, action, note=note, actor=_actor(actor), override=None)
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
                admin_key: AdminKeyOpt = None, config: ConfigOpt = None, url: UrlOpt = None,
                key_file: KeyFileOpt = None, as_json: JsonOpt = False) -> None:
    """Make the canary production now (compare-and-set on the production label), through the
    promotion gate: refused with exit status 3 unless the canary version's stored scorecard
    meets its prompt's criteria, or an admin overrides (--override-gate --reason --admin-key)."""
    override = asked_override(override_gate, reason, admin_key)
    with open_client(config, url, key_file) as client:
        try:
            st = client.rollout_action(name, "promote", note=note, actor=_actor(actor), override=override)
        except GateRefusal as exc:
            raise gate_refused(exc) from None
    _out(as_json, st, lambda: _print_status(st))



@rollouts_app.command("list")
def list_cmd(name: Annotated[str | None, typer.Argument(help="one prompt (default: every prompt)")] = None,
             config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
             as_json: JsonOpt = False) -> None:
    """Every rollout, finished ones included, newest first: id, versions, state, when, by whom."""
    with open_client(config, url, key_file) as client:
        names = [name] if name else [p["name"] for p in client.list_prompts()]
        rows = [{"prompt": n, **x} for n in names for x in client.rollout_history(n)]

    def human() -> None:
        if not rows:
            typer.echo("no rollouts")
        for x in rows:
            canary = f"canary v{x['canary_version']}" if x["canary_version"] else "shadows only"
            typer.echo(f"{x['id']:<14} {x['prompt']:<24} {x['state']:<9} stable v{x['stable_version']}, {canary}"
                       f"  started {x['started_at'][:19]} by {x['started_by']}, {x['transitions']} transition(s)"
                       f", last: {x['last_decision'] or '-'}")
    _out(as_json, {"rollouts": rows}, human)


@rollouts_app.command("show")
def show_cmd(rollout_id: str,
             prompt: Annotated[str | None, typer.Option("--prompt", help="the rollout's prompt (default: searched)")] = None,
             config: ConfigOpt = None, url: UrlOpt = None, key_file: KeyFileOpt = None,
             as_json: JsonOpt = False) -> None:
    """One rollout by id (`rollouts list`): what happened, what serves now, and every transition
    with its gates."""
    with open_client(config, url, key_file) as client:
        name = prompt or _find_rollout(client, rollout_id)
        d = client.rollout_detail(name, rollout_id)

    def human() -> None:
        if d.get("rollout") is not None:
            _print_status(d)
        typer.echo("  transitions:")
        for t in d["transitions"]:
            gates = t.get("evidence") or []
            verdicts = ", ".join(f"{g['gate']} {g['verdict']}" for g in gates)
            gate = t.get("gate") or {}
            typer.echo(f"    {t['at'][:19]} {t['actor']:<20} {t.get('action', '?'):<9} -> {t.get('state')}"
                       f" at {t.get('weight', '-')}%" + (f"  [{verdicts}]" if verdicts else "")
                       + (f"  promotion gate {gate.get('verdict')}" if gate else "")
                       + (f"  {t['note']}" if t.get("note") else ""))
    _out(as_json, d, human)


def _find_rollout(client: RegistryClient, rollout_id: str) -> str:
    """The prompt a rollout id belongs to, searched in every prompt's history."""
    for p in client.list_prompts():
        if any(x["id"] == rollout_id for x in client.rollout_history(p["name"])):
            return str(p["name"])
    raise ClientError(f"no rollout {rollout_id!r}")
