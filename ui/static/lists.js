// Pure helpers of the list pages, no DOM: the stream list's filter and
// sort, the log's query and CSV address, the audit trail's diffs, and the
// export file. Tested with node --test ui/test/.

import { streamBody } from './api.js';
import { checkCIDR, hostPort, listenText, upstreamText } from './units.js';

// streamState is a stream's state for the filter: disabled, down
// (enabled, not listening), unhealthy or up.
export function streamState(s) {
  const st = s.status || {};
  if (!s.enabled) return 'disabled';
  if (st.listening === false) return 'down';
  const ups = Array.isArray(st.upstreams) ? st.upstreams : [];
  if (st.health_status === 'unhealthy' || ups.some((u) => !u.healthy)) return 'unhealthy';
  return 'up';
}

// upstreamsOf is every upstream of a stream as host:port.
function upstreamsOf(s) {
  const ups = Array.isArray(s.upstreams) && s.upstreams.length ? s.upstreams : [{ host: s.upstream_host, port: s.upstream_port }];
  return ups.map((u) => hostPort(u.host, u.port));
}

// matchStream reports whether a stream passes the list's filter f: name
// (part of it, any case), port (a listen port, or within its range),
// upstream (part of a host:port), protocol and state (exact; "" is any).
export function matchStream(s, f = {}) {
  const has = (hay, needle) => String(hay ?? '').toLowerCase().includes(String(needle).trim().toLowerCase());
  if (f.name && !has(s.name || `stream-${s.id}`, f.name)) return false;
  if (f.port) {
    const p = Number(String(f.port).trim());
    const end = s.listen_port_end > s.listen_port ? s.listen_port_end : s.listen_port;
    if (!(p >= s.listen_port && p <= end)) return false;
  }
  if (f.upstream && !upstreamsOf(s).some((u) => has(u, f.upstream))) return false;
  if (f.protocol && (s.protocol || 'tcp') !== f.protocol) return false;
  if (f.state && streamState(s) !== f.state) return false;
  return true;
}

// SORT_KEYS are the stream list's columns that sort, with the value each
// sorts by.
export const SORT_KEYS = {
  name: (s) => (s.name || `stream-${s.id}`).toLowerCase(),
  protocol: (s) => s.protocol || 'tcp',
  listen: (s) => s.listen_port,
  upstream: (s) => upstreamText(s).toLowerCase(),
  enabled: (s) => (s.enabled ? 1 : 0),
  health: (s) => ({ unhealthy: 0, down: 1, up: 2, disabled: 3 })[streamState(s)],
  active: (s) => s.status?.active_connections ?? 0,
  total: (s) => s.status?.total_connections ?? 0,
  blocked: (s) => s.status?.blocked_connections ?? 0,
  sent: (s) => s.status?.bytes_sent ?? 0,
  received: (s) => s.status?.bytes_received ?? 0,
};

// sortStreams returns the streams sorted by a key of SORT_KEYS, ascending
// or not; ties keep the id order. Without a key: by id.
export function sortStreams(list, key, ascending = true) {
  const by = SORT_KEYS[key];
  const out = [...list];
  out.sort((a, b) => {
    if (by) {
      const x = by(a);
      const y = by(b);
      if (x < y) return ascending ? -1 : 1;
      if (x > y) return ascending ? 1 : -1;
    }
    return a.id - b.id;
  });
  return out;
}

// localToRFC3339 turns a datetime-local field's value (the browser's time
// zone) into RFC 3339 in UTC, or "" for an empty or bad one.
export function localToRFC3339(value) {
  if (!value) return '';
  const t = new Date(value);
  return Number.isNaN(t.getTime()) ? '' : t.toISOString().replace(/\.000Z$/, 'Z');
}

// logFilterProblems checks the log's filter before it is sent: [{field,
// message}], empty when it is fine.
export function logFilterProblems(f) {
  const out = [];
  const source = String(f.source || '').trim();
  if (source) {
    const why = checkCIDR(source);
    if (why) out.push({ field: 'source', message: why });
  }
  const since = localToRFC3339(f.since);
  const until = localToRFC3339(f.until);
  if (f.since && !since) out.push({ field: 'since', message: `"${f.since}" is not a time` });
  if (f.until && !until) out.push({ field: 'until', message: `"${f.until}" is not a time` });
  if (since && until && since >= until) out.push({ field: 'until', message: 'must be after From' });
  const reason = String(f.reason || '').trim();
  if (reason && !/^[a-z0-9_]+$/.test(reason)) out.push({ field: 'reason', message: `"${reason}": a reason as the log shows it, e.g. client_close` });
  return out;
}

// logQuery is the query of GET streams/{id}/connections for a filter:
// source, action, reason, node, since and until (datetime-local values),
// then limit and before; empty ones are left out.
export function logQuery(f, extra = {}) {
  const q = new URLSearchParams();
  const add = (k, v) => {
    const t = String(v ?? '').trim();
    if (t) q.set(k, t);
  };
  add('source', f.source);
  add('action', f.action);
  add('reason', f.reason);
  add('node', f.node);
  add('since', localToRFC3339(f.since));
  add('until', localToRFC3339(f.until));
  for (const [k, v] of Object.entries(extra)) add(k, v);
  return q.toString();
}

// CSV_LIMIT is the most entries a CSV download holds.
export const CSV_LIMIT = 100000;

// csvPath is the API path (relative to the UI) of a stream's log as CSV,
// with the filter f.
export function csvPath(id, f) {
  return `api/v1/streams/${id}/connections?${logQuery(f, { format: 'csv', limit: CSV_LIMIT })}`;
}

// ACTIONS are the audit trail's actions in words.
export const ACTIONS = {
  create: 'created',
  update: 'changed',
  enable: 'enabled',
  disable: 'disabled',
  delete: 'deleted',
  cert_create: 'certificate added',
  cert_update: 'certificate changed',
  cert_delete: 'certificate deleted',
};

// valueText is a changed value in words: "(none)" for nothing, JSON for
// lists and objects.
export function valueText(v) {
  if (v === null || v === undefined || v === '') return '(none)';
  if (typeof v === 'object') {
    if (Array.isArray(v) && !v.length) return '(none)';
    return JSON.stringify(v);
  }
  return String(v);
}

// diffRows are an audit entry's changes as [field, from, to] in words.
export function diffRows(entry) {
  const changes = Array.isArray(entry.changes) ? entry.changes : [];
  return changes.map((c) => [String(c.field ?? ''), valueText(c.from), valueText(c.to)]);
}

// auditWhat is what an entry changed: "stream web (4)", "certificate db
// (2)".
export function auditWhat(e) {
  const cert = String(e.action || '').startsWith('cert_');
  const id = cert ? e.certificate_id : e.stream_id;
  const kind = cert ? 'certificate' : 'stream';
  return `${kind} ${e.name || (id ? `${kind}-${id}` : '')}${id ? ` (${id})` : ''}`.trim();
}

// auditWho is who made a change: the user, else the actor and the remote
// address.
export function auditWho(e) {
  const who = e.actor || 'unknown';
  return e.remote && !who.includes(e.remote) ? `${who} (${e.remote})` : who;
}

// EXPORT_FORMAT and EXPORT_VERSION are the export file's (modules/streams
// export.go, as aegis streams export writes it).
export const EXPORT_FORMAT = 'aegis-streams-export';
export const EXPORT_VERSION = 1;

// exportFile is the stored streams (not the config's) in the format of
// aegis streams export, without certificates: the API never gives their
// private keys, and aegis streams import refuses a certificate without its
// sealed key (aegis streams export on the server writes them).
export function exportFile(streams, from, now = new Date()) {
  return {
    format: EXPORT_FORMAT,
    version: EXPORT_VERSION,
    exported_at: now.toISOString().replace(/\.\d+Z$/, 'Z'),
    from,
    certificates: [],
    streams: (streams || []).filter((s) => s.source !== 'config').map(streamBody),
  };
}

// importPlan reads an export file's text and says what the UI sends for
// each stream: PUT streams/{id} for an id that exists, else POST streams.
// It returns {steps: [{name, method, path, body}], skipped: [text]} or
// {error}.
export function importPlan(text, existing) {
  let f;
  try {
    f = JSON.parse(text);
  } catch (err) {
    return { error: `not JSON: ${err.message}` };
  }
  if (!f || typeof f !== 'object' || f.format !== EXPORT_FORMAT) return { error: `not an export of aegis streams (its "format" is not "${EXPORT_FORMAT}")` };
  if (f.version !== EXPORT_VERSION) return { error: `version ${f.version} of the export file; this UI reads version ${EXPORT_VERSION}` };
  if (!Array.isArray(f.streams)) return { error: 'the file has no "streams" list' };
  const ids = new Map((existing || []).map((s) => [s.id, s]));
  const steps = [];
  const skipped = [];
  for (const s of f.streams) {
    if (!s || typeof s !== 'object') continue;
    const name = s.name || (s.id ? `stream-${s.id}` : 'a stream without a name');
    const body = streamBody(s);
    const had = ids.get(s.id);
    if (had && had.source === 'config') {
      skipped.push(`${name}: id ${s.id} is a stream of the Caddy config here`);
    } else if (had) {
      steps.push({ name, method: 'PUT', path: `streams/${s.id}`, body });
    } else {
      delete body.id;
      steps.push({ name, method: 'POST', path: 'streams', body });
    }
  }
  const certs = Array.isArray(f.certificates) ? f.certificates.length : 0;
  if (certs) skipped.push(`${certs} ${certs === 1 ? 'certificate' : 'certificates'}: the UI does not import certificates (their private keys are sealed); use aegis streams import`);
  return { steps, skipped };
}

// exportName is the download's file name: aegis-streams-2026-12-06.json.
export function exportName(now = new Date()) {
  return `aegis-streams-${now.toISOString().slice(0, 10)}.json`;
}

// streamLine is a stream's listen and upstream in words.
export const streamLine = (s) => `${listenText(s)} → ${upstreamText(s)}`;
