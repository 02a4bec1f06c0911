"use strict";
/* Decisions: the gateway's decision log filtered by time, prompt version, arm, category and
   locale; counts and flag rates; the same selection as CSV (with a byte-order mark). */
Console.page("decisions", async (main) => {
  const { api, el, errorBox, params, t, pct } = Console;
  const OFFSETS = { "UTC": "+00:00", "Asia/Shanghai": "+08:00" };  // the zones offered; no DST in either
  const q = params();
  const prompts = (await api("/console/api/prompts")).prompts.map(p => p.name);

  // datetime-local values are read in the chosen time zone
  const local = (iso) => {
    if (!iso) return "";
    const shown = Console.time(iso);  // "YYYY-MM-DD HH:MM:SS zone"
    return shown.slice(0, 16).replace(" ", "T");
  };
  const toIso = (value) => value ? `${value}:00${OFFSETS[Console.zone()]}` : "";
  const now = new Date();
  const since = el("input", { type: "datetime-local", id: "f-since", value: local(q.get("since") || new Date(now - 24 * 3600e3).toISOString()) });
  const until = el("input", { type: "datetime-local", id: "f-until", value: local(q.get("until") || new Date(now.getTime() + 60e3).toISOString()) });
  const prompt = el("select", { id: "f-prompt" }, el("option", { value: "" }, t("common.any")),
    prompts.map(p => el("option", { value: p, selected: q.get("prompt") === p }, p)));
  const version = el("input", { type: "number", id: "f-version", min: "1", value: q.get("version") || "" });
  const arm = el("select", { id: "f-arm" }, el("option", { value: "" }, t("common.any")),
    ["stable", "canary", "shadow", "pinned"].map(a => el("option", { value: a, selected: q.get("arm") === a }, t(`arm.${a}`))));
  const category = el("input", { type: "text", id: "f-category", value: q.get("category") || "" });
  const locale = el("select", { id: "f-locale" }, el("option", { value: "" }, t("common.any")),
    ["en-US", "zh-CN"].map(l => el("option", { value: l, selected: q.get("locale") === l }, l)));
  const field = (id, key, input) => el("div", {}, el("label", { for: id }, t(key)), input);
  const form = el("form", { id: "decision-filter" },
    el("div", { class: "grid3" },
      field("f-since", "decisions.since", since), field("f-until", "decisions.until", until),
      field("f-prompt", "common.prompt", prompt), field("f-version", "decisions.version", version),
      field("f-arm", "decisions.arm", arm), field("f-category", "decisions.category", category),
      field("f-locale", "decisions.locale", locale)),
    el("p", {}, el("button", { type: "submit", id: "f-apply" }, t("decisions.apply")), " ",
      el("a", { id: "csv-link", class: "button secondary", href: "#" }, t("decisions.csv"))),
    el("p", { class: "muted" }, t("decisions.zone_note", { zone: Console.zone() })));
  const out = el("div", { id: "decisions-out", "aria-live": "polite" });
  main.replaceChildren(el("h1", {}, t("page.decisions")), form, out);

  function query() {
    const p = new URLSearchParams();
    const values = { since: toIso(since.value), until: toIso(until.value), prompt: prompt.value, version: version.value,
      arm: arm.value, category: category.value.trim(), locale: locale.value };
    for (const [k, v] of Object.entries(values)) if (v) p.set(k, v);
    return p;
  }

  function table(id, heads, rows) {
    return el("table", { id },
      el("thead", {}, el("tr", {}, heads.map(h => el("th", { scope: "col" }, t(h))))), el("tbody", {}, rows));
  }

  async function load() {
    const p = query();
    document.getElementById("csv-link").setAttribute("href", `/console/api/decisions.csv?${p}`);
    out.replaceChildren(el("p", { class: "muted" }, t("common.loading")));
    try {
      const d = await api(`/console/api/decisions?${p}`);
      const total = d.total;
      out.replaceChildren(
        el("p", { id: "decision-total" }, t("decisions.total", { n: total.n, verdicts: total.verdicts, flagged: total.flagged,
          rate: pct(total.flag_rate), errors: total.errors, since: Console.time(d.since), until: Console.time(d.until) }),
          d.shadows ? ` ${t("decisions.shadows", { n: d.shadows })}` : ""),
        el("div", { class: "grid2" },
          table("decision-counts", ["decisions.col.decision", "decisions.col.count"],
            Object.entries(d.decisions).map(([k, n]) => el("tr", {}, el("td", {}, Console.verdict({ decision: k })), el("td", {}, String(n))))),
          table("category-counts", ["decisions.col.category", "decisions.col.flagged"],
            Object.entries(d.categories).map(([k, n]) => el("tr", {}, el("td", {}, k), el("td", {}, String(n)))))),
        el("h2", {}, t("decisions.groups")),
        table("decision-groups", ["decisions.col.prompt", "decisions.col.version", "decisions.col.arm", "decisions.col.locale",
          "decisions.col.n", "decisions.col.flagged", "decisions.col.rate", "decisions.col.errors"],
          d.groups.map(g => el("tr", {}, el("td", {}, g.prompt), el("td", {}, `v${g.version}`), el("td", {}, t(`arm.${g.arm}`)),
            el("td", {}, g.locale || "—"), el("td", {}, String(g.n)), el("td", {}, String(g.flagged)), el("td", {}, pct(g.flag_rate)),
            el("td", {}, String(g.errors))))),
        el("h2", {}, t("decisions.latest")),
        table("decision-latest", ["decisions.col.time", "decisions.col.request", "decisions.col.item", "decisions.col.version",
          "decisions.col.arm", "decisions.col.decision", "decisions.col.locale", "decisions.col.latency"],
          d.latest.map(r => el("tr", {}, el("td", {}, Console.time(r.ts)), el("td", {}, el("code", {}, r.request_id)),
            el("td", {}, el("code", {}, r.item_id)), el("td", {}, `${r.prompt} v${r.version}`), el("td", {}, t(`arm.${r.arm}`)),
            el("td", {}, r.decision ? Console.verdict(r) : el("span", { class: "decision-error" }, r.error_type)),
            el("td", {}, r.locale || "—"), el("td", {}, `${Math.round(r.latency_ms)} ms`)))));
    } catch (err) { out.replaceChildren(errorBox(err)); }
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  await load();
});
