// The create/edit form: every stream setting, grouped, checked as the
// user types (the listen port against validate-port), with the server's
// errors shown next to the fields they name.

import { ApiError, displayName, get, post, put } from './api.js';
import { clearFieldErrors, clearMessages, fail, go, h, heading, setFieldError, showFieldErrors } from './dom.js';
import { MAX_SECONDS, RATE, TIME, checkCIDR, formatUpstream, fromUnit, parseCount, parseUpstream, shortMessage, splitList, toUnit } from './units.js';

const PORT = { kind: 'int', min: 1, max: 65535, required: true };

// FIELDS are the settings by their API name.
const FIELDS = {
  name: { label: 'Name', kind: 'text', hint: 'Optional.' },
  enabled: { label: 'Enabled', kind: 'check', hint: 'A disabled stream does not listen.' },
  protocol: { label: 'Protocol', kind: 'select', options: [['tcp', 'tcp'], ['udp', 'udp'], ['tcp+udp', 'tcp+udp']], hint: 'tcp+udp: both, on the same port.' },
  listen_address: { label: 'Listen address', kind: 'text', placeholder: 'every address', hint: 'An IP address, e.g. 127.0.0.1. Empty: every address.' },
  listen_port: { label: 'Listen port', ...PORT },
  listen_port_end: { label: 'Last listen port', kind: 'int', min: 0, max: 65535, empty: 0, placeholder: 'one port', hint: 'Optional: listen on every port from the listen port to this one (at most 10,000). Port listen + k goes to upstream port + k.' },
  upstream_port_fixed: { label: 'Same upstream port for every port', kind: 'check', hint: 'With a port range: send every port to the upstream port instead of upstream port + k.' },
  upstream_host: { label: 'Upstream host', kind: 'text', required: true, hint: 'A hostname or an IP address.' },
  upstream_port: { label: 'Upstream port', ...PORT },
  upstreams: { label: 'Several upstreams', kind: 'upstreams', hint: 'Optional. One per line: host:port [weight N] [backup], e.g. 10.0.0.5:5432 weight 2. When set, the upstream host and port above are not used.' },
  load_balancing: { label: 'Load balancing', kind: 'select', options: [['', 'Round robin (weighted)'], ['least_connections', 'Least connections'], ['source_hash', 'Source hash (a client keeps its upstream)'], ['random', 'Random'], ['first', 'First (failover only)']], hint: 'With several upstreams: which one a new connection goes to.' },
  fail_timeout_seconds: { label: 'Fail timeout', kind: 'unit', scale: TIME, max: MAX_SECONDS, placeholder: '10', hint: 'An upstream whose dial failed is skipped this long. Empty: 10 s.' },
  proxy_protocol_version: { label: 'PROXY protocol', kind: 'select', number: true, options: [['0', 'Off'], ['1', '1'], ['2', '2']], hint: 'Sends the client address to the upstream: 1 (text, TCP only) or 2 (binary).' },
  sni: { label: 'Server names (SNI)', kind: 'names', hint: 'Optional, TCP: share the listen address and port with other streams; TLS clients asking for one of these names (db.example.com, *.example.com) come to this stream. One per line. On a shared port, the stream without names takes the rest.' },
  ssl_enabled: { label: 'TLS termination', kind: 'check', hint: 'TLS to clients, plain TCP to the upstream.' },
  ssl_cert_id: { label: 'Certificate', kind: 'select', number: true, options: [['0', 'None']], hint: 'Add certificates on the Certificates page.' },
  whitelist_cidrs: { label: 'Allowed CIDRs', kind: 'list', hint: 'One per line, e.g. 10.0.0.0/8. Empty: all.' },
  blacklist_cidrs: { label: 'Blocked CIDRs', kind: 'list', hint: 'One per line; checked after the allowed ones.' },
  accept_proxy_protocol: { label: 'Accept PROXY protocol', kind: 'select', options: [['off', 'Off'], ['optional', 'Optional'], ['required', 'Required']], hint: 'Behind HAProxy, an AWS NLB or nginx: take the client address from the PROXY header (v1 or v2) they send. Required: every connection must come from a trusted proxy with one.' },
  trusted_proxy_cidrs: { label: 'Trusted proxies', kind: 'list', hint: 'The front proxies allowed to send a header, one CIDR or IP per line. Needed unless Off.' },
  proxy_header_timeout_seconds: { label: 'Header timeout', kind: 'unit', scale: TIME, max: 300, placeholder: '5', hint: 'A connection without its whole header by then is closed. Empty: 5 s.' },
  upstream_tls: { label: 'TLS to the upstream', kind: 'check', hint: 'TCP: Aegis connects to the upstream over TLS and verifies its certificate.' },
  upstream_tls_server_name: { label: 'Upstream server name', kind: 'text', placeholder: 'the upstream host', hint: 'The name in the upstream\'s certificate. Empty: the upstream host.' },
  upstream_tls_ca: { label: 'Upstream CA', kind: 'textarea', placeholder: '-----BEGIN CERTIFICATE-----', hint: 'PEM of the CA certificate(s) the upstream\'s certificate must chain to. Empty: the system\'s roots.' },
  upstream_tls_client_cert_id: { label: 'Client certificate', kind: 'select', number: true, options: [['0', 'None']], hint: 'Presented to the upstream (mutual TLS).' },
  upstream_tls_insecure_skip_verify: { label: 'Skip verification', kind: 'check', hint: 'Accept any certificate from the upstream. For tests only.' },
  max_connections: { label: 'Max connections', kind: 'int', min: 0, max: Number.MAX_SAFE_INTEGER, empty: 0, placeholder: 'unlimited', hint: 'At once (UDP: clients). Empty: unlimited.' },
  max_connections_per_ip: { label: 'Max per source IP', kind: 'int', min: 0, max: 1000000, empty: 0, placeholder: 'unlimited', hint: 'At once from one IP (IPv6: one /64; UDP: clients). Empty: unlimited.' },
  connection_rate_per_ip: { label: 'New connections per IP', kind: 'int', min: 0, max: 1000000, empty: 0, placeholder: 'unlimited', hint: 'From one IP (IPv6: one /64) per rate window; more are closed at once. Empty: unlimited.' },
  connection_rate_window_seconds: { label: 'Rate window', kind: 'unit', scale: TIME, max: MAX_SECONDS, placeholder: '60', hint: 'For the new connections per IP: a token bucket refilled over this time. Empty: 60 s.' },
  upload_rate_bytes: { label: 'Upload rate', kind: 'unit', scale: RATE, unit: 'KB/s', placeholder: 'unlimited', hint: 'Per connection, client → upstream. 1 KB/s = 1024 B/s.' },
  download_rate_bytes: { label: 'Download rate', kind: 'unit', scale: RATE, unit: 'KB/s', placeholder: 'unlimited', hint: 'Per connection, upstream → client.' },
  connection_timeout_seconds: { label: 'Connect timeout', kind: 'unit', scale: TIME, max: MAX_SECONDS, placeholder: '10', hint: 'For the dial to the upstream. Empty: 10 s.' },
  idle_timeout_seconds: { label: 'Idle timeout', kind: 'unit', scale: TIME, max: MAX_SECONDS, placeholder: 'never', hint: 'Close after no traffic for this long. Empty: never (UDP: 60 s).' },
  udp_responses: { label: 'UDP responses', kind: 'int', min: 0, max: 1000, empty: 0, placeholder: 'off', hint: 'UDP: replies the upstream sends per client datagram (DNS: 1); the NAT entry closes once they have come. Empty: off (idle timeout).' },
  half_close: { label: 'Half-close', kind: 'check', hint: 'TCP: keep a connection open after one side ends (nc -N, rsh). Off: either end closes both.' },
  health_check_enabled: { label: 'Health checks', kind: 'check', hint: 'A TCP dial to the upstream at every interval.' },
  health_check_interval_seconds: { label: 'Check interval', kind: 'unit', scale: TIME, max: MAX_SECONDS, placeholder: '30', hint: 'Empty: 30 s.' },
  log_connections: { label: 'Log connections', kind: 'check', hint: 'One entry per connection, blocked ones too.' },
  notes: { label: 'Notes', kind: 'textarea' },
};

const GROUPS = [
  ['Stream', ['name', 'enabled']],
  ['Protocol and addresses', ['protocol', 'listen_address', 'listen_port', 'listen_port_end', 'upstream_host', 'upstream_port', 'upstream_port_fixed', 'proxy_protocol_version']],
  ['Several upstreams', ['upstreams', 'load_balancing', 'fail_timeout_seconds']],
  ['TLS', ['sni', 'ssl_enabled', 'ssl_cert_id']],
  ['TLS to the upstream', ['upstream_tls', 'upstream_tls_server_name', 'upstream_tls_ca', 'upstream_tls_client_cert_id', 'upstream_tls_insecure_skip_verify']],
  ['Access control', ['whitelist_cidrs', 'blacklist_cidrs', 'max_connections', 'max_connections_per_ip', 'connection_rate_per_ip', 'connection_rate_window_seconds']],
  ['Behind a front proxy', ['accept_proxy_protocol', 'trusted_proxy_cidrs', 'proxy_header_timeout_seconds']],
  ['Bandwidth and timeouts', ['upload_rate_bytes', 'download_rate_bytes', 'connection_timeout_seconds', 'idle_timeout_seconds', 'udp_responses', 'half_close']],
  ['Health checks', ['health_check_enabled', 'health_check_interval_seconds']],
  ['Logging', ['log_connections']],
  ['Notes', ['notes']],
];

const PORT_FIELDS = ['protocol', 'listen_address', 'listen_port', 'listen_port_end', 'sni'];

// CERT_FIELDS choose a stored certificate.
const CERT_FIELDS = ['ssl_cert_id', 'upstream_tls_client_cert_id'];

// INSECURE is the warning, in red, next to upstream_tls_insecure_skip_verify.
const INSECURE = 'Not verified: anyone on the path can pose as the upstream. Give its CA in Upstream CA instead.';

// showInsecure shows INSECURE while skipping verification is on.
function showInsecure(form, controls) {
  const on = controls.upstream_tls_insecure_skip_verify.checked && controls.upstream_tls.checked;
  const w = form.querySelector('#warn-upstream_tls_insecure_skip_verify');
  w.textContent = on ? INSECURE : '';
  w.classList.toggle('danger', on);
}

export async function formPage(ctx) {
  const editing = ctx.id > 0;
  const [stream, certs] = await Promise.all([
    editing ? get(`streams/${ctx.id}`) : null,
    get('certificates').catch(() => []),
  ]);
  if (!ctx.alive()) return;
  const readOnly = stream?.source === 'config';
  const controls = {};
  const form = h('form', { class: 'stream-form', novalidate: true, 'aria-label': editing ? 'Edit stream' : 'New stream' });
  // Problems of no field the form shows (e.g. the id), after a Save.
  const summary = h('div', { id: 'form-problems', class: 'problems', tabindex: -1, hidden: true });
  form.append(summary);

  for (const [legend, names] of GROUPS) {
    const set = h('fieldset', {}, h('legend', {}, legend));
    for (const name of names) set.append(field(name, FIELDS[name], controls, certs));
    form.append(set);
  }
  const save = h('button', { type: 'submit', class: 'primary' }, 'Save');
  form.append(h('div', { class: 'form-actions' }, readOnly ? null : save, h('a', { href: '#/streams', class: 'button' }, readOnly ? 'Back' : 'Cancel')));

  ctx.show(
    heading(editing ? 'Edit stream' : 'New stream'),
    editing ? h('p', { class: 'sub' }, `${displayName(stream)} (id ${stream.id})`) : null,
    readOnly ? h('p', { class: 'note' }, 'This stream is defined in the Caddy config: change it there. It is shown read-only.') : null,
    form);
  fill(controls, stream, certs);
  showInsecure(form, controls);
  for (const name of ['upstream_tls', 'upstream_tls_insecure_skip_verify']) {
    controls[name].addEventListener('change', () => showInsecure(form, controls));
  }
  if (readOnly) {
    for (const set of form.querySelectorAll('fieldset')) set.disabled = true;
    return;
  }

  // Inline checks: a field is checked when it changes or loses focus, and
  // as the user types once it was checked; the listen address and port
  // also against the server, 300 ms after the last keystroke.
  const touched = new Set();
  let portTimer = null;
  let portSeq = 0;
  // portProblems asks the server whether the stream could listen on the
  // address and port as the form has them: {problems, warnings}, or null
  // when the port is not a number yet.
  const portProblems = async () => {
    const port = parseCount(controls.listen_port.value, PORT);
    if (port.error) return null;
    const end = parseCount(controls.listen_port_end.value, FIELDS.listen_port_end);
    if (end.error) return null;
    try {
      const res = await post('streams/validate-port', {
        protocol: controls.protocol.value,
        listen_address: controls.listen_address.value.trim(),
        listen_port: port.value,
        listen_port_end: end.value || undefined,
        sni: splitList(controls.sni.value),
        id: editing ? ctx.id : undefined,
      });
      return { problems: res.errors.map((e) => ({ field: e.field, message: shortMessage(e.message) })), warnings: res.warnings };
    } catch (err) {
      return { problems: [{ field: 'listen_port', message: `Could not check the port: ${err.message}` }], warnings: [] };
    }
  };
  const checkPort = async () => {
    const seq = ++portSeq;
    const res = await portProblems();
    if (!res || seq !== portSeq || !ctx.alive()) return;
    for (const f of PORT_FIELDS) setFieldError(errEl(f), '');
    showFieldErrors(form, res.problems);
    form.querySelector('#warn-listen_port').textContent = res.warnings.join('\n');
  };
  const errEl = (f) => form.querySelector(`#err-${f}`);
  const onEdit = (name, typing) => {
    if (typing && !touched.has(name)) {
      if (PORT_FIELDS.includes(name)) schedulePort();
      return;
    }
    touched.add(name);
    const [, problems] = value(name, controls);
    setFieldError(errEl(name), problems.map((p) => p.message).join('\n'));
    if (PORT_FIELDS.includes(name)) {
      form.querySelector('#warn-listen_port').textContent = '';
      if (!problems.length) schedulePort();
    }
  };
  const schedulePort = () => {
    clearTimeout(portTimer);
    portTimer = setTimeout(checkPort, 300);
  };
  ctx.onLeave(() => {
    clearTimeout(portTimer);
    portSeq++;
  });
  for (const [name, el] of Object.entries(controls)) {
    el.addEventListener('input', () => onEdit(name, true));
    el.addEventListener('change', () => onEdit(name, false));
    el.unit?.addEventListener('change', () => onEdit(name, false));
  }
  // The TLS, PROXY and protocol settings depend on each other.
  const linked = ['ssl_enabled', 'ssl_cert_id', 'proxy_protocol_version', 'upstream_tls', 'accept_proxy_protocol', 'trusted_proxy_cidrs'];
  for (const name of ['protocol', ...linked]) {
    controls[name].addEventListener('change', () => {
      for (const other of linked) {
        if (other !== name && touched.has(other)) onEdit(other, false);
      }
    });
  }

  // withPortProblems adds what the server says of the listen address and
  // port to problems that name none of those fields: the server checks
  // them only once everything else is valid, and the port check's error
  // must not vanish behind another field's.
  const withPortProblems = async (problems) => {
    if (problems.some((p) => PORT_FIELDS.includes(p.field))) return problems;
    portSeq++; // a check on its way would clear what this one finds
    const res = await portProblems();
    return res ? problems.concat(res.problems) : problems;
  };
  // showProblems puts each problem at its field, those of no field in
  // the summary at the top of the form, and says how many in the alert.
  const showProblems = (problems, otherwise) => {
    const rest = showFieldErrors(form, problems);
    const fields = new Set(problems.filter((p) => !rest.includes(p)).map((p) => p.field)).size;
    summary.replaceChildren();
    if (rest.length) {
      summary.append(h('p', {}, 'Not saved:'), h('ul', {}, rest.map((p) => h('li', {}, p.field ? `${p.field}: ${p.message}` : p.message))));
    }
    summary.hidden = rest.length === 0;
    const parts = [];
    if (fields) parts.push(`${fields === 1 ? 'a setting needs' : `${fields} settings need`} fixing, marked below`);
    if (rest.length) parts.push(`${rest.length === 1 ? 'a problem is' : `${rest.length} problems are`} listed at the top of the form`);
    fail(parts.length ? `Not saved: ${parts.join('; ')}.` : `Not saved: ${otherwise}`);
    if (fields) focusFirstInvalid(form);
    else if (rest.length) summary.focus();
  };

  let saving = false;
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (saving) return;
    clearMessages();
    clearFieldErrors(form);
    summary.hidden = true;
    saving = true;
    save.setAttribute('aria-disabled', 'true');
    try {
      const { body, problems } = read(controls);
      if (problems.length) {
        const all = await withPortProblems(problems);
        if (ctx.alive()) showProblems(all, '');
        return;
      }
      let res;
      try {
        res = await (editing ? put(`streams/${ctx.id}`, body, stream.version) : post('streams', body));
      } catch (err) {
        if (!ctx.alive()) return;
        let all = err instanceof ApiError ? err.problems.map((p) => ({ field: p.field, message: shortMessage(p.message) })) : [];
        if (err instanceof ApiError && err.status === 400 && all.length) all = await withPortProblems(all);
        if (ctx.alive()) showProblems(all, err.message);
        return;
      }
      if (ctx.alive()) go('/streams', 'Saved', res?.warnings);
    } finally {
      saving = false;
      save.removeAttribute('aria-disabled');
    }
  });
}

// field builds one setting's label, control, hint, error and warning.
function field(name, f, controls, certs) {
  const id = `f-${name}`;
  const describedBy = [f.hint && `hint-${name}`, `err-${name}`, `warn-${name}`].filter(Boolean).join(' ');
  const common = { id, name, 'aria-describedby': describedBy, required: f.required };
  let control;
  let unit = null;
  switch (f.kind) {
    case 'check':
      control = h('input', { type: 'checkbox', ...common });
      break;
    case 'select': {
      let options = f.options;
      if (CERT_FIELDS.includes(name)) options = options.concat(certs.map((c) => [String(c.id), certLabel(c)]));
      control = h('select', common, options.map(([v, t]) => h('option', { value: v }, t)));
      break;
    }
    case 'list':
    case 'names':
    case 'upstreams':
    case 'textarea':
      control = h('textarea', { ...common, rows: f.kind === 'textarea' ? 4 : 3, spellcheck: f.kind === 'textarea' ? null : 'false' });
      break;
    case 'unit':
      control = h('input', { type: 'text', inputmode: 'decimal', autocomplete: 'off', placeholder: f.placeholder, ...common });
      unit = h('select', { id: `${id}-unit`, 'aria-label': `${f.label} unit`, 'aria-describedby': describedBy },
        f.scale.units.map(([u]) => h('option', { value: u }, u)));
      control.unit = unit;
      break;
    default:
      control = h('input', {
        type: 'text', autocomplete: 'off', spellcheck: 'false', placeholder: f.placeholder,
        inputmode: f.kind === 'int' ? 'numeric' : null, ...common,
      });
  }
  controls[name] = control;
  const label = h('label', { for: id }, f.label);
  const hint = f.hint ? h('p', { id: `hint-${name}`, class: 'hint' }, f.hint) : null;
  const err = h('p', { id: `err-${name}`, class: 'err' });
  const warn = h('p', { id: `warn-${name}`, class: 'warn' });
  if (f.kind === 'check') return h('div', { class: 'field check' }, control, label, hint, err, warn);
  return h('div', { class: 'field' }, label, unit ? h('div', { class: 'with-unit' }, control, unit) : control, hint, err, warn);
}

function certLabel(c) {
  const domains = (c.domains || []).join(', ');
  return domains ? `${c.name} (${domains})` : c.name;
}

// fill shows a stream's settings, or a new stream's defaults.
function fill(controls, s, certs) {
  s = s || { protocol: 'tcp', enabled: true };
  for (const name of CERT_FIELDS) {
    if (s[name] && !certs.some((c) => c.id === s[name])) {
      controls[name].append(h('option', { value: String(s[name]) }, `Certificate ${s[name]} (not found)`));
    }
  }
  for (const [name, f] of Object.entries(FIELDS)) {
    const el = controls[name];
    const v = s[name];
    switch (f.kind) {
      case 'check':
        el.checked = !!v;
        break;
      case 'select':
        el.value = String(v ?? f.options[0][0]);
        // A value the list spells otherwise (load_balancing
        // "round_robin", the default's name) shows as the default.
        if (el.selectedIndex < 0) el.value = String(f.options[0][0]);
        // Until the user changes it, the select gives back what the stream
        // had (value): a Save that changes nothing writes nothing.
        el.loaded = { shown: el.value, value: v };
        break;
      case 'list':
      case 'names':
        el.value = (v || []).join('\n');
        break;
      case 'upstreams':
        el.value = (v || []).map(formatUpstream).join('\n');
        break;
      case 'unit': {
        const u = v ? toUnit(v, f.scale) : { amount: '', unit: f.unit || f.scale.units[0][0] };
        el.value = u.amount;
        el.unit.value = u.unit;
        break;
      }
      default:
        el.value = v == null || (f.empty === 0 && v === 0) ? '' : String(v);
    }
  }
}

// value reads one setting: [its value for the API, its problems as the
// client can tell].
function value(name, controls) {
  const f = FIELDS[name];
  const el = controls[name];
  const problems = [];
  const bad = (message) => message && problems.push({ field: name, message });
  let v;
  switch (f.kind) {
    case 'check':
      v = el.checked;
      break;
    case 'select':
      v = el.loaded && el.value === el.loaded.shown ? el.loaded.value : f.number ? Number(el.value) : el.value;
      break;
    case 'list':
      v = splitList(el.value);
      v.forEach((item) => bad(checkCIDR(item)));
      break;
    case 'names':
      v = splitList(el.value);
      break;
    case 'upstreams':
      v = [];
      for (const line of el.value.split('\n').map((l) => l.trim()).filter(Boolean)) {
        const [u, err] = parseUpstream(line);
        if (err) bad(`"${line}": ${err}`);
        else v.push(u);
      }
      break;
    case 'int':
    case 'unit': {
      const r = f.kind === 'int' ? parseCount(el.value, f) : fromUnit(el.value, el.unit.value, f.scale, f.max);
      bad(r.error);
      v = r.value;
      break;
    }
    case 'textarea':
      v = el.value;
      break;
    default:
      v = el.value.trim();
      if (f.required && !v) bad('required');
  }
  const proto = controls.protocol.value;
  if (name === 'ssl_enabled' && v && proto === 'udp') bad('TLS needs TCP: choose protocol tcp or tcp+udp, or turn TLS termination off');
  if (name === 'ssl_cert_id' && controls.ssl_enabled.checked && !v) bad('choose the certificate for TLS termination');
  if (name === 'proxy_protocol_version' && v === 1 && proto !== 'tcp') bad(`version 1 cannot describe UDP; use 2 or Off on a ${proto} stream`);
  if (name === 'trusted_proxy_cidrs' && v.length === 0 && controls.accept_proxy_protocol.value !== 'off') bad('list the front proxies that send the header (required unless Accept PROXY protocol is Off)');
  if (name === 'upstream_tls' && v && proto === 'udp') bad('TLS to the upstream needs TCP: choose protocol tcp or tcp+udp, or turn it off');
  return [v, problems];
}

// read returns the stream the form describes, and every problem with it.
function read(controls) {
  const body = {};
  let problems = [];
  for (const name of Object.keys(FIELDS)) {
    const [v, p] = value(name, controls);
    body[name] = v;
    problems.push(...p);
  }
  // With upstreams, upstream_host and upstream_port are the first of
  // them: the server fills them in.
  if (body.upstreams.length) {
    delete body.upstream_host;
    delete body.upstream_port;
    problems = problems.filter((p) => p.field !== 'upstream_host' && p.field !== 'upstream_port');
  }
  return { body, problems };
}

function focusFirstInvalid(form) {
  form.querySelector('[aria-invalid="true"]')?.focus();
}
