"use strict";
/* Review form: labels for request ids, checked and recorded as POST /v1/feedback does it.
   Keyboard first: j/k (or arrows) move, a = allow, 1-9 = block with that category,
   x = clear, c = check all, Ctrl+Enter = submit. */
Console.page("review", async (main) => {
  const { api, el, errorBox, t } = Console;
  let schema = null;
  let rows = [];      // {request_id, decision, category, status, errors}
  let current = 0;

  function parseLines(text) {
    const out = [];
    for (const raw of text.split(/\r?\n/)) {
      const line = raw.trim();
      if (!line || /^request_id\s*(,|$)/i.test(line)) continue;  // blank or a CSV header
      const [request_id, decision, category] = line.split(",").map(s => (s || "").trim().replace(/^"|"$/g, ""));
      out.push({ request_id, decision: decision || "", category: category || "", status: "", errors: [] });
    }
    return out;
  }

  function render() {
    const tbody = document.getElementById("review-rows");
    tbody.replaceChildren(...rows.map((r, i) => {
      const decision = el("select", { "aria-label": t("review.decision_for", { id: r.request_id }), "data-field": "decision" },
        el("option", { value: "" }, "—"), schema.decisions.map(d => el("option", { value: d, selected: r.decision === d }, d)));
      const category = el("select", { "aria-label": t("review.category_for", { id: r.request_id }), "data-field": "category" },
        el("option", { value: "" }, "—"), schema.categories.map((c, n) => el("option", { value: c, selected: r.category === c }, `${n + 1} ${c}`)));
      decision.addEventListener("change", () => { r.decision = decision.value; if (r.decision === "allow") r.category = ""; r.status = ""; render(); });
      category.addEventListener("change", () => { r.category = category.value; r.status = ""; });
      const status = r.status === "ok" ? "✓ " + (r.answer ? (r.answer.duplicate ? t("review.duplicate") : r.answer.replaced ? t("review.replaced") : t("review.recorded")) : t("review.valid"))
        : r.errors.map(e => `${e.field}: ${e.problem}`).join("; ");
      return el("tr", { class: [i === current ? "current" : "", r.status === "ok" ? "row-ok" : r.status === "bad" ? "row-bad" : ""].join(" "),
                        "data-row": i, onclick: () => { current = i; render(); } },
        el("td", {}, el("code", {}, r.request_id)), el("td", {}, decision), el("td", {}, category),
        el("td", { class: "status" }, status));
    }));
    document.getElementById("review-count").textContent = t("review.rows", { n: rows.length });
  }

  function setLabel(decision, category) {
    const r = rows[current];
    if (!r) return;
    r.decision = decision; r.category = category; r.status = ""; r.errors = [];
    current = Math.min(current + 1, rows.length - 1);
    render();
  }

  async function send(dryRun) {
    const out = document.getElementById("review-out");
    out.replaceChildren();
    if (!rows.length) return;
    try {
      const data = await api("/console/api/feedback", { method: "POST", body: {
        dry_run: dryRun, rows: rows.map(r => ({ request_id: r.request_id, decision: r.decision, category: r.category || null })) } });
      data.results.forEach((res, i) => {
        rows[i].status = res.ok ? "ok" : "bad"; rows[i].errors = res.errors || []; rows[i].answer = res.answer;
      });
      render();
      out.append(el("p", { role: "status" }, t(dryRun ? "review.checked" : "review.submitted", { ok: data.ok, failed: data.failed })));
    } catch (err) { out.append(errorBox(err)); }
  }

    schema = await api("/console/api/review/schema");
    const input = el("textarea", { id: "review-input", rows: 6, spellcheck: "false",
      placeholder: t("review.placeholder") });
    const file = el("input", { type: "file", id: "review-file", accept: ".csv,text/csv,text/plain" });
    const keys = [["j / ↓", t("review.key.next")], ["k / ↑", t("review.key.previous")], ["a", "allow"],
      ...schema.categories.slice(0, 9).map((c, n) => [String(n + 1), `block: ${c}`]), ["x", t("review.key.clear")],
      ["c", t("review.key.check")], ["Ctrl+Enter", t("review.key.submit")]];
    main.replaceChildren(
      el("h1", {}, t("page.review")),
      el("p", { class: "muted" }, t("review.intro", { prompt: schema.prompt, v: schema.version })),
      el("label", { for: "review-input" }, t("review.ids")), input,
      el("label", { for: "review-file" }, t("review.file")), file,
      el("p", {}, el("button", { type: "button", id: "review-load" }, t("review.load"))),
      el("h2", {}, `${t("review.labels")} `, el("span", { class: "muted", id: "review-count" }, "")),
      el("table", { id: "review-table" },
        el("thead", {}, el("tr", {}, ["review.col.id", "review.col.decision", "review.col.category", "review.col.status"].map(h => el("th", { scope: "col" }, t(h))))),
        el("tbody", { id: "review-rows", tabindex: "0", "aria-label": t("review.rows_label") })),
      el("p", {}, el("button", { type: "button", class: "secondary", id: "review-check" }, t("review.check")), " ",
        el("button", { type: "button", id: "review-submit" }, t("review.submit"))),
      el("div", { id: "review-out", "aria-live": "polite" }),
      el("h2", {}, t("review.keys")),
      el("p", { id: "review-keys" }, keys.map(([k, what]) => [el("kbd", {}, k), ` ${what} · `])));

    document.getElementById("review-load").addEventListener("click", () => {
      rows = rows.concat(parseLines(input.value)); input.value = ""; render();
      document.getElementById("review-rows").focus();
    });
    file.addEventListener("change", async () => {
      if (!file.files.length) return;
      rows = rows.concat(parseLines(await file.files[0].text())); file.value = ""; render();
      document.getElementById("review-rows").focus();
    });
    document.getElementById("review-check").addEventListener("click", () => send(true));
    document.getElementById("review-submit").addEventListener("click", () => send(false));
    document.addEventListener("keydown", (event) => {
      const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(document.activeElement.tagName);
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); send(false); return; }
      if (typing || event.altKey || event.ctrlKey || event.metaKey || !rows.length) return;
      const k = event.key;
      if (k === "j" || k === "ArrowDown") { current = Math.min(current + 1, rows.length - 1); render(); }
      else if (k === "k" || k === "ArrowUp") { current = Math.max(current - 1, 0); render(); }
      else if (k === "a") setLabel("allow", "");
      else if (/^[1-9]$/.test(k) && schema.categories[Number(k) - 1]) setLabel("block", schema.categories[Number(k) - 1]);
      else if (k === "x") setLabel("", "");
      else if (k === "c") send(true);
      else return;
      event.preventDefault();
    });
});
