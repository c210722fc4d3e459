// app.js: the dashboard's main loop: poll the server once a second, keep the samples, render.
//
// The server keeps a ring buffer of per-second samples; the page asks only for those newer than
// the last one it has (`?since=`), so a page left open all day moves a few hundred bytes a second.
// Failures never blank the page: the last data stays and a banner says what is wrong until the
// next successful poll.

import { Plot, fmtNum } from "./charts.js";
import { COLORS, JobsPanel, esc, renderAdapters, renderBudget, renderKpis, renderWorkers, sloOf } from "./panels.js";

const BASE = document.body.dataset.base;
const AUTH = document.body.dataset.auth === "1";
const KEY_STORE = "coserve.dashboard.apiKey";
const RANGE_STORE = "coserve.dashboard.range";
const POLL_MS = 1000;          // the server samples once a second: polling faster shows nothing new
const HIDDEN_POLL_MS = 5000;   // a background tab needs no live view; the server keeps sampling
const RETRY_MS = 2000;
const STALE_S = 5;

const $ = (id) => document.getElementById(id);
let samples = [];
let lastT = null;
let historyStart = null;
let snap = null;
let lastOkAt = null;
let failures = 0;
let timer = null;
let inFlight = false;
let range = Number(localStorage.getItem(RANGE_STORE)) || 300;
let engineName = null;

const time = { xTime: true };
const plots = {
  throughput: new Plot($("chart-throughput"), { ...time, empty: "Waiting for the first samples…" }),
  perIteration: new Plot($("chart-per-iteration"), { ...time, empty: "No iterations yet" }),
  latency: new Plot($("chart-latency"), { ...time, yFormat: (v) => fmtNum(v), empty: "No finished requests yet" }),
  queue: new Plot($("chart-queue"), { ...time, yMinTop: 4, yFormat: (v) => fmtNum(v, 0) }),
  kv: new Plot($("chart-kv"), { ...time, yFixedMax: 1, yFormat: (v) => `${Math.round(100 * v)}%` }),
  profile: new Plot($("chart-profile"), { xLabel: "tokens", empty: "No latency profile (no TPOT SLO set)" }),
};
const jobs = new JobsPanel($("jobs"), $("jobs-summary"), cancelJob);

// ---- server calls -------------------------------------------------------------------------

async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const abort = new AbortController();
  const t = setTimeout(() => abort.abort(), 8000);
  try {
    return await fetch(BASE + path, { ...init, headers, signal: abort.signal, cache: "no-store" });
  } finally {
    clearTimeout(t);
  }
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || `HTTP ${res.status}`;
  } catch {
    return `HTTP ${res.status}`;
  }
}

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(poll, ms);
}

async function poll() {
  if (inFlight) return;
  clearTimeout(timer);
  if (AUTH && !sessionStorage.getItem(KEY_STORE)) return askKey("");
  inFlight = true;
  try {
    let res;
    try {
      res = await api(`/api/state${lastT !== null ? `?since=${lastT}` : ""}`);
    } catch (err) {
      failures += 1;
      setConn("offline", "offline");
      banner("error", `Server unreachable (${err.name === "AbortError" ? "timed out" : "no connection"}); ` +
        `retrying every ${RETRY_MS / 1000} s. The charts keep the last data.`);
      return schedule(RETRY_MS);
    }
    if (res.status === 401) {
      const had = sessionStorage.getItem(KEY_STORE);
      sessionStorage.removeItem(KEY_STORE);
      setConn("locked", "key needed");
      return askKey(had ? "That key was refused. Check it and try again." : "");
    }
    if (!res.ok) {
      failures += 1;
      setConn("offline", "error");
      banner("error", `The server answered ${res.status}: ${await errorMessage(res)}. Retrying…`);
      return schedule(RETRY_MS);
    }
    ingest(await res.json());
    if (failures) banner("ok", "Reconnected.", 2500);
    failures = 0;
    lastOkAt = Date.now();
    setConn("live", "live");
    render();
    schedule(document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  } finally {
    inFlight = false;
  }
}

async function cancelJob(jobId) {
  try {
    const res = await api(`/api/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
    if (res.status === 401) { askKey("The server asked for the key again."); return { ok: false, message: "API key needed" }; }
    if (!res.ok) return { ok: false, message: await errorMessage(res) };
    const body = await res.json();
    setTimeout(poll, 200);
    return { ok: true, job: body.job };
  } catch {
    return { ok: false, message: "server unreachable" };
  }
}

// ---- state --------------------------------------------------------------------------------

function ingest(data) {
  if (historyStart !== null && data.history_started_at !== historyStart) {
    // The server (or its sampler) restarted: its history is new, ours would mislead.
    samples = [];
  }
  historyStart = data.history_started_at;
  for (const s of data.history) if (lastT === null || s.t > lastT) samples.push(s);
  if (samples.length) lastT = samples[samples.length - 1].t;
  const keepFrom = data.now - data.history_seconds;
  let drop = 0;
  while (drop < samples.length && samples[drop].t < keepFrom) drop++;
  if (drop) samples = samples.slice(drop);
  snap = data;
}

// ---- rendering ----------------------------------------------------------------------------

function render() {
  if (!snap) return;
  const now = snap.now;
  const win = samples.filter((s) => s.t >= now - range);
  const pts = (f) => win.map((s) => [s.t - now, f(s)]);
  const xDomain = [-range, 0];
  const kind = (k) => (s) => (s.tokens_per_s ? s.tokens_per_s[k] : null);
  const perIt = (k) => (s) => (s.tokens_per_iteration ? s.tokens_per_iteration[k] : s.iterations_per_s === 0 ? 0 : null);
  const tokenSeries = (f) => [
    { key: "decode", label: "decode", color: COLORS.decode, kind: "area", stack: true, points: pts(f("decode")) },
    { key: "prefill", label: "prefill", color: COLORS.prefill, kind: "area", stack: true, points: pts(f("prefill")) },
    { key: "ft-fwd", label: "finetune fwd", color: COLORS.ftForward, kind: "area", stack: true, points: pts(f("finetune_forward")) },
    { key: "ft-bwd", label: "finetune bwd", color: COLORS.ftBackward, kind: "area", stack: true, points: pts(f("finetune_backward")) },
  ];
  plots.throughput.update({ xDomain, series: tokenSeries(kind), refs: [] });

  const engines = Object.values(snap.engines);
  const budgets = [...new Set(engines.map((e) => e.budget && e.budget.max_forward_tokens))];
  const budget = budgets.length === 1 ? budgets[0] : null;
  const perItPlot = plots.perIteration;
  perItPlot.box.closest(".card").querySelector("h2 small").textContent =
    budget !== null && budget !== undefined ? `forward budget ${fmtNum(budget)} tokens` : "by kind";
  perItPlot.update({ xDomain, series: tokenSeries(perIt),
                     refs: [{ key: "budget", axis: "y", value: budget, color: COLORS.budget, label: `budget ${fmtNum(budget)}`, soft: 3 }] });

  const slo = sloOf(snap);
  const ttftSlo = Math.min(...engines.map((e) => (e.budget && e.budget.ttft_slo_ms) || Infinity));
  const ms = (k, q) => (s) => (s[k] ? s[k][q] : null);
  plots.latency.update({ xDomain, series: [
    { key: "ttft50", label: "TTFT p50", color: COLORS.ttft, points: pts(ms("ttft_ms", "p50")) },
    { key: "ttft99", label: "TTFT p99", color: COLORS.ttft, dash: "4 3", points: pts(ms("ttft_ms", "p99")) },
    { key: "tpot50", label: "TPOT p50", color: COLORS.tpot, points: pts(ms("tpot_ms", "p50")) },
    { key: "tpot99", label: "TPOT p99", color: COLORS.tpot, dash: "4 3", points: pts(ms("tpot_ms", "p99")) },
  ], refs: [
    { key: "slo", axis: "y", value: slo, color: COLORS.slo, label: `TPOT SLO ${fmtNum(slo)} ms`, soft: 10 },
    { key: "ttft-slo", axis: "y", value: Number.isFinite(ttftSlo) ? ttftSlo : null, color: COLORS.ttft,
      label: `TTFT SLO ${fmtNum(ttftSlo)} ms`, soft: 10 },
  ] });
  plots.queue.update({ xDomain, series: [
    { key: "running", label: "running", color: COLORS.running, kind: "area", points: pts((s) => s.running) },
    { key: "waiting", label: "waiting", color: COLORS.waiting, points: pts((s) => s.waiting) },
  ], refs: [] });
  plots.kv.update({ xDomain, series: [
    { key: "kv", label: "in use", color: COLORS.kv, kind: "area", points: pts((s) => s.kv_usage),
      format: (v) => (v === null ? "–" : `${(100 * v).toFixed(1)}%`) },
  ], refs: [] });

  renderKpis($("kpis"), snap, samples[samples.length - 1]);
  renderEngineSelect();
  renderBudget($("budget-facts"), plots.profile, snap.engines[engineName]);
  jobs.render(snap.jobs);
  renderAdapters($("adapters"), snap);
  renderWorkers($("workers"), snap);
  renderHealthBanner();
  const since = snap.history_started_at ? new Date(snap.history_started_at * 1000).toLocaleTimeString() : "–";
  $("foot").textContent = `${snap.server.backend} backend · model ${snap.server.model_id} · ` +
    `server history since ${since} (kept ${Math.round(snap.history_seconds / 60)} min) · one sample per ${snap.sample_period_s} s`;
}

function renderEngineSelect() {
  const names = Object.keys(snap.engines);
  if (!names.includes(engineName)) engineName = names[0] ?? null;
  const select = $("engine-select");
  select.hidden = names.length < 2;
  const html = names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("");
  if (select.dataset.names !== names.join("\n")) { select.innerHTML = html; select.dataset.names = names.join("\n"); }
  select.value = engineName ?? "";
}

function renderHealthBanner() {
  if (failures) return;
  const stale = snap.sampled_at ? snap.now - snap.sampled_at : null;
  if (snap.error) banner("warn", `Engine stats unavailable: ${snap.error}. Showing the last good data.`);
  else if (stale !== null && stale > STALE_S) banner("warn", `No fresh stats from the engines for ${Math.round(stale)} s (busy or stuck?).`);
  else if (bannerKind === "warn") banner(null);
}

// ---- chrome: connection pill, banner, key dialog, range ------------------------------------

function setConn(state, text) {
  const el = $("conn");
  el.dataset.state = state;
  $("conn-text").textContent = text;
}

let bannerKind = null;
let bannerTimer = null;
function banner(kind, text, hideAfterMs) {
  const el = $("banner");
  clearTimeout(bannerTimer);
  bannerKind = kind;
  if (!kind) { el.hidden = true; return; }
  el.dataset.kind = kind;
  el.textContent = text;
  el.hidden = false;
  if (hideAfterMs) bannerTimer = setTimeout(() => banner(null), hideAfterMs);
}

function askKey(message) {
  $("key-error").textContent = message;
  $("key-dialog").hidden = false;
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("key-input").value = "";
  $("key-dialog").hidden = true;
  poll();
});

if (AUTH) {
  const button = $("key-button");
  button.hidden = false;
  button.title = "Forget the API key kept in this tab";
  button.textContent = "Forget key";
  button.addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); setConn("locked", "key needed"); askKey(""); });
}

for (const b of document.querySelectorAll("[data-range]")) {
  b.addEventListener("click", () => {
    range = Number(b.dataset.range);
    localStorage.setItem(RANGE_STORE, String(range));
    markRange();
    render();
  });
}
function markRange() {
  for (const b of document.querySelectorAll("[data-range]")) b.classList.toggle("on", Number(b.dataset.range) === range);
}

$("engine-select").addEventListener("change", (e) => { engineName = e.target.value; render(); });
document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
setInterval(() => {
  if (lastOkAt && !failures && $("conn").dataset.state === "live") {
    const s = Math.round((Date.now() - lastOkAt) / 1000);
    $("conn-text").textContent = s <= 1 ? "live" : `live · ${s}s ago`;
  }
}, 1000);

markRange();
poll();
