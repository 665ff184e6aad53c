// The router: one page per hash route. A page is an async function of a
// context; it renders into ctx.main and registers with ctx.onLeave what
// stops when the user leaves it (polling).

import { clearMessages, fail, focusHeading, h, heading, say, showWarnings, takeMessage, takeWarnings } from './dom.js';
import { streamsPage } from './streams.js';
import { formPage } from './form.js';
import { activePage } from './active.js';
import { logPage } from './log.js';
import { certsPage } from './certs.js';
import { clusterPage } from './cluster.js';
import { dashboardPage } from './dashboard.js';
import { streamPage } from './stream.js';
import { auditPage } from './audit.js';

const routes = [
  [/^\/dashboard$/, dashboardPage],
  [/^\/streams$/, streamsPage],
  [/^\/streams\/new$/, formPage],
  [/^\/streams\/(\d+)$/, formPage],
  [/^\/streams\/(\d+)\/view$/, streamPage],
  [/^\/streams\/(\d+)\/active$/, activePage],
  [/^\/streams\/(\d+)\/log$/, logPage],
  [/^\/certificates$/, certsPage],
  [/^\/cluster$/, clusterPage],
  [/^\/audit$/, auditPage],
];

let leave = [];
let generation = 0;

async function render() {
  for (const fn of leave.splice(0)) fn();
  const gen = ++generation;
  // A query after the path (#/audit?stream=4) is the page's own.
  const path = location.hash.replace(/^#/, '').split('?')[0] || '/dashboard';
  const main = document.getElementById('main');
  main.replaceChildren();
  clearMessages();
  const message = takeMessage();
  if (message) say(message);
  showWarnings(message, takeWarnings());

  for (const a of document.querySelectorAll('nav a')) {
    const section = a.getAttribute('href').slice(1);
    if (path === section || (section === '/streams' && path.startsWith('/streams/'))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }

  const ctx = {
    main,
    show: (...nodes) => main.append(...nodes.filter((n) => n != null && n !== false)),
    alive: () => gen === generation,
    onLeave: (fn) => leave.push(fn),
  };
  const route = routes.find(([re]) => re.test(path));
  if (!route) {
    main.append(heading('Page not found'), h('p', {}, 'No page here. ', h('a', { href: '#/dashboard' }, 'Go to the dashboard.')));
    focusHeading();
    return;
  }
  const [, id] = path.match(route[0]);
  ctx.id = id ? Number(id) : 0;
  try {
    await route[1](ctx);
  } catch (err) {
    if (!ctx.alive()) return;
    fail(err.message);
    if (!main.querySelector('h1')) ctx.show(heading('Not loaded'), h('p', {}, h('a', { href: '#/streams' }, 'Back to the streams')));
  }
  if (ctx.alive() && !main.contains(document.activeElement)) focusHeading();
}

window.addEventListener('hashchange', () => render());
render();
