// The streams page: every stream with its state and counters, refreshed
// every 2 s while the tab is visible. Rows are updated in place, so a
// refresh neither moves focus nor undoes a switch being toggled.

import { ApiError, del, displayName, get, patch, put, streamBody } from './api.js';
import { confirmDialog, fail, focusHeading, h, heading, poll, say, setText, showWarnings, table } from './dom.js';
import { formatBytes, formatCount, formatWhen, hostPort } from './units.js';

const COUNTERS = [
  ['active_connections', formatCount, 'open connections'],
  ['total_connections', formatCount, 'connections since the last reload'],
  ['blocked_connections', formatCount, 'connections refused by the CIDR lists or max connections since the last reload'],
  ['bytes_sent', formatBytes, 'bytes client → upstream since the last reload'],
  ['bytes_received', formatBytes, 'bytes upstream → client since the last reload'],
];

export async function streamsPage(ctx) {
  const [region, tbody, row] = table('Streams', ['Name', 'Protocol', 'Listen → upstream', 'Enabled', 'Health', 'Active', 'Total', 'Blocked', 'Sent', 'Received', 'Actions']);
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
        r.tr.remove();
        r = null;
      }
      if (!r) {
        r = newRow(s, page);
        rows.set(s.id, r);
      }
      // A list asked for before the row's last change is older than it.
      if (!r.pending && started >= r.settled) update(r, s);
      const at = prev ? prev.nextSibling : tbody.firstChild;
      if (at !== r.tr) tbody.insertBefore(r.tr, at);
      prev = r.tr;
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        r.tr.remove();
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
  // A row per upstream, for a stream with several.
  r.ups = h('ul', { class: 'upstreams', 'data-field': 'upstreams', hidden: true });
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
    h('td', { class: 'addr' }, r.addr, r.down, r.ups),
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
  setText(r.addr, `${hostPort(s.listen_address, s.listen_port)} → ${hostPort(s.upstream_host, s.upstream_port)}`);
  r.down.hidden = !(s.enabled && st.listening === false);
  const ups = st.upstreams || [];
  r.ups.hidden = ups.length === 0;
  if (ups.length) {
    r.ups.replaceChildren(...ups.map((u) => h('li', { class: u.healthy ? 'ok' : 'bad', title: u.last_error || '' },
      `${hostPort(u.host, u.port)}${u.backup ? ' (backup)' : ''}: ${u.healthy ? 'up' : 'down'}, ${u.active_connections} open, ${u.total_connections} total${!u.healthy && u.last_error ? ` (${u.last_error})` : ''}`)));
  }
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
  r.tr.remove();
  page.rows.delete(r.id);
  page.empty.hidden = page.rows.size > 0;
  say(`Deleted ${name}`);
  focusHeading();
}
