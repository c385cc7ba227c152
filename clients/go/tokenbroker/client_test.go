package tokenbroker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/token-broker/token-broker/clients/go/broker/v1"
)

// The real broker, started by tests/integration/test_go_client.py, which passes its address and seeded users.
func TestAgainstTheBroker(t *testing.T) {
	target := os.Getenv("TB_TARGET")
	if target == "" {
		t.Skip("TB_TARGET unset: run through tests/integration/test_go_client.py")
	}
	c, err := New(target, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	valid, err := c.GetOIDCAccessToken(ctx, os.Getenv("TB_VALID_USER"), "")
	if err != nil || valid.Status != brokerv1.TokenStatus_TOKEN_STATUS_VALID || valid.AccessToken != os.Getenv("TB_VALID_TOKEN") {
		t.Fatalf("valid: %+v %v", valid.Status, err)
	}
	if valid.ExpiresAt.IsZero() {
		t.Fatal("valid: no expiry")
	}

	refreshed, err := c.GetOIDCAccessToken(ctx, os.Getenv("TB_EXPIRED_USER"), "")
	if err != nil || refreshed.Status != brokerv1.TokenStatus_TOKEN_STATUS_REFRESHED {
		t.Fatalf("refreshed: %v %v", refreshed.Status, err)
	}
	if refreshed.AccessToken == "" || refreshed.AccessToken == os.Getenv("TB_EXPIRED_TOKEN") {
		t.Fatal("refreshed: no new token")
	}

	source := c.TokenSource(os.Getenv("TB_NOLINK_USER"))
	token, err := source.Token(ctx)
	if err != nil || token != "" {
		t.Fatalf("no link: token %q, err %v (want \"\", nil)", token, err)
	}
	headers, err := c.BearerHeaders(ctx, os.Getenv("TB_NOLINK_USER"))
	if err != nil || len(headers) != 0 {
		t.Fatalf("no link: headers %v, err %v (want none)", headers, err)
	}
	headers, err = c.BearerHeaders(ctx, os.Getenv("TB_VALID_USER"))
	if err != nil || headers["Authorization"] != "Bearer "+os.Getenv("TB_VALID_TOKEN") {
		t.Fatalf("valid headers: %v %v", headers, err)
	}

	if _, err := c.GetOIDCAccessToken(ctx, "not-a-uuid", ""); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad user id: %v (want InvalidArgument)", err)
	}
}

// fake is a broker of the test's own, for what the real one does not do on demand.
type fake struct {
	brokerv1.UnimplementedTokenBrokerServer
	mu          sync.Mutex
	calls       int
	unavailable int
	delay       time.Duration
	last        *brokerv1.GetOIDCAccessTokenRequest
}

func (f *fake) GetOIDCAccessToken(ctx context.Context, req *brokerv1.GetOIDCAccessTokenRequest) (*brokerv1.GetOIDCAccessTokenResponse, error) {
	f.mu.Lock()
	f.calls++
	f.last = req
	fail := f.calls <= f.unavailable
	f.mu.Unlock()
	if fail {
		return nil, status.Error(codes.Unavailable, "starting")
	}
	time.Sleep(f.delay) // deaf to cancellation: the client must end the call by its own deadline
	return &brokerv1.GetOIDCAccessTokenResponse{AccessToken: "fake-token", Status: brokerv1.TokenStatus_TOKEN_STATUS_VALID}, nil
}

func serve(t *testing.T, f *fake) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	brokerv1.RegisterTokenBrokerServer(s, f)
	go s.Serve(lis)
	t.Cleanup(s.Stop)
	return lis.Addr().String()
}

func TestUnavailableIsRetried(t *testing.T) {
	f := &fake{unavailable: 2}
	c, err := New(serve(t, f), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	token, err := c.TokenSource("8d1f2c6e-3b7a-4f0e-9c55-2a7d1e0b9f31").Token(context.Background())
	if err != nil || token != "fake-token" {
		t.Fatalf("token %q, err %v", token, err)
	}
	if f.calls != 3 {
		t.Fatalf("calls %d, want 3 (two UNAVAILABLE, then OK)", f.calls)
	}
}

func TestEveryCallHasADeadline(t *testing.T) {
	f := &fake{delay: 5 * time.Second}
	c, err := New(serve(t, f), Options{Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	started := time.Now()
	_, err = c.GetOIDCAccessToken(context.Background(), "8d1f2c6e-3b7a-4f0e-9c55-2a7d1e0b9f31", "")
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("err %v, want DeadlineExceeded", err)
	}
	if time.Since(started) > 2*time.Second {
		t.Fatalf("took %v", time.Since(started))
	}
}

func TestARejectedTokenTravelsOnlyAsItsSHA256(t *testing.T) {
	f := &fake{}
	c, err := New(serve(t, f), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.TokenSource("8d1f2c6e-3b7a-4f0e-9c55-2a7d1e0b9f31").Rejected(context.Background(), "refused-token"); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte("refused-token"))
	if f.last.GetRejectedTokenSha256() != hex.EncodeToString(sum[:]) {
		t.Fatalf("fingerprint %q", f.last.GetRejectedTokenSha256())
	}
}

// An audience-bound token (issue #24), against the real broker and IdP: run by tests/integration/test_exchange.py
// (`-run TestAudienceBound`) with a resource the broker's policy lists for this caller token.
func TestAudienceBound(t *testing.T) {
	target, resource := os.Getenv("TB_TARGET"), os.Getenv("TB_RESOURCE")
	if target == "" || resource == "" {
		t.Skip("TB_TARGET or TB_RESOURCE unset: run through tests/integration/test_exchange.py")
	}
	c, err := New(target, Options{CallerToken: os.Getenv("TB_CALLER_TOKEN")})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	bound, err := c.GetOIDCAccessToken(ctx, os.Getenv("TB_USER"), "", ForResource(resource))
	if err != nil || bound.AccessToken == "" || bound.AccessToken == os.Getenv("TB_LOGIN_TOKEN") {
		t.Fatalf("a token for the resource: %v, %v", bound.Status, err)
	}
	source := c.TokenSource(os.Getenv("TB_USER"), ForResource(resource))
	if again, err := source.Token(ctx); err != nil || again != bound.AccessToken {
		t.Fatalf("the cached token for the resource: %v", err)
	}
	headers, err := c.BearerHeaders(ctx, os.Getenv("TB_USER"), ForResource(resource))
	if err != nil || headers["Authorization"] != "Bearer "+bound.AccessToken {
		t.Fatalf("bearer headers for the resource: %v", err)
	}
	_, err = c.GetOIDCAccessToken(ctx, os.Getenv("TB_USER"), "", ForResource(resource+"-unknown"))
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("an unknown resource: %v", err)
	}
	os.Stdout.WriteString("TB_BOUND_TOKEN=" + bound.AccessToken + "\n")
}
