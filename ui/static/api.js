// The REST API, at api/v1/ next to the UI wherever it is mounted (the
// admin endpoint's /ui/, a site's root, or a handle_path prefix).

const TIMEOUT_MS = 15_000;

// ApiError is a refused or failed request: the API's error body
// {error, field, value, errors[], streams} and the HTTP status (0 when
// the server could not be reached).
export class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `request failed with status ${status}`);
    this.status = status;
    this.field = body.field || '';
    this.errors = Array.isArray(body.errors) ? body.errors : [];
    this.streams = Array.isArray(body.streams) ? body.streams : [];
  }

  // problems are the fields at fault: errors[], or field with the message.
  get problems() {
    if (this.errors.length) return this.errors;
    return this.field ? [{ field: this.field, message: this.message }] : [];
  }
}

function url(path) {
  return new URL(`api/v1/${path}`, document.baseURI);
}

// request sends one API request; body, when given, goes as JSON. It
// resolves to the decoded JSON response (null for 204) or rejects with an
// ApiError. With a version, the write goes through only if the stream
// still has it (If-Match; else 412).
export async function request(method, path, body, version) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  const init = { method, headers: { Accept: 'application/json' }, cache: 'no-store', signal: ctl.signal };
  if (version) init.headers['If-Match'] = `"${version}"`;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  let text;
  try {
    res = await fetch(url(path), init);
    text = await res.text();
  } catch (err) {
    const why = ctl.signal.aborted ? `no answer within ${TIMEOUT_MS / 1000} s` : err.message;
    throw new ApiError(0, { error: `cannot reach the server: ${why}` });
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
    const body = data && typeof data === 'object' && data.error ? data : { error: `${res.status} ${res.statusText}: ${text.slice(0, 200)}` };
    throw new ApiError(res.status, body);
  }
  return data;
}

export const get = (path) => request('GET', path);
export const post = (path, body) => request('POST', path, body);
export const put = (path, body, version) => request('PUT', path, body, version);
export const del = (path, version) => request('DELETE', path, undefined, version);

// READ_ONLY are the fields GET adds to a stream; a write leaves them out.
const READ_ONLY = ['source', 'status', 'created_at', 'updated_at', 'version'];

// streamBody is a stream as GET returned it, ready to PUT back.
export function streamBody(s) {
  const out = { ...s };
  for (const k of READ_ONLY) delete out[k];
  return out;
}

// displayName is a stream's name, or stream-{id} when it has none.
export const displayName = (s) => s.name || `stream-${s.id}`;
