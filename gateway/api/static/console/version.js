"use strict";
/* One version: messages per locale, schema, model; a side-by-side diff; label moves (through
   the registry's move_label, refusals shown with their reasons); the audit timeline. */
Console.page("prompts", async (main) => {
  const { api, el, errorBox, params, t } = Console;
  const name = params().get("name") || "";
  const number = params().get("v") || "";
  const base = `/console/api/prompts/${encodeURIComponent(name)}`;
  document.title = `${name} v${number} · ${t("brand")}`;

  function messages(list) {
    return list.map(m => el("div", {}, el("div", { class: "muted" }, m.role), el("pre", {}, m.content)));
  }

  function diffTable(rows) {
    if (rows.every(r => r.op === "equal")) return el("p", { class: "muted" }, t("version.no_change"));
    return el("table", { class: "diff" },
      el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", { scope: "col" }, t("version.this")), el("th", {}, ""), el("th", { scope: "col" }, t("version.other")))),
      el("tbody", {}, rows.map(r => el("tr", { class: `op-${r.op}` },
        el("td", { class: "num" }, r.ln ?? ""), el("td", { class: "l" }, r.left ?? ""),
        el("td", { class: "num" }, r.rn ?? ""), el("td", { class: "r" }, r.right ?? "")))));
  }

  function auditItem(e) {
    const from = e.from_version === null || e.from_version === undefined ? t("audit.unset") : `v${e.from_version}`;
    const what = e.action === "publish" ? t("audit.publish", { v: e.to_version })
      : e.action === "label" ? t("audit.label", { label: e.label, from, to: `v${e.to_version}` })
        : e.action === "rollout" ? t("audit.rollout", { state: e.label || "" })
          : `${e.action}${e.to_version !== null && e.to_version !== undefined ? ` v${e.to_version}` : ""}`;
    return el("li", { "data-action": e.action }, `${Console.time(e.at)}  ${e.actor}  ${what}`, e.note ? ` — ${e.note}` : "");
  }

  const [v, audit] = await Promise.all([api(`${base}/versions/${encodeURIComponent(number)}`), api(`${base}/audit`)]);
  const others = v.versions.filter(n => n !== v.version);
  const select = el("select", { id: "diff-against" }, others.map(n => el("option", { value: n }, `v${n}`)));
  const diffOut = el("div", { id: "diff" });
  async function showDiff() {
    diffOut.replaceChildren(el("p", { class: "muted" }, t("common.loading")));
    try {
      const d = await api(`${base}/diff?from=${v.version}&to=${encodeURIComponent(select.value)}`);
      diffOut.replaceChildren(...Object.entries(d.locales).map(([loc, rows]) =>
        el("section", {}, el("h3", {}, `${loc}: v${d.from} ↔ v${d.to}`), diffTable(rows))),
        el("details", {}, el("summary", {}, t("version.yaml_diff")), el("pre", {}, d.spec_diff || t("version.identical"))));
    } catch (err) { diffOut.replaceChildren(errorBox(err)); }
  }
  select.addEventListener("change", showDiff);

  // label move: the same operation as PUT /v1/prompts/{name}/labels/{label}
  const labelInput = el("input", { type: "text", id: "move-label", list: "known-labels", value: v.labels.includes("production") ? "" : "production", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,63}" });
  const known = el("datalist", { id: "known-labels" }, ["production", "staging", "candidate"].map(l => el("option", { value: l })));
  const noteInput = el("input", { type: "text", id: "move-note" });
  const overrideInput = el("input", { type: "text", id: "move-override" });
  const moveOut = el("div", { id: "move-out", "aria-live": "polite" });
  const moveForm = el("form", { id: "move-form" },
    el("label", { for: "move-label" }, t("version.move_label")), labelInput, known,
    el("label", { for: "move-note" }, t("common.note")), noteInput,
    Console.has("admin") ? [el("label", { for: "move-override" }, t("common.override")), overrideInput] : null,
    el("p", {}, el("button", { type: "submit", id: "move-submit" }, t("version.move_submit", { v: v.version }))));
  moveForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    moveOut.replaceChildren(el("p", { class: "muted" }, t("common.working")));
    const body = { prompt: v.name, label: labelInput.value.trim(), version: v.version, note: noteInput.value };
    if (overrideInput.value.trim()) body.override = { reason: overrideInput.value.trim() };
    try {
      const r = await api("/console/api/label", { method: "POST", body });
      moveOut.replaceChildren(el("p", { role: "status", class: "ok" }, r.status === "approval_required"
        ? t("version.move_pending", { id: r.approval.id })
        : t("version.moved", { label: r.label, from: r.from_version === null ? t("audit.unset") : `v${r.from_version}`, to: `v${r.to_version}` })),
        r.gate ? el("pre", { class: "gate-message" }, r.gate.message) : "");
    } catch (err) {
      moveOut.replaceChildren(el("p", {}, t("version.move_refused")), errorBox(err));
    }
  });

  main.replaceChildren(
    el("h1", {}, `${v.name} v${v.version} `, v.labels.map(l => el("span", { class: "pill" }, l))),
    el("p", {}, `${t("version.versions")}: `, v.versions.map(n => [el("a", { href: `/console/version?name=${encodeURIComponent(v.name)}&v=${n}`, "aria-current": n === v.version ? "page" : null }, `v${n}`), " "]),
      " · ", el("a", { href: `/console/evaluation?name=${encodeURIComponent(v.name)}` }, t("nav.evaluation")),
      " · ", el("a", { href: `/console/rollouts?name=${encodeURIComponent(v.name)}` }, t("nav.rollouts"))),
    el("table", { id: "version-meta" }, el("tbody", {},
      [["version.model", v.model], ["version.sampling", Object.entries(v.sampling).map(([k, x]) => `${k}=${x}`).join(", ")],
       ["version.variables", v.variables.join(", ")], ["version.decisions", v.verdict.decisions.join(", ")],
       ["version.categories", v.verdict.categories.join(", ")], ["version.confidence", String(v.verdict.confidence)],
       ["version.policy", `${v.policy.policy_id} (${v.policy.owner})${v.policy.change_note ? " — " + v.policy.change_note : ""}`],
       ["version.published", `${Console.time(v.created_at)} · ${v.created_by}`], ["version.hash", v.content_hash]]
        .map(([k, x]) => el("tr", {}, el("th", { scope: "row" }, t(k)), el("td", {}, x))))),
    el("h2", {}, t("version.messages")),
    ...Object.entries(v.locales).map(([loc, list]) => el("section", { class: "locale", "data-locale": loc },
      el("h3", {}, loc + (loc === v.default_locale ? ` ${t("version.default")}` : "")), messages(list))),
    el("h2", {}, t("version.compare")),
    others.length ? el("p", {}, el("label", { for: "diff-against" }, t("version.compare_with")), select) : el("p", { class: "muted" }, t("version.only")),
    diffOut,
    el("h2", {}, t("version.labels")),
    Console.has("labels:write") ? moveForm : el("p", { class: "muted" }, t("common.needs_scope", { scope: "labels:write" })),
    moveOut,
    el("h2", {}, t("version.audit")),
    el("ol", { class: "audit", id: "audit" }, audit.entries.map(auditItem)));
  if (others.length) showDiff();
});
