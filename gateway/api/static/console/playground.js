"use strict";
/* Playground: run a draft beside production (nothing published, nothing logged); publishing
   it is a separate, explicit step (the same operation as POST /v1/prompts). */
Console.page("playground", async (main, session) => {
  const { api, el, errorBox, verdict, t } = Console;
  let count = 0;

  function listingRow(title, description, locale) {
    const n = ++count;
    const locales = ["en-US", "zh-CN"];
    const row = el("fieldset", { class: "listing", "data-listing": n },
      el("legend", {}, t("playground.listing", { n })),
      el("div", { class: "row" },
        el("div", {}, el("label", { for: `title-${n}` }, t("playground.title")), el("input", { type: "text", id: `title-${n}`, class: "title", value: title || "" })),
        el("div", {}, el("label", { for: `desc-${n}` }, t("playground.description")), el("textarea", { id: `desc-${n}`, class: "description", rows: 2 }, description || "")),
        el("div", {}, el("label", { for: `locale-${n}` }, t("playground.locale")), el("select", { id: `locale-${n}`, class: "locale" },
          locales.map(l => el("option", { value: l, selected: l === (locale || "en-US") }, l)))),
        el("div", {}, el("button", { type: "button", class: "secondary", onclick: () => row.remove(), "aria-label": t("playground.remove_n", { n }) }, t("playground.remove")))));
    return row;
  }

  function resultTable(data) {
    const prod = data.production ? `${data.production.label} (v${data.production.version})` : "production";
    return el("table", { id: "results" },
      el("thead", {}, el("tr", {}, [t("playground.col.listing"), t("playground.col.draft", { name: data.draft.name }), prod].map(h => el("th", { scope: "col" }, h)))),
      el("tbody", {}, data.results.map((r, i) => {
        const changed = r.production && (r.draft.decision !== r.production.decision || r.draft.category !== r.production.category);
        const cell = (ev, who) => ev ? el("td", { class: `verdict-${who}` }, verdict(ev),
          el("div", { class: "muted" }, t("playground.cost", { locale: ev.locale, ms: ev.latency_ms, p: ev.prompt_tokens, c: ev.completion_tokens })),
          el("details", {}, el("summary", {}, t("playground.rendered")), ev.messages.map(m => el("pre", {}, `[${m.role}]\n${m.content}`))))
          : el("td", { class: "muted" }, data.production ? "—" : t("playground.no_production", { label: prod, name: data.draft.name }));
        return el("tr", { class: changed ? "changed" : null, "data-result": i },
          el("td", {}, el("strong", {}, r.listing.title), el("div", { class: "muted" }, r.listing.description), el("div", { class: "muted" }, r.listing.locale)),
          cell(r.draft, "draft"), cell(r.production, "production"));
      })));
  }

  const prompt = el("textarea", { id: "draft", rows: 22, spellcheck: "false" });
  const listings = el("div", { id: "listings" }, listingRow("", "", "en-US"));
  const out = el("div", { id: "playground-out", "aria-live": "polite" });
  const run = el("button", { type: "submit", id: "run" }, t("playground.run"));
  const form = el("form", { id: "playground-form" },
    el("label", { for: "draft" }, t("playground.draft")), prompt,
    el("p", {}, el("button", { type: "button", class: "secondary", id: "load-production" }, t("playground.load"))),
    el("h2", {}, t("playground.listings")), listings,
    el("p", {}, el("button", { type: "button", class: "secondary", id: "add-listing",
      onclick: () => { if (listings.children.length < session.max_playground_listings) listings.append(listingRow("", "", "en-US")); } }, t("playground.add")),
      " ", run),
    el("p", { class: "muted" }, t("playground.nothing_published")));

  const publishNote = el("input", { type: "text", id: "publish-note" });
  const publishOut = el("div", { id: "publish-out", "aria-live": "polite" });
  const publishForm = el("form", { id: "publish-form" },
    el("h2", {}, t("playground.publish_heading")),
    el("p", { class: "muted" }, t("playground.publish_help")),
    el("label", { for: "publish-note" }, t("common.note")), publishNote,
    el("p", {}, el("button", { type: "submit", id: "publish" }, t("playground.publish"))));
  main.replaceChildren(el("h1", {}, t("page.playground")), form, out, publishForm, publishOut);
  if (!Console.has("prompts:publish")) out.append(el("p", { class: "error" }, t("common.needs_scope", { scope: "prompts:publish" })));

  document.getElementById("load-production").addEventListener("click", async () => {
    try {
      const list = await api("/console/api/prompts");
      const p = list.prompts.find(x => x.name === session.default_prompt) || list.prompts[0];
      const v = p.labels[session.production_label] || p.latest;
      const spec = await api(`/console/api/prompts/${encodeURIComponent(p.name)}/versions/${v}`);
      prompt.value = spec.yaml;
    } catch (err) { out.replaceChildren(errorBox(err)); }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const items = [...listings.querySelectorAll("fieldset.listing")].map(f => ({
      title: f.querySelector(".title").value, description: f.querySelector(".description").value,
      locale: f.querySelector(".locale").value }));
    run.disabled = true;
    out.replaceChildren(el("p", { class: "muted" }, t("playground.running")));
    try {
      const data = await api("/console/api/playground", { method: "POST", body: { prompt: prompt.value, listings: items } });
      out.replaceChildren(el("h2", {}, t("playground.verdicts")), resultTable(data), el("p", { class: "muted" }, t("playground.request", { id: data.request_id })));
    } catch (err) {
      out.replaceChildren(errorBox(err));
    } finally { run.disabled = false; }
  });

  publishForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    publishOut.replaceChildren(el("p", { class: "muted" }, t("common.working")));
    try {
      const r = await api("/console/api/publish", { method: "POST", body: { prompt: prompt.value, note: publishNote.value } });
      const href = `/console/version?name=${encodeURIComponent(r.name)}&v=${r.version}`;
      publishOut.replaceChildren(el("p", { role: "status", id: "published" },
        t(r.created ? "playground.published" : "playground.existing", { name: r.name, v: r.version }), " ",
        el("a", { href, id: "published-link" }, t("playground.open_version"))));
    } catch (err) { publishOut.replaceChildren(errorBox(err)); }
  });
});
