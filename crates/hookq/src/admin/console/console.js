// The dead-letter console. Plain JavaScript, no build step.
//
// Everything a dead letter carries (bodies, headers, keys, errors) comes from
// whoever can reach the ingress: it only ever reaches the page through
// textContent or form values, never innerHTML.
"use strict";

const TOKEN_KEY = "hookq-admin-token";
const $ = (id) => document.getElementById(id);
const state = { items: [], selected: new Set(), filter: {}, busy: false };

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) e.dataset[dk] = dv;
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + token() };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (r.status === 401) throw new Unauthorized((body && body.message) || "unauthorized");
  if (!r.ok) {
    const e = new Error((body && body.message) || ("HTTP " + r.status));
    e.status = r.status; e.body = body;
    throw e;
  }
  return body;
}

function showError(e) {
  if (e instanceof Unauthorized) { signOut("The token was refused. Sign in again."); return; }
  const b = $("error");
  b.textContent = e && e.message ? e.message : String(e);
  b.hidden = false;
}

function clearError() { $("error").hidden = true; }

function show(view) {
  for (const id of ["login", "list-view", "detail-view"]) $(id).hidden = id !== view;
  $("logout").hidden = view === "login";
  document.body.dataset.view = view;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  $("login-error").textContent = message || "";
  show("login");
  $("token").focus();
}

// ---- stats ----------------------------------------------------------------

function statCard(label, value, list) {
  const card = el("div", { class: "stat" }, el("div", { class: "label", text: label }));
  if (value !== undefined) card.append(el("div", { class: "value", text: String(value) }));
  if (list) {
    const ul = el("ul");
    for (const [k, n] of list) ul.append(el("li", {}, el("span", { text: k }), el("strong", { text: String(n) })));
    if (!list.length) ul.append(el("li", { class: "muted", text: "none" }));
    card.append(ul);
  }
  return card;
}

function fmtTime(s) {
  if (!s) return "–";
  const d = new Date(s);
  return isNaN(d) ? s : d.toLocaleString();
}

async function loadStats() {
  const s = await api("/admin/dlq/stats");
  const box = $("stats");
  const total = statCard("Dead letters", s.total);
  total.append(el("div", { class: "when muted", text: "in " + s.queue }));
  box.replaceChildren(
    total,
    statCard("By source", undefined, Object.entries(s.by_source)),
    statCard("By reason", undefined, Object.entries(s.by_reason)),
    (() => {
      const c = statCard("Dead at");
      c.append(el("div", { class: "when", text: "oldest " + fmtTime(s.oldest_dead_at) }),
               el("div", { class: "when", text: "newest " + fmtTime(s.newest_dead_at) }));
      return c;
    })(),
  );
}

// ---- targets --------------------------------------------------------------

function targetRow(t) {
  const paused = t.state === "paused";
  const button = el("button", {
    type: "button",
    class: paused ? "secondary" : "danger",
    text: paused ? "Resume" : "Pause",
  });
  button.setAttribute("aria-label", (paused ? "Resume " : "Pause ") + t.name);
  button.addEventListener("click", async () => {
    button.disabled = true;
    clearError();
    try {
      const action = paused ? "resume" : "pause";
      await api("/admin/targets/" + encodeURIComponent(t.name) + "/" + action, { method: "POST" });
      await loadTargets();
    } catch (e) { showError(e); button.disabled = false; }
  });
  const name = el("td", { data: { label: "Target" } },
    el("div", { text: t.name }), el("div", { class: "muted", text: t.url }));
  const state = el("td", { data: { label: "State" } },
    el("span", { class: "state " + t.state, text: t.state.replace("_", " ") }));
  const rate = t.rate_per_s > 0 ? ", " + t.rate_per_s + "/s" : "";
  return el("tr", { data: { target: t.name } },
    name, state,
    cell("In flight", t.in_flight),
    cell("Limit", t.limit + " of " + t.max_concurrency + rate),
    cell("Held", t.held),
    cell("Workers", t.workers),
    el("td", { class: "buttons" }, button));
}

async function loadTargets() {
  const v = await api("/admin/targets");
  const rows = v.targets.map(targetRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 7, class: "muted", text: "No targets configured." })));
  $("targets").tBodies[0].replaceChildren(...rows);
}

// ---- the list -------------------------------------------------------------

function readFilter() {
  const f = {};
  for (const k of ["source", "reason", "key"]) {
    const v = $("f-" + k).value.trim();
    if (v) f[k] = v;
  }
  return f;
}

function cell(label, text, cls) {
  return el("td", { class: cls || "", text: text == null ? "–" : String(text), data: { label } });
}

function reasonBadge(reason) {
  const td = el("td", { data: { label: "Reason" } });
  td.append(el("span", { class: "reason " + (reason || "none"), text: reason || "not hookq" }));
  return td;
}

function renderList() {
  const tbody = $("list").tBodies[0];
  const rows = state.items.map((it) => {
    const box = el("input", { type: "checkbox", checked: state.selected.has(it.id) });
    box.setAttribute("aria-label", "Select " + it.key);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(it.id); else state.selected.delete(it.id);
      renderSelection();
    });
    const open = el("button", { type: "button", text: it.key || it.id });
    open.addEventListener("click", () => openDetail(it.id));
    const keyCell = el("td", { class: "key", data: { label: "Key" } }, open);
    const tr = el("tr", { data: { id: it.id } },
      el("td", { class: "check" }, box),
      cell("Dead at", fmtTime(it.dead_at)),
      cell("Source", it.source),
      keyCell,
      reasonBadge(it.reason),
      cell("Status", it.last_status),
      cell("Attempts", it.attempts),
      cell("Last error", it.last_error, "err"),
      cell("Body", it.body_preview + (it.body_size > it.body_preview.length ? " …" : ""), "preview"),
    );
    return tr;
  });
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    const td = el("td", { colSpan: 9, class: "muted", text: "No dead letter matches." });
    tbody.append(el("tr", {}, td));
  }
  renderSelection();
}

function renderSelection() {
  // Keep only selected ids still listed.
  const shown = new Set(state.items.map((i) => i.id));
  for (const id of [...state.selected]) if (!shown.has(id)) state.selected.delete(id);
  const n = state.selected.size;
  $("selection-note").textContent = n
    ? n + " selected: the actions apply to the selection."
    : "Nothing selected: the actions apply to every dead letter the filter matches.";
  $("select-all").checked = n > 0 && n === state.items.length;
  $("dry-run").disabled = state.busy;
  $("move").disabled = state.busy;
}

async function loadList() {
  const f = readFilter();
  state.filter = f;
  const q = new URLSearchParams(f);
  q.set("limit", $("f-limit").value || "100");
  const v = await api("/admin/dlq/pending?" + q.toString());
  state.items = v.items;
  $("list-note").textContent = v.matched + " of " + v.looked_at + " dead letters match" +
    (v.truncated ? "; showing the first " + v.items.length + " (raise Show, or filter)" : "") + ".";
  renderList();
}

async function refresh() {
  clearError();
  await Promise.all([loadTargets(), loadStats(), loadList()]);
}

// The targets' states change on their own (a breaker opens, a probe goes
// out): look again every few seconds while the list is shown.
setInterval(() => {
  if (document.body.dataset.view === "list-view" && token()) loadTargets().catch(() => {});
}, 3000);

// ---- detail ---------------------------------------------------------------

function headerRows(table, headers) {
  const rows = headers.map((h) => el("tr", {},
    el("td", { text: h.name }),
    el("td", { text: h.value + (h.lossy ? "  (not UTF-8, shown with replacements)" : "") })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "muted", text: "none" })));
  table.tBodies[0].replaceChildren(...rows);
}

async function openDetail(id) {
  clearError();
  try {
    const d = await api("/admin/dlq/" + encodeURIComponent(id));
    $("detail-title").textContent = d.key || d.id;
    const meta = $("detail-meta");
    const pairs = [
      ["Message id", d.id], ["Source", d.source], ["Key", d.key], ["Delivery id", d.delivery], ["Reason", d.reason || "not a hookq dead letter"],
      ["Last status", d.last_status], ["Last error", d.last_error], ["Attempts", d.attempts],
      ["Received at", fmtTime(d.received_at)], ["Dead at", fmtTime(d.dead_at)],
      ["Content type", d.content_type], ["Body size", d.body_size + " bytes"],
      ["Moved back before", d.shovelled ? d.shovelled + " time(s), last dead as " + d.previous_dead_reason : "never"],
    ];
    meta.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v == null ? "–" : String(v) })]));
    $("detail-encoding").textContent = d.body.encoding === "base64" ? "(not UTF-8: base64)" : "";
    let body = d.body.data;
    if (d.body.encoding === "utf8") {
      try { body = JSON.stringify(JSON.parse(body), null, 2); } catch (_) { /* not JSON: as it is */ }
    }
    $("detail-body").textContent = body;
    headerRows($("detail-hookq"), d.hookq_headers);
    headerRows($("detail-request"), d.request_headers);
    show("detail-view");
    window.scrollTo(0, 0);
  } catch (e) { showError(e); }
}

// ---- dry run and move back ------------------------------------------------

function request(dryRun) {
  const body = { dry_run: dryRun };
  if (state.selected.size) body.message_ids = [...state.selected];
  else Object.assign(body, state.filter);
  return body;
}

function describeScope() {
  const n = state.selected.size;
  if (n) return n + " selected dead letter(s)";
  const f = Object.entries(state.filter).map(([k, v]) => k + " = " + v);
  return "every dead letter" + (f.length ? " with " + f.join(", ") : "") + " (reason invalid never moves)";
}

function countsList(counts) {
  const ul = el("ul");
  for (const r of counts.by_source_and_reason) ul.append(el("li", { text: r.source + " · " + r.reason + ": " + r.count }));
  return ul;
}

function showOutcome(o, failedMessage) {
  const box = $("outcome");
  const n = o.dry_run ? o.would_move.total : o.moved.total;
  box.className = "outcome" + (o.dry_run ? " dry" : "") + (failedMessage ? " failed" : "");
  const title = o.dry_run
    ? "Dry run: " + n + " dead letter(s) would move back; nothing moved."
    : "Moved " + n + " dead letter(s) back to work.";
  const parts = [el("h4", { text: title })];
  if (n) parts.push(countsList(o.dry_run ? o.would_move : o.moved));
  parts.push(el("div", { class: "muted", text: "Looked at " + o.looked_at + " of " + o.total + "; kept " + o.kept +
    (o.skipped ? "; skipped " + o.skipped + " that are not hookq messages (never moved)" : "") + "." }));
  if (o.dry_run && o.rows.length) {
    parts.push(el("div", { class: "muted", text: "Would move: " + o.rows.slice(0, 20).map((r) => r.key).join(", ") +
      (o.rows.length > 20 ? ", …" : "") }));
  }
  if (failedMessage) parts.push(el("div", { class: "error", text: failedMessage }));
  box.replaceChildren(...parts);
  box.hidden = false;
}

async function watchProgress(stop) {
  const bar = $("progress"), text = $("progress-text");
  while (!stop.done) {
    try {
      const s = await api("/admin/dlq/reprocess");
      if (s.running) {
        bar.max = Math.max(1, s.running.total);
        bar.value = s.running.looked_at;
        const n = s.running.dry_run ? s.running.would_move : s.running.moved;
        text.textContent = "looked at " + s.running.looked_at + " of " + s.running.total + ", " + n +
          (s.running.dry_run ? " would move" : " moved");
      }
    } catch (_) { /* the answer to the run says what went wrong */ }
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function run(dryRun) {
  if (state.busy) return;
  state.busy = true;
  clearError();
  $("confirm").hidden = true;
  $("outcome").hidden = true;
  $("progress-box").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = dryRun ? "dry run…" : "moving…";
  renderSelection();
  const stop = { done: false };
  const watching = watchProgress(stop);
  let outcome = null, failure = null;
  try {
    outcome = await api("/admin/dlq/reprocess", { method: "POST", body: request(dryRun) });
  } catch (e) {
    failure = e;
  }
  // The run is over: the progress goes, then the outcome shows.
  stop.done = true;
  await watching;
  $("progress-box").hidden = true;
  state.busy = false;
  if (outcome && !dryRun) state.selected.clear();
  if (!dryRun) { try { await refresh(); } catch (e) { showError(e); } }
  if (outcome) showOutcome(outcome);
  else if (failure && failure.body && failure.body.outcome) showOutcome(failure.body.outcome, failure.message);
  else if (failure) showError(failure);
  renderSelection();
}

// ---- wiring ---------------------------------------------------------------

async function signIn(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
  try {
    await refresh();
    show("list-view");
  } catch (e) {
    if (e instanceof Unauthorized) signOut("That token was refused.");
    else { show("list-view"); showError(e); }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    signIn(t);
  });
  $("logout").addEventListener("click", () => signOut("Signed out."));
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.selected.clear();
    loadList().catch(showError);
  });
  $("refresh").addEventListener("click", () => refresh().catch(showError));
  $("select-all").addEventListener("change", (ev) => {
    if (ev.target.checked) for (const i of state.items) state.selected.add(i.id);
    else state.selected.clear();
    renderList();
  });
  $("dry-run").addEventListener("click", () => run(true));
  $("move").addEventListener("click", () => {
    $("confirm-text").textContent = "Move " + describeScope() + " back to the work queue?";
    $("confirm").hidden = false;
  });
  $("confirm-yes").addEventListener("click", () => run(false));
  $("confirm-no").addEventListener("click", () => { $("confirm").hidden = true; });
  $("back").addEventListener("click", () => { show("list-view"); });

  if (token()) signIn(token()); else show("login");
});
