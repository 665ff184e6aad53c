// The live connections of one stream (UDP: one row per client), refreshed
// every 2 s while the tab is visible, each with a button that closes it.
// The stream page shows it too.

import { ApiError, del, displayName, get } from './api.js';
import { confirmDialog, fail, focusHeading, h, heading, poll, say, setText, table } from './dom.js';
import { connUpstream, formatAge, formatBytes, listenText, upstreamText } from './units.js';

export async function activePage(ctx) {
  const s = await get(`streams/${ctx.id}`);
  if (!ctx.alive()) return;
  const name = displayName(s);
  // A stream with a port range shows the port each connection came in on.
  const range = s.listen_port_end > s.listen_port;
  const [region, tbody, row] = table('Open connections', ['Source', 'Protocol', ...(range ? ['Port'] : []), 'Upstream', 'Age', 'Sent', 'Received', 'Actions']);
  const empty = h('p', { class: 'empty', hidden: true }, 'No open connections.');
  const count = h('p', { class: 'sub' });
  // On the stream page (ctx.embedded), an h2 and no links.
  ctx.show(
    ctx.embedded ? h('h2', {}, 'Open connections') : heading(`Connections: ${name}`),
    ctx.embedded ? null : h('p', { class: 'sub' }, `${listenText(s)} → ${upstreamText(s)} · `,
      h('a', { href: `#/streams/${s.id}/view` }, 'Graphs'), ' · ',
      h('a', { href: `#/streams/${s.id}/log` }, 'Log'), ' · ', h('a', { href: '#/streams' }, 'All streams')),
    count, region, empty);

  const rows = new Map();
  const gone = new Set();
  let lastError = '';

  async function refresh() {
    let list;
    try {
      list = await get(`streams/${s.id}/active`);
    } catch (err) {
      if (ctx.alive() && err.message !== lastError) fail(`Could not load the connections: ${err.message}`);
      lastError = err.message;
      return;
    }
    if (!ctx.alive()) return;
    if (lastError) {
      const a = document.getElementById('alert');
      if (a.textContent.startsWith('Could not load the connections')) a.textContent = '';
      lastError = '';
    }
    const now = Date.now();
    const seen = new Set();
    for (const c of list) {
      if (gone.has(c.id)) continue;
      seen.add(c.id);
      let r = rows.get(c.id);
      if (!r) {
        r = newRow(c);
        rows.set(c.id, r);
        tbody.append(r.tr); // the list is oldest first; new ones come last
      }
      const to = connUpstream(c, s);
      setText(r.upstream, to || 'connecting', !c.upstream ? 'The upstream is being dialed' : to !== c.upstream ? `upstream ${c.upstream}, port + ${c.listen_port - s.listen_port}` : '');
      const age = Math.max(0, now - Date.parse(c.started_at));
      setText(r.age, formatAge(age), `since ${new Date(c.started_at).toLocaleString()}`);
      const dg = (n) => (c.protocol === 'udp' ? `, ${n || 0} datagrams` : '');
      setText(r.sent, formatBytes(c.bytes_sent), `${c.bytes_sent} bytes client → upstream${dg(c.datagrams_sent)}`);
      setText(r.received, formatBytes(c.bytes_received), `${c.bytes_received} bytes upstream → client${dg(c.datagrams_received)}`);
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        r.tr.remove();
        rows.delete(id);
      }
    }
    showCount();
  }

  function showCount() {
    empty.hidden = rows.size > 0;
    setText(count, rows.size === 1 ? '1 open connection' : `${rows.size} open connections`);
  }

  function newRow(c) {
    const r = { upstream: h('td', { class: 'addr', 'data-field': 'upstream' }), age: h('td'), sent: h('td', { class: 'num' }), received: h('td', { class: 'num' }) };
    const close = h('button', { type: 'button', class: 'danger small' }, 'Close');
    close.addEventListener('click', () => closeConn(c, r));
    r.tr = row({ 'data-conn-id': c.id },
      h('th', { scope: 'row', class: 'addr' }, c.source),
      h('td', {}, c.protocol),
      range ? h('td', { 'data-field': 'listen_port' }, c.listen_port ? String(c.listen_port) : '') : null,
      r.upstream, r.age, r.sent, r.received,
      h('td', { class: 'actions' }, close));
    return r;
  }

  async function closeConn(c, r) {
    const ok = await confirmDialog({
      title: 'Close connection',
      text: `Close the connection from ${c.source} to ${name}? The client and the upstream are disconnected now.`,
      confirm: 'Close connection',
    });
    if (!ok) return;
    try {
      await del(`streams/${s.id}/active/${c.id}`);
      say(`Connection from ${c.source} closed`);
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) {
        fail(`Could not close the connection from ${c.source}: ${err.message}`);
        return;
      }
      say(`The connection from ${c.source} had already ended`);
    }
    gone.add(c.id);
    r.tr.remove();
    rows.delete(c.id);
    showCount();
    focusHeading();
  }

  await poll(ctx, refresh);
}
