"""The import layers of docs/architecture.md, checked on the source: each part of `trimodal` imports only the
parts below it (imports inside functions count too), and the HTTP ingress loads without torch/transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "platform" / "trimodal"

ALLOWED = {
    "config": set(), "files": set(), "audio": set(), "hardware": set(), "lru": set(),
    "weights": {"config", "files"},
    "models": {"config", "files", "weights", "audio"},
    "data": {"config", "files", "models"},
    "inference": {"config", "files", "audio", "hardware", "lru", "models"},
    "runs": {"config", "files", "hardware", "weights", "lru", "models", "inference"},
    "training": {"config", "files", "hardware", "models", "data", "inference", "runs"},
    "evaluation": {"config", "files", "models", "data", "inference", "runs"},
}
"""Part -> the parts it may import. `cli` and `__main__` (entry points) may import any part."""


def part_of(path: Path) -> str:
    """`models/vision.py` -> models; `files.py` -> files."""
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def imported_parts(path: Path) -> set[str]:
    """The trimodal parts a module imports, at the top or inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return {name.split(".")[1] for name in names if name.startswith("trimodal.")}


def test_every_part_imports_only_the_parts_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        if part in ("cli", "__main__", "__init__"):
            continue
        assert part in ALLOWED, f"{path}: part {part!r} is not in the layer table (docs/architecture.md)"
        extra = imported_parts(path) - ALLOWED[part] - {part}
        wrong += [f"{path.relative_to(ROOT)} imports trimodal.{name}" for name in sorted(extra)]
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_a_violation(tmp_path):
    """The control: a module of `models` that imports `training` is reported."""
    fake = PACKAGE / "models" / "vision.py"
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trimodal.training.loop import train_loop\n")
    assert imported_parts(bad) == {"training"} and "training" not in ALLOWED[part_of(fake)]


def test_the_http_ingress_loads_without_torch_or_transformers():
    code = "import sys, serve_app.ingress; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
