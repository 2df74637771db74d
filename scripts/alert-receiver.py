"""A receiver of tollgate's alerts for the tests: verifies each delivery with the official
Standard Webhooks library (`standardwebhooks` from PyPI) and validates its body against
docs/alerts.schema.json, records it, and answers as the test tells it.

    python scripts/alert-receiver.py PORT SECRET [SECRET ...]

It prints `ready PORT` once it listens (PORT 0: a port the system chooses, so that no other
process can take it between a choice and the bind). Control:
    GET  /received      -> [{"id", "type", "data", "path", "verified", "valid", "error"}] in arrival order
    POST /mode          -> {"mode": "ok" | "down" | "slow" | "slowbody" | "redirect" | "huge", "seconds": N}
    POST /secret        -> {"secret": "whsec_..."}: verified with it too
Every other POST is a delivery.
"""

import json
import pathlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PORT = int(sys.argv[1])
HOOKS = [Webhook(s) for s in sys.argv[2:]]
SCHEMA = json.loads((pathlib.Path(__file__).resolve().parent.parent / "docs" / "alerts.schema.json").read_text())
LOCK = threading.Lock()
RECEIVED = []
MODE = {"mode": "ok", "seconds": 0}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/received":
            with LOCK:
                body = json.dumps(RECEIVED).encode()
            return self.answer(200, body, [("content-type", "application/json")])
        self.answer(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path == "/mode":
            with LOCK:
                MODE.update(json.loads(body))
            return self.answer(204)
        if self.path == "/secret":
            with LOCK:
                HOOKS.append(Webhook(json.loads(body)["secret"]))
            return self.answer(204)
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified, error = False, None
        for hook in HOOKS:
            try:
                hook.verify(body, headers)
                verified = True
                break
            except WebhookVerificationError as e:
                error = str(e)
        valid, data = False, None
        try:
            data = json.loads(body).get("data")
            jsonschema.validate(json.loads(body), SCHEMA)
            valid = True
        except Exception as e:  # noqa: BLE001 - recorded for the test to show
            error = error or str(e)
        with LOCK:
            mode = dict(MODE)
            RECEIVED.append(
                {
                    "id": headers.get("webhook-id"),
                    "type": json.loads(body).get("type") if body else None,
                    "data": data,
                    "path": self.path,
                    "verified": verified,
                    "valid": valid,
                    "error": None if verified and valid else error,
                    "mode": mode["mode"],
                }
            )
        if mode["mode"] == "down":
            return self.answer(503)
        if mode["mode"] == "slow":
            time.sleep(mode["seconds"])
        if mode["mode"] == "redirect":
            return self.answer(302, headers=[("location", "/elsewhere")])
        if mode["mode"] == "slowbody":
            # The status at once, the body after a while.
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.flush()
            time.sleep(mode["seconds"])
            try:
                self.wfile.write(b"ok")
            except OSError:
                pass
            return None
        if mode["mode"] == "huge":
            self.send_response(200)
            self.send_header("content-length", str(1 << 30))
            self.end_headers()
            chunk = b"x" * 65536
            try:
                while True:
                    self.wfile.write(chunk)
            except OSError:
                return None
        if not verified:
            return self.answer(400)
        self.answer(200, b'{"ok":true}', [("content-type", "application/json")])


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
server.daemon_threads = True
print(f"ready {server.server_address[1]}", flush=True)
server.serve_forever()
