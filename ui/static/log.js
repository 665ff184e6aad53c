// One stream's connection log: newest first, 50 entries a page, filtered
// by action.

import { displayName, get } from './api.js';
import { fail, h, heading, setText, table } from './dom.js';
import { formatBytes, formatCount, formatDuration, hostPort } from './units.js';

const PAGE = 50;

export async function logPage(ctx) {
  const s = await get(`streams/${ctx.id}`);
  if (!ctx.alive()) return;
  const name = displayName(s);
  const [region, tbody, tr] = table('Connection log', ['Time', 'Source', 'Action', 'Sent', 'Received', 'Duration', 'Reason']);
  const action = h('select', { id: 'log-action' },
    h('option', { value: '' }, 'All'), h('option', { value: 'allowed' }, 'allowed'), h('option', { value: 'blocked' }, 'blocked'));
  const newer = h('button', { type: 'button' }, 'Newer');
  const older = h('button', { type: 'button' }, 'Older');
  const reload = h('button', { type: 'button' }, 'Refresh');
  const where = h('p', { class: 'sub', 'aria-live': 'polite' });
  ctx.show(
    heading(`Log: ${name}`),
    h('p', { class: 'sub' }, `${hostPort(s.listen_address, s.listen_port)} → ${hostPort(s.upstream_host, s.upstream_port)} · `,
      h('a', { href: `#/streams/${s.id}/active` }, 'Connections'), ' · ', h('a', { href: '#/streams' }, 'All streams')),
    s.log_connections ? null : h('p', { class: 'note' }, 'Connection logging is off for this stream: new connections are not logged. Turn on Log connections in its settings.'),
    h('div', { class: 'toolbar' },
      h('div', { class: 'field inline' }, h('label', { for: 'log-action' }, 'Action'), action),
      h('div', { class: 'pager' }, newer, older, reload)),
    where, region);

  // before is the cursor of the page shown (0: the newest); stack holds
  // the cursors of the newer pages, to go back.
  let before = 0;
  let next = null;
  const stack = [];
  let seq = 0;

  async function load() {
    const my = ++seq;
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (before) q.set('before', String(before));
    if (action.value) q.set('action', action.value);
    let page;
    try {
      page = await get(`streams/${s.id}/connections?${q}`);
    } catch (err) {
      if (my === seq && ctx.alive()) fail(`Could not load the log: ${err.message}`);
      return;
    }
    if (my !== seq || !ctx.alive()) return;
    next = page.next_before;
    const rows = page.entries.map((e) => entry(e, tr));
    if (!rows.length) rows.push(h('tr', { role: 'row' }, h('td', { role: 'cell', colspan: 7, class: 'empty' }, stack.length ? 'No older entries.' : 'No entries.')));
    tbody.replaceChildren(...rows);
    const first = stack.length * PAGE + 1;
    setText(where, page.entries.length ? `Entries ${first}–${first + page.entries.length - 1}, newest first` : '');
    const focused = document.activeElement;
    newer.disabled = stack.length === 0;
    older.disabled = next == null;
    if (focused?.disabled) (newer.disabled ? older.disabled ? reload : older : newer).focus();
  }

  action.addEventListener('change', () => {
    before = 0;
    stack.length = 0;
    load();
  });
  newer.addEventListener('click', () => {
    if (!stack.length) return;
    before = stack.pop();
    load();
  });
  older.addEventListener('click', () => {
    if (next == null) return;
    stack.push(before);
    before = next;
    load();
  });
  reload.addEventListener('click', () => load());
  await load();
}

function entry(e, tr) {
  const time = e.started_at || e.ended_at;
  const source = e.source_port ? hostPort(e.source_ip, e.source_port) : e.source_ip;
  const reason = e.disconnect_reason || '';
  return tr({ class: 'log-row' },
    h('td', { title: `started ${time || '?'}, ended ${e.ended_at || '?'}` }, time ? new Date(time).toLocaleString() : ''),
    h('td', { class: 'addr' }, source),
    h('td', { class: e.action === 'blocked' ? 'bad' : '' }, e.action),
    h('td', { class: 'num', title: `${e.bytes_sent} bytes client → upstream` }, formatBytes(e.bytes_sent), datagrams(e, e.datagrams_sent)),
    h('td', { class: 'num', title: `${e.bytes_received} bytes upstream → client` }, formatBytes(e.bytes_received), datagrams(e, e.datagrams_received)),
    h('td', { class: 'num', title: `${e.duration_ms} ms` }, formatDuration(e.duration_ms)),
    h('td', { title: reason }, reason.replaceAll('_', ' ')));
}

// datagrams is a UDP entry's datagram count, under its bytes.
function datagrams(e, n) {
  if (e.protocol !== 'udp' || n == null) return null;
  return h('span', { class: 'detail', 'data-field': 'datagrams' }, `${formatCount(n)} ${n === 1 ? 'datagram' : 'datagrams'}`);
}
