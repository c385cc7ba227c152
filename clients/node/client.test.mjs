// Run by tests/integration/test_node_client.py against a real broker (TB_* variables), and on its own for the
// parts that need none: `npm test`.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import protoLoader from '@grpc/proto-loader';
import { TokenBrokerClient, grpc } from './index.mjs';

const env = process.env;

test('against the broker: VALID, NO_LINK without a header, INVALID_ARGUMENT', { skip: !env.TB_TARGET }, async () => {
  const client = new TokenBrokerClient(env.TB_TARGET);
  try {
    const valid = await client.getOIDCAccessToken(env.TB_VALID_USER);
    assert.equal(valid.status, 'TOKEN_STATUS_VALID');
    assert.equal(valid.accessToken, env.TB_VALID_TOKEN);
    assert.ok(valid.expiresAt instanceof Date);
    assert.deepEqual(await client.bearerHeaders(env.TB_VALID_USER), { Authorization: `Bearer ${env.TB_VALID_TOKEN}` });
    assert.deepEqual(await client.bearerHeaders(env.TB_NOLINK_USER), {});
    const reported = await client.getOIDCAccessToken(env.TB_VALID_USER, { rejected: env.TB_VALID_TOKEN });
    assert.deepEqual([reported.status, reported.accessToken], ['TOKEN_STATUS_REAUTH_REQUIRED', '']);
    await assert.rejects(client.getOIDCAccessToken('not-a-uuid'), (err) => err.code === grpc.status.INVALID_ARGUMENT);
  } finally {
    client.close();
  }
});

test('audience-bound: a token for the MCP server, cached; PERMISSION_DENIED elsewhere', { skip: !env.TB_RESOURCE }, async () => {
  const client = new TokenBrokerClient(env.TB_TARGET, { callerToken: env.TB_CALLER_TOKEN });
  try {
    const bound = await client.getOIDCAccessToken(env.TB_USER, { resource: env.TB_RESOURCE });
    assert.ok(['TOKEN_STATUS_REFRESHED', 'TOKEN_STATUS_VALID'].includes(bound.status));
    assert.ok(bound.accessToken && bound.accessToken !== env.TB_LOGIN_TOKEN);
    assert.deepEqual(await client.bearerHeaders(env.TB_USER, { resource: env.TB_RESOURCE }), { Authorization: `Bearer ${bound.accessToken}` });
    await assert.rejects(
      client.getOIDCAccessToken(env.TB_USER, { resource: `${env.TB_RESOURCE}-unknown` }),
      (err) => err.code === grpc.status.PERMISSION_DENIED,
    );
    process.stdout.write(`TB_BOUND_TOKEN=${bound.accessToken}\n`);
  } finally {
    client.close();
  }
});

function fakeBroker(handler) {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const definition = protoLoader.loadSync('broker/v1/token_broker.proto', {
    includeDirs: [path.resolve(here, '..', '..', 'protos')], keepCase: true, enums: String, defaults: true,
  });
  const server = new grpc.Server();
  server.addService(grpc.loadPackageDefinition(definition).broker.v1.TokenBroker.service, { GetOIDCAccessToken: handler });
  return new Promise((resolve) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => resolve({ server, port }));
  });
}

test('UNAVAILABLE is retried; a rejected token travels as its SHA-256', async () => {
  let calls = 0;
  let seen;
  const { server, port } = await fakeBroker((call, callback) => {
    calls += 1;
    seen = call.request;
    if (calls <= 2) callback({ code: grpc.status.UNAVAILABLE, details: 'starting' });
    else callback(null, { access_token: 'fake', status: 'TOKEN_STATUS_VALID' });
  });
  const client = new TokenBrokerClient(`127.0.0.1:${port}`);
  try {
    assert.deepEqual(await client.bearerHeaders('u', { rejected: 'refused' }), { Authorization: 'Bearer fake' });
    assert.equal(calls, 3);
    assert.equal(seen.rejected_token_sha256, createHash('sha256').update('refused').digest('hex'));
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('every call has a deadline', async () => {
  const { server, port } = await fakeBroker(() => {}); // never answers
  const client = new TokenBrokerClient(`127.0.0.1:${port}`, { timeoutMs: 200 });
  const started = Date.now();
  try {
    await assert.rejects(client.getOIDCAccessToken('u'), (err) => err.code === grpc.status.DEADLINE_EXCEEDED);
    assert.ok(Date.now() - started < 2000);
  } finally {
    client.close();
    server.forceShutdown();
  }
});
