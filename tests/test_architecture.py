"""The package layers point one way and the training-side package stays lean.

``pipelines`` -> ``analyze`` -> ``capture``: capture never imports the analysis, pandas,
matplotlib or dask; the analysis uses only what both stages share (store format, reshaping
rules, moments, store reading), never the hooks or the writer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("analyze", "pipelines", "pandas", "matplotlib", "dask", "distributed")
CAPTURE_SHARED = {"capture", "capture.format", "capture.moments", "capture.reshape", "capture.store"}


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_capture_imports_no_analysis_and_no_heavy_libraries() -> None:
    for path, names in _imports("capture").items():
        bad = {n for n in names if n.split(".")[0] in HEAVY}
        assert not bad, f"{path} imports {sorted(bad)}"


def test_importing_capture_loads_nothing_heavy() -> None:
    code = f"import sys, capture; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import capture loaded: {out}"


def test_analyze_uses_only_the_shared_part_of_capture_and_never_pipelines() -> None:
    for path, names in _imports("analyze").items():
        assert not {n for n in names if n.split(".")[0] == "pipelines"}, path
        captured = {n for n in names if n.split(".")[0] == "capture"}
        assert captured <= CAPTURE_SHARED, f"{path} imports {sorted(captured - CAPTURE_SHARED)}"


@pytest.mark.parametrize("package", ["capture", "analyze", "pipelines"])
def test_public_face_is_explicit(package: str) -> None:
    module = __import__(package)
    assert module.__all__, package
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.__all__ names missing {name!r}"
    assert sorted(module.__all__) == sorted(set(module.__all__)), f"{package}.__all__ has duplicates"
