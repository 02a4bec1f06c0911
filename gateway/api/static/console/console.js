/* Shared by every console page: the session, JSON calls with the CSRF token, DOM helpers,
   the two languages (English, Simplified Chinese) and the time zone times are shown in.
   No inline scripts anywhere (the console's CSP is default-src 'self'). */
"use strict";

const Console = (() => {
  let session = null;
  let strings = {};
  const LANGS = [["en", "English"], ["zh-CN", "简体中文"]];
  const ZONES = ["UTC", "Asia/Shanghai"];
  const store = {
    get(key) { try { return window.localStorage.getItem(key); } catch (e) { return null; } },
    set(key, value) { try { window.localStorage.setItem(key, value); } catch (e) { /* private mode */ } },
  };

  /* The reader's choices, kept in this browser (localStorage) per user of the browser. */
  function lang() {
    const chosen = store.get("modgate.lang");
    if (LANGS.some(([code]) => code === chosen)) return chosen;
    return (navigator.language || "").toLowerCase().startsWith("zh") ? "zh-CN" : "en";
  }
  function zone() {
    const chosen = store.get("modgate.tz");
    return ZONES.includes(chosen) ? chosen : "UTC";
  }

  /* The catalogue of the chosen language (a file the gateway serves). */
  async function loadStrings() {
    const response = await fetch(`/console/static/i18n/${lang()}.json`, { credentials: "same-origin" });
    strings = await response.json();
    document.documentElement.lang = lang();
  }

  /* A text of the catalogue, with {name} placeholders filled in. */
  function t(key, vars) {
    let text = strings[key];
    if (text === undefined) {
      console.error(`console: no text for ${key} in ${lang()}`);
      text = key;
    }
    for (const [k, v] of Object.entries(vars || {})) text = text.split(`{${k}}`).join(String(v));
    return text;
  }

  /* A time in the chosen zone: 2026-01-31 20:05:09 Asia/Shanghai. */
  function time(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    const parts = Object.fromEntries(new Intl.DateTimeFormat("en-CA", {
      timeZone: zone(), year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit",
      minute: "2-digit", second: "2-digit", hourCycle: "h23" }).formatToParts(date).map(p => [p.type, p.value]));
    return `${parts.year}-${parts.month}-${parts.day} ${parts.hour}:${parts.minute}:${parts.second} ${zone()}`;
  }

  function pct(x, digits) {
    return x === null || x === undefined ? "—" : `${(100 * x).toFixed(digits === undefined ? 1 : digits)}%`;
  }
  function num(x, digits) {
    return x === null || x === undefined ? "—" : Number(x).toFixed(digits === undefined ? 3 : digits);
  }
  function interval(ci, asPct) {
    if (!ci || ci[0] === null || ci[0] === undefined) return "";
    return asPct ? `[${pct(ci[0])}, ${pct(ci[1])}]` : `[${num(ci[0])}, ${num(ci[1])}]`;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, body) {
      const err = body && body.error ? body.error : null;
      super(err ? err.message : `HTTP ${status}`);
      this.status = status;
      this.type = err ? err.type : "http_error";
      this.fields = err && err.fields ? err.fields : [];
    }
  }

  async function api(path, options) {
    const method = (options && options.method) || "GET";
    const headers = { accept: "application/json" };
    let body;
    if (method !== "GET") {
      headers["content-type"] = "application/json";
      if (session) headers["x-csrf-token"] = session.csrf;
      body = JSON.stringify((options && options.body) || {});
    }
    const response = await fetch(path, { method, headers, body, credentials: "same-origin" });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401 && !(options && options.noRedirect)) {
      window.location.assign("/console/signin");
    }
    if (!response.ok) throw new ApiError(response.status, data);
    if (data && typeof data === "object") data.httpStatus = response.status;
    return data;
  }

  function errorBox(err) {
    const box = el("div", { class: "error", role: "alert" },
      el("strong", {}, err.type ? `${err.type}: ` : ""), el("span", {}, err.message));
    const fields = err.fields || [];
    const lines = String(err.message || "").split("\n");
    if (lines.length > 1) {
      box.replaceChildren(el("strong", {}, `${err.type || "error"}`), el("pre", {}, err.message));
    }
    if (fields.length) {
      box.append(el("ul", {}, fields.map(f => el("li", {}, el("code", {}, f.field), ": ", f.problem))));
    }
    return box;
  }

  function verdict(v) {
    if (!v) return el("span", { class: "muted" }, "—");
    const parts = [el("span", { class: `decision-${v.decision}` }, v.decision)];
    if (v.category && v.category !== "none") parts.push(" / ", v.category);
    if (v.confidence !== null && v.confidence !== undefined) parts.push(` (${Number(v.confidence).toFixed(2)})`);
    if (v.fail_reason) parts.push(el("div", { class: "muted" }, `fail_reason: ${v.fail_reason}`));
    return el("span", { class: "verdict" }, parts);
  }

  /* Language and time-zone pickers: labelled selects; a change reloads the page in it. */
  function preferences() {
    const langSelect = el("select", { id: "pref-lang" },
      LANGS.map(([code, name]) => el("option", { value: code, selected: code === lang() }, name)));
    langSelect.addEventListener("change", () => { store.set("modgate.lang", langSelect.value); window.location.reload(); });
    const tzSelect = el("select", { id: "pref-tz" },
      ZONES.map(z => el("option", { value: z, selected: z === zone() }, z)));
    tzSelect.addEventListener("change", () => { store.set("modgate.tz", tzSelect.value); window.location.reload(); });
    return el("span", { class: "prefs" },
      el("label", { for: "pref-lang", class: "inline" }, t("nav.language")), langSelect,
      el("label", { for: "pref-tz", class: "inline" }, t("nav.timezone")), tzSelect);
  }

  const PAGES = ["prompts", "playground", "rollouts", "evaluation", "decisions", "queue", "review"];

  function header(active) {
    const nav = el("nav", { "aria-label": t("nav.label") },
      PAGES.map(id => el("a", { href: `/console/${id}`, id: `nav-${id}`, "aria-current": id === active ? "page" : null }, t(`nav.${id}`))),
      el("a", { href: "/docs" }, t("nav.docs")));
    const who = el("span", { class: "who", title: session ? session.scopes.join(", ") : "" }, session ? session.name : "");
    const out = el("button", { type: "button", class: "secondary", id: "signout", onclick: signOut }, t("nav.signout"));
    return el("header", {}, el("span", { class: "brand" }, t("brand")), nav, who, preferences(), out);
  }

  async function signOut() {
    try { await api("/console/api/signout", { method: "POST" }); } finally {
      window.location.assign("/console/signin");
    }
  }

  /* The language first (so even errors are in it), then the session and the header;
     resolves with the session (redirects when signed out). */
  async function boot(active) {
    await loadStrings();
    document.title = `${t(`page.${active}`)} · ${t("brand")}`;
    session = await api("/console/api/session");
    document.body.prepend(header(active));
    return session;
  }

  /* A page's main area, or the error that stopped it, under the page's heading. */
  async function page(active, build) {
    const main = document.getElementById("main");
    try {
      const s = await boot(active);
      await build(main, s);
    } catch (err) {
      main.replaceChildren(el("h1", {}, strings[`page.${active}`] || active), errorBox(err));
    }
  }

  function params() { return new URLSearchParams(window.location.search); }

  function has(scope) { return !!session && (session.scopes.includes(scope) || session.scopes.includes("admin")); }

  /* A labelled <select> of the registry's prompts; navigates to ?name= on change. */
  async function promptPicker(current) {
    const list = await api("/console/api/prompts");
    const select = el("select", { id: "prompt-picker" },
      list.prompts.map(p => el("option", { value: p.name, selected: p.name === current }, p.name)));
    select.addEventListener("change", () => {
      const q = params(); q.set("name", select.value); window.location.search = q.toString();
    });
    return el("p", {}, el("label", { for: "prompt-picker" }, t("common.prompt")), select);
  }

  return { api, el, boot, page, errorBox, verdict, params, has, ApiError, t, time, pct, num, interval,
           loadStrings, preferences, promptPicker, lang, zone, session: () => session };
})();
