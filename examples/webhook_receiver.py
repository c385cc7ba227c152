"""A link-event webhook receiver that verifies the broker's signatures (Standard Webhooks), in a few lines.

    WEBHOOK_SECRET=whsec_... python examples/webhook_receiver.py --port 8080

Each verified event is printed as one JSON line; a bad or stale signature (timestamps older than 5 minutes) is
answered 400 and never printed. Answer 2xx only once the event is handled: anything else is retried (for 24 hours),
and 410 stops the webhook until its URL changes. Deliveries are at least once: drop an event whose webhook-id you
have handled already.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


def handler(webhook: Webhook) -> type[BaseHTTPRequestHandler]:
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                event = webhook.verify(body, dict(self.headers))
            except WebhookVerificationError:
                self.send_response(400)
                self.end_headers()
                return
            # e.g. {"type": "link.reauth_required", "data": {"user_id": "...", "error": "invalid_grant", ...}}
            print(json.dumps({"webhook_id": self.headers["webhook-id"], **event}), flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Receiver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(Webhook(os.environ["WEBHOOK_SECRET"])))
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
