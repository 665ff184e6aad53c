// The streams page: every stream with its state and counters, refreshed
// every 2 s while the tab is visible. Rows are updated in place, so a
// refresh neither moves focus nor undoes a switch being toggled.

import { ApiError, del, displayName, get, patch, put, streamBody } from './api.js';
import { confirmDialog, fail, focusHeading, h, heading, poll, say, setText, showWarnings, table } from './dom.js';
import { formatBytes, formatCount, formatWhen, hostPort, listenText, upstreamText } from './units.js';

const HEADERS = ['Name', 'Protocol', 'Listen → upstream', 'Enabled', 'Health', 'Active', 'Total', 'Blocked', 'Sent', 'Received', 'Actions'];

const COUNTERS = [
  ['active_connections', formatCount, 'open connections'],
  ['total_connections', formatCount, 'connections since the last reload'],
  ['blocked_connections', formatCount, 'connections refused by the CIDR lists or max connections since the last reload'],
  ['bytes_sent', formatBytes, 'bytes client → upstream since the last reload'],
  ['bytes_received', formatBytes, 'bytes upstream → client since the last reload'],
];

export async function streamsPage(ctx) {
  const [region, tbody, row] = table('Streams', HEADERS);
  const empty = h('p', { class: 'empty', hidden: true }, 'No streams yet.');
  ctx.show(
    h('div', { class: 'page-head' }, heading('Streams'), h('a', { href: '#/streams/new', class: 'button primary' }, 'New stream')),
    region, empty);

  const page = { rows: new Map(), gone: new Set(), empty, row };
  const { rows } = page;
  let lastError = '';

  async function refresh() {
    const started = performance.now();
    let list;
    try {
      list = await get('streams');
    } catch (err) {
      if (ctx.alive() && err.message !== lastError) fail(`Could not load the streams: ${err.message}`);
      lastError = err.message;
      return;
    }
    if (!ctx.alive()) return;
    if (lastError) {
      const a = document.getElementById('alert');
      if (a.textContent.startsWith('Could not load the streams')) a.textContent = '';
      lastError = '';
    }
    const seen = new Set();
    let prev = null;
    for (const s of list) {
      if (page.gone.has(s.id)) continue; // deleted while this list was on its way
      seen.add(s.id);
      let r = rows.get(s.id);
      if (r && r.source !== s.source) {
        removeRow(r);
        r = null;
      }
      if (!r) {
        r = newRow(s, page);
        rows.set(s.id, r);
      }
      // A list asked for before the row's last change is older than it.
      if (!r.pending && started >= r.settled) update(r, s);
      // The stream's row, then a row per upstream.
      for (const tr of [r.tr, ...[...r.upRows.values()].map((u) => u.tr)]) {
        const at = prev ? prev.nextSibling : tbody.firstChild;
        if (at !== tr) tbody.insertBefore(tr, at);
        prev = tr;
      }
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        removeRow(r);
        rows.delete(id);
      }
    }
    empty.hidden = rows.size > 0;
  }

  await poll(ctx, refresh);
}

function newRow(s, page) {
  const id = s.id;
  const config = s.source === 'config';
  const r = { id, source: s.source, pending: false, settled: 0, data: s };
  r.name = h('span', { class: 'name' });
  r.proto = h('td');
  r.addr = h('span');
  r.down = h('span', { class: 'note', hidden: true }, ' not listening');
  r.sni = h('span', { class: 'detail', 'data-field': 'sni', hidden: true });
  // A row per upstream, for a stream with upstreams, after the stream's.
  r.upRows = new Map();
  // The switch's state in words too; a config stream's says why it is
  // fixed.
  const why = config ? h('span', { id: `why-${id}`, class: 'why' }, 'set in the Caddy config') : null;
  r.sw = h('input', { type: 'checkbox', class: 'switch', disabled: config, 'aria-describedby': why && why.id });
  r.swState = h('span', { class: 'sw-state', 'aria-hidden': 'true' });
  // Health: the state, then the last check's error and time.
  r.healthState = h('span', { class: 'state' });
  r.healthError = h('span', { class: 'detail', 'data-field': 'health_error', hidden: true });
  r.healthWhen = h('span', { class: 'detail when', 'data-field': 'last_health_check', hidden: true });
  r.health = h('td', { 'data-field': 'health', class: 'health' }, r.healthState, r.healthError, r.healthWhen);
  r.counters = COUNTERS.map(([field]) => h('td', { 'data-field': field, class: 'num' }));
  const actions = [h('a', { href: `#/streams/${id}/active` }, 'Connections'), h('a', { href: `#/streams/${id}/log` }, 'Log')];
  if (!config) {
    actions.unshift(h('a', { href: `#/streams/${id}` }, 'Edit'));
    actions.push(h('button', { type: 'button', class: 'danger small', onclick: () => remove(r, page) }, 'Delete'));
  }
  r.tr = page.row({ 'data-stream-id': id },
    h('th', { scope: 'row' }, r.name,
      config ? h('span', { class: 'badge', title: 'Defined in the Caddy config: change it there' }, 'config') : null),
    r.proto,
    h('td', { class: 'addr' }, r.addr, r.down, r.sni),
    h('td', { class: 'enabled', 'data-field': 'enabled' }, r.sw, r.swState, why),
    r.health,
    r.counters,
    h('td', { class: 'actions' }, actions));
  // A click while the previous change is on its way does nothing.
  r.sw.addEventListener('click', (e) => {
    if (r.pending) e.preventDefault();
  });
  r.sw.addEventListener('change', () => toggle(r));
  return r;
}

function update(r, s) {
  r.data = s;
  const st = s.status || {};
  const name = displayName(s);
  setText(r.name, name);
  setText(r.proto, s.protocol || 'tcp');
  setText(r.addr, `${listenText(s)} → ${upstreamText(s)}`);
  r.down.hidden = !(s.enabled && st.listening === false);
  const names = Array.isArray(s.sni) ? s.sni : [];
  setText(r.sni, names.length ? `SNI: ${names.join(', ')}` : '');
  r.sni.hidden = !names.length;
  updateUpstreams(r, Array.isArray(st.upstreams) ? st.upstreams : [], name);
  r.down.title = 'Enabled, but its port is not open: see the Caddy log';
  if (r.sw.getAttribute('aria-label') !== `Enabled: ${name}`) r.sw.setAttribute('aria-label', `Enabled: ${name}`);
  r.sw.checked = !!s.enabled;
  setText(r.swState, s.enabled ? 'on' : 'off');
  r.swState.className = `sw-state ${s.enabled ? 'on' : 'off'}`;

  const [text, cls, title] = health(s, st);
  setText(r.healthState, text);
  if (r.health.title !== title) r.health.title = title;
  r.health.className = `health ${cls}`;
  const error = st.health_status === 'unhealthy' ? st.last_health_error || 'no answer' : '';
  setText(r.healthError, error);
  r.healthError.hidden = !error;
  const checked = st.last_health_check && (st.health_status === 'healthy' || st.health_status === 'unhealthy');
  setText(r.healthWhen, checked ? `checked ${formatWhen(st.last_health_check)}` : '', checked ? st.last_health_check : '');
  r.healthWhen.hidden = !checked;
  COUNTERS.forEach(([field, fmt, what], i) => {
    const n = st[field] ?? 0;
    setText(r.counters[i], fmt(n), `${n} ${what}`);
  });
}

// removeRow takes a stream's row and its upstreams' rows off the page.
function removeRow(r) {
  r.tr.remove();
  for (const u of r.upRows.values()) u.tr.remove();
}

// updateUpstreams keeps a row per upstream of a stream, in the status's
// order: host:port, backup, up or down with the last error, its
// connections and bytes. The refresh puts them after the stream's row.
function updateUpstreams(r, ups, name) {
  const seen = new Set();
  const next = new Map();
  for (const u of ups) {
    const addr = hostPort(u.host, u.port);
    if (seen.has(addr)) continue;
    seen.add(addr);
    const row = r.upRows.get(addr) || upstreamRow(r.id, addr);
    next.set(addr, row);
    setText(row.label, `${name}: upstream ${addr}`);
    row.backup.hidden = !u.backup;
    setText(row.state, u.healthy ? 'up' : 'down');
    row.health.className = `health ${u.healthy ? 'ok' : 'bad'}`;
    const error = u.healthy ? '' : u.last_error || 'its last dial failed';
    setText(row.error, error);
    row.error.hidden = !error;
    const fails = u.dial_failures ?? 0;
    setText(row.fails, fails ? `${formatCount(fails)} failed ${fails === 1 ? 'dial' : 'dials'}` : '', fails ? `${fails} dials to this upstream failed since the stream started` : '');
    row.fails.hidden = !fails;
    if (row.health.title !== (u.last_error || '')) row.health.title = u.last_error || '';
    const n = (f) => u[f] ?? 0;
    setText(row.active, formatCount(n('active_connections')), `${n('active_connections')} open connections to this upstream`);
    setText(row.total, formatCount(n('total_connections')), `${n('total_connections')} connections to this upstream since the stream started`);
    setText(row.sent, formatBytes(n('bytes_sent')), `${n('bytes_sent')} bytes client → this upstream since the stream started`);
    setText(row.received, formatBytes(n('bytes_received')), `${n('bytes_received')} bytes this upstream → client since the stream started`);
  }
  for (const [addr, row] of r.upRows) {
    if (!next.has(addr)) row.tr.remove();
  }
  r.upRows = next;
}

// upstreamRow is the row of one upstream under its stream's row. Its
// first cell spans the name, protocol and address columns; the cells line
// up with the stream's health and counters.
function upstreamRow(id, addr) {
  const u = {};
  const cell = (tag, label, props = {}, ...children) => h(tag, { ...props, 'data-label': label, role: tag === 'th' ? 'rowheader' : 'cell' }, ...children);
  // The stream's name for screen readers, which read the row alone.
  u.label = h('span', { class: 'visually-hidden' });
  u.backup = h('span', { class: 'badge' }, 'backup');
  u.state = h('span', { class: 'state' });
  u.error = h('span', { class: 'detail', 'data-field': 'last_error', hidden: true });
  u.fails = h('span', { class: 'detail when', 'data-field': 'dial_failures', hidden: true });
  u.health = cell('td', HEADERS[4], { 'data-field': 'health' }, u.state, u.error, u.fails);
  u.active = cell('td', HEADERS[5], { class: 'num', 'data-field': 'active_connections' });
  u.total = cell('td', HEADERS[6], { class: 'num', 'data-field': 'total_connections' });
  u.sent = cell('td', HEADERS[8], { class: 'num', 'data-field': 'bytes_sent' });
  u.received = cell('td', HEADERS[9], { class: 'num', 'data-field': 'bytes_received' });
  u.tr = h('tr', { class: 'upstream', role: 'row', 'data-upstream-of': id, 'data-upstream': addr },
    cell('th', 'Upstream', { scope: 'row', colspan: 3, class: 'addr' }, u.label, h('span', { 'aria-hidden': 'true' }, `↳ ${addr}`), u.backup),
    cell('td', HEADERS[3]), u.health, u.active, u.total, cell('td', HEADERS[7]), u.sent, u.received, cell('td', HEADERS[10]));
  return u;
}

function health(s, st) {
  const when = st.last_health_check ? ` (checked ${new Date(st.last_health_check).toLocaleString()})` : '';
  switch (st.health_status) {
    case 'healthy':
      return ['healthy', 'ok', `The upstream answered${when}`];
    case 'unhealthy':
      return ['unhealthy', 'bad', `${st.last_health_error || 'The upstream did not answer'}${when}`];
    case 'pending':
      return ['not checked', 'none', 'Health checks are on; the first has not run yet'];
  }
  if (!s.health_check_enabled) return ['not checked', 'none', 'Health checks are off'];
  if (!s.enabled) return ['not checked', 'none', 'The stream is disabled'];
  return ['not checked', 'none', 'A UDP-only stream is not checked: a TCP dial says nothing about it'];
}

async function toggle(r) {
  const want = r.sw.checked;
  const name = displayName(r.data);
  r.pending = true;
  r.sw.setAttribute('aria-busy', 'true');
  try {
    let s;
    try {
      s = await patch(`streams/${r.id}`, { enabled: want }, r.data.version);
    } catch (err) {
      // A server without PATCH: the whole stream, as it was read.
      if (!(err instanceof ApiError && err.status === 405)) throw err;
      s = await put(`streams/${r.id}`, { ...streamBody(r.data), enabled: want }, r.data.version);
    }
    r.pending = false;
    r.settled = performance.now();
    update(r, s);
    const done = `${want ? 'Enabled' : 'Disabled'} ${name}`;
    say(done);
    showWarnings(done, s.warnings);
  } catch (err) {
    r.pending = false;
    r.settled = performance.now();
    r.sw.checked = !want;
    fail(`Could not ${want ? 'enable' : 'disable'} ${name}: ${err.message}`);
    // Changed meanwhile: show it as it is now.
    if (err instanceof ApiError && err.status === 412) get(`streams/${r.id}`).then((s) => r.pending || update(r, s), () => {});
  } finally {
    r.sw.removeAttribute('aria-busy');
  }
}

async function remove(r, page) {
  const s = r.data;
  const name = displayName(s);
  const ok = await confirmDialog({
    title: 'Delete stream',
    text: `Delete stream "${name}"? It stops listening on ${hostPort(s.listen_address, s.listen_port)}, its open connections close and its settings are gone.`,
    confirm: 'Delete',
  });
  if (!ok) return;
  try {
    await del(`streams/${r.id}`, s.version);
  } catch (err) {
    fail(`Could not delete ${name}: ${err.message}`);
    return;
  }
  page.gone.add(r.id);
  removeRow(r);
  page.rows.delete(r.id);
  page.empty.hidden = page.rows.size > 0;
  say(`Deleted ${name}`);
  focusHeading();
}
