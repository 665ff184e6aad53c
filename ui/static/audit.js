// The audit trail: every change made through the API, newest first, 50 a
// page, each with who made it and its field-by-field diff; filtered by
// stream (#/audit?stream=4 opens it filtered).

import { get } from './api.js';
import { h, heading, pager, table } from './dom.js';
import { ACTIONS, auditWhat, auditWho, diffRows } from './lists.js';

const PAGE = 50;

export async function auditPage(ctx) {
  const streams = await get('streams').catch(() => []);
  if (!ctx.alive()) return;
  const pick = h('select', { id: 'audit-stream' }, h('option', { value: '' }, 'All'),
    streams.map((s) => h('option', { value: String(s.id) }, `${s.name || `stream-${s.id}`} (${s.id})`)));
  const want = new URLSearchParams(location.hash.split('?')[1] || '').get('stream');
  if (want) {
    if (![...pick.options].some((o) => o.value === want)) pick.append(h('option', { value: want }, `stream ${want} (deleted)`));
    pick.value = want;
  }
  const where = h('p', { class: 'sub', 'aria-live': 'polite' });
  const box = h('div');
  const pages = pager(ctx, {
    size: PAGE, noun: 'Changes', what: 'audit trail', where,
    fetch: (before) => {
      const q = new URLSearchParams({ limit: String(PAGE) });
      if (before) q.set('before', String(before));
      if (pick.value) q.set('stream_id', pick.value);
      return get(`audit?${q}`);
    },
    show,
  });
  ctx.show(
    heading('Audit trail'),
    h('p', { class: 'sub' }, 'Every change made through the API: streams and certificates. Refused writes are not in it; secrets never are.'),
    h('div', { class: 'toolbar' },
      h('div', { class: 'filters' }, h('div', { class: 'field inline' }, h('label', { for: 'audit-stream' }, 'Stream'), pick)),
      h('div', { class: 'pager' }, pages.newer, pages.older, pages.reload)),
    where, box);

  function show(entries, first) {
    const withNode = entries.some((e) => e.node);
    const headers = ['Time', ...(withNode ? ['Node'] : []), 'Who', 'Action', 'What', 'Changes'];
    const [region, tbody, row] = table('Audit trail', headers);
    const rows = entries.map((e) => row({ class: 'audit-row', 'data-action': e.action, 'data-audit-id': e.id },
      h('td', { title: e.time }, e.time ? new Date(e.time).toLocaleString() : ''),
      withNode ? h('td', {}, e.node || '') : null,
      h('td', {}, auditWho(e)),
      h('td', { class: e.action === 'delete' || e.action === 'cert_delete' ? 'bad' : '' }, ACTIONS[e.action] || e.action),
      h('th', { scope: 'row' }, e.stream_id && !String(e.action).startsWith('cert_') && e.action !== 'delete'
        ? h('a', { href: `#/streams/${e.stream_id}/view` }, auditWhat(e)) : auditWhat(e)),
      h('td', { class: 'diff' }, diff(e))));
    if (!rows.length) rows.push(h('tr', { role: 'row' }, h('td', { role: 'cell', colspan: headers.length, class: 'empty' }, first ? 'No changes yet.' : 'No older entries.')));
    tbody.replaceChildren(...rows);
    box.replaceChildren(region);
  }

  pick.addEventListener('change', () => pages.restart());
  await pages.load();
}

// diff is an entry's changes as a list: field, from → to; a create shows
// the new values alone, a delete the old ones.
function diff(e) {
  const rows = diffRows(e);
  if (!rows.length) return '';
  const made = e.action === 'create' || e.action === 'cert_create';
  const gone = e.action === 'delete' || e.action === 'cert_delete';
  return h('ul', { class: 'changes' }, rows.map(([field, from, to]) => h('li', { 'data-field': field },
    h('span', { class: 'field-name' }, field), ': ',
    made ? null : h('del', {}, from), made || gone ? null : ' → ', gone ? null : h('ins', {}, to))));
}
