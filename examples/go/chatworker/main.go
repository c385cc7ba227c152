// A Go chat worker calling an upstream MCP server with the user's OIDC token from the broker:
//
//	go run ./examples/go/chatworker -broker 127.0.0.1:50051 -upstream http://127.0.0.1:8080/mcp USER_ID
//
// With a token it sends "Authorization: Bearer <token>"; without one, no header. On a 401 to a token, it reports the
// token once (only its SHA-256 travels) and retries once with the answer. Prints the upstream's HTTP status.
// With -audience-bound it asks for a token issued for the upstream alone (the MCP specification's rule).
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/token-broker/token-broker/clients/go/tokenbroker"
)

func call(ctx context.Context, upstream, token string) (int, error) {
	body := bytes.NewBufferString(`{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, upstream, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

func main() {
	broker := flag.String("broker", "127.0.0.1:50051", "the broker's address")
	upstream := flag.String("upstream", "", "the upstream MCP server's URL")
	bound := flag.Bool("audience-bound", false, "send a token issued for the upstream (its URL is the resource)")
	flag.Parse()
	if *upstream == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: chatworker -broker HOST:PORT -upstream URL USER_ID")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, err := tokenbroker.New(*broker, tokenbroker.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()
	var opts []tokenbroker.CallOption
	if *bound {
		opts = append(opts, tokenbroker.ForResource(*upstream))
	}
	source := client.TokenSource(flag.Arg(0), opts...)
	token, err := source.Token(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "broker:", err)
		os.Exit(1)
	}
	code, err := call(ctx, *upstream, token)
	if err == nil && code == http.StatusUnauthorized && token != "" {
		if token, err = source.Rejected(ctx, token); err == nil {
			code, err = call(ctx, *upstream, token)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(code)
}
