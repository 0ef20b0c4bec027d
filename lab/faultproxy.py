"""A small HTTP proxy that injects faults into chosen requests.

It forwards every request to one upstream HTTP server (the test Nova) and,
for requests that match a rule (method and a regular expression on the path
and query), answers with an error status, delays the request (a client with a
shorter timeout sees a timeout), or both. A rule may let the request reach
the upstream first and then lose its answer, which is how a client learns
that an action may have happened although it saw an error.

Standard library only; one thread per connection. Controlled from the test:

    proxy = FaultProxy("127.0.0.1", nova_port)
    proxy.start()
    proxy.add_rule(Fault(method="GET", path=r"^/v2.1/os-services", status=500, times=2))
    ...
    proxy.stop()
"""

import http.client
import http.server
import logging
import re
import threading
from dataclasses import dataclass, field

LOG = logging.getLogger(__name__)

# Headers that describe one hop, not the message (RFC 9110 section 7.6.1).
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


@dataclass
class Fault:
    """What to do with matching requests.

    method: an HTTP method or "*"; path: a regular expression searched in
    the path with its query. status: answer with it (None: pass the
    upstream's answer). delay_s: hold the request that long first.
    forward: send the request upstream even when answering with `status`
    (the action happens; its answer is lost). skip: let this many matching
    requests through untouched first. times: how many matching requests to
    affect after those (None: all). body: the error body to send.
    """

    method: str = "*"
    path: str = ".*"
    status: int | None = None
    delay_s: float = 0.0
    forward: bool = False
    skip: int = 0
    times: int | None = 1
    body: bytes = b'{"error": "injected by faultproxy"}'
    matched: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.matched >= self.times:
            return False
        if self.method not in ("*", method):
            return False
        return re.search(self.path, path) is not None

    def take(self) -> bool:
        """Counts one matching request; True when this one gets the fault."""
        if self.skipped < self.skip:
            self.skipped += 1
            return False
        self.matched += 1
        return True


@dataclass(frozen=True)
class Seen:
    """One request the proxy handled: what it did and whether it forwarded."""

    method: str
    path: str
    status: int
    forwarded: bool
    injected: bool


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    proxy: "FaultProxy"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        LOG.debug("faultproxy %s", format % args)

    def _handle(self) -> None:
        self.server.proxy._handle(self)

    do_GET = _handle
    do_POST = _handle
    do_PUT = _handle
    do_DELETE = _handle
    do_PATCH = _handle
    do_HEAD = _handle


class FaultProxy:
    """Forwards to `upstream_host:upstream_port`, injecting the faults added."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        upstream_timeout_s: float = 60.0,
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._upstream_timeout_s = upstream_timeout_s
        self._listen = (listen_host, listen_port)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[Seen] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("faultproxy is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._listen[0]}:{self.port}"

    def start(self) -> None:
        server = _Server(self._listen, _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="faultproxy"
        )
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._seen.clear()

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """Requests handled so far, optionally only those matching."""
        with self._lock:
            seen = list(self._seen)
        return [
            s
            for s in seen
            if (method is None or s.method == method)
            and (path is None or re.search(path, s.path) is not None)
        ]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path) and fault.take():
                    return fault
        return None

    def _handle(self, handler: _Handler) -> None:
        method, path = handler.command, handler.path
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        fault = self._take_fault(method, path)
        if fault is not None and fault.delay_s > 0:
            if self._stopping.wait(fault.delay_s):
                return
        forwarded = False
        status: int
        headers: list[tuple[str, str]]
        if fault is None or fault.status is None or fault.forward:
            try:
                status, headers, payload = self._forward(handler, method, path, body)
                forwarded = True
            except OSError as exc:
                LOG.warning("faultproxy upstream failed method=%s path=%s: %s", method, path, exc)
                status, headers, payload = 502, [], b'{"error": "upstream unreachable"}'
        if fault is not None and fault.status is not None:
            status = fault.status
            headers = [("Content-Type", "application/json")]
            payload = fault.body
        with self._lock:
            self._seen.append(Seen(method, path, status, forwarded, fault is not None))
        try:
            handler.send_response(status)
            for name, value in headers:
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(payload)
        except OSError:
            # The client gave up (its timeout) before the answer came.
            handler.close_connection = True

    def _forward(
        self, handler: _Handler, method: str, path: str, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=self._upstream_timeout_s)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS]
            return resp.status, kept, payload
        finally:
            conn.close()
