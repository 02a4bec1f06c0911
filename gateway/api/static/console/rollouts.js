"use strict";
/* Rollouts: the live rollout (weights, arms, gates with what they still need, shadows with
   agreement, kappa and flipped items), its actions, a start form and the history. Every write
   is the admin API's operation (gateway.rollouts.ops) with the admin API's scopes. */
Console.page("rollouts", async (main, session) => {
  const { api, el, errorBox, params, t, pct, num, interval } = Console;
  const name = params().get("name") || session.default_prompt;
  const data = await api(`/console/api/rollouts/${encodeURIComponent(name)}`);
  const canChange = Console.has("labels:write") && Console.has("labels:protected");
  const out = el("div", { id: "rollout-out", "aria-live": "polite" });

  async function write(path, body) {
    out.replaceChildren(el("p", { class: "muted" }, t("common.working")));
    try {
      await api(path, { method: "POST", body });
      window.location.reload();
    } catch (err) {
      out.replaceChildren(el("p", {}, t("rollouts.refused")), errorBox(err));
    }
  }

  function table(id, heads, rows) {
    return el("table", { id },
      el("thead", {}, el("tr", {}, heads.map(h => el("th", { scope: "col" }, t(h))))),
      el("tbody", {}, rows));
  }

  function gateRows(gates) {
    return gates.map(g => el("tr", { class: `gate-${g.verdict}`, "data-gate": g.gate },
      el("td", {}, g.gate),
      el("td", {}, g.value === null ? "—" : num(g.value), " ", el("span", { class: "muted" }, interval(g.interval))),
      el("td", {}, g.limit === null ? "—" : num(g.limit)),
      el("td", {}, String(g.samples)),
      el("td", { class: `verdict-${g.verdict}` }, t(`gate.${g.verdict}`)),
      el("td", {}, g.more === null ? t("rollouts.never") : g.more === 0 ? t("rollouts.enough") : t("rollouts.more", { n: g.more })),
      el("td", { class: "muted" }, g.note || "")));
  }

  function shadowsView(status) {
    const r = status.rollout;
    const pairs = status.stats.pairs || {};
    if (!r.shadows.length) return el("p", { class: "muted" }, t("rollouts.no_shadows"));
    return el("div", {},
      table("shadows", ["rollouts.col.version", "rollouts.col.rate", "rollouts.col.compared", "rollouts.col.agreement", "rollouts.col.kappa", "rollouts.col.errors"],
        r.shadows.map(s => {
          const p = pairs[String(s.version)] || {};
          return el("tr", { "data-shadow": s.version }, el("td", {}, `v${s.version}`), el("td", {}, pct(s.sample_rate, 0)),
            el("td", {}, String(p.n || 0)), el("td", {}, pct(p.agreement)), el("td", {}, num(p.kappa)), el("td", {}, String(p.errors || 0)));
        })),
      el("h3", {}, t("rollouts.flips")),
      status.flips.length ? table("flips", ["rollouts.col.at", "rollouts.col.item", "rollouts.col.request", "rollouts.col.stable", "rollouts.col.candidate"],
        status.flips.map(f => el("tr", {}, el("td", {}, Console.time(f.at)), el("td", { class: "flip-item" }, el("code", {}, f.item_id),
          f.content ? el("div", { class: "flip-content" }, el("strong", {}, f.content.title || ""), el("div", { class: "muted" }, f.content.description || "")) : ""),
          el("td", {}, el("code", {}, f.request_id)),
          el("td", {}, `v${f.stable.version} `, Console.verdict(f.stable)), el("td", {}, `v${f.candidate.version} `, Console.verdict(f.candidate)))))
        : el("p", { class: "muted" }, t("rollouts.no_flips")),
      status.flips_content === "no_scope" ? el("p", { class: "muted" }, t("rollouts.content_needs_scope")) : "");
  }

  function armsView(status) {
    const rows = [];
    for (const arm of ["stable", "canary"]) {
      const s = status.stats[arm];
      if (!s || !s.requests) continue;
      rows.push(el("tr", {}, el("td", {}, t(`arm.${arm}`)), el("td", {}, String(s.requests)), el("td", {}, String(s.errors)),
        el("td", {}, Object.entries(s.flag_rates || {}).map(([c, x]) => `${c} ${pct(x)}`).join(", ") || "—"),
        el("td", {}, s.p95_ms === null ? "—" : `${num(s.p95_ms, 0)} ms`)));
    }
    return rows.length ? table("arm-stats", ["rollouts.col.arm", "rollouts.col.requests", "rollouts.col.errors", "rollouts.col.flag_rates", "rollouts.col.p95"], rows)
      : el("p", { class: "muted" }, t("rollouts.no_traffic"));
  }

  function actionsForm(r) {
    const note = el("input", { type: "text", id: "action-note" });
    const override = el("input", { type: "text", id: "action-override" });
    const allowed = { step: r.canary_version !== null && r.state === "running", pause: r.state === "running",
      resume: r.state === "paused", promote: r.canary_version !== null, abort: true };
    const buttons = Object.keys(allowed).map(a => el("button", { type: "button", id: `action-${a}`, class: a === "abort" ? "danger" : a === "promote" ? "" : "secondary",
      disabled: !allowed[a] || !canChange, onclick: () => {
        const body = { prompt: name, action: a, note: note.value };
        if (a === "promote" && override.value.trim()) body.override = { reason: override.value.trim() };
        write("/console/api/rollout/action", body);
      } }, t(`action.${a}`)));
    return el("div", { id: "actions" },
      el("label", { for: "action-note" }, t("common.note")), note,
      Console.has("admin") ? [el("label", { for: "action-override" }, t("rollouts.override_promote")), override] : null,
      el("p", {}, buttons.flatMap(b => [b, " "])),
      canChange ? null : el("p", { class: "muted" }, t("common.needs_scope", { scope: "labels:write + labels:protected" })));
  }

  function statusView(status) {
    const r = status.rollout;
    const parts = [
      el("p", { id: "outcome", class: `state-${r.state}` }, el("strong", {}, t(`state.${r.state}`)), " — ",
        status.outcome.startsWith(`${r.state}: `) ? status.outcome.slice(r.state.length + 2) : status.outcome),
      table("serving", ["rollouts.col.version", "rollouts.col.arm", "rollouts.col.share"],
        status.serving.map(s => el("tr", {}, el("td", {}, `v${s.version}`), el("td", {}, t(`arm.${s.arm}`)), el("td", {}, `${s.share}%`)))),
      el("p", {}, t("rollouts.steps", { steps: r.steps.map(w => `${w}%`).join(" → "), i: r.step_index + 1 }),
        status.next_step_not_before ? [" · ", t("rollouts.next_step", { at: Console.time(status.next_step_not_before) })] : null,
        status.would_decide ? [" · ", t("rollouts.would", { action: t(`action.${status.would_decide}`) })] : null),
    ];
    if (r.last_decision) parts.push(el("p", { class: "muted" }, t("rollouts.last_decision", { what: r.last_decision })));
    if (status.promotion_gate) {
      parts.push(el("h3", {}, t("rollouts.promotion_gate")),
        el("pre", { id: "promotion-gate", class: `verdict-${status.promotion_gate.verdict}` }, status.promotion_gate.message));
    }
    if (status.gates.length) {
      parts.push(el("h3", {}, t("rollouts.gates")),
        table("gates", ["rollouts.col.gate", "rollouts.col.value", "rollouts.col.limit", "rollouts.col.samples", "rollouts.col.verdict", "rollouts.col.needs", "rollouts.col.note"], gateRows(status.gates)));
    }
    parts.push(el("h3", {}, t("rollouts.arms")), armsView(status));
    parts.push(el("h3", {}, t("rollouts.shadows")), shadowsView(status));
    if (r.state === "running" || r.state === "paused") parts.push(el("h3", {}, t("rollouts.actions")), actionsForm(r));
    return el("section", { id: "current" }, parts);
  }

  function startForm() {
    const versions = data.versions.slice().reverse();
    const canary = el("select", { id: "start-canary" }, el("option", { value: "" }, t("rollouts.no_canary")),
      versions.map(v => el("option", { value: v }, `v${v}`)));
    const steps = el("input", { type: "text", id: "start-steps", value: "5,25,50", inputmode: "numeric" });
    const shadow = el("select", { id: "start-shadow" }, el("option", { value: "" }, t("common.none")),
      versions.map(v => el("option", { value: v }, `v${v}`)));
    const rate = el("input", { type: "number", id: "start-rate", value: "1", min: "0.01", max: "1", step: "0.01" });
    const hold = el("input", { type: "number", id: "start-hold", value: "3600", min: "0", step: "1" });
    const minSamples = el("input", { type: "number", id: "start-min-samples", value: "200", min: "1", step: "1" });
    const auto = el("input", { type: "checkbox", id: "start-auto", checked: true });
    const note = el("input", { type: "text", id: "start-note" });
    const override = el("input", { type: "text", id: "start-override" });
    const form = el("form", { id: "start-form" },
      el("div", { class: "grid3" },
        el("div", {}, el("label", { for: "start-canary" }, t("rollouts.canary")), canary),
        el("div", {}, el("label", { for: "start-steps" }, t("rollouts.steps_label")), steps),
        el("div", {}, el("label", { for: "start-hold" }, t("rollouts.hold")), hold),
        el("div", {}, el("label", { for: "start-shadow" }, t("rollouts.shadow")), shadow),
        el("div", {}, el("label", { for: "start-rate" }, t("rollouts.rate")), rate),
        el("div", {}, el("label", { for: "start-min-samples" }, t("rollouts.min_samples")), minSamples)),
      el("p", {}, auto, " ", el("label", { for: "start-auto", class: "inline" }, t("rollouts.auto"))),
      el("label", { for: "start-note" }, t("common.note")), note,
      Console.has("admin") ? [el("label", { for: "start-override" }, t("common.override")), override] : null,
      el("p", {}, el("button", { type: "submit", id: "start-submit", disabled: !canChange }, t("rollouts.start"))));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const body = { prompt: name, canary_version: canary.value ? Number(canary.value) : null,
        steps: steps.value.split(",").map(s => s.trim()).filter(Boolean).map(Number),
        shadows: shadow.value ? [{ version: Number(shadow.value), sample_rate: Number(rate.value) }] : [],
        step_hold_s: Number(hold.value), auto: auto.checked, note: note.value,
        gates: { min_samples: Number(minSamples.value) } };
      if (override.value.trim()) body.override = { reason: override.value.trim() };
      write("/console/api/rollout/start", body);
    });
    return form;
  }

  async function showDetail(id, into) {
    into.replaceChildren(el("p", { class: "muted" }, t("common.loading")));
    try {
      const d = await api(`/console/api/rollouts/${encodeURIComponent(name)}/${encodeURIComponent(id)}`);
      into.replaceChildren(el("ol", { class: "audit" }, d.transitions.map(x => el("li", {},
        `${Console.time(x.at)}  ${x.actor}  ${x.action}  ${x.weight === undefined ? "" : `${x.weight}%`}`, x.note ? ` — ${x.note}` : ""))));
    } catch (err) { into.replaceChildren(errorBox(err)); }
  }

  const history = data.history.length ? table("history", ["rollouts.col.id", "rollouts.col.state", "rollouts.col.stable", "rollouts.col.canary",
    "rollouts.col.shadows", "rollouts.col.started", "rollouts.col.updated", "rollouts.col.last", "rollouts.col.transitions"],
    data.history.map(h => {
      const detail = el("div", { class: "detail" });
      const button = el("button", { type: "button", class: "link", "aria-expanded": "false", onclick: () => {
        button.setAttribute("aria-expanded", "true"); showDetail(h.id, detail); } }, h.id);
      return [el("tr", { "data-rollout": h.id }, el("td", {}, button), el("td", {}, t(`state.${h.state}`)),
        el("td", {}, `v${h.stable_version}`), el("td", {}, h.canary_version ? `v${h.canary_version}` : "—"),
        el("td", {}, h.shadows.map(v => `v${v}`).join(" ") || "—"),
        el("td", {}, `${Console.time(h.started_at)} · ${h.started_by}`), el("td", {}, Console.time(h.updated_at)),
        el("td", {}, h.last_decision || ""), el("td", {}, String(h.transitions))),
        el("tr", { class: "detail-row" }, el("td", { colspan: 9 }, detail))];
    }).flat()) : el("p", { class: "muted" }, t("rollouts.no_history"));

  const active = data.status && (data.status.rollout.state === "running" || data.status.rollout.state === "paused");
  main.replaceChildren(
    el("h1", {}, t("page.rollouts"), " · ", name),
    await Console.promptPicker(name),
    el("p", {}, Object.entries(data.labels).sort().map(([l, v]) => el("span", { class: "pill" }, `${l} → v${v}`))),
    el("h2", {}, t(active ? "rollouts.current" : "rollouts.last")),
    data.status ? statusView(data.status) : el("p", { class: "muted", id: "no-rollout" }, t("rollouts.none")),
    out,
    active ? "" : el("section", { id: "start" }, el("h2", {}, t("rollouts.start_heading")), startForm()),
    el("h2", {}, t("rollouts.history")), history);
});
