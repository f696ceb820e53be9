"""The operator dashboard's page: inline HTML, CSS and JavaScript (no build step).

Served by ``orchestrator.dashboard`` with ``__ROOT_PATH__`` replaced by the mount path (a
JSON string). The script follows ``api/events`` (SSE, the browser reconnects by itself),
draws every table with ``textContent`` only (payloads, errors and names come from
applications and receivers: never parsed as HTML), and sends an action only after
``confirm()``, with the operator token the operator typed (kept in ``sessionStorage``,
never in a cookie, so another site cannot make the browser use it). ``window.dashState``
exposes what the page received, for tests.
"""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>asyncstore operator dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 13px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 10px 16px; display: flex; gap: 16px;
           align-items: center; flex-wrap: wrap; }
  header h1 { font-size: 16px; margin: 0 12px 0 0; }
  header input { font: inherit; padding: 3px 6px; width: 200px; }
  #live { padding: 2px 8px; border-radius: 10px; background: #8a2b2b; }
  #live.on { background: #2b7a3d; }
  #mode { opacity: 0.85; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr));
         gap: 12px; padding: 12px; }
  section { background: #fff; border-radius: 6px; padding: 8px 12px;
            box-shadow: 0 1px 2px rgba(0,0,0,.08); overflow-x: auto; }
  h2 { font-size: 14px; margin: 4px 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid #eceef2;
           vertical-align: top; max-width: 320px; overflow-wrap: break-word; }
  th { font-weight: 600; color: #5a6275; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .empty { color: #8a90a0; font-style: italic; }
  .bad { color: #a32020; }
  .good { color: #2b7a3d; }
  button { font: inherit; padding: 1px 8px; margin-right: 4px; cursor: pointer; }
  button:disabled { cursor: not-allowed; }
  #message { padding: 0 16px; min-height: 20px; }
  p.note { margin: 0 0 6px; color: #5a6275; }
</style>
</head>
<body>
<header>
  <h1>asyncstore operator dashboard</h1>
  <span id="live">connecting</span>
  <span id="mode"></span>
  <label>operator <input id="operator" placeholder="your name" autocomplete="username"></label>
  <label>token <input id="token" type="password" placeholder="operator token"
         autocomplete="off"></label>
  <span id="updated"></span>
</header>
<p id="message" role="status"></p>
<main>
  <section><h2>Queues and outbox</h2><table id="queues"></table></section>
  <section><h2>Flags and rollout</h2><table id="flags"></table></section>
  <section><h2>Queued tasks</h2><p class="note" id="queued-counts"></p>
    <table id="queued"></table></section>
  <section><h2>Running tasks</h2><table id="running"></table></section>
  <section><h2>Dead-lettered tasks</h2><table id="dead"></table></section>
  <section><h2>Dead-lettered outbox messages</h2><table id="outbox-dead"></table></section>
  <section><h2>Webhook delivery log</h2><table id="webhooks"></table></section>
  <section><h2>Live sessions</h2><p class="note" id="subscribers-note"></p>
    <table id="sessions"></table></section>
  <section><h2>Audit log</h2><p class="note" id="audit-skipped"></p>
    <table id="audit"></table></section>
</main>
<script>
"use strict";
const ROOT = __ROOT_PATH__;
const state = window.dashState = {updates: 0, connects: 0, snapshot: null, results: []};
const $ = (id) => document.getElementById(id);
for (const key of ["token", "operator"]) {
  $(key).value = sessionStorage.getItem("dash." + key) || "";
  $(key).addEventListener("change", () => sessionStorage.setItem("dash." + key, $(key).value));
}

function cell(row, value, cls) {
  const td = row.insertCell();
  td.textContent = value === null || value === undefined ? "-" : String(value);
  if (cls) td.className = cls;
  return td;
}

function table(id, columns, rows, extra) {
  const t = $(id);
  t.replaceChildren();
  const head = t.createTHead().insertRow();
  for (const [title] of columns) head.appendChild(document.createElement("th")).textContent = title;
  if (extra) head.appendChild(document.createElement("th")).textContent = "";
  const body = t.createTBody();
  if (!rows.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = columns.length + (extra ? 1 : 0);
    td.className = "empty";
    td.textContent = "none";
  }
  for (const item of rows) {
    const tr = body.insertRow();
    tr.dataset.key = String(item.id ?? item.name ?? item.session_id ?? "");
    for (const [, get, cls] of columns) {
      cell(tr, get(item), typeof cls === "function" ? cls(item) : cls);
    }
    if (extra) extra(tr.insertCell(), item);
  }
}

function age(s) {
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function buttons(snap, appliesTo, target) {
  return (td, item) => {
    for (const [name, action] of Object.entries(snap.actions)) {
      if (!action.applies_to.includes(appliesTo)) continue;
      const b = td.appendChild(document.createElement("button"));
      b.textContent = action.label;
      b.dataset.action = name;
      b.disabled = snap.read_only;
      b.title = snap.read_only ? "read-only: no operator token is configured" : name;
      b.addEventListener("click", () => act(name, target(item)));
    }
  };
}

function draw(snap) {
  const mode = snap.read_only ? "read-only" : "actions enabled";
  $("mode").textContent = snap.dialect + " \\u00b7 " + mode;
  $("updated").textContent = "updated " + snap.generated_at.slice(11, 19) + " UTC";
  const depth = [["queue", (d) => d.name], ["waiting", (d) => d.waiting, "num"],
                 ["delayed", (d) => d.delayed, "num"], ["in flight", (d) => d.in_flight, "num"],
                 ["oldest wait", (d) => age(d.oldest_wait_s), "num"]];
  table("queues", depth, [...snap.queues, snap.outbox]);
  table("flags", [["flag", (f) => f.name], ["scope", (f) => f.scope],
                  ["value", (f) => f.value]], snap.flags);
  const taskCols = [["id", (t) => t.id, "num"], ["queue", (t) => t.queue],
                    ["attempts", (t) => t.attempts + "/" + t.max_attempts, "num"],
                    ["worker", (t) => t.worker_id], ["last error", (t) => t.last_error, "bad"],
                    ["payload", (t) => t.payload]];
  $("queued-counts").textContent = snap.queued_per_queue.map(
    (q) => q.queue + ": next " + q.shown + " of " + q.count + " waiting or delayed").join("; ")
    + (snap.queued_queues_hidden ? "; " + snap.queued_queues_hidden + " more queues" : "");
  const queuedCols = [["id", (t) => t.id, "num"], ["queue", (t) => t.queue],
                      ["priority", (t) => t.priority, "num"],
                      ["run after", (t) => t.run_after.slice(11, 23)],
                      ["attempts", (t) => t.attempts + "/" + t.max_attempts, "num"],
                      ["payload", (t) => t.payload]];
  table("queued", queuedCols, snap.tasks.queued, buttons(snap, "task:queued", (t) => t.id));
  table("running", taskCols, snap.tasks.running, buttons(snap, "task:running", (t) => t.id));
  table("dead", taskCols, snap.tasks.dead, buttons(snap, "task:dead", (t) => t.id));
  table("outbox-dead", [["id", (m) => m.id, "num"], ["channel", (m) => m.channel],
                        ["account", (m) => m.account],
                        ["attempts", (m) => m.attempts + "/" + m.max_attempts, "num"],
                        ["last error", (m) => m.last_error, "bad"], ["payload", (m) => m.payload]],
        snap.outbox_dead, buttons(snap, "outbox:dead", (m) => m.id));
  table("webhooks", [["at", (a) => a.attempted_at.slice(11, 23)], ["endpoint", (a) => a.endpoint],
                     ["webhook-id", (a) => a.webhook_id], ["status", (a) => a.status, "num"],
                     ["outcome", (a) => a.ok ? "delivered" : a.error,
                      (a) => a.ok ? "good" : "bad"]],
        snap.webhooks, buttons(snap, "webhook", (a) => a.webhook_id));
  table("sessions", [["session", (s) => s.session_id], ["holder", (s) => s.holder],
                     ["epoch", (s) => s.token, "num"],
                     ["subscribers", (s) => snap.subscribers_known ? s.subscribers : "-", "num"]],
        snap.sessions);
  const instances = snap.subscriber_instances || [];
  $("subscribers-note").textContent = snap.subscribers_note
    ? "Subscribers: " + snap.subscribers_note + "."
    : "Subscribers summed over " + instances.length + " live instance"
      + (instances.length === 1 ? "" : "s") + ": " + instances.map(
        (i) => i.instance_id + " (" + i.subscribers + (i.this_process ? ", this process" : "")
          + ")").join(", ") + ".";
  $("audit-skipped").textContent = snap.audit_skipped
    ? snap.audit_skipped + " refused attempts not recorded (per-client limit)" : "";
  table("audit", [["at", (e) => e.at.slice(11, 23)], ["actor", (e) => e.actor],
                  ["action", (e) => e.action], ["target", (e) => e.target],
                  ["outcome", (e) => e.outcome, (e) => e.outcome === "done" ? "good" : "bad"]],
        snap.audit);
}

async function act(name, target) {
  if (!confirm("Run " + name + " on " + target + "?")) return;
  const headers = {"Content-Type": "application/json",
                   "Authorization": "Bearer " + $("token").value};
  if ($("operator").value) headers["X-Operator"] = $("operator").value;
  let result;
  try {
    const r = await fetch(ROOT + "/api/actions/" + encodeURIComponent(name), {
      method: "POST", headers, body: JSON.stringify({target, confirm: true})});
    result = {status: r.status, ...(await r.json())};
  } catch (err) {
    result = {status: 0, ok: false, error: String(err)};
  }
  state.results.push({name, target, ...result});
  $("message").textContent = result.ok ? name + " " + target + ": done"
                                        : name + " " + target + ": " + result.error;
  $("message").className = result.ok ? "good" : "bad";
}

function connect() {
  const source = new EventSource(ROOT + "/api/events");
  source.onopen = () => {
    state.connects += 1;
    $("live").textContent = "live";
    $("live").className = "on";
  };
  source.onerror = () => { $("live").textContent = "reconnecting"; $("live").className = ""; };
  source.addEventListener("state", (e) => {
    state.snapshot = JSON.parse(e.data);
    state.updates += 1;
    draw(state.snapshot);
  });
  source.addEventListener("error", (e) => {
    if (!e.data) return;  // a connection error, not the server's event
    $("live").textContent = "database error";
    $("live").className = "";
    $("message").textContent = JSON.parse(e.data).error;
    $("message").className = "bad";
  });
  source.addEventListener("shutdown", () => { $("live").textContent = "server closing"; });
}
connect();
</script>
</body>
</html>
"""
