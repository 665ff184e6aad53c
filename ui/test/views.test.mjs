// Unit tests of the pure helpers of the dashboard, stream, audit and
// stream list pages: node --test ui/test/

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { REREAD, SERIES, gaps, isoSecond, linePath, mergePoints, nearest, niceMax, positions, problems, refreshSince, shownSpan, sinceFor, summary } from '../static/graph.js';
import {
  auditWhat, auditWho, csvPath, diffRows, exportFile, importPlan, logFilterProblems, logQuery, matchStream,
  sortStreams, streamState, valueText,
} from '../static/lists.js';
import { parseCSV } from '../e2e/csv.mjs';

test('niceMax rounds up to 1, 2 or 5 × 10^k', () => {
  const cases = [[0, 1], [-3, 1], [NaN, 1], [0.3, 0.5], [1, 1], [1.01, 2], [2, 2], [3, 5], [7, 10], [10, 10], [11, 20], [999, 1000], [1500, 2000], [4096, 5000]];
  for (const [v, want] of cases) assert.equal(niceMax(v), want, `niceMax(${v})`);
});

test('linePath spreads the points across the width, 0 at the bottom and max at the top', () => {
  assert.equal(linePath([], 100, 10, 1), '');
  assert.equal(linePath([5], 100, 10, 10), 'M0 5H100');
  assert.equal(linePath([0, 5, 10], 100, 10, 10), 'M0 10L50 5L100 0');
  // Values past the scale stay in the box; a negative one at the bottom.
  assert.equal(linePath([20, -1], 30, 10, 10), 'M0 0L30 10');
  // Coordinates to 0.1.
  assert.equal(linePath([1, 2, 3, 4], 10, 3, 3), 'M0 2L3.3 1L6.7 0L10 0');
  // A scale of 0 is taken as 1: nothing divides by zero.
  assert.equal(linePath([0, 0], 10, 4, 0), 'M0 4L10 4');
  // At their times: the first hour's points sit at the right.
  assert.equal(linePath([0, 10], 100, 10, 10, [0.9, 1]), 'M90 10L100 0');
  assert.equal(linePath([5], 100, 10, 10, [0.75]), 'M75 5H100');
  // A gap breaks the line.
  assert.equal(linePath([1, 2, 3], 100, 10, 10, [0, 0.5, 1], [false, false, true]), 'M0 9L50 8M100 7');
});

test('gaps: a point more than a step after the one before starts a new line', () => {
  const at = (s) => ({ time: `2026-12-06T12:00:${s}.000Z` });
  assert.deepEqual(gaps([], 10), []);
  assert.deepEqual(gaps([at('00'), at('10'), at('20'), at('50'), at('59')], 10), [false, false, false, true, false]);
});

test('positions put points on a time axis that ends now', () => {
  const now = Date.parse('2026-12-06T12:00:00Z');
  const pts = ['2026-12-06T11:00:00Z', '2026-12-06T11:30:00Z', '2026-12-06T11:59:00Z', '2026-12-06T10:00:00Z', '2026-12-06T12:00:10Z', 'garbage'].map((time) => ({ time }));
  const xs = positions(pts, 3600, now);
  assert.deepEqual(xs.map((x) => Math.round(x * 1000) / 1000), [0, 0.5, 0.983, 0, 1, 1]);
  // A graph shows since its first point, at least 5 minutes, at most its range.
  assert.equal(shownSpan([], 3600, now), 3600);
  assert.equal(shownSpan([{ time: '2026-12-06T11:58:00Z' }], 3600, now), 300);
  assert.equal(shownSpan([{ time: '2026-12-06T11:40:00Z' }], 3600, now), 1200);
  assert.equal(shownSpan([{ time: '2026-12-06T09:00:00Z' }], 3600, now), 3600);
});

test('summary, nearest and the series of a point', () => {
  assert.deepEqual(summary([]), { now: 0, peak: 0, avg: 0 });
  assert.deepEqual(summary([1, 5, 3]), { now: 3, peak: 5, avg: 3 });
  assert.equal(nearest(0.5, []), -1);
  assert.equal(nearest(0, [0.2, 0.5, 0.9]), 0);
  assert.equal(nearest(0.4, [0.2, 0.5, 0.9]), 1);
  assert.equal(nearest(0.71, [0.2, 0.5, 0.9]), 2);
  assert.equal(nearest(7, [0.2, 0.5, 0.9]), 2);
  const p = { bytes_sent_per_sec: 100, bytes_received_per_sec: 2048, active_connections: 3, connections_per_sec: 0.5, blocked_per_sec: 1, dial_failures_per_sec: null };
  assert.equal(SERIES.throughput.value(p), 2148);
  assert.equal(SERIES.throughput.fmt(2148), '2.1 KB/s');
  assert.equal(SERIES.active.value(p), 3);
  assert.equal(SERIES.problems.value(p), 1);
  assert.equal(SERIES.rate.fmt(1 / 3), '0.33/s');
  assert.equal(sinceFor(3600, Date.parse('2026-12-06T12:00:00.123Z')), '2026-12-06T11:00:00Z');
});

test('problems: unhealthy, upstreams down, not listening, blocking or failing in the last 5 minutes', () => {
  const ok = { enabled: true, status: { listening: true, health_status: 'healthy' } };
  assert.deepEqual(problems(ok, []), []);
  assert.deepEqual(problems({ enabled: true, status: { listening: false, health_status: 'unhealthy' } }, []), ['unhealthy', 'not listening']);
  assert.deepEqual(problems({ enabled: true, status: { upstreams: [{ healthy: true }, { healthy: false }] } }, []), ['1 upstream down']);
  // A disabled stream does not listen: no problem.
  assert.deepEqual(problems({ enabled: false, status: { listening: false } }, []), []);
  // Points every 10 s up to now.
  const now = Date.parse('2026-12-06T12:00:00Z');
  const at = (ago, blocked = 0, failed = 0) => ({ time: new Date(now - ago * 1000).toISOString(), blocked_per_sec: blocked, dial_failures_per_sec: failed });
  const quiet = Array.from({ length: 60 }, (_, i) => at(590 - i * 10));
  assert.deepEqual(problems(ok, quiet, now), []);
  assert.deepEqual(problems(ok, [at(400, 3, 2), ...quiet.slice(-20)], now), [], 'a block 400 s ago no longer counts');
  assert.deepEqual(problems(ok, [...quiet, at(0, 0.1)], now), ['blocking connections']);
  assert.deepEqual(problems(ok, [at(290, 0, 0.2)], now), ['failing dials'], 'one point 290 s ago, after a gap');
});

const streams = [
  { id: 1, name: 'web', protocol: 'tcp', enabled: true, listen_port: 8080, upstream_host: '10.0.0.5', upstream_port: 80, status: { listening: true, active_connections: 5, bytes_sent: 10 } },
  { id: 2, name: 'DNS', protocol: 'udp', enabled: true, listen_port: 53, upstream_host: '1.1.1.1', upstream_port: 53, status: { listening: false, active_connections: 0, bytes_sent: 300 } },
  { id: 3, name: '', protocol: 'tcp+udp', enabled: false, listen_port: 30000, listen_port_end: 30099, upstreams: [{ host: 'game.internal', port: 7777 }, { host: '10.0.0.9', port: 7777 }], status: { active_connections: 2 } },
  { id: 4, name: 'db', enabled: true, listen_port: 5432, upstream_host: 'pg', upstream_port: 5432, status: { listening: true, health_status: 'unhealthy', active_connections: 5 } },
];

test('streamState and matchStream filter by name, port, upstream, protocol and state', () => {
  assert.deepEqual(streams.map(streamState), ['up', 'down', 'disabled', 'unhealthy']);
  const ids = (f) => streams.filter((s) => matchStream(s, f)).map((s) => s.id);
  assert.deepEqual(ids({}), [1, 2, 3, 4]);
  assert.deepEqual(ids({ name: 'W' }), [1]);
  assert.deepEqual(ids({ name: 'stream-3' }), [3], 'a stream without a name is stream-{id}');
  assert.deepEqual(ids({ port: '53' }), [2]);
  assert.deepEqual(ids({ port: '30050' }), [3], 'a port within a range');
  assert.deepEqual(ids({ port: '30100' }), []);
  assert.deepEqual(ids({ upstream: 'game' }), [3]);
  assert.deepEqual(ids({ upstream: '10.0.0' }), [1, 3]);
  assert.deepEqual(ids({ upstream: ':5432' }), [4]);
  assert.deepEqual(ids({ protocol: 'tcp' }), [1, 4], 'no protocol is tcp');
  assert.deepEqual(ids({ state: 'down' }), [2]);
  assert.deepEqual(ids({ state: 'unhealthy' }), [4]);
  assert.deepEqual(ids({ name: 'd', state: 'up' }), []);
});

test('sortStreams sorts by any column, both ways, ties by id', () => {
  const ids = (k, asc) => sortStreams(streams, k, asc).map((s) => s.id);
  assert.deepEqual(ids('', true), [1, 2, 3, 4]);
  assert.deepEqual(ids('name', true), [4, 2, 3, 1]);
  assert.deepEqual(ids('name', false), [1, 3, 2, 4]);
  assert.deepEqual(ids('listen', true), [2, 4, 1, 3]);
  assert.deepEqual(ids('active', false), [1, 4, 3, 2], 'ties keep the id order');
  assert.deepEqual(ids('sent', true), [3, 4, 1, 2]);
  assert.deepEqual(ids('health', true), [4, 2, 1, 3]);
  assert.deepEqual(ids('enabled', true), [3, 1, 2, 4]);
  assert.deepEqual(streams.map((s) => s.id), [1, 2, 3, 4], 'the list itself is left as it was');
});

test('logQuery and csvPath carry the filter, empty fields left out', () => {
  assert.equal(logQuery({}), '');
  assert.equal(logQuery({ source: ' 10.0.0.0/8 ', action: 'blocked', reason: '', node: 'a b' }, { limit: 50, before: '' }),
    'source=10.0.0.0%2F8&action=blocked&node=a+b&limit=50');
  const since = new Date('2026-12-06T10:00:00Z');
  // datetime-local values are local time: the same instant in UTC.
  const local = (d) => new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  assert.equal(logQuery({ since: local(since) }), 'since=2026-12-06T10%3A00%3A00Z');
  assert.equal(csvPath(7, { reason: 'client_close' }), 'api/v1/streams/7/connections?reason=client_close&format=csv&limit=100000');
});

test('logFilterProblems names the field at fault', () => {
  assert.deepEqual(logFilterProblems({ source: '10.0.0.1' }), []);
  assert.deepEqual(logFilterProblems({ source: '2001:db8::/32' }), []);
  assert.equal(logFilterProblems({ source: 'ten' })[0].field, 'source');
  assert.equal(logFilterProblems({ source: '10.0.0.0/40' })[0].field, 'source');
  assert.deepEqual(logFilterProblems({ since: '2026-12-06T10:00', until: '2026-12-06T09:00' }).map((p) => p.field), ['until']);
  assert.deepEqual(logFilterProblems({ since: 'soon' }).map((p) => p.field), ['since']);
  assert.deepEqual(logFilterProblems({ since: '2026-12-06T10:00', until: '2026-12-06T10:00' }).map((p) => p.field), ['until'], 'an empty range');
  assert.deepEqual(logFilterProblems({ reason: 'client_close' }), []);
  assert.deepEqual(logFilterProblems({ reason: 'Client Close' }).map((p) => p.field), ['reason']);
});

test('parseCSV reads quotes, doubled quotes, commas and CRLF', () => {
  assert.deepEqual(parseCSV('a,b\r\n1,"x, ""y"""\n2,\n'), [['a', 'b'], ['1', 'x, "y"'], ['2', '']]);
  assert.deepEqual(parseCSV('a\n"line\nbreak"'), [['a'], ['line\nbreak']]);
  assert.deepEqual(parseCSV(''), []);
});

test('diffRows, valueText, auditWhat and auditWho put an audit entry in words', () => {
  const e = {
    action: 'update', stream_id: 4, name: 'db', actor: 'admin endpoint', remote: '127.0.0.1:5555',
    changes: [{ field: 'listen_port', from: 5432, to: 6432 }, { field: 'allow_cidrs', from: [], to: ['10.0.0.0/8'] }, { field: 'notes', from: null, to: 'x' }, { field: 'enabled', from: true, to: false }],
  };
  assert.deepEqual(diffRows(e), [['listen_port', '5432', '6432'], ['allow_cidrs', '(none)', '["10.0.0.0/8"]'], ['notes', '(none)', 'x'], ['enabled', 'true', 'false']]);
  assert.deepEqual(diffRows({ action: 'delete' }), []);
  assert.equal(valueText({ a: 1 }), '{"a":1}');
  assert.equal(valueText(0), '0');
  assert.equal(auditWhat(e), 'stream db (4)');
  assert.equal(auditWhat({ action: 'cert_create', certificate_id: 2, name: '' }), 'certificate certificate-2 (2)');
  assert.equal(auditWho(e), 'admin endpoint (127.0.0.1:5555)');
  assert.equal(auditWho({ actor: 'alice', remote: '10.0.0.1:1' }), 'alice (10.0.0.1:1)');
  assert.equal(auditWho({}), 'unknown');
});

test('exportFile writes the aegis streams export format; importPlan reads it back', () => {
  const list = [
    { id: 1, name: 'cfg', source: 'config', listen_port: 1 },
    { id: 5, name: 'web', source: 'api', listen_port: 8080, enabled: true, status: { listening: true }, version: 'abc', created_at: 'x', updated_at: 'y', warnings: ['w'] },
  ];
  // No certificates: aegis streams import would refuse them without
  // their sealed keys, which the API never gives.
  const f = exportFile(list, 'the web UI', new Date('2026-12-06T13:30:00.5Z'));
  assert.deepEqual(f, {
    format: 'aegis-streams-export', version: 1, exported_at: '2026-12-06T13:30:00Z', from: 'the web UI',
    certificates: [],
    streams: [{ id: 5, name: 'web', listen_port: 8080, enabled: true }],
  });
  const text = JSON.stringify(f);
  // id 5 exists: PUT; missing: POST without the id; the config's: skipped.
  let plan = importPlan(text, [{ id: 5, source: 'api' }]);
  assert.deepEqual(plan.steps, [{ name: 'web', method: 'PUT', path: 'streams/5', body: { id: 5, name: 'web', listen_port: 8080, enabled: true } }]);
  assert.equal(plan.skipped.length, 0);
  // A file of aegis streams export has certificates, which the UI leaves.
  plan = importPlan(JSON.stringify({ ...f, certificates: [{ id: 2, name: 'c' }] }), [{ id: 5, source: 'api' }]);
  assert.match(plan.skipped[0], /1 certificate: the UI does not import certificates/);
  plan = importPlan(text, []);
  assert.deepEqual(plan.steps, [{ name: 'web', method: 'POST', path: 'streams', body: { name: 'web', listen_port: 8080, enabled: true } }]);
  plan = importPlan(text, [{ id: 5, source: 'config' }]);
  assert.deepEqual(plan.steps, []);
  assert.match(plan.skipped[0], /web: id 5 is a stream of the Caddy config/);
  assert.match(importPlan('{', []).error, /not JSON/);
  assert.match(importPlan('{"format":"x"}', []).error, /not an export/);
  assert.match(importPlan('{"format":"aegis-streams-export","version":2,"streams":[]}', []).error, /version 2/);
  assert.match(importPlan('{"format":"aegis-streams-export","version":1}', []).error, /no "streams"/);
});

test('the dashboard asks only for the newest points, the last minute again, and merges them in', () => {
  const now = Date.parse('2026-12-06T12:00:05.400Z');
  const at = (hms, v = 0) => ({ time: `2026-12-06T${hms}.000Z`, v });
  // Nothing yet: the whole hour, to the second.
  assert.equal(isoSecond(refreshSince([], 3600, now)), '2026-12-06T11:00:05Z');
  // Points up to 11:59:50: from a minute before it.
  const old = [at('10:59:50'), at('11:00:10'), at('11:58:40', 1), at('11:59:50', 2)];
  const since = refreshSince(old, 3600, now);
  assert.equal(REREAD, 60);
  assert.equal(isoSecond(since), '2026-12-06T11:58:50Z');
  // Only old points before the hour: the whole hour again.
  assert.equal(isoSecond(refreshSince([at('09:00:00')], 3600, now)), '2026-12-06T11:00:05Z');
  // The answer replaces the points after since (a node's late sample
  // changed 11:59:50), adds the new one, and the hour drops the oldest.
  const fresh = [at('11:59:50', 5), at('12:00:00', 6)];
  const merged = mergePoints(old, fresh, since, now - 3600 * 1000);
  assert.deepEqual(merged.map((p) => [p.time.slice(11, 19), p.v]), [['11:00:10', 0], ['11:58:40', 1], ['11:59:50', 5], ['12:00:00', 6]]);
  // A failed request keeps what it had, within the hour.
  assert.deepEqual(mergePoints(old, [], Infinity, now - 3600 * 1000).length, 3);
});
