"use strict";
/* Sign-in: the key is sent once; the session is a cookie the page cannot read. */
(async () => {
  const { el, t } = Console;
  await Console.loadStrings();
  document.title = `${t("page.signin")} · ${t("brand")}`;
  const main = document.getElementById("main");
  const out = el("div", { id: "signin-error", "aria-live": "polite" });
  const key = el("input", { id: "api-key", name: "key", type: "password", placeholder: "mgk_…", required: true });
  const form = el("form", { id: "signin-form", autocomplete: "off" },
    el("label", { for: "api-key" }, t("signin.key")), key,
    el("p", {}, el("button", { type: "submit", id: "signin-submit" }, t("signin.submit"))));
  main.replaceChildren(el("h1", {}, t("brand")), el("p", { class: "muted" }, t("signin.intro")),
    form, out, el("p", {}, Console.preferences()));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    out.replaceChildren();
    try {
      await Console.api("/console/api/session", { method: "POST", body: { key: key.value.trim() }, noRedirect: true });
      window.location.assign("/console/prompts");
    } catch (err) {
      out.append(Console.errorBox(err));
    }
  });
  key.focus();
})();
