// panels.js: the dashboard's non-chart panels (figures, budget, jobs, adapters, workers).
//
// Every panel builds its elements once and then only rewrites text and attributes, so a poll
// never moves the layout, steals focus or swaps a button out from under the pointer.

import { Plot, fmtNum } from "./charts.js";

export const COLORS = {
  decode: "#4c9be8", prefill: "#92c7f4", ftForward: "#d98e32", ftBackward: "#f0c27a",
  ttft: "#a78bfa", tpot: "#4fc1a6", slo: "#ef6b73", running: "#4fc1a6", waiting: "#e3a34b",
  kv: "#8b9cf7", loss: "#e3a34b", budget: "#9aa4b1",
};
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const MAX_ENDED_JOBS = 12;

export function esc(s) {
  return String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

const fmtMs = (v) => (v === null || v === undefined ? "–" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${fmtNum(v)} ms`);
const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(v < 0.1 ? 1 : 0)}%`);

// ---- figures ------------------------------------------------------------------------------

const KPIS = [
  ["inference", "Inference", "tokens / s"], ["finetune", "Fine-tuning", "tokens / s"],
  ["iterations", "Iterations", "/ s"], ["ttft", "TTFT p50", ""], ["tpot", "TPOT p50", ""],
  ["queue", "Running · waiting", ""], ["kv", "KV cache", ""], ["jobs", "Jobs running", ""],
];

export function renderKpis(box, snap, last) {
  if (!box.dataset.built) {
    box.innerHTML = KPIS.map(([k, label, unit]) => `<div class="kpi" data-kpi="${k}"><div class="label">${label}` +
      `<span class="unit">${unit}</span></div><div class="value">–</div><div class="sub">&nbsp;</div></div>`).join("");
    box.dataset.built = "1";
  }
  const set = (k, value, sub, tone) => {
    const el = box.querySelector(`[data-kpi="${k}"]`);
    el.querySelector(".value").textContent = value;
    el.querySelector(".sub").textContent = sub || "\u00a0";
    el.title = sub || "";
    el.dataset.tone = tone || "";
  };
  const r = (last && last.tokens_per_s) || null;
  set("inference", r ? fmtNum(r.decode + r.prefill) : "–", r ? `decode ${fmtNum(r.decode)} · prefill ${fmtNum(r.prefill)}` : "");
  set("finetune", r ? fmtNum(r.finetune_forward + r.finetune_backward) : "–",
      r ? `forward ${fmtNum(r.finetune_forward)} · backward ${fmtNum(r.finetune_backward)}` : "");
  set("iterations", last && last.iterations_per_s !== null ? fmtNum(last.iterations_per_s) : "–",
      last && last.busy !== null ? `engine busy ${pct(last.busy)}` : "");
  const slo = sloOf(snap);
  const ttft = last ? last.ttft_ms : {}, tpot = last ? last.tpot_ms : {};
  set("ttft", fmtMs(ttft.p50), ttft.p99 !== null && ttft.p99 !== undefined ? `p99 ${fmtMs(ttft.p99)}` : "no finished requests yet");
  let tone = "";
  if (slo && tpot.p50 !== null && tpot.p50 !== undefined) tone = tpot.p50 > slo ? "bad" : tpot.p99 > slo ? "warn" : "good";
  set("tpot", fmtMs(tpot.p50), [tpot.p99 !== null && tpot.p99 !== undefined ? `p99 ${fmtMs(tpot.p99)}` : "",
                                slo ? `SLO ${fmtMs(slo)}` : "no SLO"].filter(Boolean).join(" · "), tone);
  set("queue", last ? `${last.running} · ${last.waiting}` : "–", "");
  set("kv", last ? pct(last.kv_usage) : "–", "", last && last.kv_usage > 0.9 ? "warn" : "");
  const jobs = snap.jobs || [];
  const active = jobs.filter((j) => !TERMINAL.has(j.status)).length;
  set("jobs", String(active), `${jobs.length} in total`);
}

/** The TPOT SLO in ms: the same on every engine, or the tightest one. */
export function sloOf(snap) {
  const slos = Object.values(snap.engines || {}).map((e) => e.budget && e.budget.tpot_slo_ms).filter((v) => v);
  return slos.length ? Math.min(...slos) : null;
}

// ---- budget and latency profile -----------------------------------------------------------

export function renderBudget(factsBox, plot, engine) {
  const b = (engine && engine.budget) || null;
  if (!b) {
    factsBox.innerHTML = `<div class="empty-note">No engine reported its budget yet.</div>`;
    plot.update({ series: [], refs: [], xDomain: [0, 1] });
    return;
  }
  const tokens = b.unit === "tokens";
  const facts = [
    ["TPOT SLO", b.tpot_slo_ms ? `${fmtNum(b.tpot_slo_ms)} ms` : "none", "the engine's time-per-output-token target"],
    ["Iteration limit", tokens ? `${fmtNum(b.limit)} units` : `${fmtNum(1e3 * b.limit)} ms`, "predicted cost an iteration may reach"],
    ["Max forward", fmtNum(b.max_forward_tokens), "most forward tokens one iteration may hold"],
    ["Max backward", fmtNum(b.max_backward_tokens), "most tokens one backward window may hold"],
    ["Inference", b.inference_token_budget === null || b.inference_token_budget === undefined ? "–" : fmtNum(b.inference_token_budget),
     "inference token budget per iteration"],
    ["Sharing", b.sharing ?? "–", "how finetuning shares iterations with inference"],
    ["Margin", tokens ? "–" : `${fmtNum(1e3 * (b.margin || 0), 1)} ms`, "headroom kept below the limit: half the recent prediction error"],
    ["Finetuning pace", tokens || b.finetune_slo_headroom == null ? "–" : `${fmtNum(1e3 * b.limit * (1 - b.finetune_slo_headroom))} ms`,
     "finetuning keeps running decodes' mean time per token at or under this, leaving the rest of the limit for prompt bursts"],
    ["Tokens / iter", fmtNum(engine.mean_tokens_per_iteration), "mean tokens per iteration, recent iterations"],
  ];
  const html = facts.map(([k, v, help]) => `<div title="${esc(help)}"><dt>${k}</dt><dd>${esc(v)}</dd></div>`).join("");
  if (factsBox.innerHTML !== html) factsBox.innerHTML = html;

  const p = engine.latency_profile;
  if (!p) { plot.update({ series: [], refs: [], xDomain: [0, 1] }); return; }
  // Predicted cost of an iteration of n prefill tokens, or of a backward window of n tokens, in ms
  // (seconds profile) or token units: the coefficients the engine learned online when it has them.
  const unitScale = tokens ? 1 : 1e3;
  const scale = tokens ? 1 : b.latency_scale || 1;
  const c = b.coefficients;
  const pts = p.points || {};
  const late = pts.late_backward || [];
  const lateLength = p.late_sequence_length;
  const measured = [...(pts.forward || []), ...(pts.backward || []), ...late].map(([n]) => n);
  const xmax = Math.max(64, ...measured, Math.min(4 * Math.max(64, ...measured), 1.15 * (b.max_forward_tokens || 0)));
  const curve = (cost, nmax = xmax) => Array.from({ length: 41 }, (_, i) => {
    const n = Math.max(1, (nmax * i) / 40);
    return [n, cost(n)];
  });
  // Keys a window's queries attend to, summed (as the engine's cost model counts them): a window
  // starting at `start` also sees every earlier token.
  const keys = (n, start) => n * start + (n * (n + 1)) / 2;
  const windowCost = (n, start) => p.backward_base + p.backward_per_token * n + (p.backward_per_key || 0) * keys(n, start);
  // The learned backward coefficient is a factor on the profiled window cost; learned coefficients
  // are already in ms (or tokens): no unit or scale factor.
  const backward = (start) => (n) => (c ? c.iteration + c.backward * unitScale * windowCost(n, start(n))
                                         : unitScale * scale * windowCost(n, start(n)));
  const dots = (list) => (list || []).map(([n, s]) => [n, unitScale * s]);
  const series = [
    { key: "fwd", label: "forward (predicted)", color: COLORS.decode, kind: "line",
      points: curve((n) => (c ? c.iteration + c.prefill_token * n : unitScale * scale * (p.forward_base + p.forward_per_token * n))) },
    { key: "bwd", label: "backward window", color: COLORS.ftForward, kind: "line", points: curve(backward(() => 0)) },
    { key: "fwd-m", color: COLORS.decode, points: dots(pts.forward), kind: "dots" },
    { key: "bwd-m", color: COLORS.ftForward, points: dots(pts.backward), kind: "dots" },
  ];
  if (lateLength && late.length) {
    series.push(
      { key: "bwd-late", label: `backward at the end of ${fmtNum(lateLength)} tokens`, color: COLORS.ftBackward,
        kind: "line", dash: "5 3", points: curve(backward((n) => lateLength - n), Math.min(xmax, lateLength)) },
      { key: "bwd-late-m", color: COLORS.ftBackward, points: dots(late), kind: "dots" });
  }
  plot.update({
    xDomain: [0, xmax],
    series,
    refs: [
      { key: "limit", axis: "y", value: unitScale * b.limit, color: COLORS.slo, label: tokens ? `limit ${fmtNum(b.limit)}` : `SLO ${fmtNum(b.tpot_slo_ms)} ms` },
      { key: "max-forward", axis: "x", value: b.max_forward_tokens, color: COLORS.budget, label: `max fwd ${fmtNum(b.max_forward_tokens)}` },
    ],
  });
}

// ---- jobs ---------------------------------------------------------------------------------

export class JobsPanel {
  /** onCancel(jobId) -> Promise<{ok, message, job}> */
  constructor(box, summary, onCancel) {
    this.box = box;
    this.summary = summary;
    this.onCancel = onCancel;
    this.rows = new Map();
    this.empty = document.createElement("div");
    this.empty.className = "empty-note";
    this.empty.textContent = "No fine-tuning jobs yet. Start one with POST /v1/fine_tuning/jobs or coserve.Trainer; its progress and loss curve appear here.";
    this.more = document.createElement("div");
    this.more.className = "more-note";
  }

  render(jobs) {
    const active = jobs.filter((j) => !TERMINAL.has(j.status));
    const ended = jobs.filter((j) => TERMINAL.has(j.status))
      .sort((a, b) => (b.finished_at || b.created_at || 0) - (a.finished_at || a.created_at || 0));
    const shown = [...active.sort((a, b) => (a.created_at || 0) - (b.created_at || 0)), ...ended.slice(0, MAX_ENDED_JOBS)];
    this.summary.textContent = jobs.length ? `${active.length} running · ${ended.length} ended` : "";
    const keep = new Set(shown.map((j) => j.job_id));
    for (const [id, row] of this.rows) if (!keep.has(id)) { row.el.remove(); this.rows.delete(id); }
    if (!shown.length) { if (!this.empty.isConnected) this.box.append(this.empty); } else this.empty.remove();
    let prev = null;
    for (const job of shown) {
      const row = this.rows.get(job.job_id) || this.create(job);
      this.update(row, job);
      // Keep DOM order = display order, moving nodes only when needed.
      const want = prev ? prev.nextSibling : this.box.firstChild;
      if (want !== row.el) this.box.insertBefore(row.el, want);
      prev = row.el;
    }
    const hidden = ended.length - Math.min(ended.length, MAX_ENDED_JOBS);
    this.more.textContent = hidden ? `${hidden} older ended job(s) not shown` : "";
    if (hidden) this.box.append(this.more); else this.more.remove();
  }

  create(job) {
    const el = document.createElement("div");
    el.className = "job";
    el.dataset.jobId = job.job_id;
    el.innerHTML = `
      <div class="job-main">
        <div class="job-title"><span class="name"></span><span class="pill status"></span></div>
        <div class="job-id mono"></div>
        <div class="progress" role="progressbar" aria-valuemin="0"><div class="bar"></div></div>
        <div class="job-meta"></div>
        <div class="job-error" role="alert"></div>
      </div>
      <div class="chart loss" data-chart="loss"></div>
      <div class="job-actions"><button class="cancel" type="button">Cancel</button></div>`;
    const row = { el, plot: new Plot(el.querySelector(".loss"), { legend: false, yZero: false, empty: "loss appears after the first step", xLabel: "step" }) };
    const button = el.querySelector(".cancel");
    button.addEventListener("click", () => this.clickCancel(row, button));
    this.rows.set(job.job_id, row);
    return row;
  }

  update(row, job) {
    const el = row.el;
    row.job = job;
    el.dataset.status = job.status;
    el.querySelector(".name").textContent = job.adapter;
    const pill = el.querySelector(".status");
    pill.textContent = job.status;
    pill.dataset.status = job.status;
    el.querySelector(".job-id").textContent = [job.job_id, job.worker && `on ${job.worker}`].filter(Boolean).join(" · ");
    const frac = job.max_steps ? Math.min(1, job.step / job.max_steps) : 0;
    const bar = el.querySelector(".progress");
    bar.setAttribute("aria-valuenow", String(job.step));
    bar.setAttribute("aria-valuemax", String(job.max_steps || 0));
    bar.querySelector(".bar").style.width = `${(100 * frac).toFixed(1)}%`;
    const parts = [`step ${job.step} / ${job.max_steps ?? "?"}`, `${Math.round(100 * frac)}%`,
                   `${fmtNum(job.tokens_trained || 0)} tokens`];
    if (job.last_loss !== null && job.last_loss !== undefined) parts.push(`loss ${fmtNum(job.last_loss, 4)}`);
    if (job.num_checkpoints) parts.push(`${job.num_checkpoints} checkpoint(s)`);
    el.querySelector(".job-meta").textContent = parts.join(" · ");
    if (!row.localError) el.querySelector(".job-error").textContent = job.error || "";
    const pts = (job.losses || []).map((l, i) => [job.loss_steps[i], l]);
    const key = `${pts.length}:${job.last_loss}`;
    if (key !== row.lossKey) {
      row.lossKey = key;
      // NOTE: x spans the steps done (the progress bar shows what is left), so the curve uses the width.
      row.plot.update({ xDomain: [1, Math.max(10, pts.length ? pts[pts.length - 1][0] : 1)],
                        series: [{ key: "loss", label: "loss", color: COLORS.loss, points: pts, kind: "line" }], refs: [] });
    }
    const button = el.querySelector(".cancel");
    if (TERMINAL.has(job.status)) { button.hidden = true; } else if (!row.busy) { button.hidden = false; }
  }

  async clickCancel(row, button) {
    // NOTE: two clicks (arm, then confirm) instead of window.confirm: a stray click on a page left
    // open all day must not stop a job, and a modal dialog would freeze the live view.
    if (row.busy) return;
    if (!row.armed) {
      row.armed = true;
      button.textContent = "Confirm cancel";
      button.classList.add("armed");
      row.disarm = setTimeout(() => { row.armed = false; button.textContent = "Cancel"; button.classList.remove("armed"); }, 4000);
      return;
    }
    clearTimeout(row.disarm);
    row.armed = false;
    row.busy = true;
    button.disabled = true;
    button.textContent = "Cancelling…";
    const errorBox = row.el.querySelector(".job-error");
    const result = await this.onCancel(row.el.dataset.jobId);
    row.busy = false;
    button.disabled = false;
    button.classList.remove("armed");
    button.textContent = "Cancel";
    row.localError = !result.ok;
    errorBox.textContent = result.ok ? "" : `Could not cancel: ${result.message}`;
    if (result.ok && result.job) this.update(row, { ...row.job, ...result.job, losses: row.job.losses, loss_steps: row.job.loss_steps });
  }
}

// ---- adapters and workers -----------------------------------------------------------------

export function renderAdapters(box, snap) {
  const training = new Set((snap.jobs || []).filter((j) => !TERMINAL.has(j.status)).map((j) => j.adapter));
  const engines = Object.entries(snap.engines || {});
  if (!engines.length) return setHtml(box, `<div class="empty-note">No engine reported yet.</div>`);
  const blocks = engines.map(([name, e]) => {
    const r = e.adapters;
    const head = engines.length > 1 ? `<div class="sub-head">${esc(name)}</div>` : "";
    if (!r) return `${head}<div class="empty-note">This engine does not report adapter residency.</div>`;
    const device = r.device || {};
    const cpu = new Set(r.cpu || []), pinned = new Set(r.pinned || []);
    const names = [...new Set([...Object.keys(device), ...(r.pinned || []), ...(r.cpu || []), ...(r.on_disk || [])])];
    const used = Object.keys(device).length;
    const slots = Array.from({ length: r.max_loras }, (_, i) => {
      const owner = Object.keys(device).find((n) => device[n] === i);
      return `<span class="slot${owner ? " used" : ""}" title="${owner ? esc(owner) : "free slot"}"></span>`;
    }).join("");
    const summary = `<div class="residency"><span>Device slots <b>${used} / ${r.max_loras}</b></span><span class="slots">${slots}</span>` +
      `<span>CPU cache <b>${cpu.size} / ${r.max_cpu_loras}</b></span></div>`;
    if (!names.length) return `${head}${summary}<div class="empty-note">No adapters loaded: requests use the base model.</div>`;
    const rows = names.map((n) => {
      const where = n in device ? `<span class="pill device">device · slot ${device[n]}</span>`
        : cpu.has(n) ? `<span class="pill cpu">CPU cache</span>`
        : pinned.has(n) ? `<span class="pill cpu">CPU · in memory</span>` : `<span class="pill disk">on disk</span>`;
      const tags = [pinned.has(n) ? "in memory" : "", training.has(n) ? "training" : ""].filter(Boolean)
        .map((t) => `<span class="tag">${t}</span>`).join("");
      return `<tr data-adapter="${esc(n)}"><td class="mono">${esc(n)}</td><td>${where}</td><td>${tags}</td></tr>`;
    }).join("");
    return `${head}${summary}<div class="table-wrap"><table><thead><tr><th>Adapter</th><th>Where</th><th></th></tr></thead><tbody>${rows}</tbody></table></div>`;
  });
  setHtml(box, blocks.join(""));
}

export function renderWorkers(box, snap) {
  const workers = snap.workers || [];
  if (!workers.length) return setHtml(box, `<div class="empty-note">No workers reported.</div>`);
  const rows = workers.map((w) => {
    const health = w.healthy ? `<span class="health ok">healthy</span>` : `<span class="health bad">unhealthy</span>`;
    const adapters = w.adapters || [];
    const jobs = Array.isArray(w.running_jobs) ? w.running_jobs.length : w.running_jobs ?? "–";
    return `<tr data-worker="${esc(w.name)}"><td class="mono">${esc(w.name)}</td><td>${esc(w.role ?? "–")}</td>` +
      `<td class="mono">${esc(w.device ?? "–")}</td><td>${health}</td><td class="num">${fmtNum(w.load ?? 0)}</td>` +
      `<td class="num" title="${esc(adapters.join(", "))}">${adapters.length}</td><td class="num">${esc(jobs)}</td>` +
      `<td class="num">${esc(w.restarts ?? 0)}</td></tr>`;
  }).join("");
  setHtml(box, `<div class="table-wrap"><table><thead><tr><th>Name</th><th>Role</th><th>Device</th><th>Health</th><th class="num">Load</th>` +
    `<th class="num">Adapters</th><th class="num">Jobs</th><th class="num">Restarts</th></tr></thead><tbody>${rows}</tbody></table></div>`);
}

const lastHtml = new WeakMap();

function setHtml(box, html) {
  // Same markup, no rewrite: keeps text selection and hover state across polls.
  if (lastHtml.get(box) !== html) { box.innerHTML = html; lastHtml.set(box, html); }
}
