// The REST API, at api/v1/ next to the UI wherever it is mounted (the
// admin endpoint's /ui/, a site's root, or a handle_path prefix).

const TIMEOUT_MS = 15_000;

// ApiError is a refused or failed request: the API's error body
// {error, field, value, errors[], streams} and the HTTP status
// (0 when no answer came). message says what failed: the server's error
// and the status it answered with, or why there was no answer.
export class ApiError extends Error {
  constructor(status, body, statusText = '') {
    const error = body.error || '';
    super(status ? `${error || 'refused'} (${statusLine(status, statusText)})` : error);
    this.status = status;
    this.error = error; // the server's sentence alone
    this.field = body.field || '';
    this.errors = Array.isArray(body.errors) ? body.errors : [];
    this.streams = Array.isArray(body.streams) ? body.streams : [];
  }

  // problems are every field at fault: errors[], and field with the
  // error when errors[] does not name it.
  get problems() {
    const out = this.errors.filter((p) => p && typeof p === 'object').map((p) => ({ field: p.field || '', message: p.message || '' }));
    if (this.field && !out.some((p) => p.field === this.field)) out.unshift({ field: this.field, message: this.error });
    return out;
  }
}

// statusLine is "HTTP 401 Unauthorized" (HTTP/2 answers have no reason
// phrase: "HTTP 401").
export function statusLine(status, text = '') {
  return text ? `HTTP ${status} ${text}` : `HTTP ${status}`;
}

// apiURL is the address of an API path next to base (the page's
// address), without the user name and password an address typed as
// user:pass@host leaves in it: fetch refuses a URL with them, and the
// browser sends the credentials it logged in with anyway.
export function apiURL(path, base) {
  const u = new URL(`api/v1/${path}`, base);
  u.username = '';
  u.password = '';
  u.hash = '';
  return u.href;
}

// request sends one API request; body, when given, goes as JSON (as a
// merge patch for PATCH). It resolves to the decoded JSON response (null
// for 204) or rejects with an ApiError. With a version, the write goes
// through only if the stream still has it (If-Match; else 412).
export async function request(method, path, body, version) {
  const ctl = new AbortController();
  const init = { method, headers: { Accept: 'application/json' }, cache: 'no-store', signal: ctl.signal };
  if (version) init.headers['If-Match'] = `"${version}"`;
  if (body !== undefined) {
    init.headers['Content-Type'] = method === 'PATCH' ? 'application/merge-patch+json' : 'application/json';
    init.body = JSON.stringify(body);
  }
  const what = `${method} api/v1/${path.split('?')[0]}`;
  let req;
  try {
    req = new Request(apiURL(path, document.baseURI), init);
  } catch (err) {
    throw new ApiError(0, { error: `cannot send ${what}: ${err.message}` });
  }
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  let res;
  let text;
  try {
    res = await fetch(req);
  } catch (err) {
    const why = ctl.signal.aborted ? `no answer within ${TIMEOUT_MS / 1000} s` : err.message;
    clearTimeout(timer);
    throw new ApiError(0, { error: `cannot reach the server (${what}): ${why}` });
  }
  try {
    text = await res.text();
  } catch (err) {
    const why = ctl.signal.aborted ? `not all of it within ${TIMEOUT_MS / 1000} s` : err.message;
    throw new ApiError(0, { error: `${what}: the answer (${statusLine(res.status, res.statusText)}) broke off: ${why}` });
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = data && typeof data === 'object' && data.error ? data : { error: `${what} refused${text.trim() ? `: ${text.trim().slice(0, 200)}` : ''}` };
    throw new ApiError(res.status, err, res.statusText);
  }
  return data;
}

export const get = (path) => request('GET', path);
export const post = (path, body) => request('POST', path, body);
export const put = (path, body, version) => request('PUT', path, body, version);
export const patch = (path, body, version) => request('PATCH', path, body, version);
export const del = (path, version) => request('DELETE', path, undefined, version);

// READ_ONLY are the fields GET (and a write's answer) adds to a stream; a
// write leaves them out.
const READ_ONLY = ['source', 'status', 'created_at', 'updated_at', 'version', 'warnings'];

// streamBody is a stream as GET returned it, ready to PUT back.
export function streamBody(s) {
  const out = { ...s };
  for (const k of READ_ONLY) delete out[k];
  return out;
}

// displayName is a stream's name, or stream-{id} when it has none.
export const displayName = (s) => s.name || `stream-${s.id}`;
