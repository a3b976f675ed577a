// The vimd dashboard: one page over the REST API with the caller's token (kept in
// sessionStorage). No framework and no build step; charts are SVG drawn here. Every text from
// the API is set as text, never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { token: sessionStorage.getItem("vim-token") || "", admin: false, timers: [], stream: null };

function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: Object.assign({ authorization: "Bearer " + state.token },
      body === undefined ? {} : { "content-type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  if (!r.ok) throw new Error(`${r.status}: ${(data && data.error) || r.statusText}`);
  return data;
}

function status(msg, bad) {
  const s = document.getElementById("status");
  s.textContent = msg;
  s.className = bad ? "error" : "";
}

function utc(ms) { return new Date(ms).toISOString().replace("T", " ").slice(0, 19); }
function monthStart() { const d = new Date(); return Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1); }
function iso(ms) { return new Date(ms).toISOString(); }
function badge(s) { return el("span", { class: "badge " + s, text: s }); }

// Runs `f` now and every `ms` while the view is shown; a failure is shown, not thrown.
function every(ms, f) {
  const run = () => f().catch((e) => status(e.message, true));
  run();
  state.timers.push(setInterval(run, ms));
}

function leaveView() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.stream) { state.stream.abort(); state.stream = null; }
}

// ---- log in ----

async function login(token) {
  state.token = token.trim();
  await api("GET", "/vms?limit=1");
  try { await api("GET", "/hosts"); state.admin = true; } catch (_) { state.admin = false; }
  sessionStorage.setItem("vim-token", state.token);
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").textContent = state.admin ? "admin" : "consumer";
  if (!location.hash) location.hash = state.admin ? "#hosts" : "#vms";
  route();
}

function showLogin(msg) {
  leaveView();
  document.getElementById("nav").hidden = true;
  document.getElementById("view").replaceChildren();
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = msg || "";
}

// ---- views ----

function route() {
  leaveView();
  const [view, arg] = (location.hash.slice(1) || "vms").split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  const v = document.getElementById("view");
  v.replaceChildren();
  const views = { hosts: hostsView, vms: vmsView, vm: vmView, events: eventsView, bill: billView };
  (views[view] || vmsView)(v, arg).catch((e) => status(e.message, true));
}

// A horizontal bar of `frac` (0..1) with its percentage.
function bar(frac, color) {
  const w = 160, pct = Math.max(0, Math.min(1, frac || 0));
  return el("svg:svg", { width: w + 50, height: 14, class: "bar" },
    el("svg:rect", { x: 0, y: 2, width: w, height: 10, rx: 3, fill: "#e9ecf1" }),
    el("svg:rect", { x: 0, y: 2, width: Math.round(w * pct), height: 10, rx: 3, fill: color }),
    el("svg:text", { x: w + 6, y: 12, text: `${Math.round(100 * (frac || 0))} %` }));
}

async function hostsView(v) {
  v.append(el("h2", { text: "Hosts" }));
  if (!state.admin) { v.append(el("p", { text: "Hosts are shown to admins." })); return; }
  const cards = el("div", { class: "cards" });
  const table = el("table", { id: "hosts-table" });
  v.append(cards, table);
  every(2000, async () => {
    const [hosts, balance] = await Promise.all([api("GET", "/hosts"), api("GET", "/cluster/balance")]);
    const load = Object.fromEntries((balance.hosts || []).map((h) => [h.id, h]));
    const up = hosts.filter((h) => h.state === "reachable").length;
    cards.replaceChildren(
      card(`${up} / ${hosts.length}`, "hosts reachable"),
      card((balance.imbalance || 0).toFixed(2), "imbalance (CV of loads)"),
      card(balance.settings && balance.settings.on ? "on" : "off", "balancer"));
    table.replaceChildren(el("tr", {}, ...["host", "state", "cores", "memory", "CPU in use", "memory committed", "heartbeat"].map((h) => el("th", { text: h }))));
    for (const h of hosts) {
      const l = load[h.id] || {};
      table.append(el("tr", { "data-host": h.id },
        el("td", { text: h.id }),
        el("td", {}, badge(h.state), h.draining ? " draining" : ""),
        el("td", { class: "num", text: h.cpu_cores }),
        el("td", { class: "num", text: `${h.memory_mib} MiB` }),
        el("td", {}, bar(l.cpu, "#2f6fd6")),
        el("td", {}, bar(l.memory, "#8a5cd6")),
        el("td", { text: h.last_heartbeat ? utc(h.last_heartbeat) : "never" })));
    }
  });
}

function card(big, label) {
  return el("div", { class: "card" }, el("div", { class: "big", text: big }), el("div", { class: "label", text: label }));
}

async function vmsView(v) {
  v.append(el("h2", { text: "Virtual machines" }));
  const table = el("table", { id: "vms-table" });
  v.append(table);
  let availability = {};
  every(10000, async () => {
    const r = await api("GET", `/sla/report?from=${encodeURIComponent(iso(monthStart()))}`);
    availability = Object.fromEntries(r.vms.map((x) => [x.vm_id, x]));
  });
  table.append(el("tr", {}, ...["name", "id", "owner", "state", "host", "vCPUs", "memory", "availability (month)", ""].map((h) => el("th", { text: h }))));
  every(1000, async () => {
    const vms = (await api("GET", "/vms")).filter((x) => x.state !== "deleted");
    // Rows are replaced only when what they show changed: a button is not swapped for a new
    // one under the pointer every second.
    const old = new Map([...table.querySelectorAll("tr[data-vm]")].map((r) => [r.dataset.vm, r]));
    let after = table.firstChild;
    for (const vm of vms) {
      const a = availability[vm.id];
      const shown = JSON.stringify([vm.name, vm.owner, vm.state, vm.host_id, vm.vcpus, vm.memory_mib, a ? a.uptime_pct.toFixed(3) : ""]);
      let row = old.get(vm.id);
      old.delete(vm.id);
      if (!row || row.dataset.shown !== shown) {
        const fresh = vmRow(vm, a, shown);
        if (row) row.replaceWith(fresh); else after.after(fresh);
        row = fresh;
      } else if (row.previousSibling !== after) {
        after.after(row);
      }
      after = row;
    }
    for (const gone of old.values()) gone.remove();
  });
}

function vmRow(vm, a, shown) {
  return el("tr", { "data-vm": vm.id, "data-shown": shown },
        el("td", {}, el("a", { href: `#vm/${vm.id}`, class: "vm-link", text: vm.name })),
        el("td", { text: vm.id.slice(0, 12) }),
        el("td", { text: vm.owner }),
        el("td", { class: "state" }, badge(vm.state)),
        el("td", { text: vm.host_id || "-" }),
        el("td", { class: "num", text: vm.vcpus }),
        el("td", { class: "num", text: `${vm.memory_mib} MiB` }),
        el("td", { class: "num", text: a ? `${a.uptime_pct.toFixed(3)} %` : "100 %" }),
        el("td", {}, ...actions(vm)));
}

// Start, stop, migrate, resize: each a job; the table shows its effect at the next refresh.
function actions(vm) {
  const act = (name, label, enabled, run) => el("button", {
    type: "button", "data-action": name, "data-vm": vm.id,
    ...(enabled ? {} : { disabled: "" }),
    onclick: async (e) => {
      e.target.disabled = true;
      try { await run(); status(`${label} ${vm.name}: sent`); } catch (err) { status(`${label} ${vm.name}: ${err.message}`, true); }
    },
  }, label);
  const running = vm.state === "running";
  return [
    act("start", "Start", ["stopped", "suspended", "failed"].includes(vm.state), () => api("POST", `/vms/${vm.id}/start`)),
    act("stop", "Stop", running, () => api("POST", `/vms/${vm.id}/stop`)),
    act("migrate", "Migrate", running, () => {
      const to = prompt("Migrate to which host? (empty: vimd picks)", "");
      if (to === null) throw new Error("cancelled");
      return api("POST", `/vms/${vm.id}/migrate`, to ? { to } : {});
    }),
    act("resize", "Resize", running, () => {
      const n = prompt(`vCPUs (1 to ${vm.max_vcpus || vm.vcpus})`, String(vm.vcpus));
      if (n === null) throw new Error("cancelled");
      return api("POST", `/vms/${vm.id}/resize`, { vcpus: Number(n) });
    }),
  ];
}

const PERIODS = [["1 h", 3600e3], ["24 h", 86400e3], ["7 d", 7 * 86400e3], ["month", null]];

async function vmView(v, id) {
  const vm = await api("GET", `/vms/${encodeURIComponent(id)}`);
  v.append(el("h2", { text: `VM ${vm.name}` }),
    el("p", {}, badge(vm.state), ` on ${vm.host_id || "no host"} · ${vm.vcpus} vCPUs · ${vm.memory_mib} MiB · owner ${vm.owner} · target ${vm.sla_target} % · `, el("a", { href: "#vms", text: "all VMs" })));
  const buttons = el("div", { class: "periods" });
  const cards = el("div", { class: "cards" });
  const chart = el("div", { class: "chart", id: "availability" });
  const outages = el("table", { id: "outages" });
  v.append(buttons, cards, chart, outages);
  let period = PERIODS[0];
  const draw = async () => {
    const to = Date.now();
    const from = period[1] ? to - period[1] : monthStart();
    const r = await api("GET", `/sla/report?vm=${encodeURIComponent(id)}&from=${encodeURIComponent(iso(from))}&to=${encodeURIComponent(iso(to))}`);
    const line = r.vms[0];
    for (const b of buttons.children) b.classList.toggle("active", b.textContent === period[0]);
    cards.replaceChildren(
      card(line ? `${line.uptime_pct.toFixed(3)} %` : "-", `available over ${period[0]}`),
      card(line ? line.outages.length : 0, "outages"),
      card(line ? `${line.mttr_s.toFixed(1)} s` : "-", "mean time to repair"),
      card(line ? (line.met ? "met" : "missed") : "-", `target ${vm.sla_target} %`));
    chart.replaceChildren(timeline(from, to, line ? line.expected : [], line ? line.outages : []));
    outages.replaceChildren(el("tr", {}, ...["from", "to", "length", "cause"].map((h) => el("th", { text: h }))));
    for (const o of (line ? line.outages : [])) {
      outages.append(el("tr", {}, el("td", { text: utc(o.from) }), el("td", { text: o.ongoing ? "still down" : utc(o.to) }),
        el("td", { class: "num", text: `${((o.to - o.from) / 1000).toFixed(1)} s` }), el("td", { text: o.cause })));
    }
  };
  for (const p of PERIODS) buttons.append(el("button", { type: "button", onclick: () => { period = p; draw(); } }, p[0]), " ");
  every(5000, draw);
}

// Up (green) while it was meant to run, outages (red) on top, grey when it was not meant to
// run, with a time axis.
function timeline(from, to, expected, outages) {
  const W = 900, H = 90, top = 20, h = 36;
  const x = (t) => Math.round(((t - from) / (to - from)) * W);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "availability timeline" },
    el("svg:rect", { x: 0, y: top, width: W, height: h, fill: "var(--off)" }));
  for (const [a, b] of expected) {
    svg.append(el("svg:rect", { x: x(a), y: top, width: Math.max(2, x(b) - x(a)), height: h, fill: "var(--up)", class: "up" }));
  }
  for (const o of outages) {
    svg.append(el("svg:rect", { x: x(o.from), y: top, width: Math.max(2, x(o.to) - x(o.from)), height: h, fill: "var(--down)", class: "outage" },
      el("svg:title", { text: `${o.cause}: ${utc(o.from)}, ${((o.to - o.from) / 1000).toFixed(1)} s` })));
  }
  for (let i = 0; i <= 4; i++) {
    const t = from + ((to - from) * i) / 4;
    svg.append(el("svg:text", { x: Math.min(W - 110, x(t)), y: top + h + 16, text: utc(t).slice(5, 16) }));
  }
  svg.append(el("svg:text", { x: 0, y: 12, text: "green: up · red: down · grey: not running" }));
  return svg;
}

async function eventsView(v) {
  v.append(el("h2", { text: "Events (live)" }));
  if (!state.admin) { v.append(el("p", { text: "The event stream is shown to admins." })); return; }
  const table = el("table", { id: "events-list" });
  v.append(table);
  const row = (e) => el("tr", { "data-kind": e.kind },
    el("td", { text: utc(e.ts) }), el("td", {}, el("strong", { text: e.kind })),
    el("td", { text: e.host_id }), el("td", { text: e.vm_id ? e.vm_id.slice(0, 12) : "" }), el("td", { text: e.detail }));
  for (const e of (await api("GET", "/events?limit=100")).reverse()) table.append(row(e));
  // Server-sent events, read through fetch: EventSource cannot send the token.
  const abort = new AbortController();
  state.stream = abort;
  const r = await fetch("/events/stream", { headers: { authorization: "Bearer " + state.token }, signal: abort.signal });
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read().catch(() => ({ done: true }));
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
      if (data) table.prepend(row(JSON.parse(data)));
      while (table.children.length > 500) table.lastChild.remove();
    }
  }
}

async function billView(v) {
  const from = monthStart();
  v.append(el("h2", { text: `Bill since ${utc(from).slice(0, 10)}` }));
  const chart = el("div", { class: "chart", id: "bill-chart" });
  const table = el("table", { id: "bill-table" });
  v.append(chart, table);
  every(10000, async () => {
    const b = await api("GET", `/bill?from=${encodeURIComponent(iso(from))}`);
    const max = Math.max(0.01, ...b.consumers.map((c) => Number(c.total)));
    const W = 700, rowH = 26;
    const svg = el("svg:svg", { viewBox: `0 0 ${W + 220} ${rowH * Math.max(1, b.consumers.length) + 10}`, width: "100%" });
    b.consumers.forEach((c, i) => {
      const w = Math.round((Number(c.total) / max) * W);
      svg.append(el("svg:text", { x: 0, y: i * rowH + 18, text: c.consumer }),
        el("svg:rect", { x: 120, y: i * rowH + 6, width: Math.max(1, w), height: 16, rx: 3, fill: "#2f6fd6" }),
        el("svg:text", { x: 126 + w, y: i * rowH + 18, text: `${c.total} ${c.currency}` }));
    });
    chart.replaceChildren(b.consumers.length ? svg : el("p", { text: "Nothing billed this month yet." }));
    table.replaceChildren(el("tr", {}, ...["consumer", "plan", "VM", "hours", "fee"].map((h) => el("th", { text: h }))));
    for (const c of b.consumers) {
      for (const vm of c.vms) {
        table.append(el("tr", {}, el("td", { text: c.consumer }), el("td", { text: c.plan }),
          el("td", { text: vm.vm_id.slice(0, 12) }), el("td", { class: "num", text: (Number(vm.seconds) / 3600).toFixed(3) }),
          el("td", { class: "num", text: `${vm.fee} ${c.currency}` })));
      }
      table.append(el("tr", {}, el("td", {}, el("strong", { text: c.consumer })), el("td", {}), el("td", {}), el("td", {}),
        el("td", { class: "num" }, el("strong", { text: `${c.total} ${c.currency}` }))));
    }
  });
}

// ---- start ----

window.addEventListener("hashchange", () => { if (state.token) route(); });
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    login(document.getElementById("token").value).catch((err) => showLogin(`cannot log in: ${err.message}`));
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem("vim-token");
    state.token = "";
    showLogin();
  });
  if (state.token) login(state.token).catch(() => showLogin());
  else showLogin();
});
