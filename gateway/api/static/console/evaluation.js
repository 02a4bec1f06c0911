"use strict";
/* Evaluation: stored scorecards per version and dataset, per-category precision and recall
   with their 95 % intervals, two scorecards compared, and the promotion gate's verdict per
   version with the policy that judged it. */
Console.page("evaluation", async (main, session) => {
  const { api, el, params, t, pct, interval } = Console;
  const name = params().get("name") || session.default_prompt;
  const data = await api(`/console/api/evaluation/${encodeURIComponent(name)}`);
  const cards = data.scorecards.slice().sort((a, b) => a.version - b.version || a.created_at.localeCompare(b.created_at));
  const cardName = (c) => `v${c.version} · ${c.dataset_sha256.slice(0, 12)}${c.dataset_source ? ` (${c.dataset_source})` : ""} · ${Console.time(c.created_at)}`;

  function metric(m, key) {
    if (!m || m[key] === null || m[key] === undefined) return "—";
    return `${pct(m[key])} ${interval(m[`${key}_ci`], true)}`;
  }

  function table(id, heads, rows) {
    return el("table", { id },
      el("thead", {}, el("tr", {}, heads.map(h => el("th", { scope: "col" }, h.startsWith("eval.") ? t(h) : h)))),
      el("tbody", {}, rows));
  }

  const list = cards.length ? table("scorecards", ["eval.col.version", "eval.col.dataset", "eval.col.items", "eval.col.accuracy", "eval.col.micro_p", "eval.col.micro_r", "eval.col.needs_review", "eval.col.created", "eval.col.report"],
    cards.map(c => el("tr", { "data-version": c.version },
      el("td", {}, el("a", { href: `/console/version?name=${encodeURIComponent(name)}&v=${c.version}` }, `v${c.version}`)),
      el("td", {}, el("code", {}, c.dataset_sha256.slice(0, 12)), " ", c.dataset_source || ""),
      el("td", {}, String(c.items)),
      el("td", {}, c.accuracy === null ? "—" : `${pct(c.accuracy)} ${interval(c.accuracy_ci, true)}`),
      el("td", {}, metric(c.micro, "precision")), el("td", {}, metric(c.micro, "recall")),
      el("td", {}, pct(c.rates.needs_review.rate)),
      el("td", {}, `${Console.time(c.created_at)} · ${c.created_by}`),
      el("td", { class: "muted" }, c.report || "—"))))
    : el("p", { class: "muted", id: "no-scorecards" }, t("eval.none", { name }));

  // two scorecards side by side, per category
  const pickA = el("select", { id: "compare-a" }, cards.map((c, i) => el("option", { value: i, selected: i === Math.max(0, cards.length - 2) }, cardName(c))));
  const pickB = el("select", { id: "compare-b" }, cards.map((c, i) => el("option", { value: i, selected: i === cards.length - 1 }, cardName(c))));
  const compared = el("div", { id: "compared" });
  function compare() {
    const a = cards[Number(pickA.value)], b = cards[Number(pickB.value)];
    if (!a || !b) return;
    const cats = [...new Set([...Object.keys(a.categories), ...Object.keys(b.categories)])].sort();
    const delta = (x, y) => (x === null || x === undefined || y === null || y === undefined) ? "—"
      : `${y >= x ? "+" : ""}${(100 * (y - x)).toFixed(1)}`;
    const rows = [...cats.map(cat => [cat, a.categories[cat], b.categories[cat]]), [t("eval.micro"), a.micro, b.micro], [t("eval.flagged"), a.flagged, b.flagged]]
      .map(([cat, x, y]) => el("tr", { "data-category": cat }, el("th", { scope: "row" }, cat),
        el("td", {}, metric(x, "precision")), el("td", {}, metric(y, "precision")), el("td", {}, delta(x && x.precision, y && y.precision)),
        el("td", {}, metric(x, "recall")), el("td", {}, metric(y, "recall")), el("td", {}, delta(x && x.recall, y && y.recall)),
        el("td", {}, `${x ? x.support : 0} / ${y ? y.support : 0}`)));
    compared.replaceChildren(
      a.dataset_sha256 !== b.dataset_sha256 ? el("p", { class: "error" }, t("eval.different_datasets")) : "",
      table("compare", ["eval.col.category", `${t("eval.p")} · v${a.version}`, `${t("eval.p")} · v${b.version}`, "eval.col.delta_pp", `${t("eval.r")} · v${a.version}`, `${t("eval.r")} · v${b.version}`, "eval.col.delta_pp", "eval.col.support"], rows));
  }
  pickA.addEventListener("change", compare);
  pickB.addEventListener("change", compare);

  function gateView(v, g) {
    return el("section", { class: "gate", "data-version": v },
      el("h3", {}, `v${v}: `, el("span", { class: `verdict-${g.verdict}` }, t(`gate.${g.verdict}`))),
      el("p", {}, t("eval.judged_by", { policy: g.policy ? g.policy.description : t("eval.no_policy") })),
      el("pre", { class: "gate-message" }, g.message),
      g.criteria.length ? table(`criteria-${v}`, ["eval.col.criterion", "eval.col.value", "eval.col.limit", "eval.col.samples", "eval.col.verdict"],
        g.criteria.map(c => el("tr", { class: `verdict-${c.verdict}` }, el("td", {}, c.criterion),
          el("td", {}, c.value === null ? "—" : Number(c.value).toFixed(3)), el("td", {}, c.limit === null ? "—" : Number(c.limit).toFixed(3)),
          el("td", {}, String(c.samples)), el("td", {}, t(`gate.${c.verdict}`))))) : null);
  }

  /* A declared criterion in one line: "counterfeit precision (lower bound) >= 0.75". */
  function criterion(c) {
    const what = [c.category, c.metric, c.bound ? `(${c.bound})` : ""].filter(Boolean).join(" ");
    const limits = [c.min !== null ? `>= ${c.min}` : "", c.max !== null ? `<= ${c.max}` : "",
      c.max_drop_vs_production !== null ? `drop vs production <= ${c.max_drop_vs_production}` : ""].filter(Boolean);
    return `${what} ${limits.join(", ")}`;
  }

  const inForce = data.policy.in_force;
  main.replaceChildren(
    el("h1", {}, t("page.evaluation"), " · ", name),
    await Console.promptPicker(name),
    el("h2", {}, t("eval.policy")),
    el("p", { id: "policy" }, inForce.description),
    inForce.evaluation ? el("ul", { id: "policy-criteria" }, inForce.evaluation.criteria.map(c => el("li", {}, el("code", {}, criterion(c))))) : "",
    el("h2", {}, t("eval.scorecards")), list,
    cards.length > 1 ? el("section", { id: "comparison" }, el("h2", {}, t("eval.compare")),
      el("div", { class: "grid2" }, el("div", {}, el("label", { for: "compare-a" }, t("eval.a")), pickA), el("div", {}, el("label", { for: "compare-b" }, t("eval.b")), pickB)),
      compared) : "",
    cards.length === 1 ? el("section", { id: "comparison" }, el("h2", {}, t("eval.categories")), compared) : "",
    el("h2", {}, t("eval.gates")),
    ...Object.entries(data.gates).sort((x, y) => Number(y[0]) - Number(x[0])).map(([v, g]) => gateView(v, g)));
  if (cards.length) compare();
});
