// One stream's page: graphs of its history over 1 h, 6 h or 24 h (with
// the numbers in a table for screen readers), a row per upstream when it
// has several, its open connections and its log (active.js and log.js,
// embedded).

import { displayName, get } from './api.js';
import { fail, h, heading, poll, setText, table, unfail } from './dom.js';
import { RANGES, SERIES, graph, problems, sinceFor, timeLabel } from './graph.js';
import { streamLine, streamState } from './lists.js';
import { activePage } from './active.js';
import { logPage } from './log.js';
import { formatBytes, formatCount, hostPort } from './units.js';

// GRAPHS are the stream page's graphs: one series each, so that each has
// its own axis.
const GRAPHS = [['throughput', 'Throughput'], ['active', 'Open connections'], ['rate', 'New connections'], ['problems', 'Blocked connections and failed dials']];

// TABLE_ROWS is how many rows the graphs' table has at most: every
// n-th point.
const TABLE_ROWS = 30;

export async function streamPage(ctx) {
  let s = await get(`streams/${ctx.id}`);
  if (!ctx.alive()) return;
  const name = displayName(s);
  let range = 0;
  const buttons = RANGES.map(([label], i) => h('button', { type: 'button', 'aria-pressed': String(i === range), onclick: () => pick(i) }, label));
  const graphs = GRAPHS.map(([key, label]) => {
    const g = graph({ label, series: [key], axes: true });
    return { key, g, box: h('section', { class: 'graph-card', 'aria-label': label }, h('h3', {}, label), g.el) };
  });
  const stateEl = h('span', { class: 'state' });
  const lineEl = document.createTextNode(`${streamLine(s)} · `); // refreshed: another admin may move it
  const bad = h('p', { class: 'problems-list bad', hidden: true });
  const dataBody = h('div');
  const nodesBox = h('div');
  const upBox = h('div');
  ctx.show(
    heading(`Stream: ${name}`),
    h('p', { class: 'sub' }, lineEl, stateEl, ' · ',
      s.source === 'config' ? null : [h('a', { href: `#/streams/${s.id}` }, 'Edit'), ' · '],
      h('a', { href: '#/streams' }, 'All streams')),
    bad,
    h('div', { class: 'toolbar' }, h('h2', {}, 'History'),
      h('div', { class: 'pager', role: 'group', 'aria-label': 'Time span' }, buttons)),
    h('div', { class: 'graphs' }, graphs.map((g) => g.box)),
    h('details', { class: 'graph-data' }, h('summary', {}, 'The graphs as a table'), dataBody),
    nodesBox, upBox);
  const conns = h('section', { class: 'embedded', 'aria-label': 'Open connections' });
  const log = h('section', { class: 'embedded', 'aria-label': 'Connection log' });
  ctx.show(conns, log);

  let seq = 0;
  let rangeError = ''; // what a failed range change showed, until a refresh works
  async function refresh() {
    const my = ++seq;
    const [label, seconds, step] = RANGES[range];
    let st;
    let hist;
    try {
      [st, hist] = await Promise.all([
        get(`streams/${s.id}`),
        get(`streams/${s.id}/history?since=${encodeURIComponent(sinceFor(seconds))}&step=${step}`),
      ]);
    } catch (err) {
      if (my === seq) throw err; // a newer refresh's answer stands
      return;
    }
    if (my !== seq || !ctx.alive()) return;
    unfail(rangeError);
    rangeError = '';
    s = st;
    lineEl.textContent = `${streamLine(s)} · `;
    const points = hist.points || [];
    for (const g of graphs) g.g.update(points, seconds, hist.step_seconds || step);
    const state = streamState(s);
    setText(stateEl, state);
    stateEl.className = `state ${state === 'up' ? 'ok' : state === 'disabled' ? '' : 'bad'}`;
    const p = problems(s, points);
    setText(bad, p.length ? `Problems: ${p.join(', ')}` : '');
    bad.hidden = !p.length;
    dataTable(dataBody, points, label);
    nodeTable(nodesBox, hist.nodes);
    upstreamTable(upBox, s);
  }

  function pick(i) {
    range = i;
    buttons.forEach((b, k) => b.setAttribute('aria-pressed', String(k === i)));
    refresh().catch((err) => {
      if (!ctx.alive()) return;
      rangeError = `Could not load the history: ${err.message}`;
      fail(rangeError);
    });
  }

  // The two embedded pages run on this page's context: they stop with it.
  const sub = (el) => ({ ...ctx, embedded: true, show: (...nodes) => el.append(...nodes.filter((n) => n != null && n !== false)) });
  await Promise.all([poll(ctx, refresh, 5000), activePage(sub(conns)), logPage(sub(log))]);
}

// dataTable shows the points as a table: time and each graph's value,
// at most TABLE_ROWS rows (every n-th point, the last one always).
function dataTable(box, points, label) {
  const headers = ['Time', ...GRAPHS.map(([, l]) => l)];
  const { tbody, row } = keptTable(box, null, `The graphs of the last ${label} as numbers`, headers);
  const every = Math.max(1, Math.ceil(points.length / TABLE_ROWS));
  const rows = [];
  for (let i = points.length - 1; i >= 0; i -= every) {
    const p = points[i];
    rows.unshift(row({}, h('th', { scope: 'row' }, timeLabel(p.time)), GRAPHS.map(([key]) => h('td', { class: 'num' }, SERIES[key].fmt(SERIES[key].value(p))))));
  }
  if (!rows.length) rows.push(h('tr', { role: 'row' }, h('td', { role: 'cell', colspan: headers.length, class: 'empty' }, 'No samples yet.')));
  tbody.replaceChildren(...rows);
}

// keptTable is box's table, made once (with the heading title, if any):
// a refresh replaces its rows only, so that the keyboard focus and the
// scroll of its region stay where they were.
function keptTable(box, title, label, headers) {
  const key = JSON.stringify([title, headers]);
  if (box.kept?.key !== key) {
    const [region, tbody, row] = table(label, headers);
    box.kept = { key, region, tbody, row };
    box.replaceChildren(...(title ? [h('h2', {}, title)] : []), region);
  }
  if (box.kept.region.getAttribute('aria-label') !== label) box.kept.region.setAttribute('aria-label', label);
  return box.kept;
}

// dropTable takes box's table away.
function dropTable(box) {
  box.kept = null;
  box.replaceChildren();
}

// nodeTable shows, in a cluster, each node's share now.
function nodeTable(box, nodes) {
  if (!Array.isArray(nodes) || nodes.length < 2) {
    dropTable(box);
    return;
  }
  const { tbody, row } = keptTable(box, 'Nodes', 'Each node now', ['Node', 'Throughput', 'Open connections']);
  tbody.replaceChildren(...nodes.map((n) => {
    const last = (n.points || [])[(n.points || []).length - 1] || {};
    return row({ 'data-node': n.node }, h('th', { scope: 'row' }, n.node), h('td', { class: 'num' }, SERIES.throughput.fmt(SERIES.throughput.value(last))),
      h('td', { class: 'num' }, SERIES.active.fmt(SERIES.active.value(last))));
  }));
}

// upstreamTable shows a row per upstream once the stream has several.
function upstreamTable(box, s) {
  const ups = s.status?.upstreams || [];
  if (ups.length < 2) {
    dropTable(box);
    return;
  }
  const { tbody, row } = keptTable(box, 'Upstreams', 'Upstreams', ['Upstream', 'State', 'Open', 'Total', 'Failed dials', 'Sent', 'Received']);
  tbody.replaceChildren(...ups.map((u) => {
    const addr = hostPort(u.host, u.port);
    return row({ 'data-upstream': addr },
      h('th', { scope: 'row', class: 'addr' }, addr, u.backup ? h('span', { class: 'badge' }, 'backup') : null),
      h('td', { class: `health ${u.healthy ? 'ok' : 'bad'}`, title: u.last_error || '' }, u.healthy ? 'up' : `down${u.last_error ? `: ${u.last_error}` : ''}`),
      h('td', { class: 'num' }, formatCount(u.active_connections ?? 0)),
      h('td', { class: 'num' }, formatCount(u.total_connections ?? 0)),
      h('td', { class: 'num' }, formatCount(u.dial_failures ?? 0)),
      h('td', { class: 'num' }, formatBytes(u.bytes_sent ?? 0)),
      h('td', { class: 'num' }, formatBytes(u.bytes_received ?? 0)));
  }));
}
