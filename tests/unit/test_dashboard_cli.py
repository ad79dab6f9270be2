"""`elastickit dashboard` and `elastickit top` through the real console script: the summary in a
terminal, the page served on a free port, and one clear sentence for every bad request."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import urllib.request

import pytest
from elastickit.cli.main import app
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(120)
EK = [sys.executable, "-m", "elastickit.cli.main"]
RUN = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "dashboard" / "run"


def _run(*args: str) -> tuple[int, str, str]:
    """The command in this process (fast), on a terminal wide enough not to wrap table cells;
    (exit code, stdout, stderr)."""
    res = CliRunner().invoke(app, list(args), env={"COLUMNS": "240"})
    return res.exit_code, res.stdout, res.stderr


def test_top_once_prints_the_summary() -> None:
    code, out, err = _run("top", str(RUN), "--once")
    assert code == 0, err
    assert "step 40" in out and "pp=1,dp=2,tp=1 (2 ranks)" in out and "run finished" in out
    assert "rank 1 is slowing the job" in out and "slow links: 0 <-> 2" in out
    assert "node 1 killed (SIGKILL): rank 1 after step 12" in out
    assert "node 2 hung (SIGSTOP): rank 1 after step 26" in out
    assert ("if node 0 were lost now, the run would restore step 40 from the node-local tier on node 3, "
            "node 0's shards from their peer copies") in out


def test_top_json_has_every_panel() -> None:
    code, out, err = _run("top", str(RUN), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"job", "heatmap", "links", "incidents", "checkpoints", "curves", "events"} <= d.keys()


@pytest.mark.parametrize(("args", "message"), [
    (("dashboard",), "give RUN (a run directory), --events FILE or --store HOST:PORT"),
    (("dashboard", str(RUN), "--events", str(RUN / "events.jsonl")), "not both"),
    (("dashboard", str(RUN / "events.jsonl")), "RUN must be a run directory (use --events"),
    (("dashboard", str(RUN / "nope")), "is not there: RUN must be a run directory"),
    (("dashboard", "--events", str(RUN)), "is a directory: pass it as RUN"),
    (("dashboard", str(RUN), "--host", "0.0.0.0", "--port", "0"), "--host 0.0.0.0: binding 0.0.0.0 exposes"),
    (("dashboard", str(RUN), "--local", "/tmp/x"), "must contain {node}"),
    (("dashboard", "--store", "nohost"), "expected HOST:PORT"),
    (("top", str(RUN), "--interval", "0"), "--interval 0.0: give a positive number"),
])
def test_bad_requests_get_one_sentence_and_exit_2(args, message) -> None:
    code, out, err = _run(*args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err


def test_dashboard_serves_the_run_on_a_free_port() -> None:
    proc = subprocess.Popen([*EK, "dashboard", str(RUN), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "dashboard of" in line and "http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "api/incidents", timeout=30) as r:
            incidents = json.load(r)
        assert [(i["cause"], i["node"], i["ranks"]) for i in incidents["incidents"]] == [
            ("stopnode", 2, [1]), ("killnode", 1, [1])]
        with urllib.request.urlopen(url, timeout=30) as r:
            assert b'data-panel="checkpoints"' in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
