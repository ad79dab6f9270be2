"""DESIGN.md section 1: imports point one way, and the engines install only under elastickit.*."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = {
    "checkpoint": {"elastickit.checkpoint"},
    "monitor": {"elastickit.monitor"},
    "reshard": {"elastickit.reshard", "elastickit.checkpoint"},
}


def _violations(folder: str, ok: set[str]) -> list[str]:
    bad = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                # Resolve against the installed name: reshard/adapters/x.py is elastickit.reshard.adapters.x
                pkg = ["elastickit", folder, *f.relative_to(ROOT / folder).parts[:-1]]
                if node.level - 1 >= len(pkg):
                    names = [f"(relative import above elastickit in {folder}/)"]
                else:
                    base = pkg[: len(pkg) - (node.level - 1)]
                    names = [".".join(base + ([node.module] if node.module else []))]
            else:
                continue
            for n in names:
                if n.startswith("(") or n == "elastickit" or n.startswith("elastickit."):
                    if n == "elastickit" and isinstance(node, ast.ImportFrom) and node.level > 0:
                        n = "elastickit.(top level)"
                    if not any(n == o or n.startswith(o + ".") for o in ok):
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {n}")
    return bad


def test_engines_import_one_way():
    bad = [v for folder, ok in ALLOWED.items() for v in _violations(folder, ok)]
    assert bad == []


def test_the_checker_catches_a_violation(tmp_path, monkeypatch):
    (tmp_path / "monitor").mkdir()
    (tmp_path / "monitor" / "x.py").write_text("from elastickit.checkpoint import manifest\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "monitor" / "sub").mkdir()
    (tmp_path / "monitor" / "sub" / "y.py").write_text("from ...checkpoint import manifest\nfrom .. import probes\n")
    assert _violations("monitor", ALLOWED["monitor"]) == [
        "monitor/sub/y.py:1 imports elastickit.checkpoint",
        "monitor/x.py:1 imports elastickit.checkpoint",
    ]


def test_engines_install_under_elastickit_only(tmp_path):
    code = (
        "import importlib.util, elastickit.checkpoint, elastickit.reshard, elastickit.monitor\n"
        "print([importlib.util.find_spec(n) is None for n in ('checkpoint', 'reshard', 'monitor')])\n"
        "print(elastickit.checkpoint.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "[True, True, True]"
    assert lines[1].endswith("checkpoint/__init__.py")
