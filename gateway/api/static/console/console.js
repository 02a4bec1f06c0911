/* Shared by every console page: the session, JSON calls with the CSRF token, DOM helpers.
   No inline scripts anywhere (the console's CSP is default-src 'self'). */
"use strict";

const Console = (() => {
  let session = null;

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

  function header(active) {
    const nav = el("nav", { "aria-label": "console" },
      [["prompts", "Prompts"], ["playground", "Playground"], ["review", "Review"]].map(([id, text]) =>
        el("a", { href: `/console/${id}`, "aria-current": id === active ? "page" : null }, text)),
      el("a", { href: "/docs" }, "API docs"));
    const who = el("span", { class: "who" }, session ? `${session.name} · ${session.scopes.join(", ")}` : "");
    const out = el("button", { type: "button", class: "secondary", id: "signout", onclick: signOut }, "Sign out");
    return el("header", {}, el("span", { class: "brand" }, "modgate console"), nav, who, out);
  }

  async function signOut() {
    try { await api("/console/api/signout", { method: "POST" }); } finally {
      window.location.assign("/console/signin");
    }
  }

  /* Load the session, draw the header; resolves with the session (redirects when signed out). */
  async function boot(active) {
    session = await api("/console/api/session");
    document.body.prepend(header(active));
    return session;
  }

  function params() { return new URLSearchParams(window.location.search); }

  function has(scope) { return !!session && (session.scopes.includes(scope) || session.scopes.includes("admin")); }

  return { api, el, boot, errorBox, verdict, params, has, ApiError };
})();
