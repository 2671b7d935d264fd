"""The house keeps its shape: a small top level, small modules that say what they are for, and
imports that flow one way (errors/config/io → models/precision/rundir → data/adapters → train →
infer → eval/export/pretrain → workflows → the API → commands → cli)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "tunesmith"
RANK = {
    "errors": 0, "config": 0, "io": 0,
    "models": 1, "precision": 1, "rundir": 1,
    "data": 2, "adapters": 2,
    "train": 3,
    "infer": 4,
    "eval": 5, "export": 5, "pretrain": 5,
    "workflows": 6,
    "": 7,  # the package itself: the library API
    "commands": 8,
    "cli": 9,
}  # fmt: skip
MAX_LINES = 450


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if "resources" not in p.parts)


def _unit(module: str) -> str:
    """The part of the house a dotted module belongs to: its top-level package or module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_small_top_level_and_small_documented_modules():
    top = [p.stem for p in ROOT.glob("*.py")]
    assert len(top) <= 8, top
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)}: over {MAX_LINES} lines"
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT)}: no module docstring"


def test_imports_flow_one_way():
    wrong = []
    for path in _modules():
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        mine = _unit(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunesmith"):
                targets = [node.module] if node.module != "tunesmith" else [f"tunesmith.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("tunesmith")]
            for target in targets:
                if target == "tunesmith.__version__":  # a constant, not the API
                    continue
                theirs = _unit(target)
                if theirs not in RANK:  # a name imported from the package root (the API)
                    theirs = ""
                if theirs == mine:
                    continue
                if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and RANK[mine] >= 2):
                    wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_ruff_keeps_the_shape():
    """`ruff check` and `ruff format --check` (configured in pyproject.toml) pass on the whole tree."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed (pip install -e '.[test]')"
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([ruff, *args], cwd=ROOT.parent, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
