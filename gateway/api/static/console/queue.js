"use strict";
/* Review queue: a stratified sample of recent decisions with their listing content.
   Keyboard first: j/k (or the arrow keys) move, a = allow, b = block (then pick the category:
   1-9 or the select), r = skip for now, Enter = submit the current item's label.
   Labels go to POST /console/api/feedback (the console's form of POST /v1/feedback). The model's
   own answer is not shown, so that it does not anchor the label. */
(async () => {
  const { api, el, errorBox } = Console;
  const main = document.getElementById("main");
  let items = [];     // queue items, plus {decision, category, status, message}
  let schemas = {};
  let current = 0;

  function schemaOf(item) {
    return schemas[`${item.prompt}@${item.version}`] || { decisions: ["allow", "block"], categories: [] };
  }

  function pct(x) { return x === null || x === undefined ? "—" : `${(100 * x).toFixed(0)} %`; }
  function kappa(x) { return x === null || x === undefined ? "—" : Number(x).toFixed(2); }

  function renderItem(item, i) {
    const schema = schemaOf(item);
    const decision = el("select", { id: `decision-${i}`, "data-field": "decision" },
      el("option", { value: "" }, "—"),
      schema.decisions.map(d => el("option", { value: d, selected: item.decision === d }, d)));
    const category = el("select", { id: `category-${i}`, "data-field": "category", disabled: item.decision === "allow" },
      el("option", { value: "" }, "—"),
      schema.categories.map((c, n) => el("option", { value: c, selected: item.category === c }, `${n + 1} ${c}`)));
    decision.addEventListener("change", () => { current = i; setDecision(decision.value); });
    category.addEventListener("change", () => { current = i; item.category = category.value; });
    const content = item.content || {};
    const status = el("span", { class: `status ${item.status || ""}`, role: "status" }, item.message || "");
    return el("section", { class: ["queue-item", i === current ? "current" : "", item.status === "ok" ? "done" : ""].join(" "),
                           "data-request-id": item.request_id, "aria-current": i === current ? "true" : null,
                           onclick: () => { if (current !== i) { current = i; render(); } } },
      el("h3", {}, `${i + 1}. `, content.title || el("span", { class: "muted" }, "(no title)")),
      el("div", { class: "muted" }, `${item.locale} · ${item.prompt} v${item.version} · item ${item.item_id} · ${item.ts}`,
        item.labelled_by.length ? ` · labelled by ${item.labelled_by.length} other reviewer(s)` : ""),
      el("div", { class: "description" }, content.description || ""),
      el("div", { class: "controls" },
        el("div", {}, el("label", { for: `decision-${i}` }, "Decision"), decision),
        el("div", {}, el("label", { for: `category-${i}` }, "Category"), category),
        el("button", { type: "button", id: `submit-${i}`, onclick: () => { current = i; submit(); } }, "Submit (Enter)"),
        status));
  }

  function render() {
    const list = document.getElementById("queue-items");
    list.replaceChildren(...items.map(renderItem));
    const node = list.children[current];
    if (node && !node.contains(document.activeElement)) node.scrollIntoView({ block: "nearest" });
    const left = items.filter(it => it.status !== "ok").length;
    document.getElementById("queue-count").textContent = `${left} of ${items.length} left in this batch`;
  }

  function setDecision(decision) {
    const item = items[current];
    if (!item) return;
    item.decision = decision;
    if (decision === "allow") item.category = "";
    item.status = ""; item.message = "";
    render();
    if (decision && decision !== "allow") document.getElementById(`category-${current}`).focus();
  }

  function move(step) {
    current = Math.max(0, Math.min(items.length - 1, current + step));
    render();
  }

  async function submit() {
    const item = items[current];
    if (!item) return;
    if (!item.decision) { item.status = "bad"; item.message = "pick a decision first (a or b)"; render(); return; }
    try {
      const data = await api("/console/api/feedback", { method: "POST", body: {
        rows: [{ request_id: item.request_id, decision: item.decision, category: item.category || null }] } });
      const res = data.results[0];
      if (res.ok) {
        item.status = "ok";
        item.message = res.answer.duplicate ? "✓ already recorded" : res.answer.replaced ? "✓ recorded (replaced an earlier label)" : "✓ recorded";
        const next = items.findIndex((it, j) => j > current && it.status !== "ok");
        if (next >= 0) current = next;
        loadAgreement();
      } else {
        item.status = "bad";
        item.message = (res.errors || []).map(e => `${e.field}: ${e.problem}`).join("; ");
      }
    } catch (err) {
      item.status = "bad"; item.message = `${err.type}: ${err.message}`;
    }
    render();
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const tag = (event.target && event.target.tagName) || "";
    const inSelect = tag === "SELECT";
    if (tag === "INPUT" || tag === "TEXTAREA") return;
    const item = items[current];
    const k = event.key;
    if (k === "j" || (k === "ArrowDown" && !inSelect)) { move(1); }
    else if (k === "k" || (k === "ArrowUp" && !inSelect)) { move(-1); }
    else if (k === "a") { setDecision("allow"); }
    else if (k === "b") { setDecision("block"); }
    else if (k === "r") { if (item) { item.message = "skipped for now"; } move(1); }
    else if (/^[1-9]$/.test(k) && item) {
      const cats = schemaOf(item).categories;
      const c = cats[Number(k) - 1];
      if (!c) return;
      if (item.decision !== "block") item.decision = "block";
      item.category = c; item.status = ""; item.message = "";
      render();
    }
    else if (k === "Enter") { submit(); }
    else return;
    event.preventDefault();
  }

  async function loadAgreement() {
    const box = document.getElementById("agreement");
    try {
      const data = await api("/console/api/queue/agreement");
      const rows = data.reviewers.map(r => el("tr", {},
        el("td", {}, r.reviewer), el("td", {}, String(r.labels)),
        el("td", {}, `${pct(r.with_model.agreement)} (n=${r.with_model.n}, κ ${kappa(r.with_model.kappa)})`),
        el("td", {}, r.with_reviewers.length ? r.with_reviewers.map(o =>
          el("div", {}, `${o.reviewer}: ${pct(o.agreement)} (n=${o.n}, κ ${kappa(o.kappa)})`)) : el("span", { class: "muted" }, "no shared items yet"))));
      box.replaceChildren(el("table", { id: "agreement-table" },
        el("thead", {}, el("tr", {}, ["Reviewer", "Labels", "Agreement with the model", "Agreement with other reviewers"].map(h => el("th", {}, h)))),
        el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 4, class: "muted" }, "no labels yet")))));
    } catch (err) {
      box.replaceChildren(errorBox(err));
    }
  }

  await Console.boot("queue");
  const nav = document.querySelector("header nav");
  if (nav && !nav.querySelector('a[href="/console/queue"]')) {
    nav.insertBefore(el("a", { href: "/console/queue", "aria-current": "page" }, "Queue"), nav.lastElementChild);
  }
  main.replaceChildren(
    el("h1", {}, "Review queue"),
    el("p", { class: "muted" }, "A stratified sample of recent decisions (allow included), with the listing as the model saw it. ",
      el("kbd", {}, "j"), "/", el("kbd", {}, "k"), " or arrows: move · ", el("kbd", {}, "a"), " allow · ",
      el("kbd", {}, "b"), " block · ", el("kbd", {}, "1"), "–", el("kbd", {}, "9"), " category · ",
      el("kbd", {}, "r"), " skip · ", el("kbd", {}, "Enter"), " submit"),
    el("p", { id: "queue-count", class: "muted" }),
    el("div", { id: "queue-items" }),
    el("h2", {}, "Agreement"),
    el("div", { id: "agreement" }));
  try {
    const data = await api("/console/api/queue?n=20");
    schemas = data.schemas;
    items = data.items.map(it => ({ ...it, decision: "", category: "", status: "", message: "" }));
    if (!items.length) {
      document.getElementById("queue-items").replaceChildren(el("p", { class: "muted" }, "Nothing to review: no sampled decisions you have not labelled yet."));
    } else {
      render();
    }
  } catch (err) {
    document.getElementById("queue-items").replaceChildren(errorBox(err));
  }
  loadAgreement();
  document.addEventListener("keydown", onKey);
})();
