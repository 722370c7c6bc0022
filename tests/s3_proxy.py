"""A real HTTP proxy in front of the test S3 server that injects faults: 503s or 500s, latency, or going away."""
import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERRORS = {
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>injected fault</Message></Error>',
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>injected fault</Message>'
         b'</Error>',
}


class FaultyProxy:
    """Forwards to ``upstream`` (host:port). ``fail_every=k`` answers every k-th request with ``status``
    (503 or 500); ``delay`` seconds of latency before each request is forwarded; ``die_after=n`` shuts
    the listener down after n forwarded requests (connections then refused)."""

    def __init__(self, upstream: str, port: int = 0, fail_every: int = 0, die_after: int | None = None,
                 status: int = 503, delay: float = 0.0):
        self.upstream, self.fail_every, self.die_after = upstream, fail_every, die_after
        self.status, self.delay = status, delay
        self.requests = self.failed = self.forwarded = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.fail_every and proxy.requests % proxy.fail_every == 0
                    proxy.failed += bool(fail)
                if fail:
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERRORS[proxy.status])))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(ERRORS[proxy.status])
                    return
                time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                with proxy.lock:
                    proxy.forwarded += 1
                    dying = proxy.die_after is not None and proxy.forwarded >= proxy.die_after
                if dying:
                    threading.Thread(target=proxy.stop).start()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
