"""The dashboard serves the events file; beyond localhost it needs a token."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from elastickit.monitor.dashboard import EventsFileSource, make_server

pytestmark = pytest.mark.timeout(30)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_events_file_page_and_json(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    event = {
        "type": "hang",
        "ranks": [3],
        "step": 7,
        "time": 1.0,
        "op": "allreduce",
        "group": "0",
        "seq": 12,
        "evidence": {"waiting_ranks": [0, 1, 2]},
        "confidence": 0.9,
    }
    path.write_text(json.dumps(event) + "\n" + '{"type": "cra')  # a line still being written
    server = make_server(EventsFileSource(str(path)), port=0, token="s3cret")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert _get(base + "/")[0] == 403
        status, body = _get(base + "/events.json?token=s3cret")
        assert status == 200 and json.loads(body) == [event]
        status, page = _get(base + "/?token=s3cret")
        assert status == 200 and "hang" in page and "allreduce" in page
        with open(path, "a") as f:
            f.write('sh", "ranks": [1], "step": 9, "time": 2.0}\n')
        assert [e["type"] for e in json.loads(_get(base + "/events.json?token=s3cret")[1])] == [
            "hang",
            "crash",
        ]
    finally:
        server.shutdown()
        server.server_close()


def test_binding_beyond_localhost_needs_a_token(tmp_path) -> None:
    with pytest.raises(ValueError, match="token"):
        make_server(EventsFileSource(str(tmp_path / "e.jsonl")), host="0.0.0.0", port=0)
