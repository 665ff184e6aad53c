// The cluster page: the nodes that share this node's storage (GET
// /api/v1/cluster), each with its state, last heartbeat, the changes it
// applied, and the streams it runs with their health; refreshed every 2 s
// while the tab is visible, rows updated in place.

import { get } from './api.js';
import { fail, h, heading, poll, setText, table } from './dom.js';
import { formatAgo, formatCount, nodeState, storageText } from './units.js';

export async function clusterPage(ctx) {
  const about = h('p', { class: 'sub', 'data-field': 'storage' });
  // Why only this node shows, while the database cannot be read.
  const problem = h('p', { class: 'note bad', 'data-field': 'cluster_error', hidden: true });
  const nodesBox = h('div');
  const streamsBox = h('div');
  ctx.show(heading('Cluster'), about, problem, nodesBox, streamsBox);

  let shape = ''; // the storage the tables are built for
  let nodes; // the nodes table: {tbody, row, rows: Map}
  const sections = new Map(); // a node's streams, by node name
  let lastError = '';

  function build(shared) {
    const headers = shared ? ['Node', 'Status', 'Last seen', 'Applied change', 'Lag', 'Streams'] : ['Node', 'Status', 'Last seen', 'Streams'];
    const [region, tbody, row] = table('Nodes', headers);
    nodes = { tbody, row, rows: new Map(), shared };
    nodesBox.replaceChildren(region);
    for (const s of sections.values()) s.section.remove();
    sections.clear();
  }

  async function refresh() {
    let view;
    try {
      view = await get('cluster');
    } catch (err) {
      if (ctx.alive() && err.message !== lastError) fail(`Could not load the cluster: ${err.message}`);
      lastError = err.message;
      return;
    }
    if (!ctx.alive()) return;
    if (lastError) {
      const a = document.getElementById('alert');
      if (a.textContent.startsWith('Could not load the cluster')) a.textContent = '';
      lastError = '';
    }
    const storage = view.storage || '';
    if (storage !== shape || !nodes) {
      shape = storage;
      build(storage === 'postgres');
    }
    setText(about, `Storage: ${storageText(storage)}. This page is served by node ${view.node}.`);
    const error = view.error ? `The database cannot be read, so only this node is shown: ${view.error}` : '';
    setText(problem, error);
    problem.hidden = !error;

    const now = Date.now();
    const list = Array.isArray(view.nodes) ? view.nodes : [];
    const seen = new Set();
    let prev = null;
    let prevSection = null;
    for (const n of list) {
      seen.add(n.name);
      let r = nodes.rows.get(n.name);
      if (!r) {
        r = nodeRow(n, nodes);
        nodes.rows.set(n.name, r);
      }
      updateNode(r, n, view, now, nodes.shared);
      const at = prev ? prev.nextSibling : nodes.tbody.firstChild;
      if (at !== r.tr) nodes.tbody.insertBefore(r.tr, at);
      prev = r.tr;

      let sec = sections.get(n.name);
      if (!sec) {
        sec = streamsSection(n.name);
        sections.set(n.name, sec);
      }
      updateStreams(sec, n, now);
      const next = prevSection ? prevSection.nextSibling : streamsBox.firstChild;
      if (next !== sec.section) streamsBox.insertBefore(sec.section, next);
      prevSection = sec.section;
    }
    for (const [name, r] of nodes.rows) {
      if (!seen.has(name)) {
        r.tr.remove();
        nodes.rows.delete(name);
      }
    }
    for (const [name, sec] of sections) {
      if (!seen.has(name)) {
        sec.section.remove();
        sections.delete(name);
      }
    }
  }

  await poll(ctx, refresh);
}

function nodeRow(n, t) {
  const r = {};
  r.name = h('span');
  r.self = h('span', { class: 'badge', hidden: true }, 'this node');
  r.stateText = h('span', { class: 'state' });
  r.stateWhy = h('span', { class: 'detail' });
  r.state = h('td', { class: 'health', 'data-field': 'status' }, r.stateText, r.stateWhy);
  r.seen = h('td', { 'data-field': 'last_seen' });
  r.applied = h('td', { class: 'num', 'data-field': 'applied_change' });
  r.lag = h('td', { class: 'num', 'data-field': 'lag' });
  r.streams = h('td', { 'data-field': 'streams' });
  r.tr = t.row({ 'data-node': n.name },
    h('th', { scope: 'row' }, r.name, r.self),
    r.state, r.seen,
    t.shared ? [r.applied, r.lag] : null,
    r.streams);
  return r;
}

function updateNode(r, n, view, now, shared) {
  setText(r.name, n.name);
  r.self.hidden = n.name !== view.node;
  const [text, cls, why] = nodeState(n);
  setText(r.stateText, text);
  r.state.className = `health ${cls}`;
  if (r.state.title !== why) r.state.title = why;
  // A node that is not up says why in words, not only by its colour.
  setText(r.stateWhy, cls === 'ok' ? '' : n.status === 'stale' ? 'no heartbeat' : 'runs from its snapshot');
  r.stateWhy.hidden = cls === 'ok';
  r.tr.className = cls === 'ok' ? '' : `node-${cls}`;
  setText(r.seen, formatAgo(n.last_seen, now), n.last_seen ? new Date(n.last_seen).toLocaleString() : '');
  if (shared) {
    setText(r.applied, formatCount(n.applied_change ?? 0), `the last change it applied; the newest is ${view.last_change}`);
    const lag = n.lag ?? 0;
    setText(r.lag, lag ? `${formatCount(lag)} behind` : 'none', `${lag} changes not applied yet`);
    r.lag.className = lag ? 'num warn' : 'num';
  }
  const streams = Array.isArray(n.streams) ? n.streams : [];
  const bad = streams.filter((s) => s.health_status === 'unhealthy' || !s.listening).length;
  setText(r.streams, `${streams.length === 1 ? '1 stream' : `${streams.length} streams`}${bad ? `, ${bad} with a problem` : ''}`);
}

let sectionIds = 0;

// streamsSection is a node's streams: a heading and a table.
function streamsSection(name) {
  const id = `node-streams-${++sectionIds}`;
  const [region, tbody, row] = table(`Streams on ${name}`, ['Stream', 'Protocol', 'Listening', 'Health', 'Active', 'Total']);
  const empty = h('p', { class: 'empty', hidden: true }, 'No streams on this node.');
  // A node that is not up shows its streams as it last reported them.
  const old = h('p', { class: 'sub', 'data-field': 'reported', hidden: true });
  const section = h('section', { class: 'node-streams', 'aria-labelledby': id, 'data-node': name },
    h('h2', { id }, `Streams on ${name}`), old, region, empty);
  return { section, region, tbody, row, empty, old, rows: new Map() };
}

function updateStreams(sec, n, now) {
  const list = Array.isArray(n.streams) ? n.streams : [];
  const old = n.status === 'stale' ? `As it last reported them, ${formatAgo(n.last_seen, now)}.` : '';
  setText(sec.old, old);
  sec.old.hidden = !old;
  const seen = new Set();
  let prev = null;
  for (const s of list) {
    seen.add(s.id);
    let r = sec.rows.get(s.id);
    if (!r) {
      r = { name: h('span'), proto: h('td'), listening: h('td', { 'data-field': 'listening' }), active: h('td', { class: 'num', 'data-field': 'active_connections' }), total: h('td', { class: 'num', 'data-field': 'total_connections' }) };
      r.healthState = h('span', { class: 'state' });
      r.healthWhy = h('span', { class: 'detail', hidden: true });
      r.health = h('td', { class: 'health', 'data-field': 'health' }, r.healthState, r.healthWhy);
      r.tr = sec.row({ 'data-stream-id': s.id }, h('th', { scope: 'row' }, r.name), r.proto, r.listening, r.health, r.active, r.total);
      sec.rows.set(s.id, r);
    }
    setText(r.name, s.name || `stream-${s.id}`);
    setText(r.proto, s.protocol || 'tcp');
    setText(r.listening, s.listening ? 'yes' : 'no');
    r.listening.className = s.listening ? '' : 'bad';
    const [text, cls, why] = streamHealth(s);
    setText(r.healthState, text);
    r.health.className = `health ${cls}`;
    setText(r.healthWhy, why);
    r.healthWhy.hidden = !why;
    setText(r.active, formatCount(s.active_connections ?? 0), `${s.active_connections ?? 0} open connections`);
    setText(r.total, formatCount(s.total_connections ?? 0), `${s.total_connections ?? 0} connections since the last reload`);
    const at = prev ? prev.nextSibling : sec.tbody.firstChild;
    if (at !== r.tr) sec.tbody.insertBefore(r.tr, at);
    prev = r.tr;
  }
  for (const [id, r] of sec.rows) {
    if (!seen.has(id)) {
      r.tr.remove();
      sec.rows.delete(id);
    }
  }
  sec.empty.hidden = sec.rows.size > 0;
  sec.region.hidden = sec.rows.size === 0;
}

// streamHealth is a stream's health as this node sees it: [text, class,
// detail].
function streamHealth(s) {
  const ups = Array.isArray(s.upstreams) ? s.upstreams : [];
  const upCount = ups.length ? `${ups.filter((u) => u.healthy).length} of ${ups.length} upstreams up` : '';
  switch (s.health_status) {
    case 'healthy':
      return ['healthy', 'ok', upCount];
    case 'unhealthy':
      return ['unhealthy', 'bad', [s.last_health_error || 'no answer', upCount].filter(Boolean).join('; ')];
    case 'pending':
      return ['not checked yet', 'none', upCount];
  }
  return ['not checked', 'none', upCount];
}
