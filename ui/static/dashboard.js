// The dashboard, the first page: totals, then every stream with
// sparklines of its last hour (throughput, open connections), those with
// problems first. Refreshed every 5 s while the tab is visible.

import { displayName, get } from './api.js';
import { fail, h, heading, poll, setText, unfail } from './dom.js';
import { SERIES, graph, isoSecond, mergePoints, problems, refreshSince } from './graph.js';
import { streamLine, streamState } from './lists.js';
import { formatBytes, formatCount } from './units.js';

const HOUR = 3600;
const STEP = 10;

export async function dashboardPage(ctx) {
  const totals = {};
  const tile = (key, label) => {
    totals[key] = h('dd', { 'data-total': key }, '–');
    return h('div', { class: 'tile' }, h('dt', {}, label), totals[key]);
  };
  const list = h('ul', { class: 'cards', 'aria-label': 'Streams, those with problems first' });
  const empty = h('p', { class: 'empty', hidden: true }, 'No streams yet. ', h('a', { href: '#/streams/new' }, 'Make one.'));
  ctx.show(
    heading('Dashboard'),
    h('dl', { class: 'totals' },
      tile('up', 'Streams up'), tile('down', 'Not listening'), tile('disabled', 'Disabled'),
      tile('unhealthy', 'Unhealthy upstreams'), tile('active', 'Open connections'), tile('throughput', 'Throughput now')),
    h('h2', {}, 'Streams, last hour'),
    list, empty);

  const cards = new Map();
  // Each stream's points of the last hour: a refresh asks only for the
  // newest (refreshSince), not the whole hour of every stream again.
  const held = new Map();
  let lastError = '';

  async function refresh() {
    let streams;
    try {
      streams = await get('streams');
    } catch (err) {
      const msg = `Could not load the streams: ${err.message}`;
      if (ctx.alive() && msg !== lastError) fail(msg);
      lastError = msg;
      return;
    }
    // One request per stream, all at once; a stream whose history fails
    // shows what it had.
    const now = Date.now();
    const hist = await Promise.all(streams.map(async (s) => {
      const old = held.get(s.id) || [];
      const since = refreshSince(old, HOUR, now);
      try {
        const h = await get(`streams/${s.id}/history?since=${encodeURIComponent(isoSecond(since))}&step=${STEP}`);
        return { points: mergePoints(old, Array.isArray(h.points) ? h.points : [], since, now - HOUR * 1000) };
      } catch {
        return { points: mergePoints(old, [], Infinity, now - HOUR * 1000) };
      }
    }));
    if (!ctx.alive()) return;
    held.clear();
    streams.forEach((s, i) => held.set(s.id, hist[i].points));
    unfail(lastError);
    lastError = '';
    const count = { up: 0, down: 0, disabled: 0, unhealthy: 0, active: 0, throughput: 0 };
    const rows = streams.map((s, i) => {
      const points = hist[i]?.points || [];
      const st = s.status || {};
      const state = streamState(s);
      if (state === 'disabled') count.disabled++;
      else if (state === 'down') count.down++;
      else count.up++;
      const ups = Array.isArray(st.upstreams) ? st.upstreams : [];
      count.unhealthy += ups.length ? ups.filter((u) => !u.healthy).length : st.health_status === 'unhealthy' ? 1 : 0;
      count.active += st.active_connections ?? 0;
      // Now: the last point, when it is of the last 30 s.
      const last = points[points.length - 1];
      if (last && Date.parse(last.time) >= Date.now() - 30_000) count.throughput += SERIES.throughput.value(last);
      return { s, points, bad: problems(s, points) };
    });
    setText(totals.up, formatCount(count.up));
    setText(totals.down, formatCount(count.down));
    setText(totals.disabled, formatCount(count.disabled));
    setText(totals.unhealthy, formatCount(count.unhealthy));
    setText(totals.active, formatCount(count.active));
    setText(totals.throughput, `${formatBytes(Math.round(count.throughput))}/s`);
    for (const el of [totals.down, totals.unhealthy]) el.classList.toggle('bad', el.textContent !== '0');

    // Problems first, then by name.
    rows.sort((a, b) => (b.bad.length > 0) - (a.bad.length > 0) || displayName(a.s).localeCompare(displayName(b.s)) || a.s.id - b.s.id);
    const seen = new Set();
    let prev = null;
    for (const r of rows) {
      seen.add(r.s.id);
      let c = cards.get(r.s.id);
      if (!c) {
        c = card(r.s.id);
        cards.set(r.s.id, c);
      }
      fill(c, r);
      const at = prev ? prev.nextSibling : list.firstChild;
      if (at !== c.li) list.insertBefore(c.li, at);
      prev = c.li;
    }
    for (const [id, c] of cards) {
      if (!seen.has(id)) {
        c.li.remove();
        cards.delete(id);
      }
    }
    empty.hidden = cards.size > 0;
  }

  await poll(ctx, refresh, 5000);
}

function card(id) {
  const c = { id };
  c.link = h('a', { href: `#/streams/${id}/view` });
  c.line = h('span', { class: 'addr' });
  c.state = h('span', { class: 'state' });
  c.bad = h('p', { class: 'problems-list bad', hidden: true });
  c.thr = graph({ label: 'Throughput, last hour', series: ['throughput'] });
  c.conn = graph({ label: 'Open connections, last hour', series: ['active'] });
  c.li = h('li', { class: 'card', 'data-stream-id': id },
    h('h3', {}, c.link),
    h('p', { class: 'sub' }, c.line, ' · ', c.state),
    c.bad,
    h('div', { class: 'sparks' }, c.thr.el, c.conn.el));
  return c;
}

function fill(c, { s, points, bad }) {
  const name = displayName(s);
  setText(c.link, name);
  setText(c.line, streamLine(s));
  const state = streamState(s);
  setText(c.state, state);
  c.state.className = `state ${state === 'up' ? 'ok' : state === 'disabled' ? '' : 'bad'}`;
  setText(c.bad, bad.length ? `Problems: ${bad.join(', ')}` : '');
  c.bad.hidden = !bad.length;
  c.li.classList.toggle('problem', bad.length > 0);
  c.thr.update(points, HOUR, STEP);
  c.conn.update(points, HOUR, STEP);
}
