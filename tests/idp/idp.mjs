// Test-only OpenID provider: oidc-provider with refresh-token rotation and reuse detection.
// Prints one JSON line {"issuer": ...} on stdout once listening. Test hooks under /__test/:
//   GET  /__test/stats   refresh grants counted from the provider's own events
//   POST /__test/fault   {"mode": "ok"|"down"|"slow"|"garbage", "delay_ms": N} applied to the token endpoint
//   POST /__test/forget   {"token": access token} drops that access token alone (its grant and refresh token stay)
//   POST /__test/exchange {"resource": URI, "clients": [client ids], "ttl": seconds, "expires_in": true|false}
//        which clients may exchange tokens for `resource` (RFC 8693 grant below), and the issued tokens' lifetime
//
// The token-exchange grant (urn:ietf:params:oauth:grant-type:token-exchange) checks the subject token (an access
// token this provider issued, still valid), allows only the clients registered for the resource (else
// invalid_target), and issues an RS256 JWT with aud = the resource, signed with the key the provider's /jwks serves.
import crypto from 'node:crypto';
import http from 'node:http';
import { exportJWK, generateKeyPair, SignJWT } from 'jose';
import Provider, { errors } from 'oidc-provider';

const clientId = process.env.IDP_CLIENT_ID || 'broker';
const clientSecret = process.env.IDP_CLIENT_SECRET || 'broker-secret';
const accessTtl = parseInt(process.env.IDP_ACCESS_TOKEN_TTL || '3600', 10);
const port = parseInt(process.env.IDP_PORT || '0', 10);

// An unbounded in-memory adapter: the built-in one is an LRU of 1000 entries, which evicts live refresh tokens
// (and so answers invalid_grant) once a test logs in a few hundred users.
const store = new Map();
const grants = new Map();
class MapAdapter {
  constructor(name) { this.name = name; }
  key(id) { return `${this.name}:${id}`; }
  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    store.set(key, { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
    if (payload.grantId) {
      if (!grants.has(payload.grantId)) grants.set(payload.grantId, new Set());
      grants.get(payload.grantId).add(key);
    }
    if (payload.uid) store.set(`uid:${this.name}:${payload.uid}`, { payload: id, expiresAt: Infinity });
    if (payload.userCode) store.set(`uc:${this.name}:${payload.userCode}`, { payload: id, expiresAt: Infinity });
  }
  async find(id) {
    const e = store.get(this.key(id));
    if (!e || e.expiresAt < Date.now()) return undefined;
    return e.payload;
  }
  async findByUid(uid) { const e = store.get(`uid:${this.name}:${uid}`); return e ? this.find(e.payload) : undefined; }
  async findByUserCode(c) { const e = store.get(`uc:${this.name}:${c}`); return e ? this.find(e.payload) : undefined; }
  async consume(id) { const e = store.get(this.key(id)); if (e) e.payload.consumed = Math.floor(Date.now() / 1000); }
  async destroy(id) { store.delete(this.key(id)); }
  async revokeByGrantId(grantId) {
    for (const key of grants.get(grantId) || []) store.delete(key);
    grants.delete(grantId);
  }
}

const stats = {
  refresh_success: 0, refresh_error: 0, invalid_grant: 0, grants_revoked: 0, token_requests: 0,
  exchange_success: 0, exchange_invalid_subject: 0, exchange_denied: 0,
};
let fault = { mode: 'ok', delay_ms: 0 };

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const exchangePolicy = new Map(); // resource -> { clients, ttl, expires_in }
const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await exportJWK(privateKey)), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

const server = http.createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    jwks: { keys: [signingJwk] },
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: ['http://127.0.0.1/callback'],
      grant_types: ['authorization_code', 'refresh_token', TOKEN_EXCHANGE],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    features: { devInteractions: { enabled: true }, revocation: { enabled: true }, introspection: { enabled: true } },
    pkce: { required: () => false },
    rotateRefreshToken: true,
    ttl: { AccessToken: accessTtl, RefreshToken: 14 * 24 * 3600, Grant: 14 * 24 * 3600 },
    issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token')
      && code.scopes.has('offline_access'),
    findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  });
  provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
    const { params, client } = ctx.oidc;
    if (params.subject_token_type !== ACCESS_TOKEN_TYPE) {
      throw new errors.InvalidRequest('unsupported subject_token_type');
    }
    const subject = params.subject_token ? await provider.AccessToken.find(params.subject_token) : undefined;
    if (!subject || subject.isExpired) {
      stats.exchange_invalid_subject += 1;
      throw new errors.InvalidGrant('subject_token is invalid or expired');
    }
    const policy = exchangePolicy.get(params.resource);
    if (!policy || !policy.clients.includes(client.clientId)) {
      stats.exchange_denied += 1;
      throw new errors.InvalidTarget('this client may not exchange tokens for this resource');
    }
    const claims = { client_id: client.clientId };
    if (params.scope) claims.scope = params.scope;
    const token = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'RS256', kid: signingJwk.kid, typ: 'at+jwt' })
      .setIssuer(issuer)
      .setSubject(subject.accountId)
      .setAudience(params.resource)
      .setIssuedAt()
      .setJti(crypto.randomUUID())
      .setExpirationTime(Math.floor(Date.now() / 1000) + policy.ttl)
      .sign(privateKey);
    stats.exchange_success += 1;
    ctx.body = { access_token: token, issued_token_type: ACCESS_TOKEN_TYPE, token_type: 'Bearer' };
    if (policy.expires_in) ctx.body.expires_in = policy.ttl;
  }, ['subject_token', 'subject_token_type', 'requested_token_type', 'resource', 'audience', 'scope']);

  provider.on('grant.success', (ctx) => {
    if (ctx.oidc.params.grant_type === 'refresh_token') stats.refresh_success += 1;
  });
  provider.on('grant.error', (ctx, err) => {
    if (ctx.oidc.params && ctx.oidc.params.grant_type === 'refresh_token') {
      stats.refresh_error += 1;
      if (err.error === 'invalid_grant') stats.invalid_grant += 1;
    }
  });
  provider.on('grant.revoked', () => { stats.grants_revoked += 1; });

  provider.use(async (ctx, next) => {
    if (ctx.path === '/__test/stats') { ctx.body = stats; return; }
    if (ctx.path === '/__test/fault' && ctx.method === 'POST') {
      const chunks = [];
      for await (const c of ctx.req) chunks.push(c);
      fault = { mode: 'ok', delay_ms: 0, ...JSON.parse(Buffer.concat(chunks).toString() || '{}') };
      ctx.body = fault;
      return;
    }
    if (ctx.path === '/__test/forget' && ctx.method === 'POST') {
      // Drop one access token (not its grant): the IdP then calls it invalid, while the refresh token still works.
      const chunks = [];
      for await (const c of ctx.req) chunks.push(c);
      const token = await provider.AccessToken.find(JSON.parse(Buffer.concat(chunks).toString()).token);
      if (token) await token.destroy();
      ctx.body = { forgotten: Boolean(token) };
      return;
    }
    if (ctx.path === '/__test/exchange' && ctx.method === 'POST') {
      const chunks = [];
      for await (const c of ctx.req) chunks.push(c);
      const body = JSON.parse(Buffer.concat(chunks).toString());
      exchangePolicy.set(body.resource, { clients: body.clients || [], ttl: body.ttl || 3600, expires_in: body.expires_in !== false });
      ctx.body = { ok: true };
      return;
    }
    if (ctx.path === '/token' && ctx.method === 'POST') {
      stats.token_requests += 1;
      if (fault.delay_ms) await new Promise((r) => { setTimeout(r, fault.delay_ms); });
      if (fault.mode === 'down') { ctx.status = 503; ctx.body = 'upstream unavailable'; return; }
      if (fault.mode === 'garbage') { ctx.status = 200; ctx.type = 'json'; ctx.body = '{"not": "a token"'; return; }
    }
    await next();
  });
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
process.on('SIGTERM', () => { server.close(); process.exit(0); });
