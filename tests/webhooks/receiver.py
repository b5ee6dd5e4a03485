"""A webhook receiver for tests/webhooks.rs that checks every delivery with the
`standardwebhooks` package (the specification's reference implementation, not the bridge's
code).

    python receiver.py PORT_FILE LOG_FILE

Listens on 127.0.0.1 (a free port, written to PORT_FILE). `POST /_config` with
{"<path>": {"secret": "whsec_...", "mode": "ok" | "fail:N" | "fail" | "hang"}} sets how a path
answers: ok = 204; fail:N = 500 for the next N requests, then ok; fail = always 500; hang =
never answers. Every other POST is verified and logged to LOG_FILE as one JSON line:
{"path", "id", "timestamp", "verified", "error", "body", "status", "at"}.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

CONFIG = {}
LOCK = threading.Lock()
port_file, log_file = sys.argv[1], sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if self.path == "/_config":
            with LOCK:
                CONFIG.update(json.loads(body))
            return self.reply(204)
        with LOCK:
            cfg = dict(CONFIG.get(self.path, {"mode": "ok"}))
            mode = cfg.get("mode", "ok")
            if mode.startswith("fail:"):
                left = int(mode.split(":")[1])
                if left > 0:
                    CONFIG[self.path]["mode"] = "fail:%d" % (left - 1)
                    status = 500
                else:
                    status = 204
            elif mode == "fail":
                status = 500
            elif mode == "hang":
                status = None
            else:
                status = 204
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified, error = False, None
        try:
            Webhook(cfg.get("secret", "")).verify(body, headers)
            verified = True
        except Exception as e:  # noqa: BLE001 - any failure is a failed verification
            error = "%s: %s" % (type(e).__name__, e)
        line = {
            "path": self.path,
            "id": headers.get("webhook-id"),
            "timestamp": headers.get("webhook-timestamp"),
            "verified": verified,
            "error": error,
            "body": body.decode("utf-8", "replace"),
            "status": status,
            "at": time.time(),
        }
        with LOCK:
            with open(log_file, "a") as f:
                f.write(json.dumps(line) + "\n")
        if status is None:
            time.sleep(3600)
            return
        self.reply(status)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os  # noqa: E402

os.replace(port_file + ".tmp", port_file)
server.serve_forever()
