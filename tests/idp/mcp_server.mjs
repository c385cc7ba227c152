// A small MCP-server stand-in for the tests: every path is a resource, http://127.0.0.1:<port><path>, and a request
// is accepted only with a Bearer JWT that the IdP signed (its /jwks), whose `aud` is exactly that URI and which has
// not expired. The login token (opaque) and a token exchanged for another resource are refused (401).
// Prints {"origin": ...} on stdout once listening. GET /__test/stats: accepted and refused requests. Serves RFC 9728
// metadata naming the test IdP (another issuer for paths with "foreign").
import http from 'node:http';
import { createRemoteJWKSet, jwtVerify } from 'jose';

const issuer = process.env.MCP_ISSUER;
const jwks = createRemoteJWKSet(new URL(`${issuer}/jwks`));
const stats = { accepted: 0, refused: 0 };

const server = http.createServer(async (req, res) => {
  const { port } = server.address();
  const url = new URL(req.url, `http://127.0.0.1:${port}`);
  const answer = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (url.pathname === '/__test/stats') { answer(200, stats); return; }
  if (url.pathname.startsWith('/.well-known/oauth-protected-resource/')) {
    // RFC 9728 metadata of the resource at the rest of the path; a path with "foreign" names another issuer.
    const path = url.pathname.slice('/.well-known/oauth-protected-resource'.length);
    const servers = path.includes('foreign') ? ['https://other-idp.example.com'] : [issuer];
    answer(200, { resource: `http://127.0.0.1:${port}${path}`, authorization_servers: servers });
    return;
  }
  const self = `http://127.0.0.1:${port}${url.pathname}`;
  const match = /^Bearer (\S+)$/.exec(req.headers.authorization || '');
  if (!match) { stats.refused += 1; answer(401, { error: 'no bearer token' }); return; }
  try {
    const { payload } = await jwtVerify(match[1], jwks, { issuer, audience: self, algorithms: ['RS256'] });
    if (payload.aud !== self) throw new Error('aud is not exactly this server');
    stats.accepted += 1;
    answer(200, { sub: payload.sub, resource: self });
  } catch (err) {
    stats.refused += 1;
    answer(401, { error: err.code || 'invalid_token' });
  }
});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ origin: `http://127.0.0.1:${server.address().port}` })}\n`);
});
process.on('SIGTERM', () => { server.close(); process.exit(0); });
