"use strict";
(async () => {
  const { api, el, errorBox } = Console;
  const main = document.getElementById("main");
  try {
    await Console.boot("prompts");
    const data = await api("/console/api/prompts");
    const link = (name, v, text) => el("a", { href: `/console/version?name=${encodeURIComponent(name)}&v=${v}` }, text);
    const rows = data.prompts.map(p => el("tr", { "data-prompt": p.name },
      el("td", {}, link(p.name, p.latest, p.name), el("div", { class: "muted" }, p.description || "")),
      el("td", {}, Object.entries(p.labels).sort().map(([label, v]) =>
        el("span", { class: "pill" }, link(p.name, v, `${label} → v${v}`)))),
      el("td", {}, link(p.name, p.latest, `v${p.latest}`), el("span", { class: "muted" }, ` (${p.versions.length} versions)`)),
      el("td", {}, p.model),
      el("td", {}, p.rollout ? [
        `${p.rollout.state}: stable v${p.rollout.stable_version}`,
        p.rollout.canary_version ? `, canary v${p.rollout.canary_version} at ${p.rollout.weight}%` : "",
        p.rollout.shadows.length ? `, shadow ${p.rollout.shadows.map(s => `v${s.version}@${s.sample_rate}`).join(" ")}` : "",
      ] : el("span", { class: "muted" }, "none"))));
    main.replaceChildren(
      el("h1", {}, "Prompts"),
      el("table", { id: "prompts" },
        el("thead", {}, el("tr", {}, ["Prompt", "Labels", "Latest", "Model", "Active rollout"].map(h => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows)));
  } catch (err) {
    main.replaceChildren(el("h1", {}, "Prompts"), errorBox(err));
  }
})();
