// The microagent dashboard. Plain JS, no framework, nothing fetched but this server's API.
// User text (names, notes) only ever goes into the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEW_KEY = "microagent.view";
const VM_KEY = "microagent.vm";

const ui = {
  workspaces: [],
  current: null,
  snapshots: [],
  ops: new Map(), // operation id -> progress element
  busy: false,
  console: null, // EventSource of the console tail
};

// ----- API -----------------------------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { /* empty or not JSON */ }
  if (!r.ok) {
    const e = new Error((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
    e.code = data && data.error && data.error.code;
    e.status = r.status;
    throw e;
  }
  return data;
}

const enc = encodeURIComponent;
const wsPath = (name) => `/api/workspaces/${enc(name)}`;

function toast(msg, bad) {
  const t = $("toast");
  t.textContent = msg;
  t.classList.toggle("bad", !!bad);
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, bad ? 8000 : 3000);
}

// Runs an action with the page marked busy; errors become a toast.
async function act(what, f) {
  ui.busy = true;
  document.body.classList.add("busy");
  try {
    await f();
  } catch (e) {
    toast(`${what} failed: ${e.message}`, true);
  } finally {
    ui.busy = false;
    document.body.classList.remove("busy");
    renderActions();
  }
}

// ----- workspaces ----------------------------------------------------------------------------

function currentWs() {
  return ui.workspaces.find((w) => w.name === ui.current) || null;
}

async function loadWorkspaces() {
  const data = await api("GET", "/api/workspaces");
  ui.workspaces = data.workspaces || [];
  if (!ui.workspaces.some((w) => w.name === ui.current)) {
    const saved = localStorage.getItem(VM_KEY);
    const pick = ui.workspaces.find((w) => w.name === saved) || ui.workspaces[0];
    ui.current = pick ? pick.name : null;
  }
  renderPicker();
  renderActions();
}

function renderPicker() {
  const sel = $("vm-picker");
  sel.textContent = "";
  for (const w of ui.workspaces) {
    const o = document.createElement("option");
    o.value = w.name;
    o.textContent = `${w.state === "running" ? "●" : "○"} ${w.name} (${w.state})`;
    o.selected = w.name === ui.current;
    sel.appendChild(o);
  }
  sel.disabled = ui.workspaces.length === 0;
  const w = currentWs();
  $("vm-dot").className = "dot " + (w ? w.state : "none");
  $("vm-state").textContent = w ? w.state : "no workspaces";
}

function renderActions() {
  const w = currentWs();
  const s = w ? w.state : null;
  const live = s === "running" || s === "paused";
  $("btn-start").hidden = !w || live;
  $("btn-start").textContent = s === "hibernated" ? "Resume" : "Start";
  $("btn-halt").hidden = !live;
  $("btn-hibernate").hidden = !live;
  $("btn-new").disabled = !w;
  // Said here, not with the cards, so a state change (restore, halt) updates it at once.
  $("notice").hidden = !(w && !live);
  $("notice").textContent = w && !live
    ? `${w.name} is ${w.state}: + New takes a disk-only snapshot; start it for a full one.`
    : "";
  for (const b of document.querySelectorAll(".toolbar button, .card button")) {
    if (ui.busy && !b.closest(".view-toggle")) b.disabled = true;
  }
  if (!ui.busy) {
    for (const id of ["btn-start", "btn-halt", "btn-hibernate"]) $(id).disabled = false;
    $("btn-new").disabled = !w;
    for (const b of document.querySelectorAll(".card button")) b.disabled = b.dataset.blocked === "1";
  }
}

async function selectWs(name) {
  ui.current = name;
  localStorage.setItem(VM_KEY, name);
  renderPicker();
  renderActions();
  stopConsole();
  $("console").textContent = "";
  if ($("console-box").open) startConsole();
  await loadSnapshots();
}

// ----- snapshots -----------------------------------------------------------------------------

async function loadSnapshots() {
  if (!ui.current) {
    ui.snapshots = [];
    renderSnapshots();
    return;
  }
  const name = ui.current;
  try {
    const data = await api("GET", `${wsPath(name)}/snapshots`);
    if (name !== ui.current) return;
    ui.snapshots = data.snapshots || [];
  } catch (e) {
    if (e.status === 404) ui.snapshots = [];
    else throw e;
  }
  renderSnapshots();
}

function fmtDate(rfc) {
  const d = new Date(rfc);
  if (isNaN(d)) return rfc;
  return d.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

function fmtSize(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, action, tag, cls) {
  const b = el("button", cls || "", label);
  b.type = "button";
  b.dataset.action = action;
  b.dataset.tag = tag;
  return b;
}

function renderSnapshots() {
  const box = $("snapshots");
  box.textContent = "";
  const q = $("search").value.trim().toLowerCase();
  const shown = ui.snapshots
    .filter((s) => !q || s.tag.toLowerCase().includes(q) || (s.note || "").toLowerCase().includes(q))
    .slice()
    .reverse(); // newest first
  const empty = $("empty");
  if (!ui.current) {
    empty.textContent = "No workspaces yet: create one with `microagent create`.";
  } else if (ui.snapshots.length === 0) {
    empty.textContent = "No snapshots yet. Use + New to take one.";
  } else {
    empty.textContent = `No snapshot matches “${q}”.`;
  }
  empty.hidden = shown.length > 0;
  for (const s of shown) {
    const card = el("article", "card");
    card.dataset.tag = s.tag;
    const head = el("div", "card-head");
    head.appendChild(el("h3", "name", s.tag));
    if (s.latest) head.appendChild(el("span", "badge latest", "Latest"));
    head.appendChild(el("span", `badge kind kind-${s.kind}`, s.kind));
    card.appendChild(head);
    const meta = el("div", "meta");
    const time = el("time", "created", fmtDate(s.created));
    time.dateTime = s.created;
    meta.appendChild(time);
    meta.appendChild(el("span", "size", fmtSize(s.size || 0)));
    if (s.parent) meta.appendChild(el("span", "parent", `diff of ${s.parent}`));
    card.appendChild(meta);
    const notes = el("p", "notes", s.note || "");
    if (!s.note) notes.classList.add("none");
    card.appendChild(notes);
    const actions = el("div", "actions");
    if (!s.latest) {
      actions.appendChild(button("Restore", "restore", s.tag));
    }
    actions.appendChild(button("Edit", "edit", s.tag));
    actions.appendChild(button("Fork", "fork", s.tag));
    const del = button("Delete", "delete", s.tag, "danger-text");
    const deps = s.children || [];
    if (deps.length) {
      del.disabled = true;
      del.dataset.blocked = "1";
      const why = `Needed by ${deps.join(", ")}`;
      del.title = why;
      del.setAttribute("aria-describedby", `why-${s.tag}`);
      const reason = el("span", "reason", why);
      reason.id = `why-${s.tag}`;
      actions.appendChild(del);
      actions.appendChild(reason);
    } else {
      actions.appendChild(del);
    }
    card.appendChild(actions);
    box.appendChild(card);
  }
  renderActions();
}

// ----- dialogs -------------------------------------------------------------------------------

// Opens a dialog; resolves with true when its form is submitted, false when cancelled.
function ask(dlg) {
  return new Promise((resolve) => {
    const form = dlg.querySelector("form");
    const done = (ok) => {
      form.removeEventListener("submit", onSubmit);
      dlg.removeEventListener("close", onClose);
      cancel.removeEventListener("click", onCancel);
      resolve(ok);
    };
    const onSubmit = (ev) => {
      if (!form.checkValidity()) return;
      ev.preventDefault();
      dlg.close("ok");
      done(true);
    };
    const onClose = () => done(false);
    const cancel = form.querySelector(".cancel");
    const onCancel = () => dlg.close("cancel");
    form.addEventListener("submit", onSubmit);
    dlg.addEventListener("close", onClose);
    cancel.addEventListener("click", onCancel);
    dlg.showModal();
  });
}

async function confirmAction(title, text, okLabel) {
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return ask($("dlg-confirm"));
}

async function newSnapshot() {
  const w = currentWs();
  if (!w) return;
  const live = w.state === "running" || w.state === "paused";
  const kind = $("new-kind");
  kind.textContent = "";
  const kinds = live
    ? [["full", "Full: memory, devices and disk"], ["diff", "Diff: pages written since the last one"]]
    : [["disk", "Disk only (the workspace is stopped)"]];
  for (const [v, label] of kinds) {
    const o = el("option", "", label);
    o.value = v;
    kind.appendChild(o);
  }
  $("new-kind-hint").textContent = live ? "" : "Start the workspace to capture its memory too.";
  $("new-name").value = "";
  $("new-notes").value = "";
  if (!(await ask($("dlg-new")))) return;
  const body = { kind: kind.value };
  const tag = $("new-name").value.trim();
  const note = $("new-notes").value;
  if (tag) body.tag = tag;
  if (note) body.note = note;
  await act("New snapshot", async () => {
    const r = await api("POST", `${wsPath(w.name)}/snapshots`, body);
    toast(`Snapshot ${r.snapshot.tag} created`);
    await loadSnapshots();
  });
}

async function editSnapshot(s) {
  $("edit-name").value = s.tag;
  $("edit-notes").value = s.note || "";
  if (!(await ask($("dlg-edit")))) return;
  const body = {};
  const tag = $("edit-name").value.trim();
  const note = $("edit-notes").value;
  if (tag && tag !== s.tag) body.tag = tag;
  if (note !== (s.note || "")) body.note = note;
  if (!Object.keys(body).length) return;
  await act("Edit", async () => {
    const r = await api("PATCH", `${wsPath(ui.current)}/snapshots/${enc(s.tag)}`, body);
    // Show the change at once, without waiting for the list.
    const i = ui.snapshots.findIndex((x) => x.tag === s.tag);
    if (i >= 0) {
      ui.snapshots[i] = Object.assign({}, ui.snapshots[i], { tag: r.snapshot.tag, note: r.snapshot.note });
      for (const x of ui.snapshots) {
        if (x.parent === s.tag) x.parent = r.snapshot.tag;
        x.children = (x.children || []).map((c) => (c === s.tag ? r.snapshot.tag : c));
      }
    }
    renderSnapshots();
  });
}

async function deleteSnapshot(s) {
  if (!(await confirmAction("Delete snapshot?", `Delete snapshot “${s.tag}” of ${ui.current}? This cannot be undone.`, "Delete"))) return;
  await act("Delete", async () => {
    await api("DELETE", `${wsPath(ui.current)}/snapshots/${enc(s.tag)}`);
    ui.snapshots = ui.snapshots.filter((x) => x.tag !== s.tag);
    renderSnapshots();
    toast(`Snapshot ${s.tag} deleted`);
    await loadSnapshots();
  });
}

async function restoreSnapshot(s) {
  const w = currentWs();
  const live = w && (w.state === "running" || w.state === "paused");
  const text = live
    ? `${w.name} is ${w.state}. Halt it and restore snapshot “${s.tag}”? What it did since is lost.`
    : `Restore ${ui.current} to snapshot “${s.tag}”? It starts from that point.`;
  if (!(await confirmAction("Restore snapshot?", text, live ? "Halt and restore" : "Restore"))) return;
  await act("Restore", async () => {
    await api("POST", `${wsPath(ui.current)}/start`, { from_snapshot: s.tag, force: live });
    toast(`${ui.current} restored from ${s.tag}`);
    await loadWorkspaces();
  });
}

async function forkSnapshot(s) {
  $("fork-from").textContent = `From ${ui.current}:${s.tag}`;
  $("fork-name").value = `${ui.current}-fork`.slice(0, 50);
  $("fork-count").value = "1";
  $("fork-ttl").value = "";
  if (!(await ask($("dlg-fork")))) return;
  const body = { name: $("fork-name").value.trim(), count: Number($("fork-count").value) };
  const ttl = $("fork-ttl").value.trim();
  if (ttl) body.ttl = ttl;
  await act("Fork", async () => {
    const r = await api("POST", `${wsPath(ui.current)}/snapshots/${enc(s.tag)}/fork`, body);
    toast(`Forked ${r.forked.map((f) => f.name).join(", ")}`);
    await loadWorkspaces();
  });
}

async function lifecycle(action) {
  const w = currentWs();
  if (!w) return;
  await act(action, async () => {
    await api("POST", `${wsPath(w.name)}/${action}`, {});
    await loadWorkspaces();
  });
}

// ----- live updates --------------------------------------------------------------------------

let reloadTimer = null;
function scheduleReload(snapshotsToo) {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(async () => {
    try {
      await loadWorkspaces();
      if (snapshotsToo) await loadSnapshots();
    } catch (e) {
      toast(`Refresh failed: ${e.message}`, true);
    }
  }, 100);
}

function progressBar(ev) {
  let row = ui.ops.get(ev.id);
  if (!row) {
    row = el("div", "op");
    row.appendChild(el("span", "op-label"));
    const bar = document.createElement("progress");
    bar.max = 100;
    row.appendChild(bar);
    $("progress").appendChild(row);
    ui.ops.set(ev.id, row);
  }
  return row;
}

function onEvent(name, ev) {
  switch (name) {
    case "workspace":
      scheduleReload(ev.name === ui.current);
      break;
    case "snapshots":
      if (ev.workspace === ui.current) scheduleReload(true);
      break;
    case "operation":
      if (ev.status === "started" && ["snapshot-create", "fork", "hibernate", "start", "create"].includes(ev.action)) {
        const row = progressBar(ev);
        row.querySelector(".op-label").textContent = `${ev.action} ${ev.workspace}…`;
        row.querySelector("progress").removeAttribute("value"); // indeterminate until progress
      } else if (ev.status === "finished") {
        const row = ui.ops.get(ev.id);
        if (row) { row.remove(); ui.ops.delete(ev.id); }
      }
      break;
    case "progress": {
      const row = progressBar(ev);
      const pct = ev.total ? Math.floor((100 * ev.done) / ev.total) : 0;
      const bar = row.querySelector("progress");
      bar.value = pct;
      const amount = ev.unit === "bytes"
        ? `${fmtSize(ev.done)} / ${fmtSize(ev.total)}`
        : `${ev.done} / ${ev.total}`;
      row.querySelector(".op-label").textContent = `${ev.action} ${ev.workspace}: ${ev.what} ${amount}`;
      break;
    }
    case "resync":
      scheduleReload(true);
      break;
  }
}

function listen() {
  const es = new EventSource("/api/events");
  for (const name of ["workspace", "snapshots", "operation", "progress", "resync"]) {
    es.addEventListener(name, (e) => {
      let data = {};
      try { data = JSON.parse(e.data); } catch (_) { return; }
      onEvent(name, data);
    });
  }
  // Reconnects by itself; what changed meanwhile is fetched once it is back.
  es.addEventListener("hello", () => scheduleReload(true));
}

function startConsole() {
  if (!ui.current || ui.console) return;
  const pre = $("console");
  const es = new EventSource(`${wsPath(ui.current)}/console`);
  es.addEventListener("console", (e) => {
    let t = "";
    try { t = JSON.parse(e.data).text; } catch (_) { return; }
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = (pre.textContent + t).slice(-64 * 1024);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  });
  es.addEventListener("reset", () => { pre.textContent = ""; });
  ui.console = es;
}

function stopConsole() {
  if (ui.console) { ui.console.close(); ui.console = null; }
}

// ----- view toggle, keyboard, wiring ---------------------------------------------------------

function setView(view, save) {
  const list = view === "list";
  $("snapshots").classList.toggle("list", list);
  $("snapshots").classList.toggle("cards", !list);
  $("view-list").setAttribute("aria-pressed", String(list));
  $("view-cards").setAttribute("aria-pressed", String(!list));
  if (save) localStorage.setItem(VIEW_KEY, view);
}

function wire() {
  $("vm-picker").addEventListener("change", (e) => selectWs(e.target.value));
  $("search").addEventListener("input", renderSnapshots);
  $("view-cards").addEventListener("click", () => setView("cards", true));
  $("view-list").addEventListener("click", () => setView("list", true));
  $("btn-new").addEventListener("click", newSnapshot);
  $("btn-start").addEventListener("click", () => lifecycle("start"));
  $("btn-halt").addEventListener("click", () => lifecycle("halt"));
  $("btn-hibernate").addEventListener("click", () => lifecycle("hibernate"));
  $("snapshots").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-action]");
    if (!b || b.disabled) return;
    const s = ui.snapshots.find((x) => x.tag === b.dataset.tag);
    if (!s) return;
    ({ restore: restoreSnapshot, edit: editSnapshot, delete: deleteSnapshot, fork: forkSnapshot })[b.dataset.action](s);
  });
  $("console-box").addEventListener("toggle", () => {
    if ($("console-box").open) startConsole(); else stopConsole();
  });
  document.addEventListener("keydown", (e) => {
    const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(document.activeElement.tagName);
    if (typing || e.ctrlKey || e.metaKey || e.altKey || document.querySelector("dialog[open]")) return;
    if (e.key === "/") { e.preventDefault(); $("search").focus(); }
    else if (e.key === "n" && !$("btn-new").disabled) { e.preventDefault(); newSnapshot(); }
  });
}

async function main() {
  setView(localStorage.getItem(VIEW_KEY) === "list" ? "list" : "cards", false);
  wire();
  listen();
  try {
    await loadWorkspaces();
    await loadSnapshots();
  } catch (e) {
    toast(`Loading failed: ${e.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", main);
