// The certificates page: the stored certificates with their expiry, an
// upload form (PEM certificate and key) and a form for a certificate that
// Caddy obtains and renews (managed).

import { ApiError, del, get, post } from './api.js';
import { clearFieldErrors, clearMessages, confirmDialog, fail, focusHeading, h, heading, say, showFieldErrors, table } from './dom.js';
import { daysLeft, splitList } from './units.js';

const WARN_DAYS = 30;

export async function certsPage(ctx) {
  const [region, tbody, tr] = table('Certificates', ['Name', 'Domains', 'Expires', 'Type', 'Used by', 'Actions']);
  const empty = h('p', { class: 'empty', hidden: true }, 'No certificates yet.');

  async function load() {
    let list;
    try {
      list = await get('certificates');
    } catch (err) {
      if (ctx.alive()) fail(`Could not load the certificates: ${err.message}`);
      return;
    }
    if (!ctx.alive()) return;
    tbody.replaceChildren(...list.map((c) => row(c, remove, tr)));
    empty.hidden = list.length > 0;
  }

  async function remove(c) {
    const users = c.used_by || [];
    const ok = await confirmDialog({
      title: 'Delete certificate',
      text: `Delete certificate "${c.name}"?${users.length ? ` Stream${users.length > 1 ? 's' : ''} ${users.join(', ')} use${users.length > 1 ? '' : 's'} it: it cannot be deleted while they do.` : ''}`,
      confirm: 'Delete',
    });
    if (!ok) return;
    try {
      await del(`certificates/${c.id}`);
    } catch (err) {
      fail(`Could not delete "${c.name}": ${err.message}`);
      return;
    }
    tbody.querySelector(`tr[data-cert-id="${c.id}"]`)?.remove();
    empty.hidden = tbody.children.length > 0;
    say('Deleted');
    focusHeading();
  }

  const upload = certForm('Upload certificate', 'up', 'Upload a certificate', 'Upload', [
    ['name', 'Name', 'input'],
    ['certificate', 'Certificate (PEM)', 'pem', 'The certificate first, then any intermediates: -----BEGIN CERTIFICATE----- …'],
    ['private_key', 'Private key (PEM)', 'pem', 'Stored encrypted; never shown again.'],
  ], (v) => ({ name: v.name.trim(), certificate: v.certificate, private_key: v.private_key }), (b) => [
    !b.name && { field: 'name', message: 'required' },
    !b.certificate.includes('-----BEGIN') && { field: 'certificate', message: 'paste the PEM certificate, from -----BEGIN CERTIFICATE-----' },
    !b.private_key.includes('-----BEGIN') && { field: 'private_key', message: 'paste the PEM private key, from -----BEGIN … PRIVATE KEY-----' },
  ]);
  const managed = certForm('Managed certificate', 'mg', 'Add a managed certificate', 'Add managed certificate', [
    ['name', 'Name', 'input'],
    ['domains', 'Domains', 'list', 'One per line or comma separated. Caddy obtains and renews the certificate; the names must reach this server.'],
  ], (v) => ({ name: v.name.trim(), domains: splitList(v.domains) }), (b) => [
    !b.name && { field: 'name', message: 'required' },
    !b.domains.length && { field: 'domains', message: 'give at least one domain name' },
  ]);

  function certForm(label, prefix, title, button, fields, body, check) {
    const form = h('form', { 'aria-label': label, class: 'cert-form', novalidate: true },
      h('h2', {}, title),
      fields.map(([name, text, kind, hint]) => {
        const id = `${prefix}-${name}`;
        const err = h('p', { id: `err-${name}`, class: 'err' });
        const hintEl = hint ? h('p', { id: `${id}-hint`, class: 'hint' }, hint) : null;
        const control = kind === 'input'
          ? h('input', { type: 'text', id, name, autocomplete: 'off', required: true })
          : h('textarea', { id, name, rows: kind === 'pem' ? 6 : 3, spellcheck: 'false', required: true, class: kind === 'pem' ? 'mono' : null });
        describe(control, [hintEl, err], prefix === 'mg' && name === 'name');
        const file = kind === 'pem' ? fileLoader(text.replace(' (PEM)', ' file'), control) : null;
        return h('div', { class: 'field' }, h('label', { for: id }, text), control, file, hintEl, err);
      }),
      h('div', { class: 'form-actions' }, h('button', { type: 'submit', class: 'primary' }, button)));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      clearMessages();
      clearFieldErrors(form);
      const values = Object.fromEntries(fields.map(([name]) => [name, form.elements[name].value]));
      const b = body(values);
      const problems = check(b).filter(Boolean);
      if (problems.length) {
        showFieldErrors(form, problems);
        fail(`Not saved: fix the marked ${problems.length === 1 ? 'field' : 'fields'}.`);
        form.querySelector('[aria-invalid="true"]')?.focus();
        return;
      }
      try {
        const c = await post('certificates', b);
        if (!ctx.alive()) return;
        form.reset();
        await load();
        say(`Saved certificate "${c.name}"${c.warnings?.length ? `. Warning: ${c.warnings.join('; ')}` : ''}`);
      } catch (err) {
        if (!ctx.alive()) return;
        const rest = err instanceof ApiError ? showFieldErrors(form, err.problems) : [];
        fail(`Not saved: ${err instanceof ApiError && err.problems.length > rest.length ? 'fix the marked fields.' : err.message}`);
        form.querySelector('[aria-invalid="true"]')?.focus();
      }
    });
    return form;
  }

  ctx.show(heading('Certificates'),
    h('p', { class: 'sub' }, 'For streams with TLS termination. A certificate in use by a stream cannot be deleted.'),
    region, empty, h('div', { class: 'cert-forms' }, upload, managed));
  await load();
}

// describe sets what describes a control. Both forms have an err-name
// (errors are found by field name within a form), so for the second one
// (dup) the elements themselves are given where the browser takes them:
// the id would name the first form's.
function describe(control, els, dup) {
  els = els.filter(Boolean);
  control.setAttribute('aria-describedby', els.map((e) => e.id).join(' '));
  if (dup && 'ariaDescribedByElements' in control) control.ariaDescribedByElements = els;
}

// fileLoader is a file input that loads a PEM file into the text area.
function fileLoader(label, target) {
  const input = h('input', { type: 'file', id: `${target.id}-file`, accept: '.pem,.crt,.cer,.key,text/plain' });
  input.addEventListener('change', async () => {
    const f = input.files?.[0];
    if (!f) return;
    if (f.size > 512 * 1024) {
      fail(`${f.name} is over 512 KB: not a PEM file`);
      return;
    }
    target.value = await f.text();
  });
  return h('div', { class: 'file' }, h('label', { for: input.id }, label), input);
}

function row(c, remove, tr) {
  const days = daysLeft(c.not_after);
  let expiry = 'not obtained yet';
  let title = 'Caddy obtains it when a stream uses it';
  if (c.not_after) {
    const date = c.not_after.slice(0, 10);
    expiry = days < 0 ? `${date} (expired)` : `${date} (${days === 0 ? 'today' : `in ${days} day${days === 1 ? '' : 's'}`})`;
    title = `valid ${c.not_before || '?'} to ${c.not_after}${c.issuer ? `, issued by ${c.issuer}` : ''}`;
  } else if (c.source === 'custom') {
    expiry = 'unknown';
  }
  const users = c.used_by || [];
  return tr({ 'data-cert-id': c.id },
    h('th', { scope: 'row' }, c.name),
    h('td', {}, (c.domains || []).join(', ')),
    h('td', { 'data-field': 'expiry', class: days !== null && days < WARN_DAYS ? 'warn' : null, title }, expiry),
    h('td', {}, c.source),
    h('td', {}, users.length ? users.map((id, i) => [i ? ', ' : '', h('a', { href: `#/streams/${id}` }, String(id))]) : 'none'),
    h('td', { class: 'actions' }, h('button', { type: 'button', class: 'danger small', onclick: () => remove(c) }, 'Delete')));
}
