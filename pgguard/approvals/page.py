# The web console: one self-contained HTML page (no build step, no external assets).
"""``GET /`` on the admin server. The page holds no data: its script asks the JSON API
with the admin bearer token (typed once, kept in the browser's localStorage, or passed
in the URL fragment ``#token=...&as=alice``, which never reaches a server log) and
polls every second. ``#17`` highlights request 17.
"""
from __future__ import annotations

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pgguard approvals</title>
<style nonce="__NONCE__">
  :root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f8f9fb; --ok:#0b7a43;
          --bad:#b42318; --warn:#b54708; --accent:#2f5bd3; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
         color:var(--fg); background:var(--bg); }
  header { display:flex; gap:1rem; align-items:center; flex-wrap:wrap; padding:.7rem 1.2rem;
           background:#fff; border-bottom:1px solid var(--line); }
  header h1 { font-size:1.05rem; margin:0 1rem 0 0; }
  header label { color:var(--muted); }
  main { padding:1rem 1.2rem; max-width:1400px; }
  h2 { font-size:.95rem; margin:1.4rem 0 .5rem; text-transform:uppercase; letter-spacing:.04em;
       color:var(--muted); }
  table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
  th, td { text-align:left; vertical-align:top; padding:.45rem .6rem;
           border-bottom:1px solid var(--line); }
  th { font-weight:600; font-size:.8rem; color:var(--muted); background:#fcfcfd; }
  tr.focus td { background:#fff8e1; }
  pre.sql { margin:0; white-space:pre-wrap; word-break:break-word; max-width:60ch;
            font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; }
  .muted { color:var(--muted); font-size:.85rem; }
  .state-approved { color:var(--ok); font-weight:600; }
  .state-denied { color:var(--bad); font-weight:600; }
  .state-timed_out, .state-withdrawn { color:var(--warn); font-weight:600; }
  .actions { display:flex; flex-direction:column; gap:.35rem; min-width:15rem; }
  .actions div { display:flex; gap:.35rem; }
  button { font:inherit; padding:.28rem .7rem; border-radius:6px; border:1px solid var(--line);
           background:#fff; cursor:pointer; }
  button.approve { background:var(--ok); color:#fff; border-color:var(--ok); }
  button.deny { background:#fff; color:var(--bad); border-color:var(--bad); }
  button:disabled { opacity:.5; cursor:default; }
  input, select { font:inherit; padding:.25rem .4rem; border:1px solid var(--line);
                  border-radius:6px; }
  input.reason { flex:1; min-width:8rem; }
  #status { margin-left:auto; }
  #status.error { color:var(--bad); }
  .err { color:var(--bad); font-size:.85rem; }
  .empty td { color:var(--muted); text-align:center; padding:1rem; }
  #login { display:none; padding:1rem; background:#fff; border:1px solid var(--line);
           margin-bottom:1rem; }
  #login.shown { display:block; }
</style>
</head>
<body>
<header>
  <h1>pgguard approvals</h1>
  <label>approve as <input id="approver" list="approvers" placeholder="your identity"
         autocomplete="off" size="14"></label>
  <datalist id="approvers"></datalist>
  <span id="status" class="muted">connecting…</span>
  <button id="logout" title="forget the admin token in this browser">forget token</button>
</header>
<main>
  <form id="login">
    <p>Paste the admin token (the value of <code id="token-env">[admin] token_env</code>
       where pgguard runs). It stays in this browser only.</p>
    <input id="token" type="password" size="40" autocomplete="off">
    <button id="save-token" type="submit">use token</button>
  </form>
  <h2>Waiting for a decision <span id="pending-count" class="muted"></span></h2>
  <table id="pending">
    <thead><tr><th>#</th><th>who</th><th>rule / what</th><th>statement</th>
      <th>waiting</th><th>decide</th></tr></thead>
    <tbody><tr class="empty"><td colspan="6">nothing is waiting</td></tr></tbody>
  </table>
  <h2>Just-in-time windows</h2>
  <table id="grants">
    <thead><tr><th>#</th><th>who</th><th>rule</th><th>approved by</th><th>ends</th>
      <th></th></tr></thead>
    <tbody><tr class="empty"><td colspan="6">none active</td></tr></tbody>
  </table>
  <h2>Recent decisions</h2>
  <table id="recent">
    <thead><tr><th>#</th><th>outcome</th><th>who</th><th>rule</th><th>statement</th>
      <th>by / reason</th><th>when</th></tr></thead>
    <tbody><tr class="empty"><td colspan="7">no decisions yet</td></tr></tbody>
  </table>
</main>
<script nonce="__NONCE__">
"use strict";
const TOKEN_KEY = "pgguard-admin-token", AS_KEY = "pgguard-approver";
let focusId = null, timer = null, busy = false;

(function readFragment() {
  const h = location.hash.slice(1);
  if (/^\d+$/.test(h)) { focusId = Number(h); return; }
  if (!h) return;
  const p = new URLSearchParams(h);
  if (p.get("token")) localStorage.setItem(TOKEN_KEY, p.get("token"));
  // (a link never replaces the name this browser's human chose: helper 110)
  if (p.get("as") && !localStorage.getItem(AS_KEY)) localStorage.setItem(AS_KEY, p.get("as"));
  if (p.get("id")) focusId = Number(p.get("id"));
  history.replaceState(null, "", location.pathname + location.search +
                       (focusId ? "#" + focusId : ""));
})();

const $ = (sel) => document.querySelector(sel);
const approver = $("#approver");
approver.value = localStorage.getItem(AS_KEY) || "";
approver.addEventListener("change", () => localStorage.setItem(AS_KEY, approver.value.trim()));

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function dur(s) {
  s = Math.max(0, Math.round(s));
  if (s >= 3600) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  if (s >= 60) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return s + "s";
}
const secs = (iso) => (Date.parse(iso) - Date.now()) / 1000;

async function api(path, body) {
  const token = localStorage.getItem(TOKEN_KEY) || "";
  const opts = { headers: { "Authorization": "Bearer " + token } };
  if (body !== undefined) {
    opts.method = "POST"; opts.body = JSON.stringify(body);
    opts.headers["Content-Type"] = "application/json";
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401) { showLogin(true); throw new Error("the admin token is missing or wrong"); }
  if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
  return data;
}

function showLogin(on) { $("#login").classList.toggle("shown", on); }
$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#token").value = ""; showLogin(false); refresh();
});
$("#logout").addEventListener("click", () => { localStorage.removeItem(TOKEN_KEY); showLogin(true); });

function status(text, error) {
  const s = $("#status"); s.textContent = text; s.classList.toggle("error", !!error);
}

async function decide(id, approve, row) {
  const who = approver.value.trim();
  const err = row.querySelector(".err");
  if (!who) { err.textContent = "type your identity in “approve as” first"; approver.focus(); return; }
  localStorage.setItem(AS_KEY, who);
  const body = { approver: who };
  if (approve) {
    const w = row.querySelector("select.window").value;
    if (w) body.window = w;
  } else {
    const reason = row.querySelector("input.reason").value.trim();
    if (reason) body.reason = reason;
  }
  row.querySelectorAll("button").forEach((b) => b.disabled = true);
  try {
    await api(`/api/approvals/${id}/${approve ? "approve" : "deny"}`, body);
    err.textContent = "";
    row.remove();
  } catch (e) {
    err.textContent = e.message;
    row.querySelectorAll("button").forEach((b) => b.disabled = false);
  }
  refresh();
}

function pendingRow(r) {
  const row = el("tr", { id: "req-" + r.id, "data-id": r.id });
  const approveBtn = el("button", { class: "approve", "data-id": r.id, type: "button",
                                    onclick: () => decide(r.id, true, row) }, "Approve");
  const denyBtn = el("button", { class: "deny", "data-id": r.id, type: "button",
                                 onclick: () => decide(r.id, false, row) }, "Deny");
  const win = el("select", { class: "window", title: "let the same statement from the same identity through for a while" },
    el("option", { value: "" }, "once"), el("option", { value: "10m" }, "+10 min"),
    el("option", { value: "1h" }, "+1 hour"), el("option", { value: "8h" }, "+8 hours"));
  row.append(
    el("td", {}, String(r.id)),
    el("td", {}, el("strong", {}, r.identity), el("div", { class: "muted" }, "on " + r.database)),
    el("td", {}, r.rule, el("div", { class: "muted" }, r.classification)),
    el("td", {}, el("pre", { class: "sql" }, r.statement)),
    el("td", { class: "age" }),
    el("td", {}, el("div", { class: "actions" },
      el("div", {}, approveBtn, win),
      el("div", {}, denyBtn, el("input", { class: "reason", placeholder: "reason (optional)" })),
      el("span", { class: "err" }),
      el("span", { class: "muted" }, "approvers: " + r.approvers.join(", ")))));
  return row;
}

function renderPending(list) {
  const body = $("#pending tbody");
  $("#pending-count").textContent = list.length ? `(${list.length})` : "";
  const keep = new Set(list.map((r) => String(r.id)));
  body.querySelectorAll("tr").forEach((tr) => {
    if (!tr.dataset.id || !keep.has(tr.dataset.id)) tr.remove();
  });
  for (const r of list) {
    let row = document.getElementById("req-" + r.id);
    if (!row) { row = pendingRow(r); body.append(row); }
    row.classList.toggle("focus", r.id === focusId);
    row.querySelector(".age").replaceChildren(dur(-secs(r.requested_at)),
      el("div", { class: "muted" }, "times out in " + dur(secs(r.expires_at))));
  }
  if (!list.length) body.append(el("tr", { class: "empty" }, el("td", { colspan: 6 }, "nothing is waiting")));
}

function renderRecent(list) {
  const rows = list.map((r) => el("tr", { "data-id": r.id, class: r.id === focusId ? "focus" : "" },
    el("td", {}, String(r.id)),
    el("td", { class: "state-" + r.state }, r.state.replace("_", " ")),
    el("td", {}, r.identity, el("div", { class: "muted" }, "on " + r.database)),
    el("td", {}, r.rule),
    el("td", {}, el("pre", { class: "sql" }, r.statement)),
    el("td", {}, r.approver || "", r.window_seconds ? el("div", { class: "muted" }, "window " + dur(r.window_seconds)) : "",
       r.reason ? el("div", { class: "muted" }, r.reason) : ""),
    el("td", { class: "muted" }, dur(-secs(r.decided_at)) + " ago")));
  $("#recent tbody").replaceChildren(...(rows.length ? rows :
    [el("tr", { class: "empty" }, el("td", { colspan: 7 }, "no decisions yet"))]));
}

function renderGrants(list) {
  const rows = list.map((g) => el("tr", {},
    el("td", {}, String(g.id)),
    el("td", {}, g.identity, el("div", { class: "muted" }, "on " + g.database)),
    el("td", {}, g.rule, el("div", { class: "muted" }, "request #" + g.request_id)),
    el("td", {}, g.approver),
    el("td", {}, "in " + dur(secs(g.expires_at))),
    el("td", {}, el("button", { type: "button", class: "revoke", "data-id": g.id, onclick: async () => {
      try { await api(`/api/grants/${g.id}/revoke`, {}); } catch (e) { status(e.message, true); }
      refresh(); } }, "End now"))));
  $("#grants tbody").replaceChildren(...(rows.length ? rows :
    [el("tr", { class: "empty" }, el("td", { colspan: 6 }, "none active"))]));
}

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [pending, recent, grants] = await Promise.all([
      api("/api/approvals?state=pending"), api("/api/approvals?state=decided&limit=25"),
      api("/api/grants")]);
    renderPending(pending); renderRecent(recent); renderGrants(grants);
    showLogin(false);
    status("live · updated " + new Date().toLocaleTimeString());
  } catch (e) {
    status(e.message, true);
  } finally {
    busy = false;
  }
}

async function loadApprovers() {
  try {
    const names = await api("/api/approvers");
    $("#approvers").replaceChildren(...names.map((n) => el("option", { value: n })));
  } catch (e) { /* shown by refresh */ }
}

if (!localStorage.getItem(TOKEN_KEY)) showLogin(true);
refresh(); loadApprovers();
timer = setInterval(refresh, 1000);
</script>
</body>
</html>
"""


def render(nonce: str, token_env: str) -> str:
    """The page with a per-response CSP nonce and the name of the token variable."""
    return (INDEX_HTML.replace("__NONCE__", nonce)
            .replace("<code id=\"token-env\">[admin] token_env</code>",
                     f"<code id=\"token-env\">{_html_escape(token_env)}</code>"))


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))
