// The streams page: every stream with its state and counters, refreshed
// every 2 s while the tab is visible. Rows are updated in place, so a
// refresh neither moves focus nor undoes a switch being toggled. The list
// filters (name, port, upstream, protocol, state) and sorts by any column;
// streams selected together are enabled, disabled or deleted one request
// each, with a summary; Export and Import read and write the file of
// aegis streams export.

import { ApiError, del, displayName, get, patch, put, request, streamBody } from './api.js';
import { confirmDialog, fail, focusHeading, h, heading, poll, say, setText, showWarnings, table, unfail } from './dom.js';
import { exportFile, exportName, importPlan, matchStream, sortStreams } from './lists.js';
import { formatBytes, formatCount, formatWhen, hostPort, listenText, upstreamText } from './units.js';

// SORTS are the sort keys (lists.js SORT_KEYS) of the columns, by index.
const SORTS = ['name', 'protocol', 'listen', 'enabled', 'health', 'active', 'total', 'blocked', 'sent', 'received'];

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
  const none = h('p', { class: 'empty', hidden: true }, 'No stream matches the filter.');
  const page = { rows: new Map(), gone: new Set(), empty, row, sort: '', asc: true };
  const { rows } = page;
  let lastError = '';

  // The filter: applied as you type, to the last list fetched.
  const input = (id, label, props) => h('div', { class: 'field inline' }, h('label', { for: id }, label), h('input', { type: 'text', id, autocomplete: 'off', ...props }));
  const select = (id, label, options) => h('div', { class: 'field inline' }, h('label', { for: id }, label),
    h('select', { id }, options.map(([v, t]) => h('option', { value: v }, t))));
  const filterForm = h('form', { class: 'filters', 'aria-label': 'Filter the streams', onsubmit: (e) => e.preventDefault() },
    input('f-name', 'Name', { size: 12 }), input('f-port', 'Port', { size: 6, inputmode: 'numeric' }), input('f-upstream', 'Upstream', { size: 14 }),
    select('f-protocol', 'Protocol', [['', 'Any'], ['tcp', 'tcp'], ['udp', 'udp'], ['tcp+udp', 'tcp+udp']]),
    select('f-state', 'State', [['', 'Any'], ['up', 'up'], ['down', 'not listening'], ['unhealthy', 'unhealthy'], ['disabled', 'disabled']]));
  const filter = () => ({
    name: filterForm.querySelector('#f-name').value,
    port: filterForm.querySelector('#f-port').value,
    upstream: filterForm.querySelector('#f-upstream').value,
    protocol: filterForm.querySelector('#f-protocol').value,
    state: filterForm.querySelector('#f-state').value,
  });
  filterForm.addEventListener('input', () => arrange());

  // Sorting: each column's header is a button; a second press reverses.
  const ths = [...region.querySelectorAll('thead th')];
  SORTS.forEach((key, i) => {
    const th = ths[i];
    // The arrow is for the eyes; aria-sort says it to screen readers.
    const arrow = h('span', { class: 'arrow', 'aria-hidden': 'true' });
    const b = h('button', { type: 'button', class: 'sort' }, th.textContent, arrow);
    b.addEventListener('click', () => {
      page.asc = page.sort === key ? !page.asc : true;
      page.sort = key;
      for (const a of region.querySelectorAll('thead .arrow')) a.textContent = '';
      for (const t of ths) t.removeAttribute('aria-sort');
      th.setAttribute('aria-sort', page.asc ? 'ascending' : 'descending');
      arrow.textContent = page.asc ? ' ▲' : ' ▼';
      arrange();
    });
    th.replaceChildren(b);
  });

  // Selection and bulk actions.
  const all = h('input', { type: 'checkbox', id: 'select-all' });
  const count = h('span', { class: 'sub', 'aria-live': 'polite' });
  const bulk = (label, fn, cls) => h('button', { type: 'button', class: cls, disabled: true, onclick: fn }, label);
  const enableB = bulk('Enable', () => runBulk('enable'));
  const disableB = bulk('Disable', () => runBulk('disable'));
  const deleteB = bulk('Delete', () => runBulk('delete'), 'danger');
  const results = h('div', { class: 'results', hidden: true, role: 'group', 'aria-label': 'Result of the last action' });
  page.selectionChanged = () => {
    const n = [...rows.values()].filter((r) => r.pick.checked && !r.tr.hidden).length;
    setText(count, n ? `${n} selected` : '');
    for (const b of [enableB, disableB, deleteB]) b.disabled = !n;
    const pickable = [...rows.values()].filter((r) => !r.tr.hidden && !r.pick.disabled);
    all.checked = pickable.length > 0 && pickable.every((r) => r.pick.checked);
  };
  all.addEventListener('change', () => {
    for (const r of rows.values()) if (!r.tr.hidden && !r.pick.disabled) r.pick.checked = all.checked;
    page.selectionChanged();
  });

  // Export and import.
  const exportB = h('button', { type: 'button', onclick: () => exportStreams() }, 'Export');
  const file = h('input', { type: 'file', id: 'import-file', accept: '.json,application/json', hidden: true, 'aria-label': 'Export file to import' });
  const importB = h('button', { type: 'button', onclick: () => file.click() }, 'Import');
  file.addEventListener('change', () => importStreams());

  ctx.show(
    h('div', { class: 'page-head' }, heading('Streams'),
      h('div', { class: 'head-actions' }, exportB, importB, file, h('a', { href: '#/streams/new', class: 'button primary' }, 'New stream'))),
    filterForm,
    h('div', { class: 'toolbar bulk' },
      h('div', { class: 'field check' }, all, h('label', { for: 'select-all' }, 'Select all shown')),
      h('div', { class: 'pager' }, count, enableB, disableB, deleteB)),
    results, region, empty, none);

  // arrange shows the rows that pass the filter, in the sort's order,
  // each stream's upstream rows after it.
  function arrange() {
    const f = filter();
    const order = sortStreams([...rows.values()].map((r) => r.data), page.sort, page.asc);
    let prev = null;
    let shown = 0;
    for (const s of order) {
      const r = rows.get(s.id);
      const on = matchStream(r.data, f);
      shown += on;
      for (const tr of [r.tr, ...[...r.upRows.values()].map((u) => u.tr)]) {
        tr.hidden = !on;
        const at = prev ? prev.nextSibling : tbody.firstChild;
        if (at !== tr) tbody.insertBefore(tr, at);
        prev = tr;
      }
    }
    none.hidden = !rows.size || shown > 0;
    page.selectionChanged();
  }

  function showResults(title, lines) {
    results.replaceChildren(h('p', {}, title), h('ul', {}, lines.map(([ok, text]) => h('li', { class: ok ? 'ok' : 'bad' }, text))),
      h('button', { type: 'button', class: 'small', onclick: () => { results.hidden = true; focusHeading(); } }, 'Dismiss'));
    results.hidden = false;
  }

  const VERBS = { enable: 'enabled', disable: 'disabled', delete: 'deleted' };

  async function runBulk(what) {
    const chosen = [...rows.values()].filter((r) => r.pick.checked && !r.tr.hidden);
    if (!chosen.length) return;
    const done = VERBS[what];
    if (what === 'delete') {
      const ok = await confirmDialog({
        title: 'Delete streams',
        text: `Delete ${chosen.length} ${chosen.length === 1 ? 'stream' : 'streams'} (${chosen.map((r) => displayName(r.data)).join(', ')})? They stop listening, their open connections close and their settings are gone.`,
        confirm: `Delete ${chosen.length}`,
      });
      if (!ok) return;
    }
    const lines = [];
    let good = 0;
    for (const r of chosen) {
      const name = displayName(r.data);
      r.pending = true;
      try {
        if (what === 'delete') {
          await del(`streams/${r.id}`, r.data.version);
          page.gone.add(r.id);
          removeRow(r);
          rows.delete(r.id);
        } else {
          const s = await patch(`streams/${r.id}`, { enabled: what === 'enable' }, r.data.version);
          update(r, s);
          r.pick.checked = false; // done; one that failed stays selected, to try again
        }
        good++;
        lines.push([true, `${name}: ${done}`]);
      } catch (err) {
        lines.push([false, `${name}: not ${done}: ${err.message}`]);
      } finally {
        r.pending = false;
        r.settled = performance.now();
      }
    }
    const title = `${done[0].toUpperCase()}${done.slice(1)} ${good} of ${chosen.length} ${chosen.length === 1 ? 'stream' : 'streams'}${good < chosen.length ? `; ${chosen.length - good} could not be ${done}` : ''}.`;
    if (good === chosen.length) say(title);
    else fail(title);
    showResults(title, lines);
    empty.hidden = rows.size > 0;
    arrange();
  }

  async function exportStreams() {
    try {
      const data = exportFile(await get('streams'), `the web UI at ${location.host}`);
      const url = URL.createObjectURL(new Blob([`${JSON.stringify(data, null, 2)}\n`], { type: 'application/json' }));
      const a = h('a', { href: url, download: exportName(), hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
      say(`Exported ${data.streams.length} ${data.streams.length === 1 ? 'stream' : 'streams'} to ${exportName()}`);
    } catch (err) {
      fail(`Could not export: ${err.message}`);
    }
  }

  async function importStreams() {
    const f = file.files[0];
    file.value = '';
    if (!f) return;
    let plan;
    try {
      plan = importPlan(await f.text(), await get('streams'));
    } catch (err) {
      fail(`Could not import ${f.name}: ${err.message}`);
      return;
    }
    if (plan.error) {
      fail(`Could not import ${f.name}: ${plan.error}`);
      return;
    }
    const { steps, skipped } = plan;
    const ok = await confirmDialog({
      title: 'Import streams',
      text: `Import ${steps.length} ${steps.length === 1 ? 'stream' : 'streams'} from ${f.name}? A stream whose id exists here is replaced; the others are added with new ids.`,
      confirm: 'Import',
    });
    if (!ok) return;
    const lines = [];
    let good = 0;
    for (const st of steps) {
      try {
        const s = await request(st.method, st.path, st.body);
        good++;
        lines.push([true, `${st.name}: ${st.method === 'PUT' ? 'replaced' : `added as stream ${s?.id ?? ''}`}`.trim()]);
      } catch (err) {
        lines.push([false, `${st.name}: not imported: ${err.message}`]);
      }
    }
    for (const sk of skipped) lines.push([false, `${sk}: skipped`]);
    const title = `Imported ${good} of ${steps.length} ${steps.length === 1 ? 'stream' : 'streams'} from ${f.name}.`;
    if (good === steps.length) say(title);
    else fail(title);
    showResults(title, lines);
    await refresh();
  }

  async function refresh() {
    const started = performance.now();
    let list;
    try {
      list = await get('streams');
    } catch (err) {
      const msg = `Could not load the streams: ${err.message}`;
      if (ctx.alive() && msg !== lastError) fail(msg);
      lastError = msg;
      return;
    }
    if (!ctx.alive()) return;
    unfail(lastError);
    lastError = '';
    const seen = new Set();
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
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        removeRow(r);
        rows.delete(id);
      }
    }
    empty.hidden = rows.size > 0;
    arrange();
  }

  await poll(ctx, refresh);
}

function newRow(s, page) {
  const id = s.id;
  const config = s.source === 'config';
  const r = { id, source: s.source, pending: false, settled: 0, data: s };
  r.name = h('span', { class: 'name' });
  // The box that selects it for a bulk action; a config stream's cannot.
  r.pick = h('input', { type: 'checkbox', class: 'pick', disabled: config, onchange: () => page.selectionChanged() });
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
  const actions = [h('a', { href: `#/streams/${id}/view` }, 'View'), h('a', { href: `#/streams/${id}/active` }, 'Connections'), h('a', { href: `#/streams/${id}/log` }, 'Log')];
  if (!config) {
    actions.unshift(h('a', { href: `#/streams/${id}` }, 'Edit'));
    actions.push(h('button', { type: 'button', class: 'danger small', onclick: () => remove(r, page) }, 'Delete'));
  }
  r.tr = page.row({ 'data-stream-id': id },
    h('th', { scope: 'row' }, r.pick, ' ', r.name,
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
  if (r.pick.getAttribute('aria-label') !== `Select ${name}`) r.pick.setAttribute('aria-label', `Select ${name}`);
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
