"""The dashboard's HTTP server: every panel as JSON, the page and its assets from the package,
a token when asked for one, and nothing else (no traversal, no other method, no other host)."""

from __future__ import annotations

import http.client
import json
import pathlib
import socket
import threading

import pytest
from elastickit.dashboard.logs import RunSources
from elastickit.dashboard.server import is_loopback, make_server
from elastickit.dashboard.summary import PANELS, Dashboard

pytestmark = pytest.mark.timeout(60)
RUN = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "dashboard" / "run"


@pytest.fixture(scope="module")
def board() -> Dashboard:
    return Dashboard(RunSources.from_run_dir(str(RUN)))


def _serve(board: Dashboard, token: str | None = None):
    server = make_server(board, port=0, token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(board):
    s = _serve(board)
    yield s
    s.shutdown()
    s.server_close()


def _get(server, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_every_panel_has_an_endpoint_and_the_summary_has_them_all(server) -> None:
    status, headers, body = _get(server, "/api/summary")
    assert status == 200 and headers["Content-Type"] == "application/json"
    summary = json.loads(body)
    for name in PANELS:
        status, _, body = _get(server, f"/api/{name}")
        assert status == 200, name
        assert json.loads(body).keys() == summary[name].keys()
    assert json.loads(_get(server, "/api/incidents")[2])["num_failures"] == 2
    assert json.loads(_get(server, "/api")[2])["endpoints"][0] == "/api/summary"


def test_events_endpoint_filters(server) -> None:
    rows = json.loads(_get(server, "/api/events?type=recovery")[2])["rows"]
    assert [(r["record"]["cause"], r["ranks"]) for r in rows] == [("stopnode", [1]), ("killnode", [1])]
    rows = json.loads(_get(server, "/api/events?type=slow_link&rank=2")[2])["rows"]
    assert [r["ranks"] for r in rows] == [[0, 2]]
    assert _get(server, "/api/events?rank=one")[0] == 400


def test_the_page_and_its_assets_come_from_the_package_with_a_strict_policy(server) -> None:
    status, headers, page = _get(server, "/")
    assert status == 200 and b'data-panel="heatmap"' in page
    for name in PANELS:
        assert f'data-panel="{name}"'.encode() in page
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert b"http://" not in page and b"https://" not in page  # no CDN, no external font
    for asset in ("/static/app.js", "/static/style.css"):
        status, _, body = _get(server, asset)
        assert status == 200 and b"http://" not in body.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in body
    assert _get(server, "/", method="HEAD")[2] == b""


@pytest.mark.parametrize("path", [
    "/static/../logs.py", "/static/%2e%2e/logs.py", "/%2e%2e/%2e%2e/etc/passwd", "/static/..%2fserver.py",
    "/static/a%00.js", "/static\\..\\x", "relative", "/api//summary",
])
def test_traversal_and_malformed_paths_are_refused(server, path) -> None:
    assert _get(server, path)[0] == 400


def test_unknown_paths_other_methods_and_other_hosts(server) -> None:
    assert _get(server, "/api/nope")[0] == 404
    assert _get(server, "/static/logs.py")[0] == 404  # only the shipped assets, by exact name
    status, headers, _ = _get(server, "/api/summary", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    # A page on another site that rebinds its name to 127.0.0.1 is refused.
    assert _get(server, "/api/job", headers={"Host": "evil.example:80"})[0] == 403
    assert _get(server, "/api/job", headers={"Host": f"localhost:{server.server_port}"})[0] == 200


@pytest.mark.parametrize("request_line", [b"GARBAGE", b"GET /api/job HTTP/9.9", b"GET /api/job FOO/1.1"])
def test_a_malformed_request_line_gets_an_error_and_no_data(server, request_line) -> None:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    # http.server answers before it knows the protocol version: an error page, no status line.
    assert b"Error code: 400" in reply or b"Error code: 505" in reply
    assert b"health" not in reply


def test_the_token_is_required_and_moves_into_a_cookie(board) -> None:
    server = _serve(board, token="s3cret")
    try:
        assert _get(server, "/api/job")[0] == 401
        assert _get(server, "/")[0] == 401
        assert _get(server, "/api/job", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _get(server, "/api/job", headers={"Authorization": "Bearer s3cret"})[0] == 200
        status, headers, _ = _get(server, "/?token=s3cret")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert _get(server, "/api/job", headers={"Cookie": cookie.split(";")[0]})[0] == 200
        assert _get(server, "/api/job", headers={"Cookie": "ek_token=nope"})[0] == 401
    finally:
        server.shutdown()
        server.server_close()


def test_binding_beyond_loopback_needs_a_token(board) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="token"):
        make_server(board, host="0.0.0.0", port=0)


def test_every_static_file_is_package_data() -> None:
    """An installed wheel carries the page: pyproject's package-data covers every static file."""
    import fnmatch
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "elastickit.dashboard"]
    static = root / "elastickit" / "dashboard" / "static"
    files = [f"static/{p.name}" for p in static.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
