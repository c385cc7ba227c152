// Command linkevents prints link events as they happen, one JSON line each, resuming where it left off: the Go
// stream helper (tokenbroker.Client.WatchLinkEvents) in a few lines.
//
//	go run ./examples/go/linkevents -broker token-broker:50051 -token "$WATCHER_TOKEN" -after "$LAST_ID"
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	brokerv1 "github.com/token-broker/token-broker/clients/go/broker/v1"
	"github.com/token-broker/token-broker/clients/go/tokenbroker"
)

var errDone = errors.New("done")

func main() {
	target := flag.String("broker", "127.0.0.1:50051", "the broker's address")
	token := flag.String("token", "", "a caller token named in BROKER_EVENT_WATCHERS")
	after := flag.String("after", "", "the id of the last event handled; empty: live events only")
	count := flag.Int("count", 0, "stop after this many events (0: never)")
	flag.Parse()
	client, err := tokenbroker.New(*target, tokenbroker.Options{CallerToken: *token})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer client.Close()
	seen := 0
	err = client.WatchLinkEvents(context.Background(), *after, func(e *brokerv1.LinkEvent) error {
		// Handle the event, then persist e.Id: that is where to resume after a restart.
		fmt.Printf("{\"id\": %q, \"type\": %q, \"user_id\": %q}\n", e.GetId(), e.GetType(), e.GetUserId())
		if seen++; *count > 0 && seen >= *count {
			return errDone
		}
		return nil
	})
	if err != nil && !errors.Is(err, errDone) {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
