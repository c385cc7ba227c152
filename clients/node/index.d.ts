import type { ChannelCredentials } from '@grpc/grpc-js';

export type TokenStatus =
  | 'TOKEN_STATUS_UNSPECIFIED' | 'TOKEN_STATUS_VALID' | 'TOKEN_STATUS_REFRESHED' | 'TOKEN_STATUS_NO_LINK'
  | 'TOKEN_STATUS_EXPIRED' | 'TOKEN_STATUS_REAUTH_REQUIRED' | 'TOKEN_STATUS_IDP_UNAVAILABLE'
  | 'TOKEN_STATUS_STORE_UNAVAILABLE' | 'TOKEN_STATUS_ACCOUNT_DISABLED' | 'TOKEN_STATUS_EXCHANGE_DENIED';

export interface OIDCToken {
  /** "" for every status without a token: send the upstream request without an Authorization header. */
  accessToken: string;
  status: TokenStatus;
  expiresAt: Date | null;
}

export interface ClientOptions {
  timeoutMs?: number;
  credentials?: ChannelCredentials;
  callerToken?: string;
  protosDir?: string;
}

export class TokenBrokerClient {
  constructor(target: string, options?: ClientOptions);
  close(): void;
  /** resource: the MCP server's URI (RFC 8707); the answer is then a token issued for it, never the login token. */
  getOIDCAccessToken(userId: string, options?: { rejected?: string; resource?: string }): Promise<OIDCToken>;
  bearerHeaders(userId: string, options?: { rejected?: string; resource?: string }): Promise<Record<string, string>>;
}
