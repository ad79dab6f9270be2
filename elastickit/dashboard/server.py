"""The dashboard's HTTP server: the standard library's ThreadingHTTPServer and a small router.

    GET /                    the page (static/index.html; the panels fetch /api/summary)
    GET /static/<file>       its script and style sheet (shipped in the package: no CDN)
    GET /api                 the list of endpoints
    GET /api/summary         every panel in one object (what the page polls)
    GET /api/<panel>         one panel: job, heatmap, links, incidents, checkpoints, curves,
                             events (?type=crash&rank=3 filters the events)

Trust (DESIGN.md section 8): it binds 127.0.0.1 unless told otherwise, and then answers only
requests addressed to a loopback name (a web page elsewhere cannot reach it by rebinding a DNS
name to 127.0.0.1). Bound beyond loopback it needs a token, given once as `/?token=...` (it
becomes an HttpOnly, SameSite=Strict cookie and the address bar drops it) or on every request as
`Authorization: Bearer ...`. Only GET and HEAD; no path ever reaches the file system (the
static files are read from the package at start and served by exact name).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import socket
import urllib.parse
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from .summary import PANELS, Dashboard

COOKIE = "ek_token"
MAX_PATH = 2048
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    # Every byte the page needs comes from this server: nothing else may load or be contacted.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the dashboard on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_static() -> dict[str, tuple[str, bytes]]:
    """The package's static files by request path: {"/static/app.js": (type, bytes)}."""
    out = {}
    folder = resources.files("elastickit.dashboard") / "static"
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if item.is_file() and suffix in STATIC_TYPES:
            out[f"/static/{item.name}"] = (STATIC_TYPES[suffix], item.read_bytes())
    if "/static/index.html" not in out:
        raise RuntimeError("elastickit.dashboard: static/index.html is missing from the package; reinstall elastickit")
    return out


def _finite(obj: Any) -> Any:
    """JSON for browsers: NaN and infinities (a diverged loss) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class DashboardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its dashboard, token and static files."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard, token: str | None) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.dashboard = dashboard
        self.token = token or None
        self.loopback = is_loopback(host)
        self.static = load_static()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in str(host) else host}:{port}/"


def make_server(dashboard: Dashboard, *, host: str = "127.0.0.1", port: int = 0,
                token: str | None = None) -> DashboardServer:
    """A server for `dashboard` (not started: call `serve_forever()`); `.url` says where.
    Raises ValueError when binding beyond loopback without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"binding {host} exposes the dashboard beyond this machine: give a token")
    return DashboardServer((host, port), dashboard, token)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "elastickit-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the terminal shows the dashboard's address, not every poll

    # -- plumbing ----------------------------------------------------------------------

    def _send(self, code: int, kind: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        body = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False).encode()
        self._send(code, "application/json", body)

    def _error(self, code: int, message: str) -> None:
        if self.path.startswith("/api"):
            self._json(code, {"error": message})
        else:
            self._send(code, "text/plain; charset=utf-8", (message + "\n").encode())

    def _host_ok(self) -> bool:
        """Bound to loopback, answer only requests addressed to a loopback name."""
        if not self.server.loopback:
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name)

    def _token(self, query: dict[str, list[str]]) -> str:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[len("Bearer "):]
        if "token" in query:
            return query["token"][0]
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:
            return ""
        return cookie[COOKIE].value if COOKIE in cookie else ""

    # -- requests ----------------------------------------------------------------------

    def do_GET(self) -> None:
        raw = self.path
        if len(raw) > MAX_PATH or not raw.startswith("/"):
            self._error(400, "bad request: malformed path")
            return
        url = urllib.parse.urlsplit(raw)
        path = urllib.parse.unquote(url.path)
        if "\x00" in path or "\\" in path or "/../" in path + "/" or "//" in path:
            self._error(400, "bad request: malformed path")
            return
        if not self._host_ok():
            self._error(403, "forbidden: the dashboard answers only requests addressed to 127.0.0.1 or localhost")
            return
        query = urllib.parse.parse_qs(url.query)
        token = self.server.token
        if token is not None:
            given = self._token(query)
            if not hmac.compare_digest(given.encode(), token.encode()):
                self._error(401, "unauthorized: open the dashboard with /?token=... (the token it was started with)")
                return
            if "token" in query and path == "/":
                # Keep the token out of the address bar, history and logs from here on.
                cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
                self._send(303, "text/plain", b"", {"Location": "/", "Set-Cookie": cookie})
                return
        if path in ("/", "/index.html"):
            kind, body = self.server.static["/static/index.html"]
            self._send(200, kind, body)
        elif path in self.server.static:
            kind, body = self.server.static[path]
            self._send(200, kind, body)
        elif path == "/api" or path == "/api/":
            self._json(200, {"endpoints": ["/api/summary"] + [f"/api/{p}" for p in PANELS]})
        elif path == "/api/summary":
            self._json(200, self.server.dashboard.summary())
        elif path == "/api/events":
            rank = query.get("rank", [""])[0]
            if rank and not rank.lstrip("-").isdigit():
                self._error(400, f"bad request: rank={rank!r} is not a rank number")
                return
            self._json(200, self.server.dashboard.events(
                type=query.get("type", [""])[0], rank=int(rank) if rank else None))
        elif path.startswith("/api/") and path[len("/api/"):] in PANELS:
            self._json(200, self.server.dashboard.summary()[path[len("/api/"):]])
        else:
            self._error(404, "not found")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _refuse(self) -> None:
        self._send(405, "text/plain; charset=utf-8", b"method not allowed: the dashboard is read-only\n",
                   {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse
