// Unit tests of the UI's pure functions: node --test ui/test/

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  MAX_SECONDS, RATE, TIME, checkCIDR, daysLeft, formatAge, formatBytes, formatCount, formatDuration,
  formatWhen, fromUnit, hostPort, parseCount, shortMessage, splitList, toUnit,
} from '../static/units.js';

test('toUnit shows the largest unit that divides exactly', () => {
  const cases = [
    [0, RATE, '0', 'B/s'],
    [1, RATE, '1', 'B/s'],
    [1000, RATE, '1000', 'B/s'],
    [1023, RATE, '1023', 'B/s'],
    [1024, RATE, '1', 'KB/s'],
    [1536, RATE, '1536', 'B/s'],
    [2048, RATE, '2', 'KB/s'],
    [1024 * 1023, RATE, '1023', 'KB/s'],
    [1048576, RATE, '1', 'MB/s'],
    [1048576 + 1024, RATE, '1025', 'KB/s'],
    [1048576 + 1, RATE, '1048577', 'B/s'],
    [100 * 1048576, RATE, '100', 'MB/s'],
    [5, TIME, '5', 's'],
    [60, TIME, '1', 'min'],
    [90, TIME, '90', 's'],
    [120, TIME, '2', 'min'],
    [3600, TIME, '1', 'h'],
    [5400, TIME, '90', 'min'],
    [86400, TIME, '24', 'h'],
    [MAX_SECONDS, TIME, '8760', 'h'],
  ];
  for (const [n, scale, amount, unit] of cases) {
    assert.deepEqual(toUnit(n, scale), { amount, unit }, `toUnit(${n})`);
  }
});

test('fromUnit converts exactly, without floating point', () => {
  const cases = [
    ['', 'KB/s', 0],
    ['  ', 'MB/s', 0],
    ['0', 'KB/s', 0],
    ['1536', 'B/s', 1536],
    ['1.5', 'KB/s', 1536],
    ['1.50', 'KB/s', 1536],
    ['0.5', 'KB/s', 512],
    ['0.25', 'KB/s', 256],
    ['0.001', 'MB/s', null], // 1048.576 B/s
    ['0.125', 'MB/s', 131072],
    ['1.1', 'MB/s', null], // 1153433.6 B/s
    ['2.5', 'MB/s', 2621440],
    ['0.0009765625', 'MB/s', 1024],
    ['1.3', 'B/s', null],
    [' 12 ', 'B/s', 12],
    ['0.5', 's', null],
    ['1.5', 'min', 90],
    ['0.1', 'min', 6],
    ['0.01', 'min', null],
    ['2.25', 'h', 8100],
    ['1.0000000000000000001', 'h', null],
  ];
  for (const [text, unit, want] of cases) {
    const scale = unit.endsWith('/s') ? RATE : TIME;
    const got = fromUnit(text, unit, scale);
    if (want === null) {
      assert.ok(got.error, `fromUnit(${text} ${unit}) = ${JSON.stringify(got)}, want an error`);
      assert.match(got.error, /not a whole number of (bytes per second|seconds)/);
    } else {
      assert.deepEqual(got, { value: want }, `fromUnit(${text} ${unit})`);
    }
  }
});

test('fromUnit refuses what is not a plain number, and what is too large', () => {
  for (const text of ['-1', '1e3', '1,5', 'abc', '1.', '.5', '0x10', '1 2', 'Infinity', 'NaN']) {
    const got = fromUnit(text, 'KB/s', RATE);
    assert.ok(got.error, `fromUnit(${text}) = ${JSON.stringify(got)}`);
    assert.match(got.error, /not a number/);
  }
  assert.match(fromUnit('5', 'GB/s', RATE).error, /unknown unit "GB\/s"/);
  assert.deepEqual(fromUnit('8760', 'h', TIME, MAX_SECONDS), { value: MAX_SECONDS });
  assert.match(fromUnit('8761', 'h', TIME, MAX_SECONDS).error, /too large; at most 8760 h/);
  assert.match(fromUnit('31536001', 's', TIME, MAX_SECONDS).error, /too large/);
  assert.match(fromUnit('9007199254740992', 'B/s', RATE).error, /too large/);
  assert.deepEqual(fromUnit('9007199254740991', 'B/s', RATE), { value: Number.MAX_SAFE_INTEGER });
});

test('a stored value survives the trip through the form', () => {
  const values = [1, 7, 512, 1000, 1023, 1024, 1025, 1536, 2048, 4096, 65536, 1000000, 1048575,
    1048576, 3 * 1048576, 1048576 * 1024, 123456789, Number.MAX_SAFE_INTEGER];
  for (const n of values) {
    const { amount, unit } = toUnit(n, RATE);
    assert.deepEqual(fromUnit(amount, unit, RATE), { value: n }, `rate ${n} shown as ${amount} ${unit}`);
  }
  for (let n = 1; n <= 7300; n += 7) {
    const { amount, unit } = toUnit(n, TIME);
    assert.deepEqual(fromUnit(amount, unit, TIME, MAX_SECONDS), { value: n }, `${n} s shown as ${amount} ${unit}`);
  }
  // Every typed amount with up to two decimals either converts to the
  // exact integer or is refused; none is rounded.
  for (const [unit, f] of RATE.units) {
    for (let hundredths = 0; hundredths <= 1000; hundredths += 3) {
      const text = `${Math.floor(hundredths / 100)}.${String(hundredths % 100).padStart(2, '0')}`;
      const got = fromUnit(text, unit, RATE);
      if ((hundredths * f) % 100 === 0) assert.deepEqual(got, { value: (hundredths * f) / 100 }, `${text} ${unit}`);
      else assert.ok(got.error, `${text} ${unit} = ${JSON.stringify(got)}`);
    }
  }
});

test('parseCount', () => {
  assert.deepEqual(parseCount('80', { min: 1, max: 65535 }), { value: 80 });
  assert.deepEqual(parseCount(' 65535 ', { min: 1, max: 65535 }), { value: 65535 });
  assert.match(parseCount('', { min: 1, max: 65535 }).error, /required/);
  assert.deepEqual(parseCount('', { empty: 0 }), { value: 0 });
  assert.match(parseCount('0', { min: 1, max: 65535 }).error, /must be 1-65535/);
  assert.match(parseCount('70000', { min: 1, max: 65535 }).error, /70000: must be 1-65535/);
  for (const bad of ['-1', '1.5', 'abc', '8o', '1e2']) assert.match(parseCount(bad, {}).error, /not a whole number/, bad);
});

test('formatBytes', () => {
  const cases = [
    [0, '0 B'], [1, '1 B'], [700, '700 B'], [1023, '1023 B'], [1024, '1 KB'], [1536, '1.5 KB'],
    [10 * 1024 + 512, '10.5 KB'], [100 * 1024, '100 KB'], [1048575, '1 MB'], [1048576, '1 MB'],
    [1.25 * 1048576, '1.3 MB'], [500 * 1048576, '500 MB'], [1024 ** 3, '1 GB'], [3.5 * 1024 ** 4, '3.5 TB'],
    [1024 ** 5, '1 PB'], [2 ** 64, '16 EB'],
  ];
  for (const [n, want] of cases) assert.equal(formatBytes(n), want, `formatBytes(${n})`);
});

test('formatDuration and formatAge', () => {
  const cases = [
    [0, '0 ms'], [1, '1 ms'], [450, '450 ms'], [999, '999 ms'], [1000, '1 s'], [1500, '1.5 s'],
    [1999, '1.9 s'], [59_999, '59.9 s'], [60_000, '1 min'], [65_000, '1 min 5 s'], [3_599_999, '59 min 59 s'],
    [3_600_000, '1 h'], [3_660_000, '1 h 1 min'], [86_399_000, '23 h 59 min'], [86_400_000, '1 d'],
    [2 * 86_400_000 + 4 * 3_600_000 + 59_000, '2 d 4 h'],
  ];
  for (const [ms, want] of cases) assert.equal(formatDuration(ms), want, `formatDuration(${ms})`);
  assert.equal(formatAge(0), '0 s');
  assert.equal(formatAge(999), '0 s');
  assert.equal(formatAge(1500), '1 s');
  assert.equal(formatAge(59_999), '59 s');
  assert.equal(formatAge(61_000), '1 min 1 s');
  assert.equal(formatAge(NaN), '0 s');
});

test('formatCount groups digits', () => {
  assert.equal(formatCount(0), '0');
  assert.equal(formatCount(999), '999');
  assert.equal(formatCount(1000), '1,000');
  assert.equal(formatCount(1234567), '1,234,567');
});

test('splitList takes lines and commas', () => {
  assert.deepEqual(splitList(''), []);
  assert.deepEqual(splitList('10.0.0.0/8\n192.168.0.0/16\r\n\n'), ['10.0.0.0/8', '192.168.0.0/16']);
  assert.deepEqual(splitList('a.example, b.example,c.example'), ['a.example', 'b.example', 'c.example']);
});

test('checkCIDR', () => {
  for (const ok of ['10.0.0.0/8', '192.168.1.1', '0.0.0.0/0', '2001:db8::/32', '::1', '::ffff:10.0.0.0/104', '1.2.3.4/32']) {
    assert.equal(checkCIDR(ok), '', ok);
  }
  for (const [bad, want] of [['1.2.3.4/33', /0-32/], ['2001:db8::/129', /0-128/], ['300.1.1.1', /0-255/],
    ['example.com', /not an IP/], ['1.2.3.4/8/9', /more than one/], ['10.0.0.0/', /prefix length/], ['1.2.3', /not an IP/]]) {
    assert.match(checkCIDR(bad), want, bad);
  }
});

test('shortMessage drops the stream prefix only', () => {
  assert.equal(shortMessage('stream 3: listen_port 0: must be 1-65535'), 'listen_port 0: must be 1-65535');
  assert.equal(shortMessage('stream 1 ("db"): listen_port 5432: in use'), 'listen_port 5432: in use');
  assert.equal(shortMessage('stream 1 ("a \\"b\\": c"): notes: x'), 'notes: x');
  assert.equal(shortMessage('the new stream ("db"): listen_port: required; must be 1-65535'), 'listen_port: required; must be 1-65535');
  assert.equal(shortMessage('the new stream: upstream_host: required'), 'upstream_host: required');
  assert.equal(shortMessage('unknown field "x"'), 'unknown field "x"');
  assert.equal(shortMessage(undefined), '');
});

test('hostPort and daysLeft', () => {
  assert.equal(hostPort('127.0.0.1', 80), '127.0.0.1:80');
  assert.equal(hostPort('', 80), '*:80');
  assert.equal(hostPort('::1', 53), '[::1]:53');
  const now = Date.parse('2026-01-01T00:00:00Z');
  assert.equal(daysLeft('2026-01-21T00:00:00Z', now), 20);
  assert.equal(daysLeft('2026-01-01T12:00:00Z', now), 0);
  assert.equal(daysLeft('2025-12-31T00:00:00Z', now), -1);
  assert.equal(daysLeft('', now), null);
  assert.equal(daysLeft('not a date', now), null);
});

test('formatWhen gives the time alone for today, else the date too', () => {
  const now = new Date(2026, 11, 6, 12, 0, 0);
  const today = new Date(2026, 11, 6, 10, 54, 49);
  const yesterday = new Date(2026, 11, 5, 23, 59, 0);
  assert.equal(formatWhen(today.toISOString(), now, 'en-GB'), '10:54:49');
  assert.equal(formatWhen(yesterday.toISOString(), now, 'en-GB'), '05/12/2026, 23:59:00');
  assert.equal(formatWhen('not a time', now), 'not a time');
});

test('parseUpstream and formatUpstream', async () => {
  const { parseUpstream, formatUpstream } = await import('../static/units.js');
  assert.deepEqual(parseUpstream('10.0.0.5:5432'), [{ host: '10.0.0.5', port: 5432 }, '']);
  assert.deepEqual(parseUpstream('[2001:db8::5]:5432 weight 3 backup'), [{ host: '2001:db8::5', port: 5432, weight: 3, backup: true }, '']);
  assert.deepEqual(parseUpstream('db:1 backup weight 2'), [{ host: 'db', port: 1, backup: true, weight: 2 }, '']);
  assert.match(parseUpstream('db')[1], /host:port/);
  assert.match(parseUpstream('db:70000')[1], /1-65535/);
  assert.match(parseUpstream('db:1 weight')[1], /needs a number/);
  assert.match(parseUpstream('db:1 weight 101')[1], /1-100/);
  assert.match(parseUpstream('db:1 backup backup')[1], /want weight N or backup/);
  for (const line of ['10.0.0.5:5432', '[2001:db8::5]:5432 weight 3 backup', 'db:1 backup']) {
    assert.equal(formatUpstream(parseUpstream(line)[0]), line);
  }
});

test('portRange, listenText and upstreamText show ranges and several upstreams', async () => {
  const { portRange, listenText, upstreamText } = await import('../static/units.js');
  assert.equal(portRange(5432, 0), '5432');
  assert.equal(portRange(5432, undefined), '5432');
  assert.equal(portRange(5432, 5432), '5432');
  assert.equal(portRange(30000, 30099), '30000-30099');

  const one = { listen_address: '0.0.0.0', listen_port: 5432, upstream_host: '10.0.0.5', upstream_port: 5432 };
  assert.equal(listenText(one), '0.0.0.0:5432');
  assert.equal(upstreamText(one), '10.0.0.5:5432');
  assert.equal(listenText({ ...one, listen_address: '' }), '*:5432');

  const range = { listen_address: '::1', listen_port: 30000, listen_port_end: 30099, upstream_host: 'db', upstream_port: 40000 };
  assert.equal(listenText(range), '[::1]:30000-30099');
  assert.equal(upstreamText(range), 'db:40000-40099', 'port + k');
  assert.equal(upstreamText({ ...range, upstream_port_fixed: true }), 'db:40000', 'every port to one');

  const three = { ...one, upstreams: [{ host: 'a', port: 1 }, { host: 'b', port: 2 }, { host: 'c', port: 3, backup: true }] };
  assert.equal(upstreamText(three), '3 upstreams');
  assert.equal(upstreamText({ ...one, upstreams: [{ host: '2001:db8::5', port: 22 }] }), '[2001:db8::5]:22', 'one upstream in the list');
  assert.equal(upstreamText({ ...one, upstreams: [] }), '10.0.0.5:5432');
});

test('formatAgo', async () => {
  const { formatAgo } = await import('../static/units.js');
  const now = Date.parse('2026-12-06T10:00:00.000Z');
  assert.equal(formatAgo('2026-12-06T10:00:00.000Z', now), 'just now');
  assert.equal(formatAgo('2026-12-06T09:59:59.500Z', now), 'just now');
  assert.equal(formatAgo('2026-12-06T10:00:03.000Z', now), 'just now', 'a clock a little ahead');
  assert.equal(formatAgo('2026-12-06T09:59:58.000Z', now), '2 s ago');
  assert.equal(formatAgo('2026-12-06T09:57:55.000Z', now), '2 min 5 s ago');
  assert.equal(formatAgo('2026-12-06T07:00:00.000Z', now), '3 h ago');
  assert.equal(formatAgo('soon', now), 'soon');
  assert.equal(formatAgo(null, now), '');
});

test('nodeState and storageText', async () => {
  const { nodeState, storageText } = await import('../static/units.js');
  assert.deepEqual(nodeState({ status: 'up' }).slice(0, 2), ['up', 'ok']);
  assert.deepEqual(nodeState({ status: 'stale' }).slice(0, 2), ['stale', 'bad']);
  assert.deepEqual(nodeState({ status: 'snapshot' }).slice(0, 2), ['snapshot', 'warn']);
  assert.deepEqual(nodeState({ status: 'odd' }).slice(0, 2), ['odd', 'warn']);
  assert.match(nodeState({ status: 'stale' })[2], /heartbeat/);
  assert.match(nodeState({ status: 'snapshot' })[2], /database was down/);
  assert.equal(storageText('sqlite'), 'SQLite (one node)');
  assert.match(storageText('postgres'), /^PostgreSQL/);
  assert.match(storageText(''), /one node/);
});

test('connUpstream moves the port on a one-to-one range only', async () => {
  const { connUpstream } = await import('../static/units.js');
  const range = { listen_port: 30000, listen_port_end: 30099 };
  assert.equal(connUpstream({ upstream: '10.0.0.5:40000', listen_port: 30002 }, range), '10.0.0.5:40002');
  assert.equal(connUpstream({ upstream: '[2001:db8::5]:40000', listen_port: 30099 }, range), '[2001:db8::5]:40099');
  assert.equal(connUpstream({ upstream: '10.0.0.5:40000', listen_port: 30000 }, range), '10.0.0.5:40000');
  assert.equal(connUpstream({ upstream: '10.0.0.5:40000', listen_port: 30002 }, { ...range, upstream_port_fixed: true }), '10.0.0.5:40000');
  assert.equal(connUpstream({ upstream: '10.0.0.5:40000' }, range), '10.0.0.5:40000', 'no listen_port');
  assert.equal(connUpstream({ upstream: '10.0.0.5:5432' }, { listen_port: 5432 }), '10.0.0.5:5432', 'one port');
  assert.equal(connUpstream({}, range), '', 'being dialed');
});
