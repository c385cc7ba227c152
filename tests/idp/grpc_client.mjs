// A polyglot caller: Node.js with @grpc/grpc-js and @grpc/proto-loader, loading protos/ directly (no generated JS).
// Usage: node grpc_client.mjs HOST:PORT USER_ID [REJECTED_ACCESS_TOKEN]  -> prints {"code": ..., "status": ..., "access_token": ..., ...}
import { createHash } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
const protos = path.resolve(here, '..', '..', 'protos');
const definition = protoLoader.loadSync('broker/v1/token_broker.proto', {
  includeDirs: [protos], keepCase: true, enums: String, longs: String, defaults: true, oneofs: true,
});
const { broker } = grpc.loadPackageDefinition(definition);
const [target, userId, rejected] = process.argv.slice(2);
// An access token the upstream refused travels only as its SHA-256 (lower-case hex).
const request = { user_id: userId };
if (rejected) request.rejected_token_sha256 = createHash('sha256').update(rejected).digest('hex');
const client = new broker.v1.TokenBroker(target, grpc.credentials.createInsecure());
const deadline = new Date(Date.now() + 5000);
client.GetOIDCAccessToken(request, { deadline }, (err, resp) => {
  if (err) {
    process.stdout.write(`${JSON.stringify({ code: grpc.status[err.code], details: err.details })}\n`);
  } else {
    process.stdout.write(`${JSON.stringify({
      code: 'OK', status: resp.status, access_token: resp.access_token,
      expires_at: resp.expires_at ? resp.expires_at.seconds : null,
    })}\n`);
  }
  client.close();
});
