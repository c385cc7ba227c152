"""Delivery of link events (docs/link-events.md): signed webhooks (`webhook`) and the payload they and the stream
carry (`payload`). The events themselves are written by the domain, with the state they record, in the outbox
(broker.postgres.events)."""
