"use strict";
document.getElementById("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = document.getElementById("signin-error");
  out.replaceChildren();
  const key = document.getElementById("api-key").value.trim();
  try {
    await Console.api("/console/api/session", { method: "POST", body: { key }, noRedirect: true });
    window.location.assign("/console/prompts");
  } catch (err) {
    out.append(Console.errorBox(err));
  }
});
document.getElementById("api-key").focus();
