"use strict";
Console.page("prompts", async (main) => {
  const { api, el, t } = Console;
  const data = await api("/console/api/prompts");
  const link = (name, v, text) => el("a", { href: `/console/version?name=${encodeURIComponent(name)}&v=${v}` }, text);
  const rows = data.prompts.map(p => el("tr", { "data-prompt": p.name },
    el("td", {}, link(p.name, p.latest, p.name), el("div", { class: "muted" }, p.description || "")),
    el("td", {}, Object.entries(p.labels).sort().map(([label, v]) =>
      el("span", { class: "pill" }, link(p.name, v, `${label} → v${v}`)))),
    el("td", {}, link(p.name, p.latest, `v${p.latest}`), el("span", { class: "muted" }, ` ${t("prompts.versions", { n: p.versions.length })}`)),
    el("td", {}, p.model),
    el("td", {}, p.scorecard ? el("a", { href: `/console/evaluation?name=${encodeURIComponent(p.name)}` },
      t("prompts.scorecard", { v: p.scorecard.version, acc: Console.pct(p.scorecard.accuracy), items: p.scorecard.items }))
      : el("span", { class: "muted" }, t("common.none"))),
    el("td", {}, p.rollout ? el("a", { href: `/console/rollouts?name=${encodeURIComponent(p.name)}` }, [
      t("prompts.rollout", { state: p.rollout.state, stable: p.rollout.stable_version }),
      p.rollout.canary_version ? t("prompts.rollout_canary", { v: p.rollout.canary_version, w: p.rollout.weight }) : "",
      p.rollout.shadows.length ? t("prompts.rollout_shadows", { list: p.rollout.shadows.map(s => `v${s.version}@${s.sample_rate}`).join(" ") }) : "",
    ]) : el("span", { class: "muted" }, t("common.none")))));
  main.replaceChildren(
    el("h1", {}, t("page.prompts")),
    el("table", { id: "prompts" },
      el("thead", {}, el("tr", {}, ["prompts.col.prompt", "prompts.col.labels", "prompts.col.latest", "prompts.col.model",
        "prompts.col.scorecard", "prompts.col.rollout"].map(h => el("th", { scope: "col" }, t(h))))),
      el("tbody", {}, rows)));
});
