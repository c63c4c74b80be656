"""The three packages' layers (docs/design.md): imports run adpdm_export -> calibration -> engines, never back up.

Checked statically over every import statement, lazy ones inside functions included,
and dynamically by importing each bottom package's modules alone in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engines": {"calibration", "adpdm_export"},
    # calibration knows nothing of ONNX
    "calibration": {"adpdm_export", "onnx", "onnxruntime", "onnx_ir", "onnxscript", "tensorrt", "polygraphy"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        hits = imported_roots(f) & FORBIDDEN[package]
        if hits:
            bad[str(f.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"{package} imports from a layer above it: {bad}"


@pytest.mark.parametrize("package", ["engines", "calibration"])
def test_each_module_imports_alone(package):
    mods = [f"{package}.{f.stem}" for f in sorted((ROOT / package).glob("*.py")) if f.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {sorted(FORBIDDEN[package])!r})\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
