// Package tokenbroker is the Go client of broker.v1.TokenBroker: a chat worker's way to get the user's OIDC access
// token for an upstream MCP server. It replaces the product's in-process oidcMCPTokenSource with the same shape.
//
// The rules are the Python client's (broker.client):
//   - every call has a deadline (DefaultTimeout unless the context has a sooner one);
//   - UNAVAILABLE is retried (4 attempts, exponential backoff from 100 ms, within the deadline): such a call was never
//     started by the broker. The client retries itself, so it does not depend on the gRPC version's retry support;
//   - an empty access token is not an error: send the upstream request without an Authorization header;
//   - one connection per Client, keepalive on, round_robin for dns:/// targets (a headless Service);
//   - optional TLS and a bearer caller token.
package tokenbroker

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/token-broker/token-broker/clients/go/broker/v1"
)

// DefaultTimeout bounds one call when the caller's context has no sooner deadline.
const DefaultTimeout = 5 * time.Second

// serviceConfig: round_robin spreads calls over every address of a dns:/// target.
const serviceConfig = `{"loadBalancingConfig": [{"%s": {}}]}`

// Attempts and backoff for UNAVAILABLE (a broker that is starting, stopping, or unreachable).
const (
	attempts       = 4
	initialBackoff = 100 * time.Millisecond
	maxBackoff     = time.Second
)

// Options configure a Client. The zero value is a plaintext client with the defaults.
type Options struct {
	Timeout     time.Duration // per call; DefaultTimeout when zero
	TLS         *tls.Config   // nil: plaintext (loopback, or a service mesh's sidecar)
	CallerToken string        // sent as "authorization: Bearer <token>" (BROKER_CALLER_TOKENS_FILE)
	DialOptions []grpc.DialOption
}

// Token is the broker's answer. AccessToken is "" for every status but VALID and REFRESHED.
type Token struct {
	AccessToken string
	ExpiresAt   time.Time // zero when unknown or never
	Status      brokerv1.TokenStatus
}

// BearerHeaders is {"Authorization": "Bearer <token>"}, or an empty map when there is no usable token.
func (t Token) BearerHeaders() map[string]string {
	if t.AccessToken == "" {
		return map[string]string{}
	}
	return map[string]string{"Authorization": "Bearer " + t.AccessToken}
}

// Client calls one broker (or one Service) over one connection. Safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	stub    brokerv1.TokenBrokerClient
	timeout time.Duration
	token   string
}

// New dials `target` ("host:port" or "dns:///token-broker-headless.ns.svc:50051"); the connection is made lazily.
func New(target string, opts Options) (*Client, error) {
	if target == "" {
		return nil, errors.New("tokenbroker: empty target")
	}
	balancer := "pick_first"
	if strings.HasPrefix(target, "dns:///") {
		balancer = "round_robin"
	}
	dial := []grpc.DialOption{
		grpc.WithDefaultServiceConfig(strings.Replace(serviceConfig, "%s", balancer, 1)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	}
	if opts.TLS != nil {
		dial = append(dial, grpc.WithTransportCredentials(credentials.NewTLS(opts.TLS)))
	} else {
		dial = append(dial, grpc.WithInsecure())
	}
	if opts.CallerToken != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(callerToken{opts.CallerToken, opts.TLS != nil}))
	}
	conn, err := grpc.Dial(target, append(dial, opts.DialOptions...)...)
	if err != nil {
		return nil, err
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{conn: conn, stub: brokerv1.NewTokenBrokerClient(conn), timeout: timeout}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// CallOption adjusts one request.
type CallOption func(*brokerv1.GetOIDCAccessTokenRequest)

// ForResource asks for a token issued for the MCP server at `uri` (RFC 8707 resource; the broker exchanges the
// user's login token for it, RFC 8693), never the login token: "" with TOKEN_STATUS_EXCHANGE_DENIED when the IdP
// refuses, PERMISSION_DENIED when this caller may not have one for that server.
func ForResource(uri string) CallOption {
	return func(r *brokerv1.GetOIDCAccessTokenRequest) { r.Resource = uri }
}

// GetOIDCAccessToken asks for the user's token. `rejected` is "" or the access token an upstream just refused (HTTP
// 401): only its SHA-256 is sent, and the broker refreshes it once for every caller that reports it. An error is
// returned only for the call itself (INVALID_ARGUMENT, auth, deadline, UNAVAILABLE after the retries).
func (c *Client) GetOIDCAccessToken(ctx context.Context, userID, rejected string, opts ...CallOption) (Token, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req := &brokerv1.GetOIDCAccessTokenRequest{UserId: userID}
	for _, opt := range opts {
		opt(req)
	}
	if rejected != "" {
		sum := sha256.Sum256([]byte(rejected))
		req.RejectedTokenSha256 = hex.EncodeToString(sum[:])
	}
	resp, err := c.call(ctx, req)
	if err != nil {
		return Token{}, err
	}
	t := Token{AccessToken: resp.GetAccessToken(), Status: resp.GetStatus()}
	if resp.GetExpiresAt() != nil && t.AccessToken != "" {
		t.ExpiresAt = resp.GetExpiresAt().AsTime()
	}
	return t, nil
}

func (c *Client) call(ctx context.Context, req *brokerv1.GetOIDCAccessTokenRequest) (*brokerv1.GetOIDCAccessTokenResponse, error) {
	backoff := initialBackoff
	for attempt := 1; ; attempt++ {
		resp, err := c.stub.GetOIDCAccessToken(ctx, req)
		if status.Code(err) != codes.Unavailable || attempt == attempts {
			return resp, err
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil, err
		}
		if backoff *= 2; backoff > maxBackoff {
			backoff = maxBackoff
		}
	}
}

// BearerHeaders follows the Python client's rule: the header with a token, an empty map without one.
func (c *Client) BearerHeaders(ctx context.Context, userID string, opts ...CallOption) (map[string]string, error) {
	t, err := c.GetOIDCAccessToken(ctx, userID, "", opts...)
	if err != nil {
		return nil, err
	}
	return t.BearerHeaders(), nil
}

// TokenSource is the product's oidcMCPTokenSource shape, bound to one user.
type TokenSource struct {
	client *Client
	userID string
	opts   []CallOption
}

// TokenSource returns the token source of one user (for one MCP server with ForResource).
func (c *Client) TokenSource(userID string, opts ...CallOption) *TokenSource {
	return &TokenSource{client: c, userID: userID, opts: opts}
}

// Token returns the user's access token, or "" with no error for every status that carries none (no link, expired,
// the IdP or the database down, re-login needed): the caller then sends no Authorization header.
func (s *TokenSource) Token(ctx context.Context) (string, error) {
	t, err := s.client.GetOIDCAccessToken(ctx, s.userID, "", s.opts...)
	if err != nil {
		return "", err
	}
	return t.AccessToken, nil
}

// Rejected reports that an upstream refused `token` and returns what the broker answers instead ("" when the user
// must log in again, or on any other status without a token).
func (s *TokenSource) Rejected(ctx context.Context, token string) (string, error) {
	t, err := s.client.GetOIDCAccessToken(ctx, s.userID, token, s.opts...)
	if err != nil {
		return "", err
	}
	return t.AccessToken, nil
}

type callerToken struct {
	token  string
	secure bool
}

func (t callerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + t.token}, nil
}

// RequireTransportSecurity: a caller token may travel in plaintext only where the channel is plaintext by choice
// (loopback, or a mesh sidecar), as with the Python client.
func (t callerToken) RequireTransportSecurity() bool { return t.secure }
