// DOM helpers. Text always goes in as text (textContent, text nodes),
// never as HTML.

// h creates an element. props: class, text, on<event> handlers, value and
// checked (set as properties, after the children), other attributes (true
// → present, false/null → left out). Children are nodes or strings.
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  let value;
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'value' || k === 'checked') value = [k, v];
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  el.append(...children.flat(Infinity).filter((c) => c != null && c !== false));
  if (value) el[value[0]] = value[1];
  return el;
}

// setText changes an element's text and title only when they differ, so
// that a refresh leaves the DOM (and the user's selection) alone.
export function setText(el, text, title) {
  if (el.textContent !== text) el.textContent = text;
  if (title !== undefined && el.title !== title) el.title = title;
}

const status = () => document.getElementById('status');
const alertEl = () => document.getElementById('alert');

// say shows a success message in the status region.
export function say(msg) {
  alertEl().textContent = '';
  status().textContent = msg;
}

// fail shows an error in the alert region.
export function fail(msg) {
  status().textContent = '';
  alertEl().textContent = msg;
}

// unfail takes away the error msg that fail showed, if the alert region
// still shows it: a refresh that works again clears its own error, not
// another's.
export function unfail(msg) {
  const a = alertEl();
  if (msg && a.textContent === msg) a.textContent = '';
}

// clearMessages empties both regions and takes the notices away.
export function clearMessages() {
  status().textContent = '';
  alertEl().textContent = '';
  document.getElementById('notices').replaceChildren();
}

// showWarnings shows the warnings the server gave for a write that went
// through (what: e.g. "Saved redis") in a notice that stays until it is
// dismissed, the next write or the user goes to another page.
export function showWarnings(what, warnings) {
  const box = document.getElementById('notices');
  box.replaceChildren();
  if (!Array.isArray(warnings) || !warnings.length) return;
  const notice = h('div', { class: 'notice', role: 'group', 'aria-label': 'Warnings' },
    h('p', {}, `${what}, with ${warnings.length === 1 ? 'a warning' : `${warnings.length} warnings`}:`),
    h('ul', {}, warnings.map((w) => h('li', {}, String(w)))));
  notice.append(h('button', {
    type: 'button',
    class: 'small',
    onclick: () => {
      notice.remove();
      focusHeading();
    },
  }, 'Dismiss'));
  box.append(notice);
}

let nextMessage = '';
let nextWarnings = [];

// go navigates to a hash route and shows message (e.g. "Saved") and the
// server's warnings there.
export function go(hash, message = '', warnings = []) {
  nextMessage = message;
  nextWarnings = warnings || [];
  if (location.hash === `#${hash}`) window.dispatchEvent(new HashChangeEvent('hashchange'));
  else location.hash = hash;
}

// takeMessage returns the message go left for the page being shown.
export function takeMessage() {
  const m = nextMessage;
  nextMessage = '';
  return m;
}

// takeWarnings returns the warnings go left for the page being shown.
export function takeWarnings() {
  const w = nextWarnings;
  nextWarnings = [];
  return w;
}

// heading is a page's h1, focusable so the router can move focus to it.
export function heading(text) {
  document.title = `${text} · Aegis Streams`;
  return h('h1', { tabindex: -1 }, text);
}

// focusHeading moves focus to the page's h1.
export function focusHeading() {
  document.querySelector('main h1')?.focus();
}

let dialogs = 0;

// confirmDialog asks in a modal <dialog> and resolves to true when the
// user confirms. Cancel, Escape, closing and leaving the page (the hash
// route changes) resolve to false. Focus starts on Cancel and returns to
// the element that had it (or the page's h1).
export function confirmDialog({ title, text, confirm }) {
  return new Promise((resolve) => {
    const opener = document.activeElement;
    const id = `dlg-${++dialogs}`;
    const cancel = h('button', { type: 'button' }, 'Cancel');
    const ok = h('button', { type: 'button', class: 'danger' }, confirm);
    const dlg = h('dialog', { 'aria-labelledby': `${id}-t`, 'aria-describedby': `${id}-d` },
      h('h2', { id: `${id}-t` }, title),
      h('p', { id: `${id}-d` }, text),
      h('div', { class: 'actions' }, ok, cancel));
    const leave = () => dlg.close('cancel');
    ok.addEventListener('click', () => dlg.close('ok'));
    cancel.addEventListener('click', () => dlg.close('cancel'));
    window.addEventListener('hashchange', leave);
    dlg.addEventListener('close', () => {
      window.removeEventListener('hashchange', leave);
      dlg.remove();
      if (opener && opener.isConnected && typeof opener.focus === 'function') opener.focus();
      else focusHeading();
      resolve(dlg.returnValue === 'ok');
    });
    document.body.append(dlg);
    dlg.showModal();
    cancel.focus();
  });
}

// poll runs fn now and then every `every` ms after it finished, only
// while the page is visible, until the page is left (ctx.onLeave).
export function poll(ctx, fn, every = 2000) {
  let timer = null;
  let running = false;
  let stopped = false;
  let last = 0;
  let shown = ''; // the error the last tick showed
  const schedule = (wait) => {
    clearTimeout(timer);
    timer = setTimeout(tick, wait);
  };
  async function tick() {
    timer = null;
    if (stopped || running || document.visibilityState !== 'visible') return;
    running = true;
    last = Date.now();
    try {
      await fn();
      unfail(shown);
      shown = '';
    } catch (err) {
      shown = `Could not refresh this page: ${err.message}`;
      fail(shown);
    } finally {
      running = false;
    }
    if (!stopped) schedule(every);
  }
  const onVisible = () => {
    if (document.visibilityState !== 'visible') {
      clearTimeout(timer);
      timer = null;
    } else if (!timer && !running && !stopped) {
      schedule(Math.max(0, last + every - Date.now()));
    }
  };
  document.addEventListener('visibilitychange', onVisible);
  ctx.onLeave(() => {
    stopped = true;
    clearTimeout(timer);
    document.removeEventListener('visibilitychange', onVisible);
  });
  return tick();
}

// table builds a table in a region and returns [region, tbody, row].
// row(props, ...cells) makes a body row whose cells carry their column's
// name in data-label: narrow screens show rows as cards, each value under
// its name. The roles are explicit because CSS display changes drop the
// implicit ones in some browsers.
export function table(label, headers) {
  const tbody = h('tbody', { role: 'rowgroup' });
  const region = h('div', { class: 'table-wrap', role: 'region', 'aria-label': label, tabindex: 0 },
    h('table', { role: 'table' },
      h('thead', { role: 'rowgroup' }, h('tr', { role: 'row' }, headers.map((c) => h('th', { scope: 'col', role: 'columnheader' }, c)))),
      tbody));
  const row = (props, ...cells) => {
    const tr = h('tr', { ...props, role: 'row' }, cells);
    [...tr.cells].forEach((c, i) => {
      c.dataset.label = headers[i];
      c.setAttribute('role', c.tagName === 'TH' ? 'rowheader' : 'cell');
    });
    return tr;
  };
  return [region, tbody, row];
}

// showFieldErrors puts each problem of an API error (or client check)
// under its field: the element err-{field} within root. It returns the
// problems root has no place for.
export function showFieldErrors(root, problems) {
  const byField = new Map();
  const rest = [];
  for (const p of problems) {
    const el = root.querySelector(`#err-${CSS.escape(p.field || '')}`);
    if (!p.field || !el) {
      rest.push(p);
      continue;
    }
    if (!byField.has(el)) byField.set(el, []);
    if (!byField.get(el).includes(p.message)) byField.get(el).push(p.message);
  }
  for (const [el, msgs] of byField) setFieldError(el, msgs.join('\n'));
  return rest;
}

// setFieldError sets (or clears, with "") the error element el and marks
// the fields it describes invalid.
export function setFieldError(el, msg) {
  el.textContent = msg;
  for (const input of el.closest('.field')?.querySelectorAll('input, select, textarea') ?? []) {
    if (msg) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  }
}

// clearFieldErrors empties every err- element within root.
export function clearFieldErrors(root) {
  for (const el of root.querySelectorAll('[id^="err-"]')) setFieldError(el, '');
}

// pager runs a list shown a page at a time, newest first, that the API
// pages with before and next_before. fetch(before) gets a page ({entries,
// next_before}; before is '' for the newest); show(entries, first) draws
// it (first: the newest page). where says which entries show ("Entries
// 1–50, newest first", with noun for Entries). It returns {newer, older,
// reload} (the buttons, to place), load() (the page shown, again) and
// restart() (the newest page: after a filter changed). what names the
// list in an error.
export function pager(ctx, { size, noun, what, where, fetch, show }) {
  const newer = h('button', { type: 'button' }, 'Newer');
  const older = h('button', { type: 'button' }, 'Older');
  const reload = h('button', { type: 'button' }, 'Refresh');
  // before is the cursor of the page shown ('': the newest); stack holds
  // the cursors of the newer pages, to go back.
  let before = '';
  let next = null;
  const stack = [];
  let seq = 0;
  async function load() {
    const my = ++seq;
    let page;
    try {
      page = await fetch(before);
    } catch (err) {
      if (my === seq && ctx.alive()) fail(`Could not load the ${what}: ${err.message}`);
      return;
    }
    if (my !== seq || !ctx.alive()) return;
    const entries = Array.isArray(page.entries) ? page.entries : [];
    next = page.next_before ?? null;
    show(entries, stack.length === 0);
    const first = stack.length * size + 1;
    setText(where, entries.length ? `${noun} ${first}–${first + entries.length - 1}, newest first` : '');
    const focused = document.activeElement;
    newer.disabled = stack.length === 0;
    older.disabled = next == null;
    if (focused?.disabled) (newer.disabled ? older.disabled ? reload : older : newer).focus();
  }
  newer.addEventListener('click', () => {
    if (!stack.length) return;
    before = stack.pop();
    load();
  });
  older.addEventListener('click', () => {
    if (next == null) return;
    stack.push(before);
    before = next;
    load();
  });
  reload.addEventListener('click', () => load());
  const restart = () => {
    before = '';
    stack.length = 0;
    return load();
  };
  return { newer, older, reload, load, restart };
}
