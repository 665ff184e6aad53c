// Pure helpers, no DOM: unit conversion for the form, human formatting
// for tables, and small parsers. Tested with node --test ui/test/.

// A scale is the units of one stored integer, smallest first.
// 1 KB/s = 1024 B/s, as nginx counts.
export const RATE = { noun: 'bytes per second', units: [['B/s', 1], ['KB/s', 1024], ['MB/s', 1024 * 1024]] };
export const TIME = { noun: 'seconds', units: [['s', 1], ['min', 60], ['h', 3600]] };

// MAX_SECONDS is the most a setting in seconds may be: one year.
export const MAX_SECONDS = 365 * 24 * 3600;

// toUnit shows a stored integer in the largest unit that divides it
// exactly, so nothing is rounded: 1536 → 1536 B/s, 2048 → 2 KB/s.
export function toUnit(n, scale) {
  for (let i = scale.units.length - 1; i > 0; i--) {
    const [unit, f] = scale.units[i];
    if (Number.isSafeInteger(n) && n !== 0 && n % f === 0) return { amount: String(n / f), unit };
  }
  return { amount: String(n), unit: scale.units[0][0] };
}

// fromUnit converts what the user typed in a unit to the stored integer,
// exactly (decimal arithmetic, no floating point): "1.5" KB/s → 1536.
// Empty is 0. It returns {value} or {error}.
export function fromUnit(text, unit, scale, max = Number.MAX_SAFE_INTEGER) {
  const t = String(text ?? '').trim();
  if (t === '') return { value: 0 };
  const u = scale.units.find(([name]) => name === unit);
  if (!u) return { error: `unknown unit "${unit}"; choose ${scale.units.map(([n]) => n).join(', ')}` };
  const m = /^(\d+)(?:\.(\d+))?$/.exec(t);
  if (!m) return { error: `"${t}" is not a number; write digits, e.g. 1.5` };
  const frac = m[2] || '';
  const div = 10n ** BigInt(frac.length);
  const scaled = (BigInt(m[1]) * div + BigInt(frac || '0')) * BigInt(u[1]);
  if (scaled % div !== 0n) {
    return { error: `${t} ${unit} is not a whole number of ${scale.noun}; use a smaller unit` };
  }
  const v = scaled / div;
  if (v > BigInt(max)) {
    const top = toUnit(max, scale);
    return { error: `${t} ${unit} is too large; at most ${top.amount} ${top.unit}` };
  }
  return { value: Number(v) };
}

// parseCount reads a whole number ≥ min and ≤ max; empty is `empty`
// (undefined: required). It returns {value} or {error}.
export function parseCount(text, { min = 0, max = Number.MAX_SAFE_INTEGER, empty } = {}) {
  const t = String(text ?? '').trim();
  if (t === '') return empty === undefined ? { error: 'required' } : { value: empty };
  if (!/^\d+$/.test(t)) return { error: `"${t}" is not a whole number` };
  const n = Number(t);
  if (n < min || n > max) return { error: `${t}: must be ${min}-${max}` };
  return { value: n };
}

const BYTE_UNITS = ['B', 'KB', 'MB', 'GB', 'TB', 'PB', 'EB'];

// formatBytes is a byte count for people: 700 B, 1.5 KB, 12 MB (1 KB =
// 1024 B; one decimal under 100 of a unit).
export function formatBytes(n) {
  if (!Number.isFinite(n) || n < 1024) return `${n} B`;
  let v = n;
  let i = 0;
  while (v >= 1024 && i < BYTE_UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  let r = v >= 100 ? Math.round(v) : Math.round(v * 10) / 10;
  if (r >= 1024 && i < BYTE_UNITS.length - 1) {
    r = 1;
    i++;
  }
  return `${r} ${BYTE_UNITS[i]}`;
}

// formatCount groups digits: 1234567 → 1,234,567.
export function formatCount(n) {
  return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

// formatDuration is a duration in milliseconds for people: 450 ms, 1.5 s,
// 2 min 5 s, 3 h 20 min, 2 d 4 h. Parts are cut, never rounded up.
export function formatDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return `${ms} ms`;
  if (ms < 1000) return `${Math.floor(ms)} ms`;
  if (ms < 60_000) return `${Math.floor(ms / 100) / 10} s`;
  const s = Math.floor(ms / 1000);
  const two = (a, ua, b, ub) => (b ? `${a} ${ua} ${b} ${ub}` : `${a} ${ua}`);
  if (s < 3600) return two(Math.floor(s / 60), 'min', s % 60, 's');
  if (s < 86400) return two(Math.floor(s / 3600), 'h', Math.floor((s % 3600) / 60), 'min');
  return two(Math.floor(s / 86400), 'd', Math.floor((s % 86400) / 3600), 'h');
}

// formatAge is how long ago something started, in whole seconds or more.
export function formatAge(ms) {
  if (!(ms >= 1000)) return '0 s';
  if (ms < 60_000) return `${Math.floor(ms / 1000)} s`;
  return formatDuration(ms);
}

// formatWhen is a past time for people: the time of day when it is of
// today (by now's date), else the date and time, in the browser's locale.
export function formatWhen(iso, now = new Date(), locale = undefined) {
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  if (t.toDateString() === now.toDateString()) return t.toLocaleTimeString(locale);
  return t.toLocaleString(locale);
}

// splitList splits CIDRs or domains given one per line or comma
// separated; blanks are dropped.
export function splitList(text) {
  return String(text ?? '').split(/[\s,]+/).filter(Boolean);
}

// checkCIDR says why s is not an IP address or CIDR, or returns "". The
// server checks fully; this catches typing mistakes early.
export function checkCIDR(s) {
  const [ip, bits, extra] = s.split('/');
  if (extra !== undefined) return `"${s}": more than one "/"`;
  const v4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip);
  let max;
  if (v4) {
    if (v4.slice(1).some((o) => Number(o) > 255)) return `"${s}": an IPv4 address has numbers 0-255`;
    max = 32;
  } else if (ip.includes(':') && /^[0-9a-fA-F:.]+$/.test(ip)) {
    max = 128;
  } else {
    return `"${s}": not an IP address or CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)`;
  }
  if (bits !== undefined && !(/^\d{1,3}$/.test(bits) && Number(bits) <= max)) {
    return `"${s}": the prefix length must be 0-${max}`;
  }
  return '';
}

// shortMessage drops the `stream 3 ("db"): ` (or, on a create, `the new
// stream ("db"): `) in front of a server message about one field: the form
// shows it next to the field of that stream.
export function shortMessage(msg) {
  return String(msg ?? '').replace(/^(?:stream \d+|the new stream)(?: \("(?:[^"\\]|\\.)*"\))?: /, '');
}

// hostPort joins a host and a port, with brackets around an IPv6 address;
// an empty host is every address, "*".
export function hostPort(host, port) {
  const h = host || '*';
  return h.includes(':') ? `[${h}]:${port}` : `${h}:${port}`;
}

// daysLeft is the number of whole days from now until an ISO time
// (negative once past), or null without one.
export function daysLeft(iso, now = Date.now()) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : Math.floor((t - now) / 86_400_000);
}

// parseUpstream reads one line of the upstreams field, "host:port
// [weight N] [backup]", as the Caddyfile's upstream option: [upstream,
// problem].
export function parseUpstream(line) {
  const words = line.split(/\s+/);
  const m = /^(?:\[([^\]]+)\]|([^:\s]+)):(\d+)$/.exec(words[0]);
  if (!m) return [null, 'want host:port, e.g. 10.0.0.5:5432 or [2001:db8::5]:5432'];
  const port = Number(m[3]);
  if (port < 1 || port > 65535) return [null, `port ${m[3]}: must be 1-65535`];
  const u = { host: m[1] || m[2], port };
  for (let i = 1; i < words.length; i++) {
    if (words[i] === 'backup' && !u.backup) {
      u.backup = true;
    } else if (words[i] === 'weight' && u.weight === undefined) {
      const w = parseCount(words[++i] ?? '', { min: 1, max: 100 });
      if (w.error) return [null, `weight ${w.error === 'required' ? 'needs a number' : w.error}`];
      u.weight = w.value;
    } else {
      return [null, `"${words[i]}": want weight N or backup after host:port`];
    }
  }
  return [u, ''];
}

// formatUpstream is one upstream as a line of the upstreams field.
export function formatUpstream(u) {
  const host = u.host.includes(':') ? `[${u.host}]` : u.host;
  return `${host}:${u.port}${u.weight > 1 ? ` weight ${u.weight}` : ''}${u.backup ? ' backup' : ''}`;
}

// portRange is a port, or a range of ports as "30000-30099" when end is
// past it (listen_port_end: 0 is one port).
export function portRange(port, end) {
  return end > port ? `${port}-${end}` : `${port}`;
}

// listenText is where a stream listens: 0.0.0.0:5432, or
// 0.0.0.0:30000-30099 for a port range.
export function listenText(s) {
  return hostPort(s.listen_address, portRange(s.listen_port, s.listen_port_end));
}

// upstreamText is where a stream sends its connections: host:port (a
// range when the stream's ports map one to one: port + k), or "3
// upstreams" for several.
export function upstreamText(s) {
  const ups = Array.isArray(s.upstreams) ? s.upstreams : [];
  if (ups.length > 1) return `${ups.length} upstreams`;
  const host = ups.length ? ups[0].host : s.upstream_host;
  const port = ups.length ? ups[0].port : s.upstream_port;
  const span = s.listen_port_end > s.listen_port && !s.upstream_port_fixed ? s.listen_port_end - s.listen_port : 0;
  return hostPort(host, portRange(port, port + span));
}

// formatAgo is how long ago an ISO time was: "just now" under a second
// (or a time ahead of now, as a clock a little off gives), else "5 s
// ago", "2 min 5 s ago".
export function formatAgo(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return String(iso ?? '');
  const ms = now - t;
  return ms < 1000 ? 'just now' : `${formatAge(ms)} ago`;
}

// nodeState is a node of GET /api/v1/cluster in words: [text, class
// (ok, bad or warn), what it means].
export function nodeState(n) {
  switch (n.status) {
    case 'up':
      return ['up', 'ok', 'Its heartbeat is on time'];
    case 'stale':
      return ['stale', 'bad', 'No heartbeat for 3 beats: stopped, or cut off from the database'];
    case 'snapshot':
      return ['snapshot', 'warn', 'Started while the database was down: it runs from its local copy of the streams'];
  }
  return [String(n.status || 'unknown'), 'warn', 'An unknown state'];
}

// storageText says what a cluster answer's storage is.
export function storageText(storage) {
  switch (storage) {
    case 'postgres':
      return 'PostgreSQL (shared by the nodes)';
    case 'sqlite':
      return 'SQLite (one node)';
    case '':
    case undefined:
    case null:
      return 'none (storage off: one node)';
  }
  return String(storage);
}

// connUpstream is where an open connection went: its upstream's host:port
// (the API's upstream), with the port moved by k for a connection on port
// listen_port + k of a range that maps ports one to one.
export function connUpstream(c, s) {
  const up = c.upstream || '';
  const k = (c.listen_port || 0) - s.listen_port;
  const m = /^(.*):(\d+)$/.exec(up);
  if (!m || !(s.listen_port_end > s.listen_port) || s.upstream_port_fixed || !(k > 0)) return up;
  return `${m[1]}:${Number(m[2]) + k}`;
}
