// charts.js: a small SVG plotter for the dashboard (lines, stacked areas, dots, reference lines).
//
// One Plot per chart box: a legend with each series' latest value, an SVG sized to the box in real
// pixels (so text never stretches), and a hover guide with a tooltip. The box has a fixed height and
// the legend a fixed set of entries, so updates never move the layout. Each redraw sets
// data-points (non-empty points drawn), data-max (largest y value) and data-updates on the box:
// tests and curious users can read them.

const SVG_NS = "http://www.w3.org/2000/svg";
const PAD = { left: 46, right: 12, top: 10, bottom: 22 };

export function fmtNum(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (digits !== undefined) return v.toFixed(digits);
  if (Number.isInteger(v) && a < 1e4) return String(v);
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
  if (a >= 100 || a === 0) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toPrecision(2);
}

export function fmtAgo(seconds) {
  const s = Math.round(-seconds);
  if (s <= 0) return "now";
  if (s < 60) return `−${s}s`;
  const m = Math.floor(s / 60), r = s % 60;
  return r ? `−${m}m${String(r).padStart(2, "0")}` : `−${m}m`;
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

export class Plot {
  /**
   * @param {HTMLElement} box  the chart container (fixed height from CSS)
   * @param {object} opts  yFormat(v), xFormat(v), xTime (x = seconds relative to now), yFixedMax,
   *                       yMinTop (smallest top of the y axis), yZero (false: fit y to the data, not from 0),
   *                       empty (text when nothing to draw),
   *                       legend (default true), hover (default true)
   */
  constructor(box, opts = {}) {
    this.box = box;
    this.opts = { yFormat: fmtNum, xFormat: fmtNum, legend: true, hover: true, empty: "No data yet", ...opts };
    this.updates = 0;
    this.data = null;
    box.classList.add("plot");
    if (this.opts.legend) {
      this.legend = document.createElement("div");
      this.legend.className = "legend";
      box.appendChild(this.legend);
    }
    this.area = document.createElement("div");
    this.area.className = "plot-area";
    box.appendChild(this.area);
    this.guide = document.createElement("div");
    this.guide.className = "guide";
    this.tip = document.createElement("div");
    this.tip.className = "tip";
    this.area.append(this.guide, this.tip);
    this.svgHolder = document.createElement("div");
    this.svgHolder.className = "svg-holder";
    this.area.prepend(this.svgHolder);
    if (this.opts.hover) {
      this.area.addEventListener("mousemove", (e) => this.hover(e));
      this.area.addEventListener("mouseleave", () => this.hideHover());
    }
    this.width = 0;
    this.height = 0;
    new ResizeObserver(() => {
      const w = this.area.clientWidth, h = this.area.clientHeight;
      if (w !== this.width || h !== this.height) { this.width = w; this.height = h; this.draw(); }
    }).observe(this.area);
  }

  /** data: {series: [{key, label, color, points: [[x, y|null]], kind: "line"|"area"|"dots", stack, dash}],
   *         refs: [{axis: "y"|"x", value, label, color}], xDomain: [lo, hi]} */
  update(data) {
    this.data = data;
    this.updates += 1;
    this.box.dataset.updates = String(this.updates);
    this.draw();
  }

  layout() {
    const d = this.data;
    const series = d.series.map((s) => ({ ...s, drawn: s.points }));
    // Stacked areas: each layer's y is the running sum of the layers below it (same x positions).
    let below = null;
    for (const s of series.filter((s) => s.stack)) {
      s.base = below;
      s.drawn = s.points.map(([x, y], i) => {
        const b = below ? below[i][1] : 0;
        return [x, y === null || b === null ? null : y + b];
      });
      below = s.drawn;
    }
    let count = 0, max = 0, dataMax = 0, xmin = Infinity, xmax = -Infinity;
    for (const s of series) {
      for (const [x, y] of s.drawn) {
        if (y === null || y === undefined) continue;
        count += 1;
        max = Math.max(max, y);
        xmin = Math.min(xmin, x); xmax = Math.max(xmax, x);
      }
      for (const [, y] of s.points) if (y !== null && y !== undefined) dataMax = Math.max(dataMax, y);
    }
    for (const r of d.refs || []) {
      if (r.axis === "x" || r.value === null || r.value === undefined) continue;
      // A soft reference (a budget or SLO far above the data) must not squash the data into the floor:
      // it sets the scale only within `soft` times the data's top, else it is noted as off scale.
      if (r.soft && max > 0 && r.value > r.soft * max) continue;
      max = Math.max(max, r.value);
    }
    let [x0, x1] = d.xDomain || [xmin, xmax];
    if (!Number.isFinite(x0) || !Number.isFinite(x1) || x0 === x1) { x0 = 0; x1 = 1; }
    let bottom = 0;
    if (this.opts.yZero === false && count) {
      // Curves that live far from zero (a loss): fit the axis to the data's own range.
      let min = Infinity;
      for (const s of series) for (const [, y] of s.drawn) if (y !== null && y !== undefined) min = Math.min(min, y);
      const pad = Math.max((max - min) * 0.1, Math.abs(max) * 0.01, 1e-6);
      const step = niceStep(max - min + 2 * pad, 3);
      bottom = Math.floor((min - pad) / step) * step;
      const top = Math.ceil((max + pad) / step) * step;
      return { series, count, dataMax, x0, x1, top, bottom, step };
    }
    let top = this.opts.yFixedMax ?? Math.max(max * 1.08, this.opts.yMinTop ?? 0);
    if (!(top > 0)) top = 1;
    const step = niceStep(top, 4);
    if (this.opts.yFixedMax === undefined) top = Math.ceil(top / step - 1e-9) * step;
    return { series, count, dataMax, x0, x1, top, bottom, step };
  }

  draw() {
    if (!this.data) return;
    if (this.legend) this.drawLegend();   // first: its height decides the plot area's
    const W = this.area.clientWidth, H = this.area.clientHeight;
    if (!W || !H) return;
    const L = (this.lay = this.layout());
    const iw = W - PAD.left - PAD.right, ih = H - PAD.top - PAD.bottom;
    const sx = (x) => PAD.left + ((x - L.x0) / (L.x1 - L.x0)) * iw;
    const sy = (y) => PAD.top + ih - ((Math.min(Math.max(y, L.bottom), L.top) - L.bottom) / (L.top - L.bottom)) * ih;
    this.sx = sx; this.W = W; this.iw = iw;
    const parts = [];
    for (let i = 0, v = L.bottom; v <= L.top + 1e-9; i++, v = L.bottom + i * L.step) {
      const y = sy(v).toFixed(1);
      parts.push(`<line class="grid" x1="${PAD.left}" x2="${W - PAD.right}" y1="${y}" y2="${y}"/>`,
                 `<text class="tick" x="${PAD.left - 6}" y="${y}" text-anchor="end" dominant-baseline="middle">${esc(this.opts.yFormat(v))}</text>`);
    }
    const xstep = this.opts.xTime ? timeStep(L.x1 - L.x0, iw) : niceStep(L.x1 - L.x0, Math.max(2, Math.floor(iw / 70)));
    const xfmt = this.opts.xTime ? fmtAgo : this.opts.xFormat;
    const first = this.opts.xTime ? L.x1 - Math.floor((L.x1 - L.x0) / xstep) * xstep : Math.ceil(L.x0 / xstep) * xstep;
    for (let i = 0, v = first; v <= L.x1 + 1e-9; i++, v = first + i * xstep) {
      const x = sx(v).toFixed(1);
      parts.push(`<text class="tick" x="${x}" y="${H - 6}" text-anchor="middle">${esc(xfmt(v))}</text>`);
    }
    for (const s of L.series) {
      const pts = s.drawn;
      if (s.kind === "dots") {
        for (const [x, y] of pts) if (y !== null) parts.push(`<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="3" fill="${s.color}" class="dot"/>`);
        continue;
      }
      // A stacked layer that is zero throughout would draw its stroke right on top of the layer
      // below and look like data of its own kind: leave it out.
      if (s.stack && !s.points.some(([, y]) => y)) continue;
      for (const idx of runs(pts)) {
        const run = idx.map((i) => pts[i]);
        const line = run.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
        if (s.kind === "area") {
          // Close the area along the layer below (stacked) or the x axis.
          const back = idx.slice().reverse().map((i) => {
            const b = s.base ? s.base[i][1] ?? 0 : 0;
            return `L${sx(pts[i][0]).toFixed(1)},${sy(b).toFixed(1)}`;
          }).join("");
          parts.push(`<path d="${line}${back}Z" fill="${s.color}" fill-opacity="0.22" stroke="none"/>`);
        }
        const dash = s.dash ? ` stroke-dasharray="${s.dash}"` : "";
        parts.push(`<path d="${line}" fill="none" stroke="${s.color}" stroke-width="${s.width || 1.6}"${dash} stroke-linejoin="round"/>`);
      }
    }
    for (const r of this.data.refs || []) {
      if (r.value === null || r.value === undefined) continue;
      if (r.axis === "x") {
        if (r.value < L.x0 || r.value > L.x1) continue;
        const x = sx(r.value).toFixed(1);
        parts.push(`<g data-ref="${esc(r.key || "")}"><line class="ref" x1="${x}" x2="${x}" y1="${PAD.top}" y2="${PAD.top + ih}" stroke="${r.color}"/>` +
                   `<text class="ref-label" x="${+x - 4}" y="${PAD.top + 10}" text-anchor="end" fill="${r.color}">${esc(r.label)}</text></g>`);
      } else if (r.value > L.top) {
        parts.push(`<g data-ref="${esc(r.key || "")}" data-off-scale="1"><text class="ref-label" x="${W - PAD.right - 2}" y="${PAD.top + 10}" ` +
                   `text-anchor="end" fill="${r.color}">${esc(r.label)} ↑</text></g>`);
      } else {
        const y = sy(r.value).toFixed(1);
        parts.push(`<g data-ref="${esc(r.key || "")}"><line class="ref" x1="${PAD.left}" x2="${W - PAD.right}" y1="${y}" y2="${y}" stroke="${r.color}"/>` +
                   `<text class="ref-label" x="${W - PAD.right - 2}" y="${+y - 4}" text-anchor="end" fill="${r.color}">${esc(r.label)}</text></g>`);
      }
    }
    if (!L.count) parts.push(`<text class="empty" x="${PAD.left + iw / 2}" y="${PAD.top + ih / 2}" text-anchor="middle" dominant-baseline="middle">${esc(this.opts.empty)}</text>`);
    this.svgHolder.innerHTML = `<svg xmlns="${SVG_NS}" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">${parts.join("")}</svg>`;
    this.box.dataset.points = String(L.count);
    this.box.dataset.max = String(L.dataMax);
  }

  drawLegend() {
    const items = this.data.series.filter((s) => s.label).map((s) => {
      const last = lastValue(s.points);
      const fmt = s.format || this.opts.yFormat;
      return `<span class="item"><i style="background:${s.color}"></i>${esc(s.label)} <b>${esc(fmt(last))}</b></span>`;
    });
    const html = items.join("");
    if (html !== this.legendHtml) { this.legend.innerHTML = html; this.legendHtml = html; }
  }

  hover(e) {
    if (!this.lay || !this.lay.count) return this.hideHover();
    const rect = this.area.getBoundingClientRect();
    const px = e.clientX - rect.left;
    if (px < PAD.left || px > this.W - PAD.right) return this.hideHover();
    const L = this.lay;
    const x = L.x0 + ((px - PAD.left) / this.iw) * (L.x1 - L.x0);
    const rows = [];
    let at = null;
    for (const s of this.data.series) {
      if (!s.label) continue;
      const p = nearest(s.points, x);
      if (!p) continue;
      at = at ?? p[0];
      rows.push(`<div><i style="background:${s.color}"></i>${esc(s.label)} <b>${esc((s.format || this.opts.yFormat)(p[1]))}</b></div>`);
    }
    if (at === null) return this.hideHover();
    const gx = this.sx(at);
    this.guide.style.transform = `translateX(${gx.toFixed(0)}px)`;
    this.guide.style.display = "block";
    const head = this.opts.xTime ? fmtAgo(at) : `${this.opts.xLabel || ""} ${this.opts.xFormat(at)}`;
    this.tip.innerHTML = `<div class="tip-head">${esc(head)}</div>${rows.join("")}`;
    this.tip.style.display = "block";
    const tw = this.tip.offsetWidth;
    const left = gx + 12 + tw > this.W ? gx - 12 - tw : gx + 12;
    this.tip.style.transform = `translate(${Math.max(0, left).toFixed(0)}px, 4px)`;
  }

  hideHover() {
    this.guide.style.display = "none";
    this.tip.style.display = "none";
  }
}

function timeStep(span, width) {
  const wanted = span / Math.max(2, Math.floor(width / 64));
  for (const s of [5, 10, 15, 30, 60, 120, 300, 600, 900]) if (s >= wanted) return s;
  return 1800;
}

function runs(points) {
  // Index runs of consecutive non-null points: a null (no data) breaks the line instead of drawing a false zero.
  const out = [];
  let cur = [];
  points.forEach((p, i) => {
    if (p[1] === null || p[1] === undefined) { if (cur.length) out.push(cur); cur = []; } else cur.push(i);
  });
  if (cur.length) out.push(cur);
  return out;
}

function lastValue(points) {
  for (let i = points.length - 1; i >= 0; i--) if (points[i][1] !== null && points[i][1] !== undefined) return points[i][1];
  return null;
}

function nearest(points, x) {
  let best = null, dist = Infinity;
  for (const p of points) {
    if (p[1] === null || p[1] === undefined) continue;
    const d = Math.abs(p[0] - x);
    if (d < dist) { dist = d; best = p; }
  }
  return best;
}
