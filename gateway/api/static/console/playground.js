"use strict";
(async () => {
  const { api, el, errorBox, verdict } = Console;
  const main = document.getElementById("main");
  let count = 0;

  function listingRow(title, description, locale) {
    const n = ++count;
    const locales = ["en-US", "zh-CN"];
    const row = el("fieldset", { class: "listing", "data-listing": n },
      el("legend", {}, `Listing ${n}`),
      el("div", { class: "row" },
        el("div", {}, el("label", { for: `title-${n}` }, "Title"), el("input", { type: "text", id: `title-${n}`, class: "title", value: title || "" })),
        el("div", {}, el("label", { for: `desc-${n}` }, "Description"), el("textarea", { id: `desc-${n}`, class: "description", rows: 2 }, description || "")),
        el("div", {}, el("label", { for: `locale-${n}` }, "Locale"), el("select", { id: `locale-${n}`, class: "locale" },
          locales.map(l => el("option", { value: l, selected: l === (locale || "en-US") }, l)))),
        el("div", {}, el("button", { type: "button", class: "secondary", onclick: () => row.remove(), "aria-label": `remove listing ${n}` }, "Remove"))));
    return row;
  }

  function resultTable(data) {
    const prod = data.production ? `${data.production.label} (v${data.production.version})` : "production";
    return el("table", { id: "results" },
      el("thead", {}, el("tr", {}, ["Listing", `Draft (${data.draft.name})`, prod].map(h => el("th", { scope: "col" }, h)))),
      el("tbody", {}, data.results.map((r, i) => {
        const changed = r.production && (r.draft.decision !== r.production.decision || r.draft.category !== r.production.category);
        const cell = (ev, who) => ev ? el("td", { class: `verdict-${who}` }, verdict(ev),
          el("div", { class: "muted" }, `${ev.locale} · ${ev.latency_ms} ms · ${ev.prompt_tokens}+${ev.completion_tokens} tokens`),
          el("details", {}, el("summary", {}, "Rendered messages"), ev.messages.map(m => el("pre", {}, `[${m.role}]\n${m.content}`))))
          : el("td", { class: "muted" }, data.production ? "—" : `no ${prod} version of ${data.draft.name}`);
        return el("tr", { class: changed ? "changed" : null, "data-result": i },
          el("td", {}, el("strong", {}, r.listing.title), el("div", { class: "muted" }, r.listing.description), el("div", { class: "muted" }, r.listing.locale)),
          cell(r.draft, "draft"), cell(r.production, "production"));
      })));
  }

  try {
    const session = await Console.boot("playground");
    const prompt = el("textarea", { id: "draft", rows: 22, spellcheck: "false" });
    const listings = el("div", { id: "listings" }, listingRow("", "", "en-US"));
    const out = el("div", { id: "playground-out", "aria-live": "polite" });
    const run = el("button", { type: "submit", id: "run" }, "Run draft and production");
    const form = el("form", { id: "playground-form" },
      el("label", { for: "draft" }, "Draft prompt (YAML, as `modgate prompts publish` takes it)"), prompt,
      el("p", {}, el("button", { type: "button", class: "secondary", id: "load-production" }, "Load the production prompt")),
      el("h2", {}, "Listings"), listings,
      el("p", {}, el("button", { type: "button", class: "secondary", id: "add-listing",
        onclick: () => { if (listings.children.length < session.max_playground_listings) listings.append(listingRow("", "", "en-US")); } }, "Add listing"),
        " ", run),
      el("p", { class: "muted" }, "Nothing is published and nothing reaches the decision log or any rollout. Each listing uses one unit of your key's quota."));
    main.replaceChildren(el("h1", {}, "Playground"), form, out);
    if (!Console.has("prompts:publish")) out.append(el("p", { class: "error" }, "Your key lacks the prompts:publish scope: runs will be refused."));

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
      out.replaceChildren(el("p", { class: "muted" }, "Running…"));
      try {
        const data = await api("/console/api/playground", { method: "POST", body: { prompt: prompt.value, listings: items } });
        out.replaceChildren(el("h2", {}, "Verdicts"), resultTable(data), el("p", { class: "muted" }, `request ${data.request_id}`));
      } catch (err) {
        out.replaceChildren(errorBox(err));
      } finally { run.disabled = false; }
    });
  } catch (err) {
    main.replaceChildren(el("h1", {}, "Playground"), errorBox(err));
  }
})();
