// The Node.js client of broker.v1.TokenBroker, with the rules of the Python and Go clients:
// - every call has a deadline (5 s unless timeoutMs says otherwise);
// - UNAVAILABLE is retried (4 attempts, backoff from 100 ms): the broker never started such a call;
// - an empty access token is not an error: send the upstream request without an Authorization header;
// - round_robin for dns:/// targets (a headless Service), keepalive on, optional TLS and caller token;
// - a token the upstream refused travels only as its SHA-256 (`rejected`).
import { createHash } from 'node:crypto';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
const ATTEMPTS = 4;

function load(protosDir) {
  const definition = protoLoader.loadSync('broker/v1/token_broker.proto', {
    includeDirs: [protosDir], keepCase: true, enums: String, longs: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).broker.v1.TokenBroker;
}

export class TokenBrokerClient {
  /**
   * @param {string} target "host:port", or "dns:///token-broker-headless.ns.svc:50051"
   * @param {{timeoutMs?: number, credentials?: grpc.ChannelCredentials, callerToken?: string, protosDir?: string}} options
   */
  constructor(target, options = {}) {
    const Service = load(options.protosDir || path.resolve(here, '..', '..', 'protos'));
    const channelOptions = {
      'grpc.keepalive_time_ms': 30000,
      'grpc.keepalive_timeout_ms': 10000,
      'grpc.service_config': JSON.stringify({
        loadBalancingConfig: [{ [target.startsWith('dns:///') ? 'round_robin' : 'pick_first']: {} }],
      }),
    };
    this.client = new Service(target, options.credentials || grpc.credentials.createInsecure(), channelOptions);
    this.timeoutMs = options.timeoutMs || 5000;
    this.metadata = new grpc.Metadata();
    if (options.callerToken) this.metadata.set('authorization', `Bearer ${options.callerToken}`);
  }

  close() { this.client.close(); }

  /**
   * The user's token: {accessToken, status, expiresAt}. accessToken is "" for every status without a token.
   * @param {string} userId
   * @param {{rejected?: string, resource?: string}} options rejected: an access token the upstream just refused
   *   (HTTP 401); resource: the MCP server's URI, for a token issued for that server alone (never the login token)
   */
  async getOIDCAccessToken(userId, { rejected, resource } = {}) {
    const request = { user_id: userId };
    if (resource) request.resource = resource;
    if (rejected) request.rejected_token_sha256 = createHash('sha256').update(rejected).digest('hex');
    const deadline = Date.now() + this.timeoutMs;
    let backoff = 100;
    for (let attempt = 1; ; attempt += 1) {
      try {
        const resp = await this.#call(request, new Date(deadline));
        return {
          accessToken: resp.access_token,
          status: resp.status,
          expiresAt: resp.access_token && resp.expires_at ? new Date(Number(resp.expires_at.seconds) * 1000) : null,
        };
      } catch (err) {
        if (err.code !== grpc.status.UNAVAILABLE || attempt === ATTEMPTS || Date.now() + backoff >= deadline) throw err;
        await new Promise((r) => { setTimeout(r, backoff); });
        backoff = Math.min(backoff * 2, 1000);
      }
    }
  }

  /** {Authorization: "Bearer ..."}, or {} when there is no usable token. */
  async bearerHeaders(userId, options = {}) {
    const { accessToken } = await this.getOIDCAccessToken(userId, options);
    return accessToken ? { Authorization: `Bearer ${accessToken}` } : {};
  }

  #call(request, deadline) {
    return new Promise((resolve, reject) => {
      this.client.GetOIDCAccessToken(request, this.metadata, { deadline }, (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  }
}

export { grpc };
