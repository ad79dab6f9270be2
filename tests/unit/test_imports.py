"""DESIGN.md section 1: imports point one way, and the engines install only under elastickit.*."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The vocabulary every part shares: the format (manifest, items, files, codec, commit) and the
# error hierarchy. The plan (pure, typed: who writes what, the manifest built from it, matching
# a state against a manifest) builds on the format only.
FORMAT = {"elastickit.checkpoint.format", "elastickit.checkpoint.errors"}
PLAN = FORMAT | {"elastickit.checkpoint.plan"}
ALLOWED = {
    "checkpoint": {"elastickit.checkpoint"},
    "checkpoint/format": FORMAT,
    "checkpoint/plan": PLAN,
    "monitor": {"elastickit.monitor"},
    # DESIGN.md section 1: reshard -> checkpoint, the format only (and the plan types it
    # builds manifests with); never the tiers, the drivers or the coordination.
    "reshard": {"elastickit.reshard"} | PLAN,
}


def _from_names(module: str, node: ast.ImportFrom, ok: set[str]) -> list[str]:
    """The names `from module import a, b` brings in: the module itself, or `module.a` when the
    module is an ancestor of an allowed package (`from elastickit.checkpoint import format`)."""
    if not any(o.startswith(module + ".") for o in ok):
        return [module]
    return [f"{module}.{a.name}" for a in node.names]


def _violations(folder: str, ok: set[str]) -> list[str]:
    bad = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = _from_names(node.module, node, ok)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                # Resolve against the installed name: reshard/adapters/x.py is elastickit.reshard.adapters.x
                pkg = ["elastickit", *folder.split("/"), *f.relative_to(ROOT / folder).parts[:-1]]
                if node.level - 1 >= len(pkg):
                    names = [f"(relative import above elastickit in {folder}/)"]
                else:
                    base = ".".join(pkg[: len(pkg) - (node.level - 1)] + ([node.module] if node.module else []))
                    names = _from_names(base, node, ok)
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


def test_reshard_may_read_the_format_and_the_plan_only(tmp_path, monkeypatch):
    (tmp_path / "reshard" / "adapters").mkdir(parents=True)
    (tmp_path / "reshard" / "x.py").write_text(
        "from elastickit.checkpoint.format.manifest import Manifest\n"
        "from elastickit.checkpoint.plan.save import build_manifest\n"
        "from elastickit.checkpoint.errors import DataError\n"
        "from elastickit.checkpoint.drivers.writer import SaveRequest\n"
        "import elastickit.checkpoint.coord\n"
    )
    (tmp_path / "reshard" / "adapters" / "y.py").write_text(
        "from ...checkpoint.format import codec\nfrom ...checkpoint import catalog\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations("reshard", ALLOWED["reshard"]) == [
        "reshard/adapters/y.py:2 imports elastickit.checkpoint.catalog",
        "reshard/x.py:4 imports elastickit.checkpoint.drivers.writer",
        "reshard/x.py:5 imports elastickit.checkpoint.coord",
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
