// One stream's connection log: newest first, 50 entries a page, filtered
// on the server by source (IP or CIDR), action, disconnect reason, time
// range and, with several nodes, the node that took the connection; a
// link downloads what is filtered as CSV. The stream page shows it too
// (ctx.embedded: an h2 instead of the page's h1).

import { displayName, get } from './api.js';
import { clearFieldErrors, h, heading, pager, showFieldErrors, table } from './dom.js';
import { csvPath, logFilterProblems, logQuery } from './lists.js';
import { formatBytes, formatCount, formatDuration, hostPort, listenText, upstreamText } from './units.js';

// REASONS are the disconnect reasons a log entry can have, offered as the
// filter's suggestions: the names of modules/streamstate's reasons (a Go
// test there checks that the two lists agree), and sni_no_match.
const REASONS = ['client_close', 'upstream_close', 'client_error', 'upstream_error', 'idle_timeout', 'dial_failed',
  'acl_denied', 'max_connections', 'max_connections_per_ip', 'rate_limited', 'source_share', 'source_table_full',
  'connection_cap', 'responses_done', 'admin_closed', 'stream_disabled', 'stream_removed', 'config_changed', 'shutdown',
  'tls_handshake_failed', 'upstream_tls_failed', 'upstream_loop', 'proxy_header_failed', 'proxy_header_invalid',
  'proxy_header_untrusted', 'proxy_header_missing', 'sni_no_match'];

const PAGE = 50;

export async function logPage(ctx) {
  const s = await get(`streams/${ctx.id}`);
  if (!ctx.alive()) return;
  const name = displayName(s);
  // The table, made again on each load: a Node column from the first
  // entries that name their node on.
  const box = h('div');
  let withNode = false;
  // An Upstream column when the stream has several upstreams.
  const withUpstream = (s.upstreams || []).length > 0;
  const action = h('select', { id: 'log-action' },
    h('option', { value: '' }, 'All'), h('option', { value: 'allowed' }, 'allowed'), h('option', { value: 'blocked' }, 'blocked'));
  // The node filter shows once more than one node is known: from the
  // cluster's list and from the entries.
  const node = h('select', { id: 'log-node' }, h('option', { value: '' }, 'All'));
  const nodeField = h('div', { class: 'field inline', hidden: true }, h('label', { for: 'log-node' }, 'Node'), node);
  // The text filters apply with the Filter button (or Enter).
  const field = (id, label, input) => h('div', { class: 'field inline' }, h('label', { for: id }, label), input,
    h('p', { id: `err-${id.slice(4)}`, class: 'err' }));
  const source = h('input', { type: 'text', id: 'log-source', class: 'mono', size: 18, placeholder: '10.0.0.0/8', autocomplete: 'off', 'aria-describedby': 'err-source' });
  const reason = h('input', { type: 'text', id: 'log-reason', size: 16, list: 'log-reasons', autocomplete: 'off', 'aria-describedby': 'err-reason' });
  const since = h('input', { type: 'datetime-local', id: 'log-since', step: 1, 'aria-describedby': 'err-since' });
  const until = h('input', { type: 'datetime-local', id: 'log-until', step: 1, 'aria-describedby': 'err-until' });
  const csv = h('a', { class: 'button', download: `stream-${s.id}-log.csv` }, 'Download CSV');
  const filters = () => ({ source: source.value, action: action.value, reason: reason.value, node: node.value, since: since.value, until: until.value });
  const form = h('form', { class: 'filters', 'aria-label': 'Log filter' },
    h('div', { class: 'field inline' }, h('label', { for: 'log-action' }, 'Action'), action),
    field('log-source', 'Source IP or CIDR', source),
    field('log-reason', 'Reason', reason),
    h('datalist', { id: 'log-reasons' }, REASONS.map((r) => h('option', { value: r }))),
    field('log-since', 'From', since),
    field('log-until', 'To', until),
    nodeField,
    h('button', { type: 'submit' }, 'Filter'), csv);
  const nodes = new Set();
  const addNodes = (names) => {
    for (const n of names) {
      if (!n || nodes.has(n)) continue;
      nodes.add(n);
      const opts = [...node.options].slice(1);
      const at = opts.find((o) => o.value > n) || null;
      node.insertBefore(h('option', { value: n }, n), at);
    }
    nodeField.hidden = nodes.size < 2 && !node.value;
  };
  const where = h('p', { class: 'sub', 'aria-live': 'polite' });
  // applied is the filter of the entries shown, and of the CSV link.
  let applied = {};
  const pages = pager(ctx, {
    size: PAGE, noun: 'Entries', what: 'log', where,
    fetch: (before) => get(`streams/${s.id}/connections?${logQuery(applied, { limit: PAGE, before })}`),
    show: showEntries,
  });
  const show = () => ctx.show(
    ctx.embedded ? h('h2', { id: 'log-h' }, 'Connection log') : heading(`Log: ${name}`),
    ctx.embedded ? null : h('p', { class: 'sub' }, `${listenText(s)} → ${upstreamText(s)} · `,
      h('a', { href: `#/streams/${s.id}/view` }, 'Graphs'), ' · ',
      h('a', { href: `#/streams/${s.id}/active` }, 'Connections'), ' · ', h('a', { href: '#/streams' }, 'All streams')),
    s.log_connections ? null : h('p', { class: 'note' }, 'Connection logging is off for this stream: new connections are not logged. Turn on Log connections in its settings.'),
    form,
    h('div', { class: 'toolbar' }, where, h('div', { class: 'pager' }, pages.newer, pages.older, pages.reload)),
    box);

  function showEntries(entries, first) {
    addNodes(entries.map((e) => e.node));
    withNode ||= entries.some((e) => e.node) || !!node.value;
    const headers = ['Time', ...(withNode ? ['Node'] : []), 'Source', ...(withUpstream ? ['Upstream'] : []), 'Action', 'Sent', 'Received', 'Duration', 'Reason'];
    const [region, tbody, tr] = table('Connection log', headers);
    const rows = entries.map((e) => entry(e, tr, withNode, withUpstream));
    if (!rows.length) rows.push(h('tr', { role: 'row' }, h('td', { role: 'cell', colspan: headers.length, class: 'empty' }, first ? 'No entries.' : 'No older entries.')));
    tbody.replaceChildren(...rows);
    box.replaceChildren(region);
  }

  const filter = () => {
    clearFieldErrors(form);
    const f = filters();
    const bad = logFilterProblems(f);
    if (bad.length) {
      showFieldErrors(form, bad);
      form.querySelector('[aria-invalid="true"]')?.focus();
      return;
    }
    applied = f;
    csv.href = csvPath(s.id, applied);
    pages.restart();
  };
  csv.href = csvPath(s.id, applied);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    filter();
  });
  action.addEventListener('change', filter);
  node.addEventListener('change', filter);
  // The other nodes' names, for the filter; without them, the filter
  // knows the names the entries give.
  get('cluster').then((c) => ctx.alive() && addNodes((c.nodes || []).map((n) => n.name)), () => {});
  // The page shows with its first entries, so that its columns stay.
  await pages.load();
  if (ctx.alive()) show();
}

function entry(e, tr, withNode, withUpstream) {
  const time = e.started_at || e.ended_at;
  const source = e.source_port ? hostPort(e.source_ip, e.source_port) : e.source_ip;
  const reason = e.disconnect_reason || '';
  return tr({ class: 'log-row' },
    h('td', { title: `started ${time || '?'}, ended ${e.ended_at || '?'}` }, time ? new Date(time).toLocaleString() : ''),
    withNode ? h('td', { 'data-field': 'node' }, e.node || '') : null,
    h('td', { class: 'addr' }, source),
    withUpstream ? h('td', { class: 'addr', 'data-field': 'upstream' }, e.upstream || '') : null,
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
