package tokenbroker

import (
	"context"
	"io"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	brokerv1 "github.com/token-broker/token-broker/clients/go/broker/v1"
)

// WatchLinkEvents calls handle for every link event after the cursor `after` (the id of the last event handled; ""
// for live events only), then for live ones, until ctx ends or handle returns an error (which it returns). When the
// stream breaks (UNAVAILABLE: a broker shutting down, a network break) it reconnects by itself with the id of the
// last event handled, so nothing is skipped; an event may come twice around a reconnection (ids identify them).
// Persist event.Id after handling an event to resume there after a restart. OUT_OF_RANGE (the cursor is past the
// retention: start again with "" and reconcile), PERMISSION_DENIED and INVALID_ARGUMENT are returned.
func (c *Client) WatchLinkEvents(ctx context.Context, after string, handle func(*brokerv1.LinkEvent) error) error {
	cursor := after
	backoff := initialBackoff
	for {
		handled, err := c.watchOnce(ctx, &cursor, handle, &backoff)
		if handled != nil {
			return handled
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch status.Code(err) {
		case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.OK:
		default:
			return err
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return ctx.Err()
		}
		if backoff *= 2; backoff > 5*time.Second {
			backoff = 5 * time.Second
		}
	}
}

// watchOnce runs one stream: (the handler's error, nil) or (nil, the stream's end).
func (c *Client) watchOnce(ctx context.Context, cursor *string, handle func(*brokerv1.LinkEvent) error, backoff *time.Duration) (error, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.stub.WatchLinkEvents(ctx, &brokerv1.WatchLinkEventsRequest{After: *cursor})
	if err != nil {
		return nil, err
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if err := handle(resp.GetEvent()); err != nil {
			return err, nil
		}
		*cursor = resp.GetEvent().GetId()
		*backoff = initialBackoff
	}
}
