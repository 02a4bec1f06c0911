"use strict";
(async () => {
  const { api, el, errorBox, params } = Console;
  const main = document.getElementById("main");
  const name = params().get("name") || "";
  const number = params().get("v") || "";
  const base = `/console/api/prompts/${encodeURIComponent(name)}`;

  function messages(list) {
    return list.map(m => el("div", {}, el("div", { class: "muted" }, m.role), el("pre", {}, m.content)));
  }

  function diffTable(rows) {
    if (rows.every(r => r.op === "equal")) return el("p", { class: "muted" }, "No change in this locale's messages.");
    return el("table", { class: "diff" },
      el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", { scope: "col" }, "this version"), el("th", {}, ""), el("th", { scope: "col" }, "other version"))),
      el("tbody", {}, rows.map(r => el("tr", { class: `op-${r.op}` },
        el("td", { class: "num" }, r.ln ?? ""), el("td", { class: "l" }, r.left ?? ""),
        el("td", { class: "num" }, r.rn ?? ""), el("td", { class: "r" }, r.right ?? "")))));
  }

  try {
    await Console.boot("prompts");
    const [v, audit] = await Promise.all([api(`${base}/versions/${encodeURIComponent(number)}`), api(`${base}/audit`)]);
    const others = v.versions.filter(n => n !== v.version);
    const select = el("select", { id: "diff-against", "aria-label": "compare with version" },
      others.map(n => el("option", { value: n }, `v${n}`)));
    const diffOut = el("div", { id: "diff" });
    async function showDiff() {
      diffOut.replaceChildren(el("p", { class: "muted" }, "Loading…"));
      try {
        const d = await api(`${base}/diff?from=${v.version}&to=${encodeURIComponent(select.value)}`);
        diffOut.replaceChildren(...Object.entries(d.locales).map(([loc, rows]) =>
          el("section", {}, el("h3", {}, `${loc}: v${d.from} ↔ v${d.to}`), diffTable(rows))),
          el("details", {}, el("summary", {}, "Whole version (YAML) as a unified diff"), el("pre", {}, d.spec_diff || "(identical)")));
      } catch (err) { diffOut.replaceChildren(errorBox(err)); }
    }
    select.addEventListener("change", showDiff);
    main.replaceChildren(
      el("h1", {}, `${v.name} v${v.version}`, v.labels.map(l => el("span", { class: "pill" }, l))),
      el("p", {}, "Versions: ", v.versions.map(n => [el("a", { href: `/console/version?name=${encodeURIComponent(v.name)}&v=${n}`, "aria-current": n === v.version ? "page" : null }, `v${n}`), " "])),
      el("table", { id: "version-meta" }, el("tbody", {},
        [["Model", v.model], ["Sampling", Object.entries(v.sampling).map(([k, x]) => `${k}=${x}`).join(", ")],
         ["Variables", v.variables.join(", ")], ["Decisions", v.verdict.decisions.join(", ")],
         ["Categories", v.verdict.categories.join(", ")], ["Confidence", String(v.verdict.confidence)],
         ["Policy", `${v.policy.policy_id} (owner ${v.policy.owner})${v.policy.change_note ? " — " + v.policy.change_note : ""}`],
         ["Published", `${v.created_at} by ${v.created_by}`], ["Content hash", v.content_hash]]
          .map(([k, x]) => el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, x))))),
      el("h2", {}, "Messages per locale"),
      ...Object.entries(v.locales).map(([loc, list]) => el("section", { class: "locale", "data-locale": loc },
        el("h3", {}, loc + (loc === v.default_locale ? " (default)" : "")), messages(list))),
      el("h2", {}, "Compare"),
      others.length ? el("p", {}, el("label", { for: "diff-against" }, "Compare with"), select) : el("p", { class: "muted" }, "This is the only version."),
      diffOut,
      el("h2", {}, "Audit timeline"),
      el("ol", { class: "audit", id: "audit" }, audit.entries.map(e => el("li", {}, e.line))));
    if (others.length) showDiff();
  } catch (err) {
    main.replaceChildren(el("h1", {}, `${name} v${number}`), errorBox(err));
  }
})();
