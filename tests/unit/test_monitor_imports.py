"""elastickit.monitor imports nothing else of elastickit (DESIGN.md section 1), and importing
it does not import torch (the CLI stays fast)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

MONITOR = pathlib.Path(__file__).resolve().parents[2] / "monitor"


def test_monitor_imports_only_itself_and_third_parties() -> None:
    offenders = []
    for path in sorted(MONITOR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] in ("elastickit", "checkpoint", "reshard", "monitor")
            ]
    assert offenders == []


def test_import_does_not_load_torch() -> None:
    code = "import sys, elastickit.monitor; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.stdout.strip() == "False", out.stderr
