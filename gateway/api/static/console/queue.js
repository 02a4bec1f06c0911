"use strict";
/* Review queue: a stratified sample of recent decisions with their listing content.
   Keyboard first: j/k (or the arrow keys) move, a = allow, b = block (then pick the category:
   1-9 or the select), r = skip for now, Enter = submit the current item's label.
   Labels go to POST /console/api/feedback (the console's form of POST /v1/feedback). The model's
   own answer is not shown, so that it does not anchor the label. */
(async () => {
  const { api, el, errorBox, t } = Console;
  let items = [];     // queue items, plus {decision, category, status, message}
  let schemas = {};
  let current = 0;

  function schemaOf(item) {
    return schemas[`${item.prompt}@${item.version}`] || { decisions: ["allow", "block"], categories: [] };
  }

  function pct(x) { return x === null || x === undefined ? "—" : Console.pct(x, 0); }
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
      el("h3", {}, `${i + 1}. `, content.title || el("span", { class: "muted" }, t("queue.no_title"))),
      el("div", { class: "muted" }, t("queue.meta", { locale: item.locale, prompt: item.prompt, version: item.version,
                                                    item: item.item_id, ts: Console.time(item.ts) }),
        item.labelled_by.length ? t("queue.others", { n: item.labelled_by.length }) : ""),
      el("div", { class: "description" }, content.description || ""),
      el("div", { class: "controls" },
        el("div", {}, el("label", { for: `decision-${i}` }, t("queue.decision")), decision),
        el("div", {}, el("label", { for: `category-${i}` }, t("queue.category")), category),
        el("button", { type: "button", id: `submit-${i}`, onclick: () => { current = i; submit(); } }, t("queue.submit")),
        status));
  }

  function render() {
    const list = document.getElementById("queue-items");
    list.replaceChildren(...items.map(renderItem));
    const node = list.children[current];
    if (node && !node.contains(document.activeElement)) node.scrollIntoView({ block: "nearest" });
    const left = items.filter(it => it.status !== "ok").length;
    document.getElementById("queue-count").textContent = t("queue.left", { left, total: items.length });
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
    if (!item.decision) { item.status = "bad"; item.message = t("queue.pick_decision"); render(); return; }
    try {
      const data = await api("/console/api/feedback", { method: "POST", body: {
        rows: [{ request_id: item.request_id, decision: item.decision, category: item.category || null }] } });
      const res = data.results[0];
      if (res.ok) {
        item.status = "ok";
        item.message = t(res.answer.duplicate ? "queue.duplicate" : res.answer.replaced ? "queue.replaced" : "queue.recorded");
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
    else if (k === "r") { if (item) { item.message = t("queue.skipped"); } move(1); }
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
        el("td", {}, t("queue.pair", { agreement: pct(r.with_model.agreement), n: r.with_model.n, kappa: kappa(r.with_model.kappa) })),
        el("td", {}, r.with_reviewers.length ? r.with_reviewers.map(o =>
          el("div", {}, t("queue.pair_with", { reviewer: o.reviewer, agreement: pct(o.agreement), n: o.n, kappa: kappa(o.kappa) })))
          : el("span", { class: "muted" }, t("queue.no_shared")))));
      box.replaceChildren(el("table", { id: "agreement-table" },
        el("thead", {}, el("tr", {}, ["queue.col.reviewer", "queue.col.labels", "queue.col.with_model", "queue.col.with_reviewers"].map(h => el("th", {}, t(h))))),
        el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 4, class: "muted" }, t("queue.no_labels"))))));
    } catch (err) {
      box.replaceChildren(errorBox(err));
    }
  }

  document.head.append(el("link", { rel: "stylesheet", href: "/console/static/queue.css" }));
  await Console.page("queue", async (main) => {
    main.replaceChildren(
      el("h1", {}, t("page.queue")),
      el("p", { class: "muted" }, t("queue.intro")),
      el("p", { class: "muted" }, t("queue.keys")),
      el("p", { id: "queue-count", class: "muted" }),
      el("div", { id: "queue-items" }),
      el("h2", {}, t("queue.agreement")),
      el("div", { id: "agreement" }));
    try {
      const data = await api("/console/api/queue?n=20");
      schemas = data.schemas;
      items = data.items.map(it => ({ ...it, decision: "", category: "", status: "", message: "" }));
      if (!items.length) {
        document.getElementById("queue-items").replaceChildren(el("p", { class: "muted" }, t("queue.empty")));
      } else {
        render();
      }
    } catch (err) {
      document.getElementById("queue-items").replaceChildren(errorBox(err));
    }
  });
  loadAgreement();
  document.addEventListener("keydown", onKey);
})();
