// Unit tests of api.js's pure parts: node --test ui/test/

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ApiError, apiURL, statusLine } from '../static/api.js';

test('apiURL drops the user name and password of the page address', () => {
  const cases = [
    ['https://user:pass@host:9443/', 'streams', 'https://host:9443/api/v1/streams'],
    ['https://user:pass@host:9443/#/streams/3', 'streams/3', 'https://host:9443/api/v1/streams/3'],
    ['https://user@host/admin/', 'streams?limit=5', 'https://host/admin/api/v1/streams?limit=5'],
    ['http://a%40b:p%3Ass@127.0.0.1:2019/ui/', 'certificates', 'http://127.0.0.1:2019/ui/api/v1/certificates'],
    ['http://127.0.0.1:2019/ui/', 'streams/validate-port', 'http://127.0.0.1:2019/ui/api/v1/streams/validate-port'],
  ];
  for (const [base, path, want] of cases) {
    const got = apiURL(path, base);
    assert.equal(got, want, `apiURL(${path}, ${base})`);
    // What fetch would refuse.
    assert.doesNotThrow(() => new Request(got), `new Request(${got})`);
  }
  assert.throws(() => new Request(new URL('api/v1/streams', 'https://user:pass@host/')), /credentials/);
});

test('ApiError says the status and the server\'s error, and lists every field at fault', () => {
  const e = new ApiError(400, {
    error: 'whitelist_cidrs "10.0.0.0/33": bad', field: 'whitelist_cidrs', value: '10.0.0.0/33',
    errors: [{ field: 'whitelist_cidrs', message: 'whitelist_cidrs "10.0.0.0/33": bad' }, { field: 'id', message: 'taken' }],
  }, 'Bad Request');
  assert.equal(e.message, 'whitelist_cidrs "10.0.0.0/33": bad (HTTP 400 Bad Request)');
  assert.equal(e.error, 'whitelist_cidrs "10.0.0.0/33": bad');
  assert.deepEqual(e.problems, [
    { field: 'whitelist_cidrs', message: 'whitelist_cidrs "10.0.0.0/33": bad' },
    { field: 'id', message: 'taken' },
  ]);
  // field without errors[] (older servers), and a field errors[] lacks.
  assert.deepEqual(new ApiError(409, { error: 'in use', field: 'listen_port' }).problems, [{ field: 'listen_port', message: 'in use' }]);
  assert.deepEqual(new ApiError(409, { error: 'x', field: 'a', errors: [{ field: 'b', message: 'y' }] }).problems,
    [{ field: 'a', message: 'x' }, { field: 'b', message: 'y' }]);
  assert.equal(new ApiError(401, { error: 'GET api/v1/streams refused' }).message, 'GET api/v1/streams refused (HTTP 401)');
  assert.equal(new ApiError(0, { error: 'cannot reach the server' }).message, 'cannot reach the server');
  assert.equal(statusLine(404, 'Not Found'), 'HTTP 404 Not Found');
});
