// End-to-end tests of the Aegis Streams web UI: a real bin/aegis, a TCP
// echo server and real clients on loopback, driven through headless
// Debian Chromium with playwright-core.
//
//   make e2e                      (builds bin/aegis, installs what is missing)
//   node ui/e2e/run.mjs           (AEGIS_BIN defaults to ../../bin/aegis)
//
// Screenshots of each page go to test-artifacts/ui/ at the repository root,
// with aegis.log (what bin/aegis printed). The run fails if the page asks
// for anything outside the aegis origin: the UI must work offline. One test
// runs axe-core (WCAG 2 A/AA) on every page, light and dark, and fails on
// serious or critical issues.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import dgram from 'node:dgram';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { parseCSV } from './csv.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '../..');
const aegisBin = path.resolve(here, process.env.AEGIS_BIN || '../../bin/aegis');
const chromiumBin = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const artifacts = path.join(repoRoot, 'test-artifacts', 'ui');

// The whole run stops after this long, whatever is stuck.
const RUN_LIMIT_MS = 300_000;
// Playwright actions and waits on the page.
const STEP_MS = 10_000;
// One node:test test.
const TEST_MS = 40_000;

const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const CFG_NAME = 'cfg-stream'; // the read-only stream from the Caddyfile
const NAME = 'e2e-echo'; // the stream the tests create in the form
const CERT_NAME = 'e2e-cert';
const UDP_NAME = 'e2e-udp'; // a UDP stream made in the form
const GUARDED_NAME = 'e2e-guarded'; // blocks 127.0.0.1, upstream down
const MULTI_NAME = 'e2e-three'; // three upstreams (one down) on a port range
const SNI_NAME = 'e2e-sni'; // server names on a port of its own
const NODE = 'e2e-node'; // node_name
const SITE_USER = 'e2e';
const SITE_PASSWORD = 'e2e-password-not-secret';

// Everything the run owns, for the cleanup.
const S = {
  tmp: '', aegis: null, aegisExited: null, echo: null, echo2: null, holder: null, udpEcho: null, sockets: new Set(),
  pgDir: '', children: [], // the PostgreSQL test's server and nodes
  browser: null, offOrigin: [], pageErrors: [],
  ports: {}, base: '', site: '', streamId: 0, certId: 0,
};

const watchdog = setTimeout(() => {
  console.error(`e2e: the run took over ${RUN_LIMIT_MS / 1000} s; stopping it`);
  killAegisNow();
  process.exit(1);
}, RUN_LIMIT_MS);
watchdog.unref();

process.on('exit', killAegisNow);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killAegisNow();
    removeTmp();
    process.exit(1);
  });
}

function killAegisNow() {
  for (const child of [S.aegis, ...S.children]) {
    if (child && child.exitCode === null && child.signalCode === null) {
      try { child.kill('SIGKILL'); } catch { /* already gone */ }
    }
  }
}

function removeTmp() {
  if (S.tmp) fs.rmSync(S.tmp, { recursive: true, force: true });
  if (S.pgDir) fs.rmSync(S.pgDir, { recursive: true, force: true });
}

// ---------------------------------------------------------------- helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// waitFor polls fn until it returns a truthy value, or throws naming what
// it waited for and the last value or error seen.
async function waitFor(what, fn, timeout = STEP_MS, interval = 100) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > end) {
      const seen = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${seen})`);
    }
    await sleep(interval);
  }
}

// handedOut holds every port freePort and threePorts returned in this run:
// a port a test keeps closed (an upstream that must be down) is in no
// S.ports, and must not be handed to the next stream.
const handedOut = new Set();

// freePort finds a loopback TCP port in 20000-32767 that nothing holds now
// and that it has not returned before.
async function freePort() {
  const taken = new Set(Object.values(S.ports));
  for (let i = 0; i < 200; i++) {
    const port = 20000 + Math.floor(Math.random() * 12768);
    if (taken.has(port) || handedOut.has(port)) continue;
    if (await canBind(port)) {
      handedOut.add(port);
      return port;
    }
  }
  throw new Error('no free port in 20000-32767 after 200 tries');
}

function canBind(port, host = '127.0.0.1') {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen({ port, host, exclusive: true }, () => srv.close(() => resolve(true)));
  });
}

// get is a plain GET with node:http (fetch sends Sec-Fetch-Mode: cors, which
// Caddy's admin endpoint refuses without an Origin, as a browser's would be).
function get(url, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 5000, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: no answer within 5 s`)));
    req.on('error', reject);
  });
}

async function api(urlPath) {
  const res = await get(S.base + urlPath);
  let body = null;
  if (res.text) {
    try {
      body = JSON.parse(res.text);
    } catch {
      throw new Error(`GET ${urlPath}: status ${res.status}, not JSON: ${res.text.slice(0, 200)}`);
    }
  }
  return { status: res.status, body };
}

// apiSend writes through the API with the headers a browser on the admin
// origin sends, as a script of another admin would.
async function apiSend(method, urlPath, body) {
  const res = await fetch(S.base + urlPath, {
    method,
    headers: { Origin: S.base, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  assert.ok(res.ok, `${method} ${urlPath}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

// udpExchange sends the payloads from one UDP socket, each once the echo
// of the one before came back; it resolves then, rejects after 5 s.
function udpExchange(port, payloads) {
  return new Promise((resolve, reject) => {
    const sock = dgram.createSocket('udp4');
    let got = 0;
    const done = (err) => {
      clearTimeout(timer);
      sock.close();
      if (err) reject(err); else resolve(got);
    };
    const timer = setTimeout(() => done(new Error(`UDP echo: ${got} of ${payloads.length} datagrams back after 5 s`)), 5000);
    sock.on('error', done);
    sock.on('message', () => {
      if (++got === payloads.length) done();
      else sock.send(payloads[got]);
    });
    sock.connect(port, '127.0.0.1', () => sock.send(payloads[0]));
  });
}

function track(sock) {
  S.sockets.add(sock);
  sock.once('close', () => S.sockets.delete(sock));
  return sock;
}

function connect(port, useTLS) {
  return new Promise((resolve, reject) => {
    const opts = { host: '127.0.0.1', port };
    const sock = useTLS
      ? tls.connect({ ...opts, servername: 'e2e.test', rejectUnauthorized: false })
      : net.connect(opts);
    track(sock);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`connecting to 127.0.0.1:${port}: no answer within 5 s`));
    }, 5000);
    sock.once(useTLS ? 'secureConnect' : 'connect', () => {
      clearTimeout(timer);
      resolve(sock);
    });
    sock.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

// exchange writes payload and resolves with what came back once as many
// bytes did, rejects if the socket ends first or after 5 s.
function exchange(sock, payload) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let got = 0;
    const done = (err, val) => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('close', onClose);
      sock.off('error', onError);
      if (err) reject(err); else resolve(val);
    };
    const onData = (d) => {
      chunks.push(d);
      got += d.length;
      if (got >= payload.length) done(null, Buffer.concat(chunks));
    };
    const onClose = () => done(new Error(`connection closed after ${got} of ${payload.length} echoed bytes`));
    const onError = (err) => done(err);
    const timer = setTimeout(() => done(new Error(`echo: ${got} of ${payload.length} bytes after 5 s`)), 5000);
    sock.on('data', onData);
    sock.once('close', onClose);
    sock.once('error', onError);
    sock.write(payload);
  });
}

// echoThrough opens a connection, checks the echo of payload and closes it.
async function echoThrough(port, payload, useTLS = false) {
  const sock = await connect(port, useTLS);
  try {
    const back = await exchange(sock, payload);
    assert.ok(back.equals(payload), `echo through 127.0.0.1:${port} came back different`);
    return sock;
  } finally {
    await closeSocket(sock);
  }
}

function closeSocket(sock) {
  if (sock.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => { sock.destroy(); resolve(); }, 2000);
    sock.once('close', () => { clearTimeout(timer); resolve(); });
    sock.end();
  });
}

// probe says what a new connection to port gets: 'refused' (connect
// fails), 'closed' (closed at once, no echo), or 'echo'.
async function probe(port) {
  let sock;
  try {
    sock = await connect(port, false);
  } catch {
    return 'refused';
  }
  try {
    await exchange(sock, Buffer.from('probe'));
    return 'echo';
  } catch {
    return 'closed';
  } finally {
    sock.destroy();
  }
}

function digitsIn(text) {
  if (text == null) return NaN;
  const joined = text.replace(/(\d)[,.\u00a0\u202f' ](?=\d{3}(\D|$))/g, '$1');
  const nums = (joined.match(/\d+/g) || []).map(Number);
  return nums.length ? Math.max(...nums) : NaN;
}

// cellNumber reads the exact number in a stream row's data-field cell title.
async function cellNumber(row, field) {
  const cell = row.locator(`[data-field="${field}"]`);
  const title = await cell.getAttribute('title', { timeout: STEP_MS });
  const n = digitsIn(title);
  assert.ok(Number.isFinite(n), `cell ${field}: title ${JSON.stringify(title)} holds no number`);
  return n;
}

// launchBrowser starts Chromium with a fresh profile that Playwright makes
// in os.tmpdir(), pointed here at the run's temporary directory so that
// the cleanup removes it even if Chromium could not.
async function launchBrowser() {
  const saved = process.env.TMPDIR;
  process.env.TMPDIR = S.tmp;
  try {
    S.browser = await chromium.launch({
      executablePath: chromiumBin,
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 30_000,
    });
  } finally {
    if (saved === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = saved;
  }
}

async function newContext(options = {}) {
  const ctx = await S.browser.newContext({ viewport: { width: 1280, height: 900 }, ...options });
  ctx.setDefaultTimeout(STEP_MS);
  ctx.setDefaultNavigationTimeout(STEP_MS);
  return ctx;
}

// guardOrigin aborts and records every request of ctx that leaves origin.
async function guardOrigin(ctx, origin) {
  await ctx.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith('data:') || url.startsWith('blob:') || new URL(url).origin === origin) {
      return route.continue();
    }
    S.offOrigin.push(url);
    return route.abort('blockedbyclient');
  });
}

function watchPage(page, label) {
  page.on('pageerror', (err) => S.pageErrors.push(`${label}: ${err.message}`));
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(artifacts, name), fullPage: true, timeout: STEP_MS });
}

function streamRow(page, id) {
  return page.locator(`tr[data-stream-id="${id}"]`);
}

// openHash loads the UI on the admin endpoint at a hash route, as a typed
// address does.
async function openHash(page, hash) {
  await page.goto(`${S.base}/ui/#${hash}`);
}

function h1(page, name) {
  return page.getByRole('heading', { level: 1, name, exact: true });
}

function openDialog(page) {
  return page.locator('dialog[open]');
}

// ---------------------------------------------------------------- axe

// axe-core is a test dependency only: it is injected into the page under
// test in a context that bypasses the UI's CSP, never served by aegis.
const AXE_SRC = fs.readFileSync(path.join(here, 'node_modules', 'axe-core', 'axe.min.js'), 'utf8');
const AXE_TAGS = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa'];
const AXE_FAIL = new Set(['serious', 'critical']);

// checkA11y runs axe-core's WCAG 2 A/AA rules on page as it is now, prints
// every violation and returns the serious and critical ones, described.
async function checkA11y(page, what) {
  if (!(await page.evaluate(() => typeof window.axe === 'object'))) {
    await page.addScriptTag({ content: AXE_SRC });
  }
  const t0 = Date.now();
  const { review, violations } = await page.evaluate(async (tags) => {
    const r = await window.axe.run(document, { runOnly: { type: 'tag', values: tags }, resultTypes: ['violations'] });
    return {
      review: r.incomplete.map((v) => v.id),
      violations: r.violations.map((v) => ({
        id: v.id, impact: v.impact, help: v.help,
        nodes: v.nodes.map((n) => ({ target: n.target.join(' '), impact: n.impact, summary: n.failureSummary })),
      })),
    };
  }, AXE_TAGS);
  const bad = [];
  for (const v of violations) {
    // One line for each rule and impact: where, and what to fix (the
    // first place's summary; the others' are alike).
    const byImpact = new Map();
    for (const n of v.nodes) {
      const impact = n.impact || v.impact;
      byImpact.set(impact, [...(byImpact.get(impact) || []), n]);
    }
    for (const [impact, nodes] of byImpact) {
      const line = `${what}: ${v.id} (${impact}): ${v.help}\n#     at ${nodes.map((n) => n.target).join(' | ')}`
        + `\n#     ${(nodes[0].summary || '').replace(/\n/g, '\n#     ')}`;
      console.log(`# axe ${line}`);
      if (AXE_FAIL.has(impact)) bad.push(line);
    }
  }
  const unsure = review.length ? `; axe could not decide: ${review.join(', ')}` : '';
  console.log(`# axe ${what}: ${violations.length} rule(s) violated, ${Date.now() - t0} ms${unsure}`);
  return bad;
}

function needStream() {
  assert.ok(S.streamId, `no stream "${NAME}": the create test failed`);
}

// ---------------------------------------------------------------- set-up

let page; // the main tab, on the admin endpoint

before(async () => {
  const t0 = Date.now();
  assert.ok(fs.existsSync(aegisBin), `${aegisBin} is missing: run make build (or set AEGIS_BIN)`);
  assert.ok(fs.existsSync(chromiumBin), `${chromiumBin} is missing: apt-get install chromium (or set CHROMIUM_BIN)`);
  fs.mkdirSync(artifacts, { recursive: true });
  S.tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-e2e-'));

  // The upstream: a TCP echo server.
  S.echo = net.createServer((sock) => {
    track(sock);
    sock.on('error', () => {});
    sock.pipe(sock);
  });
  S.ports.echo = await freePort();
  await new Promise((resolve, reject) => {
    S.echo.once('error', reject);
    S.echo.listen({ port: S.ports.echo, host: '127.0.0.1', exclusive: true }, resolve);
  });

  // A second one, for a stream with several upstreams.
  S.echo2 = net.createServer((sock) => {
    track(sock);
    sock.on('error', () => {});
    sock.pipe(sock);
  });
  S.ports.echo2 = await freePort();
  await new Promise((resolve, reject) => {
    S.echo2.once('error', reject);
    S.echo2.listen({ port: S.ports.echo2, host: '127.0.0.1', exclusive: true }, resolve);
  });

  // A program that holds a port and is no stream's upstream.
  S.holder = net.createServer((sock) => sock.destroy());
  S.ports.held = await freePort();
  await new Promise((resolve, reject) => {
    S.holder.once('error', reject);
    S.holder.listen({ port: S.ports.held, host: '127.0.0.1', exclusive: true }, resolve);
  });

  // A UDP echo server, for the UDP stream.
  S.udpEcho = dgram.createSocket('udp4');
  S.udpEcho.on('message', (msg, rinfo) => S.udpEcho.send(msg, rinfo.port, rinfo.address));
  S.udpEcho.on('error', () => {});
  await new Promise((resolve, reject) => {
    S.udpEcho.once('error', reject);
    S.udpEcho.bind(0, '127.0.0.1', resolve);
  });
  S.ports.udpEcho = S.udpEcho.address().port;

  S.ports.admin = await freePort();
  S.ports.cfg = await freePort();
  S.ports.site = await freePort();
  S.ports.stream = await freePort();
  S.base = `http://127.0.0.1:${S.ports.admin}`;
  S.site = `http://127.0.0.1:${S.ports.site}`;

  // The lowest bcrypt cost: the default (14) takes about a second of CPU
  // for each check of the password.
  const hash = execFileSync(aegisBin, ['hash-password', '--algorithm', 'bcrypt', '--bcrypt-cost', '4', '--plaintext', SITE_PASSWORD], {
    encoding: 'utf8', timeout: 20_000,
  }).trim();
  const caddyfile = path.join(S.tmp, 'Caddyfile');
  // The admin origins as in Caddyfile.example: "" lets a browser open the
  // UI from its address bar (no Origin, no Referer).
  fs.writeFileSync(caddyfile, `{
	admin 127.0.0.1:${S.ports.admin} {
		origins 127.0.0.1:${S.ports.admin} localhost:${S.ports.admin} ""
	}
	storage file_system ${S.tmp}/caddy
	skip_install_trust
	streams {
		storage sqlite ${S.tmp}/streams.db
		node_name ${NODE}
		host 1 ${CFG_NAME} {
			listen 127.0.0.1:${S.ports.cfg}
			upstream 127.0.0.1:${S.ports.echo}
		}
	}
}

http://127.0.0.1:${S.ports.site} {
	bind 127.0.0.1
	basic_auth {
		${SITE_USER} ${hash}
	}
	handle_path /admin/* {
		route {
			streams_admin
		}
	}
	handle {
		route {
			streams_admin
		}
	}
}
`);

  const log = fs.openSync(path.join(artifacts, 'aegis.log'), 'w');
  S.aegis = spawn(aegisBin, ['run', '--config', caddyfile, '--adapter', 'caddyfile'], {
    cwd: S.tmp,
    env: {
      ...process.env,
      HOME: S.tmp,
      XDG_DATA_HOME: path.join(S.tmp, 'data'),
      XDG_CONFIG_HOME: path.join(S.tmp, 'config'),
    },
    stdio: ['ignore', log, log],
  });
  fs.closeSync(log);
  S.aegisExited = new Promise((resolve) => S.aegis.once('exit', (code, sig) => resolve({ code, sig })));
  S.aegisExited.then(({ code, sig }) => {
    if (!S.stopping) console.error(`e2e: bin/aegis exited early (code ${code}, signal ${sig}); see test-artifacts/ui/aegis.log`);
  });
  await waitFor('bin/aegis to answer on its admin endpoint', async () => {
    if (S.aegis.exitCode !== null) throw new Error(`bin/aegis exited with ${S.aegis.exitCode}; see test-artifacts/ui/aegis.log`);
    const { status } = await api('/api/v1/streams');
    return status === 200;
  }, 20_000, 200);

  await launchBrowser();
  const ctx = await newContext();
  await guardOrigin(ctx, S.base);
  page = await ctx.newPage();
  watchPage(page, 'admin endpoint');
  console.log(`# set-up took ${Date.now() - t0} ms (aegis admin ${S.base}, site ${S.site})`);
});

after(async () => {
  const t0 = Date.now();
  S.stopping = true;
  if (S.browser) await S.browser.close().catch(() => {});
  for (const sock of S.sockets) sock.destroy();
  if (S.echo) await new Promise((r) => S.echo.close(r));
  if (S.echo2) await new Promise((r) => S.echo2.close(r));
  if (S.holder) await new Promise((r) => S.holder.close(r));
  if (S.udpEcho) S.udpEcho.close();
  for (const child of S.children.slice().reverse()) await stopChild(child);
  if (S.aegis && S.aegis.exitCode === null && S.aegis.signalCode === null) {
    S.aegis.kill('SIGTERM');
    const stopped = await Promise.race([S.aegisExited, sleep(10_000).then(() => null)]);
    if (!stopped) killAegisNow();
  }
  removeTmp();
  clearTimeout(watchdog);
  console.log(`# clean-up took ${Date.now() - t0} ms`);
});

// ---------------------------------------------------------------- tests

test('the streams page loads, and the config stream is read-only', { timeout: TEST_MS }, async () => {
  await openHash(page, '/streams');
  await h1(page, 'Streams').waitFor();
  const row = streamRow(page, 1);
  await row.waitFor();
  assert.match(await row.innerText(), new RegExp(CFG_NAME));
  assert.ok(await row.getByText('config', { exact: true }).isVisible(), 'config stream: no "config" badge');
  assert.equal(await row.getByRole('link', { name: 'Edit', exact: true }).count(), 0, 'config stream has an Edit link');
  assert.equal(await row.getByRole('button', { name: 'Delete', exact: true }).count(), 0, 'config stream has a Delete button');
  assert.ok(await page.getByLabel(`Enabled: ${CFG_NAME}`, { exact: true }).isDisabled(), 'config stream switch is not disabled');
  assert.equal((await row.locator('[data-field="health"]').innerText()).trim(), 'not checked');
  // /ui without the slash leads to the UI too.
  const res = await get(`${S.base}/ui`);
  assert.ok([301, 302, 307, 308].includes(res.status), `GET /ui: status ${res.status}, want a redirect`);
  assert.match(res.headers.location || '', /\/ui\/$/);
});

test('a TCP stream created in the form relays bytes', { timeout: TEST_MS }, async () => {
  await page.getByRole('link', { name: 'New stream', exact: true })
    .or(page.getByRole('button', { name: 'New stream', exact: true })).first().click();
  await h1(page, 'New stream').waitFor();
  await page.getByLabel('Name', { exact: true }).fill(NAME);
  await page.getByLabel('Protocol', { exact: true }).selectOption('tcp');
  await page.getByLabel('Listen address', { exact: true }).fill('127.0.0.1');
  await page.getByLabel('Listen port', { exact: true }).fill(String(S.ports.stream));
  await page.getByLabel('Upstream host', { exact: true }).fill('127.0.0.1');
  await page.getByLabel('Upstream port', { exact: true }).fill(String(S.ports.echo));
  await page.getByLabel('Log connections', { exact: true }).check();
  await page.getByLabel('Notes', { exact: true }).fill('made by ui/e2e');
  assert.ok(await page.getByLabel('Enabled', { exact: true }).isChecked(), 'a new stream is not enabled by default');
  await shot(page, 'form.png');
  await page.getByRole('button', { name: 'Save', exact: true }).click();

  const created = await waitFor(`stream "${NAME}" in GET /api/v1/streams`, async () => {
    const { body } = await api('/api/v1/streams');
    return body.find((s) => s.name === NAME);
  });
  S.streamId = created.id;
  assert.equal(created.source, 'api');
  assert.equal(created.protocol || 'tcp', 'tcp');
  assert.equal(created.listen_address, '127.0.0.1');
  assert.equal(created.listen_port, S.ports.stream);
  assert.equal(created.upstream_host, '127.0.0.1');
  assert.equal(created.upstream_port, S.ports.echo);
  assert.equal(created.enabled, true);
  assert.equal(created.log_connections, true);
  assert.equal(created.notes, 'made by ui/e2e');
  await waitFor('a success message (role=status)', async () =>
    (await page.getByRole('status').allInnerTexts()).some((t) => t.trim() !== ''));

  await echoThrough(S.ports.stream, Buffer.from('hello through aegis\n'));
});

test('counters on the streams page move with traffic, without a reload', { timeout: TEST_MS }, async () => {
  needStream();
  await page.getByRole('link', { name: 'Streams', exact: true }).first().click();
  await h1(page, 'Streams').waitFor();
  const row = streamRow(page, S.streamId);
  await row.waitFor();
  assert.match(await row.innerText(), new RegExp(NAME));
  const conns0 = await cellNumber(row, 'total_connections');
  const sent0 = await cellNumber(row, 'bytes_sent');
  const recv0 = await cellNumber(row, 'bytes_received');
  await page.evaluate(() => { window.__e2eNoReload = true; });

  const payload = Buffer.alloc(50_000, 'x');
  await echoThrough(S.ports.stream, payload);

  await waitFor('total_connections, bytes_sent and bytes_received to grow on the page', async () => {
    const conns = await cellNumber(row, 'total_connections');
    const sent = await cellNumber(row, 'bytes_sent');
    const recv = await cellNumber(row, 'bytes_received');
    return conns >= conns0 + 1 && sent >= sent0 + payload.length && recv >= recv0 + payload.length
      && { conns, sent, recv };
  }, 15_000, 250);
  assert.equal(await page.evaluate(() => window.__e2eNoReload), true, 'the page reloaded');
  await shot(page, 'streams.png');
});

test('phone width and dark mode', { timeout: TEST_MS }, async () => {
  // The streams page, with the config stream and the one made above.
  await openHash(page, '/streams');
  await streamRow(page, S.streamId || 1).waitFor();
  const lightBg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);

  await page.setViewportSize({ width: 375, height: 812 });
  await streamRow(page, S.streamId || 1).waitFor();
  await shot(page, 'streams-phone.png');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 1, `at 375 px the page scrolls sideways by ${overflow} px`);

  await page.setViewportSize({ width: 1280, height: 900 });
  await page.emulateMedia({ colorScheme: 'dark' });
  await shot(page, 'streams-dark.png');
  const darkBg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert.notEqual(darkBg, lightBg, 'dark mode: the page background does not change');
  await page.emulateMedia({ colorScheme: 'light' });
});

test('the row switch turns the stream off (connections refused) and on again, with a PATCH of enabled alone', { timeout: TEST_MS }, async () => {
  needStream();
  const sw = page.getByLabel(`Enabled: ${NAME}`, { exact: true });
  assert.ok(await sw.isChecked(), 'switch is off for an enabled stream');
  const writes = [];
  const onRequest = (req) => {
    if (req.method() !== 'GET' && new URL(req.url()).pathname.endsWith(`/api/v1/streams/${S.streamId}`)) {
      writes.push({ method: req.method(), type: req.headers()['content-type'], ifMatch: req.headers()['if-match'], body: req.postData() });
    }
  };
  page.on('request', onRequest);
  await sw.click();
  await waitFor('the stream to be disabled in the API', async () =>
    (await api(`/api/v1/streams/${S.streamId}`)).body.enabled === false);
  page.off('request', onRequest);
  await waitFor('the switch to show off', async () => !(await sw.isChecked()));
  const off = await waitFor('a new connection to be refused or closed', async () => {
    const r = await probe(S.ports.stream);
    return r !== 'echo' && r;
  }, 5000, 200);
  assert.ok(['refused', 'closed'].includes(off));

  await sw.click();
  await waitFor('the stream to be enabled in the API', async () =>
    (await api(`/api/v1/streams/${S.streamId}`)).body.enabled === true);
  await waitFor('the switch to show on', () => sw.isChecked());
  await waitFor('echo through the stream again', async () => (await probe(S.ports.stream)) === 'echo', 5000, 200);
  // The switch sent enabled alone, as a merge patch of the version shown.
  assert.equal(writes.length, 1, `the switch sent ${JSON.stringify(writes)}`);
  assert.equal(writes[0].method, 'PATCH', `the switch sent ${JSON.stringify(writes)}`);
  assert.equal(writes[0].type, 'application/merge-patch+json');
  assert.deepEqual(JSON.parse(writes[0].body), { enabled: false });
  assert.match(writes[0].ifMatch || '', /^".+"$/, 'the PATCH has no If-Match');
});

test('saving the form after someone else changed the stream says so and keeps their change', { timeout: TEST_MS }, async () => {
  needStream();
  await openHash(page, `/streams/${S.streamId}`);
  await h1(page, 'Edit stream').waitFor();
  await page.getByLabel('Notes', { exact: true }).fill('from the form');
  // Meanwhile another admin changes the stream through the API, as a
  // script would, with the headers a browser on the admin origin sends.
  const { body: current } = await api(`/api/v1/streams/${S.streamId}`);
  const res = await fetch(`${S.base}/api/v1/streams/${S.streamId}`, {
    method: 'PUT',
    headers: { Origin: S.base, 'Content-Type': 'application/json' },
    body: JSON.stringify({ ...current, notes: 'from the API' }),
  });
  assert.equal(res.status, 200, `PUT through the API: ${res.status} ${await res.text()}`);

  await page.getByRole('button', { name: 'Save', exact: true }).click();
  const alert = page.getByRole('alert').filter({ hasText: /changed by someone else/ });
  await alert.waitFor();
  assert.match(await alert.innerText(), /load it again/);
  assert.ok(await h1(page, 'Edit stream').isVisible(), 'the form was left after a refused save');
  assert.equal((await api(`/api/v1/streams/${S.streamId}`)).body.notes, 'from the API', 'the form overwrote the API change');
  await shot(page, 'form-conflict.png');
  // Back to the streams page, where the next test starts.
  await openHash(page, '/streams');
  await streamRow(page, S.streamId).waitFor();
});

test('the form shows a stream as the API stored it, and a Save that changes nothing changes nothing', { timeout: TEST_MS }, async () => {
  needStream();
  // As a script would write it: load_balancing by its name, no protocol,
  // no accept_proxy_protocol.
  const { body: current } = await api(`/api/v1/streams/${S.streamId}`);
  const body = { ...current, load_balancing: 'round_robin' };
  delete body.protocol;
  delete body.accept_proxy_protocol;
  await apiSend('PUT', `/api/v1/streams/${S.streamId}`, body);
  const audit = async () => (await api(`/api/v1/audit?stream_id=${S.streamId}`)).body.entries;
  const before = await audit();
  await openHash(page, `/streams/${S.streamId}`);
  await h1(page, 'Edit stream').waitFor();
  const lb = page.getByLabel('Load balancing', { exact: true });
  assert.equal(await lb.evaluate((el) => el.selectedOptions[0]?.textContent), 'Round robin (weighted)', 'load_balancing round_robin shows blank');
  await page.getByRole('button', { name: 'Save', exact: true }).click();
  await streamRow(page, S.streamId).waitFor();
  // A write that changes nothing makes no audit entry.
  const after = await audit();
  assert.equal(after.length, before.length, `an unchanged Save changed ${JSON.stringify(after[0]?.changes)}`);
  assert.equal((await api(`/api/v1/streams/${S.streamId}`)).body.load_balancing, 'round_robin');
});

test('the log page shows the connection, allowed, with its bytes', { timeout: TEST_MS }, async () => {
  needStream();
  const payload = Buffer.alloc(700, 'L'); // under 1 KiB, so any human format shows 700
  await echoThrough(S.ports.stream, payload);
  const entry = await waitFor('the 700-byte connection in the API log', async () => {
    const { body } = await api(`/api/v1/streams/${S.streamId}/connections?limit=100`);
    return body.entries.find((e) => e.bytes_sent === 700 && e.bytes_received === 700);
  }, 15_000, 250);
  assert.equal(entry.action, 'allowed');

  await streamRow(page, S.streamId).getByRole('link', { name: 'Log', exact: true }).click();
  await h1(page, `Log: ${NAME}`).waitFor();
  const headers = (await page.locator('table thead th').allInnerTexts()).map((t) => t.trim());
  for (const h of ['Time', 'Source', 'Action', 'Sent', 'Received', 'Duration', 'Reason']) {
    assert.ok(headers.includes(h), `log table: no column "${h}" (have ${headers.join(', ')})`);
  }
  const col = (h) => headers.indexOf(h);
  const rowOf700 = async () => {
    for (const r of await page.locator('tr.log-row').all()) {
      const cells = (await r.locator('td').allInnerTexts()).map((t) => t.trim());
      if (cells[col('Action')] === 'allowed' && /\b700\b/.test(cells[col('Sent')])
        && /\b700\b/.test(cells[col('Received')])) return cells;
    }
    return null;
  };
  const cells = await waitFor('a log row: allowed, 700 bytes each way', rowOf700);
  assert.match(cells[col('Source')], /127\.0\.0\.1/);
  await shot(page, 'log.png');

  // The Action filter: "blocked" hides it, "allowed" shows it again.
  const action = page.getByLabel('Action', { exact: true });
  await action.selectOption({ label: 'blocked' });
  await waitFor('no allowed rows with Action = blocked', async () => (await rowOf700()) === null);
  await action.selectOption({ label: 'allowed' });
  await waitFor('the row back with Action = allowed', rowOf700);
});

test('the form shows an inline error for a port that is taken', { timeout: TEST_MS }, async () => {
  await openHash(page, '/streams/new');
  await h1(page, 'New stream').waitFor();
  const port = page.getByLabel('Listen port', { exact: true });
  const err = page.locator('#err-listen_port');
  assert.match((await port.getAttribute('aria-describedby')) || '', /\berr-listen_port\b/,
    'Listen port is not described by #err-listen_port');
  await page.getByLabel('Listen address', { exact: true }).fill('127.0.0.1');

  // The port of the config stream.
  await port.fill(String(S.ports.cfg));
  await port.press('Tab');
  const overlap = await waitFor('#err-listen_port text for the config stream\'s port', async () =>
    (await err.innerText()).trim());
  assert.match(overlap, new RegExp(`${S.ports.cfg}`), `error does not name the port: ${overlap}`);

  // A port that another program holds (no stream relays to it: that would be a loop).
  await port.fill(String(S.ports.held));
  await port.press('Tab');
  const held = await waitFor('#err-listen_port to name the held port', async () => {
    const t = (await err.innerText()).trim();
    return t.includes(String(S.ports.held)) && t;
  });
  assert.match(held, /in use/, `error does not say the port is in use: ${held}`);

  // A free port clears it.
  await port.fill(String(await freePort()));
  await port.press('Tab');
  await waitFor('#err-listen_port to clear for a free port', async () => (await err.innerText()).trim() === '');
});

test('a UDP stream made in the form: Save and the switch show the server\'s warnings', { timeout: TEST_MS }, async () => {
  S.ports.udp = await freePort();
  await openHash(page, '/streams/new');
  await h1(page, 'New stream').waitFor();
  await page.getByLabel('Name', { exact: true }).fill(UDP_NAME);
  await page.getByLabel('Protocol', { exact: true }).selectOption('udp');
  await page.getByLabel('Listen address', { exact: true }).fill('127.0.0.1');
  await page.getByLabel('Listen port', { exact: true }).fill(String(S.ports.udp));
  await page.getByLabel('Upstream host', { exact: true }).fill('127.0.0.1');
  await page.getByLabel('Upstream port', { exact: true }).fill(String(S.ports.udpEcho));
  await page.getByLabel('Idle timeout', { exact: true }).fill('1');
  await page.getByLabel('Log connections', { exact: true }).check();
  // A TCP dial says nothing of a UDP upstream: the server warns.
  await page.getByLabel('Health checks', { exact: true }).check();
  await page.getByRole('button', { name: 'Save', exact: true }).click();
  await h1(page, 'Streams').waitFor();
  const made = await waitFor('the UDP stream in the API', async () =>
    (await api('/api/v1/streams')).body.find((s) => s.name === UDP_NAME));
  S.udpId = made.id;
  const notice = page.getByRole('group', { name: 'Warnings' });
  await notice.waitFor();
  assert.match(await notice.innerText(), /health_check_enabled/);
  await shot(page, 'streams-warnings.png');
  await notice.getByRole('button', { name: 'Dismiss', exact: true }).click();
  assert.equal(await notice.count(), 0, 'the notice stays after Dismiss');

  // The switch's write warns alike.
  const sw = page.getByLabel(`Enabled: ${UDP_NAME}`, { exact: true });
  await sw.click();
  try {
    await notice.waitFor();
    assert.match(await notice.innerText(), /Disabled e2e-udp.*\n?.*health_check_enabled/s);
  } finally {
    await waitFor('the UDP stream disabled', async () => (await api(`/api/v1/streams/${made.id}`)).body.enabled === false);
    await sw.click();
    await waitFor('the UDP stream enabled again', async () => (await api(`/api/v1/streams/${made.id}`)).body.enabled === true);
  }
});

test('the log of a UDP stream counts its datagrams', { timeout: TEST_MS }, async () => {
  assert.ok(S.udpId, `no stream "${UDP_NAME}": the test that makes it failed`);
  const made = { id: S.udpId };
  // Three datagrams each way; the session ends after the 1 s idle timeout.
  const payloads = ['one', 'two', 'three'].map((t) => Buffer.from(t));
  await waitFor('the UDP echo through the stream', () => udpExchange(S.ports.udp, payloads), 10_000, 300);
  const entry = await waitFor('the UDP entry in the API log', async () => {
    const { body } = await api(`/api/v1/streams/${made.id}/connections?limit=10`);
    return body.entries.find((e) => e.protocol === 'udp' && e.datagrams_sent >= 3);
  }, 15_000, 250);
  await openHash(page, `/streams/${made.id}/log`);
  await h1(page, `Log: ${UDP_NAME}`).waitFor();
  await page.locator('tr.log-row').first().waitFor();
  const counts = await page.locator('tr.log-row [data-field="datagrams"]').allInnerTexts();
  for (const n of [entry.datagrams_sent, entry.datagrams_received]) {
    assert.ok(counts.includes(`${n} datagrams`), `no "${n} datagrams" in the log's rows: ${JSON.stringify(counts)}`);
  }
  await shot(page, 'log-udp.png');
  await apiSend('DELETE', `/api/v1/streams/${made.id}`);
});

test('Save shows every problem: a taken port and a bad CIDR each at its field, others at the top', { timeout: TEST_MS }, async () => {
  await openHash(page, '/streams/new');
  await h1(page, 'New stream').waitFor();
  const portErr = page.locator('#err-listen_port');
  const cidrErr = page.locator('#err-whitelist_cidrs');
  await page.getByLabel('Listen address', { exact: true }).fill('127.0.0.1');
  const port = page.getByLabel('Listen port', { exact: true });
  await port.fill(String(S.ports.held)); // another program holds it
  await port.press('Tab');
  await page.getByLabel('Upstream host', { exact: true }).fill('127.0.0.1');
  await page.getByLabel('Upstream port', { exact: true }).fill(String(S.ports.echo));
  await waitFor('#err-listen_port to say the port is in use', async () => /in use/.test(await portErr.innerText()));
  const cidrs = page.getByLabel('Allowed CIDRs', { exact: true });
  const save = page.getByRole('button', { name: 'Save', exact: true });
  // One the form catches, one only the server does.
  for (const cidr of ['10.0.0.0/33', '1:2:3']) {
    await cidrs.fill(cidr);
    await save.click();
    await waitFor(`both errors after Save with ${cidr}`, async () => {
      const [p, c] = [await portErr.innerText(), await cidrErr.innerText()];
      return /in use/.test(p) && c.includes(cidr);
    });
    const alert = (await page.getByRole('alert').innerText()).trim();
    assert.match(alert, /2 settings/, `the alert: ${alert}`);
  }
  await shot(page, 'form-errors.png');
  assert.equal((await api('/api/v1/streams')).body.filter((s) => s.listen_port === S.ports.held).length, 0, 'a stream was made');

  // A problem of no field the form shows goes in a summary at the top.
  const summary = page.locator('#form-problems');
  assert.ok(await summary.isHidden(), 'the summary shows with nothing in it');
  await cidrs.fill('');
  await page.route('**/api/v1/streams', (route) => {
    if (route.request().method() !== 'POST') return route.fallback();
    return route.fulfill({
      status: 409,
      contentType: 'application/json',
      body: JSON.stringify({
        error: 'id 7 is taken by stream 7 ("other")', field: 'id', value: 7,
        errors: [{ field: 'id', value: 7, message: 'id 7 is taken by stream 7 ("other")' }, { field: 'name', value: 'x', message: 'name "x": taken' }],
      }),
    });
  });
  try {
    await save.click();
    await summary.waitFor({ state: 'visible' });
    assert.match(await summary.innerText(), /id 7 is taken/);
    assert.match(await page.locator('#err-name').innerText(), /taken/);
    assert.match(await page.getByRole('alert').innerText(), /a setting needs fixing.*a problem is listed at the top/);
  } finally {
    await page.unroute('**/api/v1/streams');
  }
});

test('the UI on the admin endpoint opens from a typed address, not from other sites', { timeout: TEST_MS }, async () => {
  // A typed address or a bookmark: no Origin, no Referer, Sec-Fetch-Mode
  // navigate. In a tab of its own, so the other tests go on either way.
  const tab = await page.context().newPage();
  try {
    const res = await tab.goto(`${S.base}/ui/`);
    assert.equal(res.status(), 200, `GET /ui/ typed into the address bar: status ${res.status()}: ${(await res.text()).slice(0, 200)}`);
    await h1(tab, 'Dashboard').waitFor();
  } finally {
    await tab.close();
  }
  // A page of another site still gets nothing, read or write.
  for (const headers of [
    { 'Sec-Fetch-Mode': 'cors', 'Sec-Fetch-Site': 'cross-site', Origin: 'http://other.example' },
    { 'Sec-Fetch-Mode': 'navigate', 'Sec-Fetch-Site': 'cross-site', Referer: 'http://other.example/page' },
  ]) {
    const res = await get(`${S.base}/ui/api/v1/streams`, headers);
    assert.equal(res.status, 403, `GET /ui/api/v1/streams with ${JSON.stringify(headers)}: status ${res.status}`);
  }
});

let certPem, keyPem;

test('an uploaded certificate that expires within 30 days is flagged', { timeout: TEST_MS }, async () => {
  const certFile = path.join(S.tmp, 'cert.pem');
  const keyFile = path.join(S.tmp, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-days', '20', '-subj', '/CN=e2e.test', '-addext', 'subjectAltName=DNS:e2e.test',
    '-keyout', keyFile, '-out', certFile], { stdio: 'ignore', timeout: 10_000 });
  certPem = fs.readFileSync(certFile, 'utf8');
  keyPem = fs.readFileSync(keyFile, 'utf8');

  await page.getByRole('link', { name: 'Certificates', exact: true }).first().click();
  await h1(page, 'Certificates').waitFor();
  const form = page.locator('form[aria-label="Upload certificate"]');
  await form.getByLabel('Name', { exact: true }).fill(CERT_NAME);
  await form.getByLabel('Certificate (PEM)', { exact: true }).fill(certPem);
  await form.getByLabel('Private key (PEM)', { exact: true }).fill(keyPem);
  await form.getByRole('button', { name: 'Upload', exact: true }).click();

  const cert = await waitFor(`certificate "${CERT_NAME}" in the API`, async () =>
    (await api('/api/v1/certificates')).body.find((c) => c.name === CERT_NAME));
  S.certId = cert.id;
  assert.deepEqual(cert.domains, ['e2e.test']);
  const row = page.locator(`tr[data-cert-id="${cert.id}"]`);
  await row.waitFor();
  const text = await row.innerText();
  assert.match(text, new RegExp(CERT_NAME));
  assert.match(text, /e2e\.test/);
  assert.match(text, /custom/);
  const expiry = row.locator('[data-field="expiry"]');
  assert.match((await expiry.getAttribute('class')) || '', /\bwarn\b/, 'expiry cell has no class "warn"');
  const said = (await page.getByRole('status').allInnerTexts()).join(' ');
  assert.match(said, /expires/, `the upload's expiry warning is not shown: ${JSON.stringify(said)}`);
  await shot(page, 'certificates.png');
});

test('TLS turned on in the edit form terminates with the uploaded certificate', { timeout: TEST_MS }, async () => {
  needStream();
  assert.ok(S.certId, 'no certificate: the upload test failed');
  await openHash(page, '/streams');
  await streamRow(page, S.streamId).getByRole('link', { name: 'Edit', exact: true }).click();
  await h1(page, 'Edit stream').waitFor();
  assert.equal(await page.getByLabel('Name', { exact: true }).inputValue(), NAME);
  assert.equal(await page.getByLabel('Listen port', { exact: true }).inputValue(), String(S.ports.stream));
  await page.getByLabel('TLS termination', { exact: true }).check();
  const select = page.getByLabel('Certificate', { exact: true });
  const option = select.locator('option', { hasText: CERT_NAME });
  await waitFor(`option "${CERT_NAME}" in the Certificate select`, async () => (await option.count()) === 1);
  await select.selectOption(await option.getAttribute('value'));
  await page.getByRole('button', { name: 'Save', exact: true }).click();

  await waitFor('ssl_enabled and ssl_cert_id in the API', async () => {
    const { body } = await api(`/api/v1/streams/${S.streamId}`);
    return body.ssl_enabled === true && body.ssl_cert_id === S.certId;
  });
  const sock = await waitFor('a TLS handshake on the stream', () => connect(S.ports.stream, true), 5000, 200);
  try {
    assert.equal(sock.getPeerCertificate().subject.CN, 'e2e.test');
    const payload = Buffer.from('hello over TLS\n');
    assert.ok((await exchange(sock, payload)).equals(payload), 'TLS echo came back different');
  } finally {
    await closeSocket(sock);
  }
});

test('deleting a certificate in use is refused with the reason', { timeout: TEST_MS }, async () => {
  assert.ok(S.certId && S.streamId, 'needs the certificate and the stream from earlier tests');
  await openHash(page, '/certificates');
  await h1(page, 'Certificates').waitFor();
  const row = page.locator(`tr[data-cert-id="${S.certId}"]`);
  await row.getByRole('button', { name: 'Delete', exact: true }).click();
  const dialog = openDialog(page);
  await dialog.waitFor();
  assert.match(await dialog.innerText(), new RegExp(CERT_NAME), 'the dialog does not name the certificate');
  await dialog.getByRole('button', { name: 'Delete', exact: true }).click();
  const alert = page.getByRole('alert').filter({ hasText: /in use/i });
  await alert.waitFor();
  assert.match(await alert.innerText(), new RegExp(NAME), 'the refusal does not name the stream');
  assert.equal((await api(`/api/v1/certificates/${S.certId}`)).status, 200, 'the certificate is gone');
  assert.equal(await row.count(), 1, 'the certificate row is gone');
});

test('the connections page closes a held connection', { timeout: TEST_MS }, async () => {
  needStream();
  const held = await connect(S.ports.stream, true);
  const closed = new Promise((resolve) => held.once('close', resolve));
  held.on('error', () => {});
  const payload = Buffer.from('held\n');
  assert.ok((await exchange(held, payload)).equals(payload));
  const active = await waitFor('the held connection in the API', async () => {
    const { body } = await api(`/api/v1/streams/${S.streamId}/active`);
    return body.length === 1 && body[0];
  });

  await openHash(page, '/streams');
  await streamRow(page, S.streamId).getByRole('link', { name: 'Connections', exact: true }).click();
  await h1(page, `Connections: ${NAME}`).waitFor();
  const row = page.locator(`tr[data-conn-id="${active.id}"]`);
  await row.waitFor();
  assert.match(await row.innerText(), /127\.0\.0\.1/);
  await shot(page, 'connections.png');

  await row.getByRole('button', { name: 'Close', exact: true }).click();
  const dialog = openDialog(page);
  await dialog.waitFor();
  await dialog.getByRole('button', { name: 'Close connection', exact: true }).click();
  await Promise.race([closed, sleep(5000).then(() => { throw new Error('the client socket is still open 5 s after Close'); })]);
  await waitFor('the row to go', async () => (await row.count()) === 0);
  const entry = await waitFor('the admin_closed log entry', async () => {
    const { body } = await api(`/api/v1/streams/${S.streamId}/connections?limit=10`);
    return body.entries.find((e) => e.disconnect_reason === 'admin_closed');
  }, 15_000, 250);
  assert.equal(entry.action, 'allowed');
});

test('a stream row shows blocked connections, the health error and the time of the check; a config stream\'s switch says on and why it is fixed', { timeout: TEST_MS }, async () => {
  const down = await freePort(); // nothing listens: the health check fails
  S.ports.guarded = await freePort();
  const made = await apiSend('POST', '/api/v1/streams', {
    name: GUARDED_NAME, listen_address: '127.0.0.1', listen_port: S.ports.guarded,
    upstream_host: '127.0.0.1', upstream_port: down, enabled: true,
    health_check_enabled: true, health_check_interval_seconds: 1, blacklist_cidrs: ['127.0.0.1/32'],
  });
  S.guardedId = made.id;
  await waitFor('a blocked connection in the stream status', async () => {
    await probe(S.ports.guarded);
    return (await api(`/api/v1/streams/${made.id}`)).body.status.blocked_connections >= 1;
  }, 5000, 200);

  await openHash(page, '/streams');
  const row = streamRow(page, made.id);
  await row.waitFor();
  const headers = (await page.locator('table thead th').allInnerTexts()).map((t) => t.trim());
  assert.ok(headers.includes('Blocked'), `no column "Blocked" (have ${headers.join(', ')})`);
  const blocked = row.locator('[data-field="blocked_connections"]');
  await waitFor('the Blocked cell to show 1 or more', async () => digitsIn(await blocked.innerText()) >= 1);
  const health = row.locator('[data-field="health"]');
  const error = row.locator('[data-field="health_error"]');
  const when = row.locator('[data-field="last_health_check"]');
  await waitFor('unhealthy, with its error and time, in the row', async () =>
    /unhealthy/.test(await health.innerText()) && (await error.isVisible()) && (await when.isVisible()));
  const { status } = (await api(`/api/v1/streams/${made.id}`)).body;
  assert.match(await error.innerText(), /refused|connect/, `the error shown: ${await error.innerText()}`);
  assert.ok(status.last_health_error && (await error.innerText()).includes(status.last_health_error.slice(0, 20)), 'not the API\'s last_health_error');
  assert.match(await when.innerText(), /^checked \S/);

  // The config stream's switch: on, drawn as the other on switches, and
  // why it cannot change, in words beside it and as its description.
  const cfg = streamRow(page, 1);
  const cfgSwitch = page.getByLabel(`Enabled: ${CFG_NAME}`, { exact: true });
  assert.ok(await cfgSwitch.isDisabled());
  assert.equal((await cfg.locator('[data-field="enabled"]').innerText()).replace(/\s+/g, ' ').trim(), 'on set in the Caddy config');
  const described = await cfgSwitch.evaluate((el) => el.getAttribute('aria-describedby').split(' ').map((id) => document.getElementById(id)?.textContent).join(' '));
  assert.match(described, /set in the Caddy config/);
  const bg = (loc) => loc.evaluate((el) => getComputedStyle(el).backgroundColor);
  const apiSwitch = page.getByLabel(`Enabled: ${GUARDED_NAME}`, { exact: true });
  assert.ok(await apiSwitch.isChecked());
  assert.equal(await bg(cfgSwitch), await bg(apiSwitch), 'the fixed "on" switch is drawn unlike an "on" switch');
  await shot(page, 'streams-health.png');

  // On a phone: cards, the same details, no sideways scroll.
  await page.setViewportSize({ width: 375, height: 812 });
  try {
    await row.scrollIntoViewIfNeeded();
    assert.ok(await error.isVisible() && await when.isVisible() && await blocked.isVisible(), 'details hidden at 375 px');
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `at 375 px the page scrolls sideways by ${overflow} px`);
    await shot(page, 'streams-health-phone.png');
  } finally {
    await page.setViewportSize({ width: 1280, height: 900 });
  }
});

test('the cluster page shows the one node of SQLite and its streams, and follows changes without a reload', { timeout: TEST_MS }, async () => {
  await openHash(page, '/streams');
  await h1(page, 'Streams').waitFor();
  await page.getByRole('link', { name: 'Cluster', exact: true }).first().click();
  await h1(page, 'Cluster').waitFor();
  const about = page.locator('[data-field="storage"]');
  await waitFor('the storage line', async () => /SQLite \(one node\)/.test(await about.innerText()));
  const rows = page.locator('tr[data-node]');
  await waitFor('one node row', async () => (await rows.count()) === 1);
  const row = page.locator(`tr[data-node="${NODE}"]`);
  const cells = await row.innerText();
  assert.match(cells, new RegExp(NODE));
  assert.match(cells, /this node/);
  assert.equal((await row.locator('[data-field="status"]').innerText()).trim(), 'up');
  assert.match(await row.locator('[data-field="last_seen"]').innerText(), /just now|\d+ s ago/);
  const headers = (await page.locator('table').first().locator('thead th').allInnerTexts()).map((t) => t.trim());
  assert.deepEqual(headers, ['Node', 'Status', 'Last seen', 'Streams'], 'SQLite has no changes to apply');
  assert.ok(await page.locator('[data-field="cluster_error"]').isHidden(), 'an error shows');
  // The node's streams, with their health: the config stream listens.
  const section = page.getByRole('region', { name: `Streams on ${NODE}`, exact: true });
  const cfg = section.locator('tr[data-stream-id="1"]');
  await cfg.waitFor();
  assert.match(await cfg.innerText(), new RegExp(CFG_NAME));
  assert.equal((await cfg.locator('[data-field="listening"]').innerText()).trim(), 'yes');
  assert.equal((await cfg.locator('[data-field="health"]').innerText()).trim(), 'not checked');

  // A stream made meanwhile shows up at the next refresh.
  await page.evaluate(() => { window.__e2eNoReload = true; });
  const count = async () => digitsIn(await row.locator('[data-field="streams"]').innerText());
  const before = await count();
  assert.equal(before, (await api('/api/v1/streams')).body.length);
  const port = await freePort();
  const made = await apiSend('POST', '/api/v1/streams', {
    name: 'e2e-cluster', listen_address: '127.0.0.1', listen_port: port, upstream_host: '127.0.0.1', upstream_port: S.ports.echo,
  });
  try {
    await section.locator(`tr[data-stream-id="${made.id}"]`).waitFor({ timeout: 6000 });
    await waitFor('one more stream in the node row', async () => (await count()) === before + 1);
    assert.equal(await page.evaluate(() => window.__e2eNoReload), true, 'the page reloaded');
    await shot(page, 'cluster.png');
  } finally {
    await apiSend('DELETE', `/api/v1/streams/${made.id}`);
  }
});

test('the cluster page says when the database cannot be read, and marks stale and snapshot nodes', { timeout: TEST_MS }, async () => {
  // What a node on PostgreSQL answers (the backend's tests check that it
  // does); here, how the page shows it.
  const { body: real } = await api('/api/v1/cluster');
  const self = real.nodes[0];
  const at = (s) => new Date(Date.now() - s * 1000).toISOString();
  let answer = {
    node: NODE, storage: 'postgres', last_change: 42,
    nodes: [
      { ...self, applied_change: 42, lag: 0, status: 'up', last_seen: at(1) },
      { name: 'e2e-old', address: '127.0.0.1:1', version: 'v1', applied_change: 39, lag: 3, status: 'stale', last_seen: at(125), streams: [] },
      { name: 'e2e-cut', address: '127.0.0.1:2', version: 'v1', applied_change: 42, lag: 0, status: 'snapshot', last_seen: at(2),
        streams: [{ ...self.streams[0], health_status: 'unhealthy', healthy: false, last_health_error: 'dial tcp 10.0.0.9:5432: connection refused', listening: true }] },
    ],
  };
  const route = '**/api/v1/cluster';
  await page.route(route, (r) => r.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(answer) }));
  try {
    await openHash(page, '/cluster');
    await h1(page, 'Cluster').waitFor();
    const stale = page.locator('tr[data-node="e2e-old"]');
    await stale.waitFor();
    const headers = (await page.locator('table').first().locator('thead th').allInnerTexts()).map((t) => t.trim());
    assert.deepEqual(headers, ['Node', 'Status', 'Last seen', 'Applied change', 'Lag', 'Streams']);
    assert.match(await page.locator('[data-field="storage"]').innerText(), /PostgreSQL/);
    assert.match(await stale.locator('[data-field="status"]').innerText(), /^stale\s+no heartbeat$/);
    assert.match(await stale.locator('[data-field="status"]').getAttribute('class'), /\bbad\b/);
    assert.match((await stale.locator('[data-field="last_seen"]').innerText()).trim(), /^2 min \d+ s ago$/);
    assert.equal((await stale.locator('[data-field="lag"]').innerText()).trim(), '3 behind');
    const snap = page.locator('tr[data-node="e2e-cut"]');
    assert.match(await snap.locator('[data-field="status"]').innerText(), /^snapshot\s+runs from its snapshot$/);
    assert.equal((await snap.locator('[data-field="streams"]').innerText()).trim(), '1 stream, 1 with a problem');
    const cut = page.getByRole('region', { name: 'Streams on e2e-cut', exact: true });
    assert.match(await cut.locator('[data-field="health"]').innerText(), /unhealthy\s+dial tcp 10\.0\.0\.9:5432: connection refused/);
    assert.equal((await page.locator(`tr[data-node="${NODE}"] [data-field="status"]`).innerText()).trim(), 'up');
    await shot(page, 'cluster-nodes.png');

    // The database down: this node alone, and why.
    answer = { node: NODE, storage: 'postgres', last_change: 42, error: 'PostgreSQL at db.internal:5432 is unreachable: dial tcp: connection refused',
      nodes: [{ ...self, applied_change: 42, lag: 0, status: 'up' }] };
    const error = page.locator('[data-field="cluster_error"]');
    await error.waitFor({ timeout: 6000 });
    assert.match(await error.innerText(), /database cannot be read.*only this node.*db\.internal:5432 is unreachable/s);
    await waitFor('the other nodes gone', async () => (await page.locator('tr[data-node]').count()) === 1, 6000);
    await shot(page, 'cluster-db-down.png');
  } finally {
    await page.unroute(route);
  }
});

// threePorts finds three ports in a row that nothing holds.
async function threePorts() {
  for (let i = 0; i < 50; i++) {
    const p = await freePort();
    if (p < 32000 && !handedOut.has(p + 1) && !handedOut.has(p + 2) && await canBind(p + 1) && await canBind(p + 2)) {
      handedOut.add(p + 1).add(p + 2);
      return p;
    }
  }
  throw new Error('no three free ports in a row after 50 tries');
}

test('a stream with three upstreams on a port range: a row per upstream, the closed one down with its error; an open connection names its upstream, and on a range its port', { timeout: TEST_MS }, async () => {
  const first = await threePorts();
  S.ports.multi = first;
  const closed = await freePort(); // nothing listens: down
  const made = await apiSend('POST', '/api/v1/streams', {
    name: MULTI_NAME, listen_address: '127.0.0.1', listen_port: first, listen_port_end: first + 2, upstream_port_fixed: true,
    upstreams: [{ host: '127.0.0.1', port: S.ports.echo }, { host: '127.0.0.1', port: S.ports.echo2 }, { host: '127.0.0.1', port: closed, backup: true }],
    health_check_enabled: true, health_check_interval_seconds: 1, log_connections: true,
  });
  S.multiId = made.id;
  S.ports.sni = await freePort();
  const sni = await apiSend('POST', '/api/v1/streams', {
    name: SNI_NAME, listen_address: '127.0.0.1', listen_port: S.ports.sni, upstream_host: '127.0.0.1', upstream_port: S.ports.echo,
    sni: ['db.e2e.test', '*.e2e.test'],
  });
  await echoThrough(first + 1, Buffer.from('through the range\n'));

  await openHash(page, '/streams');
  const row = streamRow(page, made.id);
  await row.waitFor();
  assert.equal((await row.locator('td.addr').innerText()).split('\n')[0].trim(), `127.0.0.1:${first}-${first + 2} → 3 upstreams`);
  const ups = page.locator(`tr[data-upstream-of="${made.id}"]`);
  await waitFor('three upstream rows', async () => (await ups.count()) === 3);
  // They follow the stream's row.
  assert.equal(await row.evaluate((tr) => tr.nextElementSibling?.dataset.upstream), `127.0.0.1:${S.ports.echo}`);
  const down = page.locator(`tr[data-upstream="127.0.0.1:${closed}"]`);
  await waitFor('the closed upstream down, with its error', async () =>
    (await down.locator('[data-field="health"] .state').innerText()).trim() === 'down' && (await down.locator('[data-field="last_error"]').isVisible()), 8000, 200);
  assert.match(await down.locator('[data-field="last_error"]').innerText(), /refused|connect/);
  assert.match(await down.innerText(), /backup/);
  for (const port of [S.ports.echo, S.ports.echo2]) {
    const up = page.locator(`tr[data-upstream="127.0.0.1:${port}"]`);
    await waitFor(`upstream ${port} up`, async () => (await up.locator('[data-field="health"] .state').innerText()).trim() === 'up', 8000, 200);
    assert.ok(await up.locator('[data-field="last_error"]').isHidden());
  }
  // The one connection relayed counts on one of the two that are up,
  // with its bytes each way.
  const { body } = await api(`/api/v1/streams/${made.id}`);
  const used = body.status.upstreams.find((u) => u.total_connections === 1);
  assert.ok(used, `no upstream with the connection: ${JSON.stringify(body.status.upstreams)}`);
  const usedRow = page.locator(`tr[data-upstream="127.0.0.1:${used.port}"]`);
  await waitFor('its counts in its row', async () => (await usedRow.locator('[data-field="total_connections"]').innerText()).trim() === '1'
    && /\b18 B/.test(await usedRow.locator('[data-field="bytes_sent"]').innerText()) && /\b18 B/.test(await usedRow.locator('[data-field="bytes_received"]').innerText()));
  // The server names of the SNI stream.
  assert.equal((await streamRow(page, sni.id).locator('[data-field="sni"]').innerText()).trim(), 'SNI: db.e2e.test, *.e2e.test');
  await shot(page, 'streams-upstreams.png');
  // On a phone: the upstream rows as cards, with their details.
  await page.setViewportSize({ width: 375, height: 812 });
  try {
    await down.scrollIntoViewIfNeeded();
    assert.ok(await down.locator('[data-field="last_error"]').isVisible(), 'the error is hidden at 375 px');
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `at 375 px the page scrolls sideways by ${overflow} px`);
    await shot(page, 'streams-upstreams-phone.png');
  } finally {
    await page.setViewportSize({ width: 1280, height: 900 });
  }

  // A held connection: the upstream it went to.
  const held = await connect(first + 1, false);
  held.on('error', () => {});
  try {
    assert.ok((await exchange(held, Buffer.from('held\n'))).equals(Buffer.from('held\n')));
    const active = await waitFor('the held connection in the API', async () => (await api(`/api/v1/streams/${made.id}/active`)).body[0]);
    assert.match(active.upstream, new RegExp(`^127\\.0\\.0\\.1:(${S.ports.echo}|${S.ports.echo2})$`));
    await openHash(page, `/streams/${made.id}/active`);
    await h1(page, `Connections: ${MULTI_NAME}`).waitFor();
    const conn = page.locator(`tr[data-conn-id="${active.id}"]`);
    await conn.waitFor();
    assert.equal((await conn.locator('[data-field="upstream"]').innerText()).trim(), active.upstream);
    assert.match(await page.locator('p.sub').first().innerText(), new RegExp(`^127\\.0\\.0\\.1:${first}-${first + 2} → 3 upstreams`));
  } finally {
    await closeSocket(held);
  }

  // A range that maps port + k to upstream port + k: a connection on the
  // last port shows that port, and the upstream port it went to.
  const r = await threePorts();
  const range = await apiSend('POST', '/api/v1/streams', {
    name: 'e2e-range', listen_address: '127.0.0.1', listen_port: r, listen_port_end: r + 2, upstream_host: '127.0.0.1', upstream_port: S.ports.echo - 2,
  });
  const held2 = await connect(r + 2, false);
  held2.on('error', () => {});
  try {
    assert.ok((await exchange(held2, Buffer.from('held\n'))).equals(Buffer.from('held\n')));
    const active = await waitFor('the held connection in the API', async () => (await api(`/api/v1/streams/${range.id}/active`)).body[0]);
    await openHash(page, `/streams/${range.id}/active`);
    await h1(page, 'Connections: e2e-range').waitFor();
    const conn = page.locator(`tr[data-conn-id="${active.id}"]`);
    await conn.waitFor();
    const headers = (await page.locator('table thead th').allInnerTexts()).map((t) => t.trim());
    assert.deepEqual(headers, ['Source', 'Protocol', 'Port', 'Upstream', 'Age', 'Sent', 'Received', 'Actions']);
    assert.equal((await conn.locator('[data-field="listen_port"]').innerText()).trim(), String(r + 2));
    assert.equal((await conn.locator('[data-field="upstream"]').innerText()).trim(), `127.0.0.1:${S.ports.echo}`);
    assert.match(await page.locator('p.sub').first().innerText(), new RegExp(`^127\\.0\\.0\\.1:${r}-${r + 2} → 127\\.0\\.0\\.1:${S.ports.echo - 2}-${S.ports.echo}`));
    await shot(page, 'connections-range.png');
  } finally {
    await closeSocket(held2);
    await apiSend('DELETE', `/api/v1/streams/${range.id}`);
  }
});

test('the log shows each entry\'s node, and filters by node when there are several', { timeout: TEST_MS }, async () => {
  assert.ok(S.multiId, `no stream "${MULTI_NAME}": the test that makes it failed`);
  const entry = await waitFor('a log entry of the range stream', async () =>
    (await api(`/api/v1/streams/${S.multiId}/connections?limit=10`)).body.entries[0], 15_000, 250);
  assert.equal(entry.node, NODE);
  // Two nodes in the cluster's list, as on PostgreSQL.
  const route = '**/api/v1/cluster';
  const { body: real } = await api('/api/v1/cluster');
  await page.route(route, (r) => r.fulfill({ status: 200, contentType: 'application/json',
    body: JSON.stringify({ ...real, storage: 'postgres', nodes: [...real.nodes, { ...real.nodes[0], name: 'e2e-other', streams: [] }] }) }));
  const asked = [];
  const onRequest = (req) => {
    const u = new URL(req.url());
    if (u.pathname.endsWith('/connections')) asked.push(u.searchParams.get('node'));
  };
  page.on('request', onRequest);
  try {
    await openHash(page, `/streams/${S.multiId}/log`);
    await h1(page, `Log: ${MULTI_NAME}`).waitFor();
    const rows = page.locator('tr.log-row');
    await rows.first().waitFor();
    const headers = (await page.locator('table thead th').allInnerTexts()).map((t) => t.trim());
    // A stream with upstreams: the upstream each connection went to.
    assert.deepEqual(headers, ['Time', 'Node', 'Source', 'Upstream', 'Action', 'Sent', 'Received', 'Duration', 'Reason']);
    assert.equal((await rows.first().locator('[data-field="node"]').innerText()).trim(), NODE);
    assert.match(entry.upstream, new RegExp(`^127\\.0\\.0\\.1:(${S.ports.echo}|${S.ports.echo2})$`));
    // The entries' upstreams as the API gives them. Entries of the range
    // test's connections may still be on their way: Refresh until the page
    // and the API agree.
    await waitFor('the Upstream column to match the API', async () => {
      const want = (await api(`/api/v1/streams/${S.multiId}/connections?limit=50`)).body.entries.map((e) => e.upstream);
      const got = (await page.locator('tr.log-row [data-field="upstream"]').allInnerTexts()).map((t) => t.trim());
      if (JSON.stringify(got) === JSON.stringify(want)) return true;
      await page.getByRole('button', { name: 'Refresh', exact: true }).click();
      return false;
    }, STEP_MS, 500);
    await shot(page, 'log-node.png');
    const filter = page.getByLabel('Node', { exact: true });
    await filter.waitFor();
    assert.deepEqual(await filter.locator('option').allInnerTexts(), ['All', NODE, 'e2e-other']);
    await filter.selectOption('e2e-other');
    await page.getByRole('cell', { name: 'No entries.', exact: true }).waitFor();
    await filter.selectOption(NODE);
    await rows.first().waitFor();
    // All nodes (again for each Refresh the wait above needed), then each.
    assert.deepEqual(asked.slice(-2), ['e2e-other', NODE]);
    assert.ok(asked.length >= 3 && asked.slice(0, -2).every((n) => n === null), `asked ${JSON.stringify(asked)}`);
  } finally {
    page.off('request', onRequest);
    await page.unroute(route);
  }
  // One node: no filter to choose from, the column stays.
  await openHash(page, '/streams');
  await openHash(page, `/streams/${S.multiId}/log`);
  await page.locator('tr.log-row').first().waitFor();
  assert.equal(await page.locator('#log-node').isVisible(), false, 'a node filter with one node');
  assert.equal((await page.locator('tr.log-row [data-field="node"]').first().innerText()).trim(), NODE);
});

// ---------------------------------------------------------------- PostgreSQL

// pgBin is the newest /usr/lib/postgresql/*/bin with postgres in it, or ''.
function pgBin() {
  const root = '/usr/lib/postgresql';
  if (!fs.existsSync(root)) return '';
  const dirs = fs.readdirSync(root).filter((v) => fs.existsSync(path.join(root, v, 'bin', 'postgres')))
    .sort((a, b) => Number(b) - Number(a));
  return dirs.length ? path.join(root, dirs[0], 'bin') : '';
}

// stopChild ends a child of the run (SIGTERM, then SIGKILL after 10 s).
async function stopChild(child, signal = 'SIGTERM') {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  const done = await Promise.race([gone.then(() => true), sleep(10_000).then(() => false)]);
  if (!done) {
    child.kill('SIGKILL');
    await gone;
  }
}

// startPostgres runs a PostgreSQL server of its own, as the postgres
// user when the run is root (as internal/pgtest does for the Go tests),
// and resolves with its port once it accepts connections.
async function startPostgres(bin) {
  S.pgDir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-e2e-pg-'));
  const as = {};
  if (process.getuid() === 0) {
    const id = (flag) => Number(execFileSync('id', [flag, 'postgres'], { encoding: 'utf8', timeout: 5000 }).trim());
    const [uid, gid] = [id('-u'), id('-g')];
    fs.chownSync(S.pgDir, uid, gid);
    Object.assign(as, { uid, gid });
  }
  const data = path.join(S.pgDir, 'data');
  execFileSync(path.join(bin, 'initdb'), ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8', '--locale=C'],
    { ...as, cwd: S.pgDir, stdio: 'ignore', timeout: 60_000 });
  const port = await freePort();
  const log = fs.openSync(path.join(artifacts, 'postgres.log'), 'w');
  const pg = spawn(path.join(bin, 'postgres'), ['-D', data, '-p', String(port), '-k', S.pgDir, '-c', 'listen_addresses=127.0.0.1',
    '-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'shared_buffers=32MB'],
  { ...as, cwd: S.pgDir, stdio: ['ignore', log, log] });
  fs.closeSync(log);
  S.children.push(pg);
  await waitFor('PostgreSQL to accept connections', async () => {
    if (pg.exitCode !== null) throw new Error('postgres exited; see test-artifacts/ui/postgres.log');
    execFileSync(path.join(bin, 'pg_isready'), ['-h', '127.0.0.1', '-p', String(port), '-U', 'postgres'], { stdio: 'ignore', timeout: 5000 });
    return true;
  }, 30_000, 200);
  return port;
}

// startNode runs a bin/aegis node on the PostgreSQL at pgPort, with a
// config stream of its own, and resolves with its admin address and
// process.
async function startNode(name, pgPort, key) {
  const dir = path.join(S.tmp, name);
  fs.mkdirSync(dir);
  const admin = await freePort();
  S.ports[`admin-${name}`] = admin;
  const listen = await freePort();
  S.ports[`cfg-${name}`] = listen;
  const caddyfile = path.join(dir, 'Caddyfile');
  fs.writeFileSync(caddyfile, `{
	admin 127.0.0.1:${admin} {
		origins 127.0.0.1:${admin} ""
	}
	storage file_system ${dir}/caddy
	skip_install_trust
	streams {
		storage postgres postgres://postgres@127.0.0.1:${pgPort}/postgres?sslmode=disable
		storage_key ${key}
		node_name ${name}
		host ${name === 'e2e-pg-a' ? 1 : 2} cfg-${name} {
			listen 127.0.0.1:${listen}
			upstream 127.0.0.1:${S.ports.echo}
		}
	}
}
`);
  const log = fs.openSync(path.join(artifacts, `aegis-${name}.log`), 'w');
  const child = spawn(aegisBin, ['run', '--config', caddyfile, '--adapter', 'caddyfile'], {
    cwd: dir,
    env: { ...process.env, HOME: dir, XDG_DATA_HOME: path.join(dir, 'data'), XDG_CONFIG_HOME: path.join(dir, 'config') },
    stdio: ['ignore', log, log],
  });
  fs.closeSync(log);
  S.children.push(child);
  const base = `http://127.0.0.1:${admin}`;
  await waitFor(`node ${name} to answer on its admin endpoint`, async () => {
    if (child.exitCode !== null) throw new Error(`bin/aegis (${name}) exited with ${child.exitCode}; see test-artifacts/ui/aegis-${name}.log`);
    return (await get(`${base}/api/v1/cluster`)).status === 200;
  }, 20_000, 200);
  return { base, child };
}

test('on PostgreSQL, the cluster page shows both nodes with their streams, then the stopped one as stale; the log filters by node', { timeout: 75_000 }, async (t) => {
  const bin = pgBin();
  if (!bin) {
    t.skip('PostgreSQL is not installed (apt-get install postgresql; make postgres does it)');
    return;
  }
  const pgPort = await startPostgres(bin);
  const key = 'ab'.repeat(32);
  const a = await startNode('e2e-pg-a', pgPort, key);
  const b = await startNode('e2e-pg-b', pgPort, key);
  const ctx = await newContext();
  await guardOrigin(ctx, a.base);
  const tab = await ctx.newPage();
  watchPage(tab, 'node e2e-pg-a');
  try {
    await tab.goto(`${a.base}/ui/#/cluster`);
    await h1(tab, 'Cluster').waitFor();
    await waitFor('both nodes up', async () => {
      const states = await tab.locator('tr[data-node] [data-field="status"]').allInnerTexts();
      return states.length === 2 && states.every((x) => x.trim() === 'up');
    }, 15_000, 250);
    assert.match(await tab.locator('[data-field="storage"]').innerText(), /PostgreSQL/);
    const headers = (await tab.locator('table').first().locator('thead th').allInnerTexts()).map((x) => x.trim());
    assert.deepEqual(headers, ['Node', 'Status', 'Last seen', 'Applied change', 'Lag', 'Streams']);
    assert.match(await tab.locator('tr[data-node="e2e-pg-a"]').innerText(), /this node/);
    assert.doesNotMatch(await tab.locator('tr[data-node="e2e-pg-b"]').innerText(), /this node/);
    // Each node's own config stream, as that node reports it.
    for (const [name, id] of [['e2e-pg-a', 1], ['e2e-pg-b', 2]]) {
      const sec = tab.getByRole('region', { name: `Streams on ${name}`, exact: true });
      const row = sec.locator(`tr[data-stream-id="${id}"]`);
      await row.waitFor({ timeout: 8000 });
      assert.match(await row.innerText(), new RegExp(`cfg-${name}`));
      assert.equal((await row.locator('[data-field="listening"]').innerText()).trim(), 'yes');
    }
    await shot(tab, 'cluster-postgres.png');

    // The log of a stream on PostgreSQL offers both nodes.
    await tab.goto(`${a.base}/ui/#/streams/1/log`);
    await h1(tab, 'Log: cfg-e2e-pg-a').waitFor();
    const filter = tab.getByLabel('Node', { exact: true });
    await filter.waitFor();
    assert.deepEqual(await filter.locator('option').allInnerTexts(), ['All', 'e2e-pg-a', 'e2e-pg-b']);

    // Node b stops: after 3 missed heartbeats the page marks it stale.
    await tab.goto(`${a.base}/ui/#/cluster`);
    await h1(tab, 'Cluster').waitFor();
    await tab.locator('tr[data-node="e2e-pg-b"]').waitFor();
    await tab.evaluate(() => { window.__e2eNoReload = true; });
    await stopChild(b.child, 'SIGKILL');
    const stale = tab.locator('tr[data-node="e2e-pg-b"] [data-field="status"]');
    await waitFor('node b stale on the page', async () => /^stale/.test((await stale.innerText()).trim()), 20_000, 250);
    assert.match(await stale.getAttribute('class'), /\bbad\b/);
    assert.equal((await tab.locator('tr[data-node="e2e-pg-a"] [data-field="status"]').innerText()).trim(), 'up');
    assert.match(await tab.locator('section[data-node="e2e-pg-b"] [data-field="reported"]').innerText(), /^As it last reported them, \d+ s ago\.$/);
    assert.ok(await tab.locator('section[data-node="e2e-pg-a"] [data-field="reported"]').isHidden());
    assert.equal(await tab.evaluate(() => window.__e2eNoReload), true, 'the page reloaded');
    await shot(tab, 'cluster-postgres-stale.png');
  } finally {
    await ctx.close();
    await stopChild(a.child);
    await stopChild(b.child);
  }
});

// ------------------------------------------------ issue 18: the pages an
// operator keeps open: dashboard, stream page, audit trail, search and
// bulk actions, export and import.

const GRAPH_NAME = 'e2e-graph'; // traffic for the graphs, the log's filters
const BULK = ['e2e-bulk-a', 'e2e-bulk-b', 'e2e-bulk-c'];

// pump sends echo traffic through port for ms: chunk bytes every 100 ms,
// from localAddress. It resolves with the bytes echoed.
async function pump(port, ms, chunk = 64 * 1024, localAddress = '127.0.0.1') {
  const sock = track(net.connect({ host: '127.0.0.1', port, localAddress }));
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  let got = 0;
  sock.on('data', (d) => { got += d.length; });
  const end = Date.now() + ms;
  const payload = Buffer.alloc(chunk, 0x61);
  while (Date.now() < end) {
    sock.write(payload);
    await sleep(100);
  }
  await closeSocket(sock);
  return got;
}

// connectFrom opens and closes one echoed connection from localAddress.
async function connectFrom(port, localAddress) {
  const sock = track(net.connect({ host: '127.0.0.1', port, localAddress }));
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  const back = await exchange(sock, Buffer.from(`from ${localAddress}`));
  assert.equal(back.toString(), `from ${localAddress}`);
  await closeSocket(sock);
}

// sendRaw is a write through the API that may be refused: {status, body}.
async function sendRaw(method, urlPath, body) {
  const res = await fetch(S.base + urlPath, {
    method,
    headers: { Origin: S.base, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

function needGraph() {
  assert.ok(S.graphId, `no stream "${GRAPH_NAME}": the dashboard test failed`);
}

test('the dashboard is the first page: totals, and sparklines that change while traffic flows', { timeout: 75_000 }, async () => {
  S.ports.graph = await freePort();
  const made = await apiSend('POST', '/api/v1/streams', {
    name: GRAPH_NAME, listen_address: '127.0.0.1', listen_port: S.ports.graph,
    upstream_host: '127.0.0.1', upstream_port: S.ports.echo, log_connections: true,
  });
  S.graphId = made.id;
  await waitFor(`${GRAPH_NAME} to listen`, async () => (await probe(S.ports.graph)) === 'echo', 5000, 100);

  // The UI's address alone opens the dashboard.
  await page.goto(`${S.base}/ui/`);
  await h1(page, 'Dashboard').waitFor();
  assert.equal(await page.getByRole('link', { name: 'Dashboard', exact: true }).getAttribute('aria-current'), 'page');
  const card = page.locator(`li.card[data-stream-id="${S.graphId}"]`);
  await card.waitFor();
  assert.match(await card.innerText(), new RegExp(GRAPH_NAME));
  const total = (key) => page.locator(`[data-total="${key}"]`).innerText();
  await waitFor('the totals', async () => /^\d+$/.test(await total('up')));
  const list = (await api('/api/v1/streams')).body;
  assert.equal(Number(await total('disabled')), list.filter((s) => !s.enabled).length, 'disabled total');
  // Streams with problems first: the guarded one (unhealthy, blocking) and
  // the one with an upstream down lead.
  await waitFor('the problem cards first', async () => {
    const problem = await page.locator('li.card').evaluateAll((lis) => lis.map((li) => li.classList.contains('problem')));
    return problem[0] && problem.indexOf(false) > 0 && !problem.slice(problem.indexOf(false)).includes(true);
  });
  const guarded = page.locator(`li.card.problem[data-stream-id="${S.guardedId}"]`);
  assert.match(await guarded.innerText(), /Problems: unhealthy, blocking connections/);
  const spark = card.locator('svg.spark').first();
  const before = await spark.locator('path.line').getAttribute('d');

  // Traffic for a while: the throughput sparkline, its text alternative
  // and the total change without a reload.
  const flowing = pump(S.ports.graph, 25_000);
  const label = await waitFor('the throughput sparkline to show traffic', async () => {
    const l = await spark.getAttribute('aria-label');
    const d = await spark.locator('path.line').getAttribute('d');
    return d !== before && !/now 0 B\/s/.test(l) && l;
  }, 30_000, 500);
  assert.match(label, /^Throughput, last hour: now [\d.]+ [KMG]?B\/s, peak/);
  assert.notEqual(await total('throughput'), '0 B/s');
  // The history API says the same.
  const hist = (await api(`/api/v1/streams/${S.graphId}/history?step=10`)).body;
  assert.equal(hist.stream_id, S.graphId);
  assert.equal(hist.step_seconds, 10);
  assert.ok(hist.points.some((p) => p.bytes_sent_per_sec > 0 && p.bytes_received_per_sec > 0), `no traffic in ${JSON.stringify(hist.points.slice(-3))}`);
  // Numbers on hover.
  const box = await spark.boundingBox();
  await page.mouse.move(box.x + box.width - 2, box.y + box.height / 2);
  assert.match(await card.locator('.readout').first().innerText(), /^\d\d:\d\d: Throughput [\d.]+ [KMG]?B\/s$/);
  await shot(page, 'dashboard.png');
  // A refresh asks for the last minute or so, not the whole hour again.
  const again = await page.waitForRequest((r) => r.url().includes(`/streams/${S.graphId}/history?`));
  const since = Date.parse(new URL(again.url()).searchParams.get('since'));
  assert.ok(Date.now() - since < 3 * 60_000, `a refresh asked since ${new Date(since).toISOString()}`);
  await flowing;
  // Polling stops when the page is left.
  let after = 0;
  page.on('request', (r) => { if (/\/history\?/.test(r.url())) after++; });
  await openHash(page, '/certificates');
  await h1(page, 'Certificates').waitFor();
  const n = after;
  await sleep(6000);
  assert.equal(after, n, 'the dashboard still polls after it was left');
});

test('the stream page: graphs over 1 h, 6 h and 24 h with axes and a table, open connections and the log', { timeout: TEST_MS }, async () => {
  needGraph();
  const held = await connect(S.ports.graph, false);
  held.on('error', () => {});
  try {
    await openHash(page, '/streams');
    await streamRow(page, S.graphId).getByRole('link', { name: 'View', exact: true }).click();
    await h1(page, `Stream: ${GRAPH_NAME}`).waitFor();
    const g = page.locator('section.graph-card', { hasText: 'Throughput' }).locator('svg.graph');
    await waitFor('the throughput graph to show traffic', async () => !/now 0 B\/s, peak 0 B\/s/.test(await g.getAttribute('aria-label')));
    // Axis labels with units: the scale's top and the times.
    const axis = await g.locator('.axis text').allTextContents();
    assert.ok(axis.some((t) => /[KMG]?B\/s$/.test(t)), `no unit on the axis: ${axis}`);
    assert.ok(axis.some((t) => /^\d\d:\d\d$/.test(t)), `no time on the axis: ${axis}`);
    // Keyboard: focus the graph, arrows move along its points.
    await g.focus();
    await page.keyboard.press('End');
    const readout = page.locator('section.graph-card', { hasText: 'Throughput' }).locator('.readout');
    const last = await readout.innerText();
    assert.match(last, /^\d\d:\d\d: Throughput /);
    await page.keyboard.press('Home');
    assert.notEqual(await readout.innerText(), last, 'Home did not move to the first point');
    // A screen reader hears it: the keys write to a polite live region.
    const said = page.locator('section.graph-card', { hasText: 'Throughput' }).locator('[aria-live="polite"]');
    assert.equal(await said.textContent(), await readout.innerText());
    // The table behind the graphs.
    await page.getByText('The graphs as a table', { exact: true }).click();
    const rows = page.locator('.graph-data tbody tr');
    assert.ok(await rows.count() >= 1);
    // The spans ask the API for their step.
    for (const [label, step] of [['6 h', 60], ['24 h', 300], ['1 h', 10]]) {
      const asked = page.waitForRequest((r) => r.url().includes(`/history?`) && r.url().includes(`step=${step}`));
      await page.getByRole('button', { name: label, exact: true }).click();
      await asked;
      assert.equal(await page.getByRole('button', { name: label, exact: true }).getAttribute('aria-pressed'), 'true');
    }
    // A range whose history fails says so; the next refresh that works
    // takes the error away.
    const once = '**/api/v1/streams/*/history?*step=60*';
    await page.route(once, (r) => r.fulfill({ status: 503, contentType: 'application/json', body: '{"error":"try later"}' }));
    await page.getByRole('button', { name: '6 h', exact: true }).click();
    const alert = page.locator('#alert');
    await waitFor('the failed range\'s error', async () => /Could not load the history/.test(await alert.innerText()));
    await page.unroute(once);
    await waitFor('the error to go with the next refresh', async () => (await alert.innerText()) === '', 12_000, 250);
    await page.getByRole('button', { name: '1 h', exact: true }).click();
    // The open connection and the log, on the same page.
    await page.getByRole('heading', { level: 2, name: 'Open connections' }).waitFor();
    await page.locator('tr[data-conn-id]').first().waitFor();
    await page.getByRole('heading', { level: 2, name: 'Connection log' }).waitFor();
    await page.locator('tr.log-row').first().waitFor();
    await page.getByText('The graphs as a table', { exact: true }).click();
    await shot(page, 'stream.png');
  } finally {
    await closeSocket(held);
  }
  // A stream with several upstreams: a row for each, the closed one down.
  if (S.multiId) {
    await openHash(page, `/streams/${S.multiId}/view`);
    await h1(page, `Stream: ${MULTI_NAME}`).waitFor();
    const ups = page.getByRole('region', { name: 'Upstreams' }).locator('tbody tr');
    await waitFor('three upstream rows', async () => (await ups.count()) === 3);
    const states = await ups.locator('td.health').allInnerTexts();
    assert.equal(states.filter((t) => t.startsWith('up')).length, 2, `states: ${states}`);
    assert.equal(states.filter((t) => t.startsWith('down')).length, 1, `states: ${states}`);
    // The 5 s refreshes keep the table, and so the keyboard focus on it.
    const region = page.getByRole('region', { name: 'Upstreams' });
    await region.focus();
    for (let i = 0; i < 2; i++) await page.waitForResponse((r) => r.url().includes(`/streams/${S.multiId}/history?`));
    await page.waitForTimeout(200);
    assert.ok(await region.evaluate((el) => el === document.activeElement), 'a refresh took the focus off the Upstreams table');
    // Another admin drops the backup: the line under the heading follows.
    const { body: m } = await api(`/api/v1/streams/${S.multiId}`);
    await apiSend('PATCH', `/api/v1/streams/${S.multiId}`, { upstreams: m.upstreams.filter((u) => !u.backup) });
    const sub = page.locator('main p.sub').first();
    await waitFor('the heading\'s line to say 2 upstreams', async () => /→ 2 upstreams/.test(await sub.innerText()), 12_000, 250);
  }
});

test('the log filters by source CIDR on the server, and Download CSV gets what is filtered', { timeout: TEST_MS }, async () => {
  needGraph();
  // Two from 127.0.0.2, one from 127.0.0.3.
  await connectFrom(S.ports.graph, '127.0.0.2');
  await connectFrom(S.ports.graph, '127.0.0.2');
  await connectFrom(S.ports.graph, '127.0.0.3');
  await waitFor('the three entries in the log', async () => {
    const { body } = await api(`/api/v1/streams/${S.graphId}/connections?limit=50`);
    return body.entries.filter((e) => e.source_ip === '127.0.0.2' || e.source_ip === '127.0.0.3').length === 3;
  }, 15_000, 250);
  await openHash(page, `/streams/${S.graphId}/log`);
  await h1(page, `Log: ${GRAPH_NAME}`).waitFor();
  const source = page.getByLabel('Source IP or CIDR', { exact: true });
  // A bad CIDR is refused at its field, nothing sent.
  await source.fill('127.0.0.0/99');
  await page.getByRole('button', { name: 'Filter', exact: true }).click();
  assert.match(await page.locator('#err-source').innerText(), /prefix length/);
  assert.equal(await source.getAttribute('aria-invalid'), 'true');
  await source.fill('127.0.0.2/32');
  const asked = page.waitForResponse((r) => r.url().includes('/connections?') && r.url().includes('source=127.0.0.2%2F32'));
  await page.getByRole('button', { name: 'Filter', exact: true }).click();
  assert.equal((await asked).status(), 200);
  await waitFor('two rows from 127.0.0.2', async () => {
    const texts = await page.locator('tr.log-row').allInnerTexts();
    return texts.length === 2 && texts.every((t) => t.includes('127.0.0.2'));
  });
  // Reason and a time range go to the server too; a range with nothing
  // in it shows no entry.
  await page.getByLabel('Reason', { exact: true }).fill('client_close');
  // To the minute: Chromium keeps "…:00" seconds as "…", and Playwright's
  // fill then calls the value malformed (one run in 60).
  const local = (ms) => { const d = new Date(ms); return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16); };
  await page.getByLabel('From', { exact: true }).fill(local(Date.now() - 3_600_000));
  await page.getByLabel('To', { exact: true }).fill(local(Date.now() - 1_800_000));
  const ranged = page.waitForResponse((r) => /reason=client_close/.test(r.url()) && /since=/.test(r.url()) && /until=/.test(r.url()));
  await page.getByRole('button', { name: 'Filter', exact: true }).click();
  assert.equal((await ranged).status(), 200);
  await page.getByText('No entries.', { exact: true }).waitFor();
  await page.getByLabel('From', { exact: true }).fill('');
  await page.getByLabel('To', { exact: true }).fill('');
  await page.getByRole('button', { name: 'Filter', exact: true }).click();
  await waitFor('the two rows again', async () => (await page.locator('tr.log-row').count()) === 2);
  const link = page.getByRole('link', { name: 'Download CSV', exact: true });
  assert.match(await link.getAttribute('href'), /format=csv/);
  assert.match(await link.getAttribute('href'), /reason=client_close/);
  const [download] = await Promise.all([page.waitForEvent('download'), link.click()]);
  const csv = fs.readFileSync(await download.path(), 'utf8');
  fs.writeFileSync(path.join(artifacts, 'log-filtered.csv'), csv);
  const [head, ...rows] = parseCSV(csv).filter((r) => r.length > 1);
  const col = head.indexOf('source_ip');
  assert.ok(col >= 0, `no source_ip column in ${head}`);
  assert.equal(rows.length, 2, `CSV rows: ${JSON.stringify(rows)}`);
  assert.ok(rows.every((r) => r[col] === '127.0.0.2'), `CSV sources: ${rows.map((r) => r[col])}`);
});

test('the stream list filters, sorts, and disables three selected streams at once with a summary', { timeout: TEST_MS }, async () => {
  S.bulkIds = [];
  for (const name of BULK) {
    const port = await freePort();
    S.ports[name] = port;
    const s = await apiSend('POST', '/api/v1/streams', { name, listen_address: '127.0.0.1', listen_port: port, upstream_host: '127.0.0.1', upstream_port: S.ports.echo });
    S.bulkIds.push(s.id);
  }
  await openHash(page, '/streams');
  await streamRow(page, S.bulkIds[2]).waitFor();
  const visibleIds = async () => (await page.locator('tbody tr[data-stream-id]:visible').evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.streamId))));
  // Filters: name, port, upstream, protocol, state.
  await page.getByLabel('Name', { exact: true }).fill('e2e-bulk');
  await waitFor('only the bulk streams', async () => JSON.stringify(await visibleIds()) === JSON.stringify(S.bulkIds));
  await page.getByLabel('Port', { exact: true }).fill(String(S.ports[BULK[1]]));
  await waitFor('the stream on that port', async () => JSON.stringify(await visibleIds()) === JSON.stringify([S.bulkIds[1]]));
  await page.getByLabel('Port', { exact: true }).fill('');
  await page.getByLabel('Protocol', { exact: true }).selectOption('udp');
  await waitFor('no tcp stream', async () => (await visibleIds()).length === 0);
  await page.getByText('No stream matches the filter.').waitFor();
  await page.getByLabel('Protocol', { exact: true }).selectOption('');
  await page.getByLabel('Upstream', { exact: true }).fill(`:${S.ports.echo}`);
  // Sort by name, then the other way.
  const name = page.getByRole('button', { name: 'Name', exact: true });
  await name.click();
  await waitFor('sorted by name', async () => JSON.stringify(await visibleIds()) === JSON.stringify(S.bulkIds));
  await name.click();
  await waitFor('sorted by name, descending', async () => JSON.stringify(await visibleIds()) === JSON.stringify([...S.bulkIds].reverse()));
  assert.equal(await page.locator('th[aria-sort="descending"]').count(), 1);
  assert.equal(await page.locator('th[aria-sort="descending"] button').getAttribute('class'), 'sort');
  assert.equal(await page.locator('th[aria-sort="descending"] button').innerText(), 'Name ▼');

  // Select all shown (the three), then Disable: one PATCH each.
  const patches = [];
  page.on('request', (r) => { if (r.method() === 'PATCH') patches.push(r.url()); });
  await page.getByLabel('Select all shown', { exact: true }).check();
  await page.getByText('3 selected', { exact: true }).waitFor();
  await page.getByRole('button', { name: 'Disable', exact: true }).click();
  const result = page.getByRole('group', { name: 'Result of the last action' });
  await result.waitFor();
  assert.match(await result.innerText(), /Disabled 3 of 3 streams\./);
  for (const n of BULK) assert.match(await result.innerText(), new RegExp(`${n}: disabled`));
  assert.equal(patches.length, 3, `PATCH requests: ${patches}`);
  for (const id of S.bulkIds) assert.equal((await api(`/api/v1/streams/${id}`)).body.enabled, false, `stream ${id} still enabled`);
  await page.getByLabel('State', { exact: true }).selectOption('disabled');
  await waitFor('the three as disabled', async () => (await visibleIds()).length === 3);
  await page.getByLabel('State', { exact: true }).selectOption('');

  // Enable them, one changed meanwhile by someone else: two go through,
  // the third says why not.
  await page.getByLabel('Select all shown', { exact: true }).check();
  await apiSend('PATCH', `/api/v1/streams/${S.bulkIds[1]}`, { notes: 'changed by another admin' });
  await page.getByRole('button', { name: 'Enable', exact: true }).click();
  await waitFor('the enable summary', async () => /Enabled 2 of 3 streams; 1 could not be enabled/.test(await result.innerText()));
  assert.match(await result.innerText(), new RegExp(`${BULK[1]}: not enabled: .*\\(HTTP 412`));
  assert.match(await page.getByRole('alert').innerText(), /Enabled 2 of 3/);
  await shot(page, 'streams-bulk.png');
});

test('the audit trail shows an entry for each kind of change, with field diffs, filtered by stream', { timeout: TEST_MS }, async () => {
  assert.ok(S.bulkIds?.length === 3, 'the bulk test failed');
  // An update with a diff, a certificate added, changed and deleted, and
  // a bulk delete through the UI.
  await apiSend('PATCH', `/api/v1/streams/${S.bulkIds[0]}`, { name: 'e2e-bulk-renamed' });
  const cert = await apiSend('POST', '/api/v1/certificates', { name: 'e2e-audit-cert', certificate: certPem, private_key: keyPem });
  await apiSend('PUT', `/api/v1/certificates/${cert.id}`, { name: 'e2e-audit-cert-2', certificate: certPem, private_key: keyPem });
  await apiSend('DELETE', `/api/v1/certificates/${cert.id}`);
  await openHash(page, '/streams');
  await page.getByLabel('Name', { exact: true }).fill('e2e-bulk');
  await streamRow(page, S.bulkIds[2]).waitFor();
  // The one the enable above could not change stays selected (to try
  // again): clear the selection first.
  await page.getByLabel('Select all shown', { exact: true }).check();
  await page.getByLabel('Select all shown', { exact: true }).uncheck();
  await page.getByLabel(`Select ${BULK[2]}`, { exact: true }).check();
  await page.getByRole('button', { name: 'Delete', exact: true }).first().click();
  await openDialog(page).getByRole('button', { name: 'Delete 1', exact: true }).click();
  await page.getByRole('group', { name: 'Result of the last action' }).filter({ hasText: 'Deleted 1 of 1 stream.' }).waitFor();
  assert.equal((await api(`/api/v1/streams/${S.bulkIds[2]}`)).status, 404);

  await page.getByRole('link', { name: 'Audit', exact: true }).click();
  await h1(page, 'Audit trail').waitFor();
  await page.locator('tr.audit-row').first().waitFor();
  const kinds = ['create', 'update', 'enable', 'disable', 'delete', 'cert_create', 'cert_update', 'cert_delete'];
  for (const k of kinds) {
    assert.ok(await page.locator(`tr.audit-row[data-action="${k}"]`).count() > 0, `no "${k}" entry on the audit page`);
  }
  // The rename's diff, and who: the admin endpoint and its remote.
  const rename = page.locator('tr.audit-row[data-action="update"]', { hasText: 'e2e-bulk-renamed' }).first();
  const field = rename.locator('li[data-field="name"]');
  assert.equal(await field.locator('del').innerText(), BULK[0]);
  assert.equal(await field.locator('ins').innerText(), 'e2e-bulk-renamed');
  assert.match(await rename.innerText(), /admin endpoint/);
  // No private key anywhere.
  assert.doesNotMatch(await page.locator('main').innerText(), /PRIVATE KEY/);
  await shot(page, 'audit.png');
  // Filtered by one stream: its entries alone.
  await page.getByLabel('Stream', { exact: true }).selectOption(String(S.bulkIds[1]));
  await waitFor('the filtered list', async () => {
    const ids = await page.locator('tr.audit-row').evaluateAll((trs) => trs.map((tr) => tr.textContent));
    return ids.length > 0 && ids.every((t) => t.includes(`(${S.bulkIds[1]})`));
  });
  const actions = await page.locator('tr.audit-row').evaluateAll((trs) => trs.map((tr) => tr.dataset.action));
  assert.deepEqual([...new Set(actions)].sort(), ['create', 'disable', 'update'], `stream ${S.bulkIds[1]}: ${actions}`);
});

test('export downloads the streams in the export format; import puts them back and says per stream what went through', { timeout: TEST_MS }, async () => {
  assert.ok(S.bulkIds?.length === 3, 'the bulk test failed');
  await openHash(page, '/streams');
  await streamRow(page, S.bulkIds[1]).waitFor();
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Export', exact: true }).click()]);
  assert.match(download.suggestedFilename(), /^aegis-streams-\d{4}-\d\d-\d\d\.json$/);
  const file = JSON.parse(fs.readFileSync(await download.path(), 'utf8'));
  assert.equal(file.format, 'aegis-streams-export');
  assert.equal(file.version, 1);
  const ids = file.streams.map((s) => s.id);
  assert.ok(ids.includes(S.bulkIds[1]) && !ids.includes(1), `streams in the file: ${ids}`);
  assert.ok(file.streams.every((s) => s.status === undefined && s.version === undefined));

  // Delete one, then import the file with one more stream whose port is
  // taken: the deleted one comes back, the others are replaced, the
  // conflicting one is refused with the server's reason.
  const gone = file.streams.find((s) => s.id === S.bulkIds[1]);
  await apiSend('DELETE', `/api/v1/streams/${S.bulkIds[1]}`);
  file.streams.push({ ...gone, id: 999_999, name: 'e2e-import-clash', listen_port: S.ports.graph, enabled: true });
  const upload = path.join(S.tmp, 'import.json');
  fs.writeFileSync(upload, JSON.stringify(file));
  await page.locator('#import-file').setInputFiles(upload);
  const dialog = openDialog(page);
  await dialog.waitFor();
  assert.match(await dialog.innerText(), new RegExp(`Import ${file.streams.length} streams from import\\.json`));
  await dialog.getByRole('button', { name: 'Import', exact: true }).click();
  const result = page.getByRole('group', { name: 'Result of the last action' });
  await waitFor('the import summary', async () => /Imported \d+ of \d+ streams from import\.json/.test(await result.innerText()));
  const text = await result.innerText();
  assert.match(text, new RegExp(`Imported ${file.streams.length - 1} of ${file.streams.length} streams`));
  assert.match(text, new RegExp(`${BULK[1]}: added as stream \\d+`));
  assert.match(text, new RegExp(`${GRAPH_NAME}: replaced`));
  assert.match(text, /e2e-import-clash: not imported: .*listen_port \d+\/tcp overlaps stream .*\(HTTP 400/);
  assert.ok((await api('/api/v1/streams')).body.some((s) => s.name === BULK[1]), 'the deleted stream is not back');
  await streamRow(page, (await api('/api/v1/streams')).body.find((s) => s.name === BULK[1]).id).waitFor();
  // A file that is not an export changes nothing and says why.
  fs.writeFileSync(upload, '{"format":"something else"}');
  await page.locator('#import-file').setInputFiles(upload);
  await page.getByRole('alert').filter({ hasText: /not an export of aegis streams/ }).waitFor();
});

test('the new pages pass axe-core WCAG 2 A/AA with no violation at all, light and dark, wide and phone', { timeout: 60_000 }, async () => {
  needGraph();
  const ctx = await newContext({ bypassCSP: true });
  await guardOrigin(ctx, S.base);
  const tab = await ctx.newPage();
  watchPage(tab, 'axe 18');
  const all = [];
  const pages = [
    ['dashboard', async () => {
      await openHash(tab, '/dashboard');
      await tab.locator(`li.card[data-stream-id="${S.graphId}"] svg.spark[aria-label*="now"]`).first().waitFor();
    }],
    ['stream page', async () => {
      await openHash(tab, `/streams/${S.graphId}/view`);
      await h1(tab, `Stream: ${GRAPH_NAME}`).waitFor();
      await tab.locator('tr.log-row').first().waitFor();
      await tab.getByText('The graphs as a table', { exact: true }).click();
    }],
    ['audit', async () => {
      await openHash(tab, '/audit');
      await tab.locator('tr.audit-row').first().waitFor();
    }],
    ['streams with filter and a bulk result', async () => {
      await openHash(tab, '/streams');
      await streamRow(tab, S.graphId).waitFor();
      await tab.getByLabel(`Select ${GRAPH_NAME}`, { exact: true }).check();
      await tab.getByRole('button', { name: 'Enable', exact: true }).click();
      await tab.getByRole('group', { name: 'Result of the last action' }).waitFor();
    }],
  ];
  try {
    for (const [width, height] of [[1280, 900], [375, 812]]) {
      await tab.setViewportSize({ width, height });
      for (const scheme of ['light', 'dark']) {
        await tab.emulateMedia({ colorScheme: scheme });
        for (const [what, show] of pages) {
          await show();
          if (!(await tab.evaluate(() => typeof window.axe === 'object'))) await tab.addScriptTag({ content: AXE_SRC });
          const found = await tab.evaluate(async (tags) => (await window.axe.run(document, { runOnly: { type: 'tag', values: tags }, resultTypes: ['violations'] }))
            .violations.map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => `${n.target.join(' ')}: ${n.failureSummary}`).join(' | ')}`), AXE_TAGS);
          console.log(`# axe ${what}, ${scheme}, ${width} px: ${found.length} violation(s)`);
          if (width < 400 && scheme === 'dark' && what !== 'streams with filter and a bulk result') await shot(tab, `${what.replace(/ /g, '-')}-phone-dark.png`);
          for (const v of found) all.push(`${what}, ${scheme}, ${width} px: ${v}`);
        }
      }
    }
  } finally {
    await ctx.close();
  }
  assert.deepEqual(all, [], `axe found ${all.length} violation(s):\n${all.join('\n')}`);
});

test('every page passes axe-core WCAG 2 A/AA checks (no serious or critical issue), light and dark, wide and narrow', { timeout: TEST_MS }, async () => {
  needStream();
  const bad = [];
  const ctx = await newContext({ bypassCSP: true });
  await guardOrigin(ctx, S.base);
  const tab = await ctx.newPage();
  watchPage(tab, 'axe');
  // An open connection, so that the connections page has a row.
  const held = await connect(S.ports.stream, true);
  held.on('error', () => {});
  const held2 = await connect(S.ports.multi, false);
  held2.on('error', () => {});
  // The check itself finds a known low-contrast text and an unnamed field.
  await tab.setContent('<!doctype html><html lang="en"><title>t</title><main><p style="color:#999;background:#fff">faint</p><input type="text"></main></html>');
  const control = (await checkA11y(tab, 'known-bad control page')).join('\n');
  assert.match(control, /color-contrast/, 'axe missed low-contrast text');
  assert.match(control, /\blabel\b/, 'axe missed a field without a name');

  // Each page as the tests above saw it, shown and waited for.
  const pages = [
    ['streams (config and API stream)', async () => {
      await openHash(tab, '/streams');
      await streamRow(tab, 1).waitFor();
      await streamRow(tab, S.streamId).waitFor();
    }],
    ['edit form', async () => {
      await openHash(tab, `/streams/${S.streamId}`);
      await h1(tab, 'Edit stream').waitFor();
      await tab.getByLabel('Listen port', { exact: true }).waitFor();
    }],
    // Errors showing: a taken port, and a save without the required fields.
    ['new form with errors', async () => {
      await openHash(tab, '/streams/new');
      await h1(tab, 'New stream').waitFor();
      const port = tab.getByLabel('Listen port', { exact: true });
      await port.fill(String(S.ports.cfg));
      await port.press('Tab');
      await waitFor('#err-listen_port text', async () => (await tab.locator('#err-listen_port').innerText()).trim());
      await tab.getByRole('button', { name: 'Save', exact: true }).click();
      await waitFor('#err-upstream_host text', async () => (await tab.locator('#err-upstream_host').innerText()).trim());
      await tab.getByRole('alert').filter({ hasText: /\S/ }).waitFor();
    }],
    // A write's warnings (the answer to the switch's PATCH, with a
    // warning added; the stream stays as it is).
    ['streams with a warnings notice', async () => {
      await openHash(tab, '/streams');
      await streamRow(tab, S.streamId).waitFor();
      const one = `**/api/v1/streams/${S.streamId}`;
      await tab.route(one, async (route) => {
        if (route.request().method() !== 'PATCH') return route.fallback();
        const { body } = await api(`/api/v1/streams/${S.streamId}`);
        return route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify({ ...body, warnings: ['listen_port 53: the well-known port of DNS'] }) });
      });
      try {
        await tab.getByLabel(`Enabled: ${NAME}`, { exact: true }).click();
        await tab.getByRole('group', { name: 'Warnings' }).waitFor();
      } finally {
        await tab.unroute(one);
      }
    }],
    // A save refused for a setting the form has no field for.
    ['new form with a problem at the top', async () => {
      await openHash(tab, '/streams/new');
      await h1(tab, 'New stream').waitFor();
      for (const [label, v] of [['Listen port', String(S.ports.stream)], ['Upstream host', '127.0.0.1'], ['Upstream port', String(S.ports.echo)]]) {
        await tab.getByLabel(label, { exact: true }).fill(v);
      }
      const all = '**/api/v1/streams';
      await tab.route(all, (route) => (route.request().method() !== 'POST' ? route.fallback() : route.fulfill({
        status: 409, contentType: 'application/json',
        body: JSON.stringify({ error: 'id 7 is taken', field: 'id', value: 7, errors: [{ field: 'id', value: 7, message: 'id 7 is taken' }] }),
      })));
      try {
        await tab.getByRole('button', { name: 'Save', exact: true }).click();
        await tab.locator('#form-problems').waitFor({ state: 'visible' });
      } finally {
        await tab.unroute(all);
      }
    }],
    ['connections', async () => {
      await openHash(tab, `/streams/${S.streamId}/active`);
      await h1(tab, `Connections: ${NAME}`).waitFor();
      await tab.locator('tr[data-conn-id]').first().waitFor();
    }],
    ['log', async () => {
      await openHash(tab, `/streams/${S.streamId}/log`);
      await h1(tab, `Log: ${NAME}`).waitFor();
      await tab.locator('tr.log-row').first().waitFor();
    }],
    ['cluster', async () => {
      await openHash(tab, '/cluster');
      await h1(tab, 'Cluster').waitFor();
      await tab.locator(`tr[data-node="${NODE}"]`).waitFor();
      await tab.locator('section tr[data-stream-id]').first().waitFor();
    }],
    ['connections with upstream and port', async () => {
      await openHash(tab, `/streams/${S.multiId}/active`);
      await h1(tab, `Connections: ${MULTI_NAME}`).waitFor();
      await tab.locator('tr[data-conn-id]').first().waitFor();
    }],
    ['certificates', async () => {
      await openHash(tab, '/certificates');
      await h1(tab, 'Certificates').waitFor();
      await tab.locator(`tr[data-cert-id="${S.certId}"]`).waitFor();
    }],
  ];
  try {
    for (const scheme of ['light', 'dark']) {
      await tab.emulateMedia({ colorScheme: scheme });
      for (const [what, show] of pages) {
        await show();
        bad.push(...await checkA11y(tab, `${what}, ${scheme}`));
      }
    }
    // The streams page at phone width, where rows are cards.
    await tab.setViewportSize({ width: 375, height: 812 });
    for (const scheme of ['dark', 'light']) {
      await tab.emulateMedia({ colorScheme: scheme });
      await pages[0][1]();
      bad.push(...await checkA11y(tab, `streams, ${scheme}, 375 px`));
    }
  } finally {
    await closeSocket(held);
    await closeSocket(held2);
    await ctx.close();
  }
  assert.deepEqual(bad, [], `axe found ${bad.length} serious or critical issue(s):\n${bad.join('\n')}`);
});

test('deleting the stream asks first, then frees its port', { timeout: TEST_MS }, async () => {
  needStream();
  await openHash(page, '/streams');
  const row = streamRow(page, S.streamId);
  await row.getByRole('button', { name: 'Delete', exact: true }).click();
  const dialog = openDialog(page);
  await dialog.waitFor();
  assert.match(await dialog.innerText(), new RegExp(NAME), 'the dialog does not name the stream');
  // Cancel keeps it.
  await dialog.getByRole('button', { name: 'Cancel', exact: true }).click();
  await waitFor('the dialog to close', async () => (await openDialog(page).count()) === 0);
  assert.equal((await api(`/api/v1/streams/${S.streamId}`)).status, 200, 'Cancel deleted the stream');
  // Leaving the page (Back, a link) cancels the question: no dialog stays
  // over the next page to delete the stream from there.
  await row.getByRole('button', { name: 'Delete', exact: true }).click();
  await openDialog(page).waitFor();
  await page.evaluate(() => { window.location.hash = '#/'; });
  await waitFor('the dialog to close as the page is left', async () => (await openDialog(page).count()) === 0);
  assert.equal((await api(`/api/v1/streams/${S.streamId}`)).status, 200, 'leaving the page deleted the stream');
  await openHash(page, '/streams');

  await row.getByRole('button', { name: 'Delete', exact: true }).click();
  await openDialog(page).getByRole('button', { name: 'Delete', exact: true }).click();
  await waitFor('the row to go', async () => (await row.count()) === 0);
  assert.equal((await api(`/api/v1/streams/${S.streamId}`)).status, 404);
  await waitFor(`port ${S.ports.stream} to be free`, () => canBind(S.ports.stream), 5000, 100);
  // The certificate is free now, and deleting it works.
  await openHash(page, '/certificates');
  const certRow = page.locator(`tr[data-cert-id="${S.certId}"]`);
  await certRow.getByRole('button', { name: 'Delete', exact: true }).click();
  await openDialog(page).getByRole('button', { name: 'Delete', exact: true }).click();
  await waitFor('the certificate row to go', async () => (await certRow.count()) === 0);
  assert.equal((await api(`/api/v1/certificates/${S.certId}`)).status, 404);
});

test('a site with streams_admin and basic_auth serves the UI after login', { timeout: TEST_MS }, async () => {
  for (const p of ['/', '/api/v1/streams', '/admin/']) {
    const res = await get(S.site + p);
    assert.equal(res.status, 401, `GET ${p} without login: status ${res.status}`);
  }
  const ctx = await newContext({ httpCredentials: { username: SITE_USER, password: SITE_PASSWORD } });
  await guardOrigin(ctx, S.site);
  const sitePage = await ctx.newPage();
  watchPage(sitePage, 'site');
  for (const mount of ['/', '/admin/']) {
    // The dashboard first, then the streams.
    await sitePage.goto(S.site + mount);
    await h1(sitePage, 'Dashboard').waitFor();
    await sitePage.locator('li.card[data-stream-id="1"]').waitFor();
    await sitePage.getByRole('link', { name: 'Streams', exact: true }).click();
    await h1(sitePage, 'Streams').waitFor();
    await streamRow(sitePage, 1).waitFor();
    assert.match(await streamRow(sitePage, 1).innerText(), new RegExp(CFG_NAME));
  }
  await ctx.close();
});

test('the UI opened as http://user:password@host/ loads the streams (requests go without the credentials)', { timeout: TEST_MS }, async () => {
  // As a browser does with a typed https://user:pass@host:9443/: the
  // page address, and so document.baseURI, keeps the credentials, and
  // fetch refuses a URL with them.
  const ctx = await newContext();
  await guardOrigin(ctx, S.site);
  const tab = await ctx.newPage();
  watchPage(tab, 'site with credentials in the URL');
  const withCreds = (mount) => `http://${SITE_USER}:${encodeURIComponent(SITE_PASSWORD)}@127.0.0.1:${S.ports.site}${mount}`;
  try {
    for (const mount of ['/', '/admin/']) {
      await tab.goto(`${withCreds(mount)}#/streams`);
      await h1(tab, 'Streams').waitFor();
      const alert = tab.getByRole('alert');
      const row = streamRow(tab, 1);
      await waitFor(`the config stream's row at ${mount} (or an alert)`, async () =>
        (await row.count()) > 0 || (await alert.innerText()).trim());
      assert.equal((await alert.innerText()).trim(), '', `an alert at ${mount}`);
      assert.match(await row.innerText(), new RegExp(CFG_NAME));
    }
    // A request the server refuses says the status and the server's
    // error, not "cannot reach the server".
    await tab.goto(`${withCreds('/')}#/streams/9999/log`);
    const said = await waitFor('an alert for a stream that does not exist', async () => (await tab.getByRole('alert').innerText()).trim());
    assert.match(said, /HTTP 404/, `the alert does not give the status: ${said}`);
    assert.match(said, /9999/, `the alert does not give the server's error: ${said}`);
    assert.doesNotMatch(said, /cannot reach/, said);
  } finally {
    await ctx.close();
  }
});

test('the pages fetched nothing outside the aegis origin and threw no errors', () => {
  assert.deepEqual(S.offOrigin, [], 'requests outside the aegis origin');
  assert.deepEqual(S.pageErrors, [], 'uncaught errors in the page');
});
