"""The demo's orders app: calls billing through its sidecar every few seconds and,
with events on, publishes an `orders.created` event through it."""

import http.server
import json
import os
import signal
import sys
import threading
import time
import urllib.request

SIDECAR = os.environ["SIDECAR_URL"]
PORT = int(os.environ.get("PORT", "8080"))
INTERVAL = float(os.environ.get("INTERVAL_SECONDS", "5"))
PUBLISH = os.environ.get("PUBLISH_EVENTS") == "true"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def call_billing_forever() -> None:
    order = 0
    while True:
        order += 1
        try:
            url = f"{SIDECAR}/v1/invoke/billing/get?order={order}"
            with urllib.request.urlopen(url, timeout=10) as answer:
                print(f"order {order}: billing answered {answer.status}", flush=True)
        except Exception as error:
            print(f"order {order}: billing call failed: {error}", flush=True)
        if PUBLISH:
            body = json.dumps({"order": order}).encode()
            request = urllib.request.Request(
                f"{SIDECAR}/v1/publish/orders.created",
                data=body,
                headers={"content-type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    print(f"order {order}: event {answer.read().decode()}", flush=True)
            except Exception as error:
                print(f"order {order}: publish failed: {error}", flush=True)
        time.sleep(INTERVAL)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
threading.Thread(target=call_billing_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
