"""A small live dashboard of the monitor's findings (standard-library HTTP, no JavaScript).

Two sources: an events file (JSON lines, as the collector writes it) or a live store, for
which the dashboard runs its own `Collector` (read-only: it never aborts the job).

    GET /             the page (refreshes itself every 2 s)
    GET /events.json  every event so far
    GET /state.json   per-rank heartbeat view (store source) and event counts

It binds 127.0.0.1 by default; binding any other address needs a token (DESIGN.md section 8),
given as `?token=...` or `Authorization: Bearer ...`.
"""

from __future__ import annotations

import hmac
import html
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .collector import Collector

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class EventsFileSource:
    """Events read (incrementally) from a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset = 0
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            if os.path.exists(self.path):
                with open(self.path, encoding="utf-8") as f:
                    f.seek(self._offset)
                    chunk = f.read()
                complete, _, _rest = chunk.rpartition("\n")
                if complete:
                    self._offset += len(complete.encode()) + 1
                    for line in complete.splitlines():
                        try:
                            self._events.append(json.loads(line))
                        except json.JSONDecodeError:
                            continue
            return list(self._events)

    def ranks(self) -> dict[str, Any]:
        return {}


class CollectorSource:
    """Events and heartbeats from a live Collector (started here, read-only)."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def events(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.collector.events]

    def ranks(self) -> dict[str, Any]:
        out = {}
        for r, o in sorted(self.collector.observed().items()):
            hb = o.heartbeat
            out[str(r)] = {
                "step": hb.step,
                "state": hb.state,
                "silent_s": round(o.silent_s, 2),
                "exited": o.exited,
                "in_flight": len(hb.in_flight),
                "host": hb.host,
                "pid": hb.pid,
            }
        return out


def _page(events: list[dict[str, Any]], ranks: dict[str, Any], title: str) -> str:
    counts: dict[str, int] = {}
    for e in events:
        counts[e.get("type", "?")] = counts.get(e.get("type", "?"), 0) + 1
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(time.strftime('%H:%M:%S', time.localtime(float(e.get('time', 0)))))}</td>"
        f"<td class='{esc(str(e.get('type')))}'>{esc(str(e.get('type')))}</td>"
        f"<td>{esc(', '.join(str(r) for r in e.get('ranks', [])))}</td>"
        f"<td>{esc(str(e.get('step')))}</td><td>{esc(str(e.get('op', '')))}</td>"
        f"<td>{esc(str(e.get('group', '')))}</td><td>{esc(str(e.get('confidence')))}</td>"
        f"<td><code>{esc(json.dumps(e.get('evidence', {}), sort_keys=True))}</code></td></tr>"
        for e in reversed(events)
    )
    rank_rows = "".join(
        f"<tr><td>{esc(r)}</td>"
        + "".join(
            f"<td>{esc(str(v[k]))}</td>" for k in ("step", "state", "silent_s", "in_flight", "host")
        )
        + "</tr>"
        for r, v in ranks.items()
    )
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no anomalies"
    ranks_html = (
        f"<h2>Ranks</h2><table><tr><th>rank</th><th>step</th><th>state</th>"
        f"<th>silent (s)</th><th>in flight</th><th>host</th></tr>{rank_rows}</table>"
        if ranks
        else ""
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="2"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}
.hang,.crash{{color:#b00;font-weight:bold}} .slow_rank,.slow_link{{color:#a60}}</style></head>
<body><h1>{esc(title)}</h1><p>{esc(summary)}</p>{ranks_html}
<h2>Events</h2><table><tr><th>time</th><th>type</th><th>ranks</th><th>step</th><th>op</th>
<th>group</th><th>confidence</th><th>evidence</th></tr>{rows}</table></body></html>"""


def make_server(
    source: EventsFileSource | CollectorSource,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    title: str = "elastickit monitor",
) -> ThreadingHTTPServer:
    """An HTTP server for `source` (not started: call `serve_forever()`); `.server_port` says
    the port. Raises ValueError when binding beyond localhost without a token."""
    if host not in LOCAL_HOSTS and not token:
        raise ValueError(f"binding {host} exposes the dashboard beyond this machine; give a token")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _authorized(self, query: dict[str, list[str]]) -> bool:
            if not token:
                return True
            given = query.get("token", [""])[0]
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[len("Bearer ") :]
            return hmac.compare_digest(given.encode(), token.encode())

        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            if not self._authorized(urllib.parse.parse_qs(url.query)):
                self._send(403, "text/plain", b"forbidden: give the dashboard token\n")
                return
            routes: dict[str, Callable[[], tuple[str, bytes]]] = {
                "/": lambda: (
                    "text/html; charset=utf-8",
                    _page(source.events(), source.ranks(), title).encode(),
                ),
                "/events.json": lambda: ("application/json", json.dumps(source.events()).encode()),
                "/state.json": lambda: (
                    "application/json",
                    json.dumps(
                        {"ranks": source.ranks(), "num_events": len(source.events())}
                    ).encode(),
                ),
            }
            route = routes.get(url.path)
            if route is None:
                self._send(404, "text/plain", b"not found\n")
                return
            kind, body = route()
            self._send(200, kind, body)

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return ThreadingHTTPServer((host, port), Handler)
