// Graphs of a stream's history (GET /api/v1/streams/{id}/history), drawn
// as SVG by the page: sparklines on the dashboard, graphs with axes on the
// stream page. The maths (top of the file) is pure and tested with node
// --test; the SVG building needs a document.

import { formatBytes, formatCount } from './units.js';

// SERIES are what the graphs show of a history point.
export const SERIES = {
  throughput: { label: 'Throughput', unit: 'bytes/s', value: (p) => num(p.bytes_sent_per_sec) + num(p.bytes_received_per_sec), fmt: (v) => `${formatBytes(Math.round(v))}/s` },
  active: { label: 'Open connections', unit: 'connections', value: (p) => num(p.active_connections), fmt: (v) => (Number.isInteger(v) ? formatCount(v) : String(Math.round(v * 10) / 10)) },
  rate: { label: 'New connections', unit: 'per second', value: (p) => num(p.connections_per_sec), fmt: (v) => `${round2(v)}/s` },
  problems: { label: 'Blocked and failed dials', unit: 'per second', value: (p) => num(p.blocked_per_sec) + num(p.dial_failures_per_sec), fmt: (v) => `${round2(v)}/s` },
};

const num = (v) => (Number.isFinite(v) ? v : 0);
const round2 = (v) => String(Math.round(v * 100) / 100);

// niceMax is the top of a graph's scale: the smallest 1, 2 or 5 × 10^k at
// or above v (1 for nothing, so that a flat line sits at the bottom).
export function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) {
    if (m * p >= v * (1 - 1e-12)) return m * p;
  }
  return 10 * p;
}

// linePath is the SVG path of values across a w × h box, 0 at the
// bottom and max at the top (coordinates to 0.1). xs are where each value
// is, as fractions of the width (positions); without them the first is at
// x = 0 and the last at x = w. starts (gaps) marks the values after a gap:
// the line breaks there. One value is a flat line from its place to the
// right edge.
export function linePath(values, w, h, max, xs, starts) {
  const n = values.length;
  if (!n) return '';
  const top = max > 0 ? max : 1;
  const r = (v) => Math.round(v * 10) / 10;
  const y = (v) => r(h - (Math.min(Math.max(v, 0), top) / top) * h);
  const x = (i) => (xs ? xs[i] * w : n === 1 ? 0 : (i * w) / (n - 1));
  if (n === 1) return `M${r(x(0))} ${y(values[0])}H${r(w)}`;
  return values.map((v, i) => `${!i || starts?.[i] ? 'M' : 'L'}${r(x(i))} ${y(v)}`).join('');
}

// gaps marks each point that comes more than one step after the one
// before: the history has no point for a step without samples (before
// the stream existed, while Caddy was down), which is no data, not 0.
export function gaps(points, step) {
  return points.map((p, i) => i > 0 && Date.parse(p.time) - Date.parse(points[i - 1].time) > step * 1500);
}

// positions are the points' places on a time axis of span seconds that
// ends at now: 0 is its start, 1 now (a point outside is put at the edge).
export function positions(points, span, now = Date.now()) {
  const t0 = now - span * 1000;
  return points.map((p) => {
    const f = (Date.parse(p.time) - t0) / (span * 1000);
    return Number.isFinite(f) ? Math.min(1, Math.max(0, f)) : 1;
  });
}

// summary is the last, highest and average of values (0s without any).
export function summary(values) {
  if (!values.length) return { now: 0, peak: 0, avg: 0 };
  let peak = 0;
  let sum = 0;
  for (const v of values) {
    peak = Math.max(peak, v);
    sum += v;
  }
  return { now: values[values.length - 1], peak, avg: sum / values.length };
}

// shownSpan is how many seconds a graph of range seconds shows: since
// its first point when that is later (a server that started 2 minutes
// ago has 2 minutes to show), and at least 5 minutes.
export function shownSpan(points, range, now = Date.now()) {
  const first = points.length ? Date.parse(points[0].time) : NaN;
  if (!Number.isFinite(first)) return range;
  return Math.min(range, Math.max(300, Math.ceil((now - first) / 1000)));
}

// nearest is the index of the position (a fraction of the width, in
// order) closest to f; -1 without any.
export function nearest(f, xs) {
  let best = -1;
  for (let i = 0; i < xs.length; i++) {
    if (best < 0 || Math.abs(xs[i] - f) < Math.abs(xs[best] - f)) best = i;
  }
  return best;
}

// timeLabel is a point's time as the axis shows it: hours and minutes.
export function timeLabel(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  return `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
}

// sinceFor is the since= of a history request for the last `seconds`.
export function sinceFor(seconds, now = Date.now()) {
  return isoSecond(now - seconds * 1000);
}

// isoSecond is the time ms as an RFC 3339 time, to the second (down).
export function isoSecond(ms) {
  return new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z');
}

// REREAD is how far back a refresh asks again for points it has: on a
// cluster, a node's samples reach the database up to a step late, and
// change the sum of a point already shown.
export const REREAD = 60;

// refreshSince is the since= (ms) of a refresh of points, the last
// `seconds` of them, to the second: REREAD before the newest point it
// has, or the whole span when it has none (or only older ones).
export function refreshSince(points, seconds, now = Date.now()) {
  const from = now - seconds * 1000;
  const last = points.length ? Date.parse(points[points.length - 1].time) : NaN;
  const since = Number.isFinite(last) ? Math.max(from, last - REREAD * 1000) : from;
  return Math.floor(since / 1000) * 1000; // as isoSecond sends it
}

// mergePoints is old points with fresh ones, the answer to a request
// since `since` (ms; the server sends the points after it): old ones up
// to since, then fresh, without those before `from` (ms).
export function mergePoints(old, fresh, since, from) {
  const keep = (p) => Date.parse(p.time) >= from;
  return [...old.filter((p) => Date.parse(p.time) <= since && keep(p)), ...fresh.filter(keep)];
}

// RANGES are the stream page's graph spans: [label, seconds, step].
export const RANGES = [['1 h', 3600, 10], ['6 h', 6 * 3600, 60], ['24 h', 24 * 3600, 300]];

// problems says what is wrong with a stream now, from the stream (GET
// /streams) and its history: unhealthy, an upstream down, not listening,
// blocked connections or failed dials in the 5 minutes before now. Empty:
// nothing.
export function problems(s, points = [], now = Date.now()) {
  const out = [];
  const st = s.status || {};
  const ups = Array.isArray(st.upstreams) ? st.upstreams : [];
  const down = ups.filter((u) => !u.healthy).length;
  if (st.health_status === 'unhealthy') out.push('unhealthy');
  else if (down) out.push(`${down} ${down === 1 ? 'upstream' : 'upstreams'} down`);
  if (s.enabled && st.listening === false) out.push('not listening');
  const recent = points.filter((p) => Date.parse(p.time) >= now - 300_000);
  if (recent.some((p) => num(p.blocked_per_sec) > 0)) out.push('blocking connections');
  if (recent.some((p) => num(p.dial_failures_per_sec) > 0)) out.push('failing dials');
  return out;
}

// ---------------------------------------------------------------- SVG

const NS = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v != null) el.setAttribute(k, String(v));
  }
  el.append(...children);
  return el;
}

// graph draws series of points as one SVG line each, on a time axis that
// ends now. opts: label (what it shows, for the text alternative), series
// (names of SERIES), axes (labels of the value and time axes). It returns
// {el, update(points, range)}: update redraws in place for the last range
// seconds. It is drawn at the size CSS gives it (in pixels, so that its
// text is never stretched), again when that changes. Hovering or moving
// the focus along it (arrow keys) shows a point's numbers in its readout.
export function graph(opts) {
  const { label, series, axes = false } = opts;
  let W = axes ? 600 : 160;
  let H = axes ? 160 : 36;
  const pad = axes ? { l: 64, r: 8, t: 8, b: 22 } : { l: 1, r: 1, t: 2, b: 2 };
  let w = W - pad.l - pad.r;
  let hh = H - pad.t - pad.b;
  const lines = series.map((name, i) => svg('path', { class: `line s${i}`, fill: 'none' }));
  const cursor = svg('line', { class: 'cursor', y1: 0, visibility: 'hidden' });
  const axis = svg('g', { class: 'axis' });
  const frame = svg('rect', { class: 'frame', fill: 'none' });
  const plot = svg('g', { transform: `translate(${pad.l} ${pad.t})` }, frame, ...lines, cursor);
  const title = svg('title');
  const root = svg('svg', { class: axes ? 'graph' : 'spark', role: 'img', tabindex: 0, preserveAspectRatio: 'none' }, title, axis, plot);
  const readout = document.createElement('p');
  readout.className = 'readout';
  readout.setAttribute('aria-live', 'off');
  // What the arrow keys reach, said by a screen reader: only a key writes
  // here, so that the 5 s refreshes say nothing.
  const said = document.createElement('span');
  said.className = 'visually-hidden';
  said.setAttribute('aria-live', 'polite');
  const el = document.createElement('figure');
  el.className = axes ? 'graph-box' : 'spark-box';
  el.append(root, readout, said);
  let pts = [];
  let vals = [];
  let xs = [];
  let at = -1;
  let lastRange = 3600;
  let lastStep = 10;
  if (typeof ResizeObserver === 'function') new ResizeObserver(() => update(pts, lastRange, lastStep)).observe(root);

  const show = (i) => {
    at = i;
    if (!pts.length || i < 0) {
      cursor.setAttribute('visibility', 'hidden');
      readout.textContent = text();
      return;
    }
    const x = xs[i] * w;
    cursor.setAttribute('x1', x);
    cursor.setAttribute('x2', x);
    cursor.setAttribute('visibility', 'visible');
    readout.textContent = `${timeLabel(pts[i].time)}: ${series.map((n, k) => `${SERIES[n].label} ${SERIES[n].fmt(vals[k][i])}`).join(', ')}`;
  };
  // text is the graph in words: now and the peak of each series.
  const text = () => {
    if (!pts.length) return `${label}: no data yet`;
    return `${label}: ${series.map((n, k) => {
      const s = summary(vals[k]);
      return `${series.length > 1 ? `${SERIES[n].label.toLowerCase()} ` : ''}now ${SERIES[n].fmt(s.now)}, peak ${SERIES[n].fmt(s.peak)}`;
    }).join('; ')}`;
  };
  root.addEventListener('pointermove', (e) => {
    const r = root.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * W - pad.l;
    show(nearest(x / w, xs));
  });
  root.addEventListener('pointerleave', () => show(-1));
  root.addEventListener('blur', () => show(-1));
  root.addEventListener('keydown', (e) => {
    if (!pts.length) return;
    const d = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity }[e.key];
    if (d === undefined) return;
    e.preventDefault();
    show(Math.min(pts.length - 1, Math.max(0, (at < 0 ? pts.length - 1 : at) + d)));
    said.textContent = readout.textContent;
  });

  function update(points, range = 3600, step = 10) {
    pts = Array.isArray(points) ? points : [];
    lastRange = range;
    lastStep = step;
    // The size on the page, once it is on one.
    if (root.clientWidth > 0 && root.clientHeight > 0) {
      W = root.clientWidth;
      H = root.clientHeight;
    }
    w = Math.max(10, W - pad.l - pad.r);
    hh = Math.max(10, H - pad.t - pad.b);
    root.setAttribute('viewBox', `0 0 ${W} ${H}`);
    frame.setAttribute('width', w);
    frame.setAttribute('height', hh);
    cursor.setAttribute('y2', hh);
    const now = Date.now();
    const span = shownSpan(pts, range, now);
    xs = positions(pts, span, now);
    vals = series.map((n) => pts.map(SERIES[n].value));
    const starts = gaps(pts, step);
    // Every series on its own scale would mislead: one scale per unit, and
    // the first series' scale for the axis.
    lines.forEach((line, k) => {
      const max = niceMax(summary(vals[k]).peak);
      line.setAttribute('d', linePath(vals[k], w, hh, max, xs, starts));
    });
    const words = text();
    title.textContent = words;
    root.setAttribute('aria-label', words);
    if (at >= pts.length) at = -1;
    show(at);
    if (axes) {
      const max = niceMax(summary(vals[0] || []).peak);
      const f = SERIES[series[0]].fmt;
      const t = (x, y, s, anchor) => svg('text', { x, y, 'text-anchor': anchor }, s);
      const kids = [
        t(pad.l - 4, pad.t + 10, f(max), 'end'),
        t(pad.l - 4, pad.t + hh / 2 + 4, f(max / 2), 'end'),
        t(pad.l - 4, pad.t + hh, f(0), 'end'),
      ];
      kids.push(t(pad.l, H - 4, timeLabel(new Date(now - span * 1000)), 'start'), t(pad.l + w / 2, H - 4, timeLabel(new Date(now - span * 500)), 'middle'),
        t(pad.l + w, H - 4, timeLabel(new Date(now)), 'end'));
      axis.replaceChildren(...kids);
    }
  }
  update([]);
  return { el, update, text };
}
