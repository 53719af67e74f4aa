#!/usr/bin/env python3
"""A webhook receiver for order-api's events, as a shop's fulfilment or e-mail service would
write one. What every receiver must do (docs/events.md):

1. Verify the signature over the raw body, with the official Standard Webhooks library
   (`pip install standardwebhooks`): it also refuses a timestamp more than 5 minutes off, so a
   captured request cannot be replayed later. During a secret rotation the request carries two
   signatures; either secret verifies it.
2. Deduplicate on `webhook-id` (the event's id, the same on every attempt): delivery is at
   least once, so an event may arrive again after a timeout or a replay. Keep the ids durably
   in a real service (a table with a unique key, written in the same transaction as the
   effect); this example keeps them in memory.
3. Apply one order's (or product's) events in `sequence` order. order-api sends the next
   event of a stream only after the previous one was delivered (or given up after its
   retries), so a gap means an event was given up: fetch the order's events
   (GET /api/orders/{id}/events) or the feed (GET /api/events) to catch up.
4. Answer 2xx quickly (do the work after, or in a queue): an answer slower than
   WEBHOOK_TIMEOUT_MS counts as a failure and is retried. 410 Gone disables the endpoint.

Usage: receiver.py PORT SECRET [SECRET ...]   (prints one JSON line per event applied)
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

seen_ids = set()
last_sequence = {}  # stream ("order:1", "product:5") -> last sequence applied
lock = threading.Lock()


def stream_of(event):
    if "orderId" in event:
        return f"order:{event['orderId']}"
    return f"product:{event['productId']}"


class Handler(BaseHTTPRequestHandler):
    verifiers = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {name.lower(): value for name, value in self.headers.items()}
        if not any(verifies(verifier, body, headers) for verifier in self.verifiers):
            self.answer(401)
            return
        event = json.loads(body)
        with lock:
            if headers["webhook-id"] in seen_ids:
                self.answer(200)  # a repeat: already applied
                return
            stream = stream_of(event)
            expected = last_sequence.get(stream, 0) + 1
            gap = event["sequence"] != expected
            seen_ids.add(headers["webhook-id"])
            last_sequence[stream] = event["sequence"]
        print(json.dumps({"id": event["id"], "type": event["type"], "stream": stream,
                          "sequence": event["sequence"], "gap": gap}), flush=True)
        self.answer(200)

    def answer(self, status):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def verifies(verifier, body, headers):
    try:
        verifier.verify(body, headers)
        return True
    except WebhookVerificationError:
        return False


def main():
    port, secrets = int(sys.argv[1]), sys.argv[2:]
    Handler.verifiers = [Webhook(secret) for secret in secrets]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(json.dumps({"listening": port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
