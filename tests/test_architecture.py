"""The shape of the code: layers point one way, each package has a pinned public face.

- ``pipelines`` -> ``analyze`` -> ``capture``: capture never imports the analysis, pandas,
  matplotlib or dask; the analysis uses only what both stages share (store format, reshaping
  rules, moments, store reading), never the hooks or the writer.
- Each package's ``__init__`` names what users import (``__all__``, pinned below); a module
  never imports another module's underscore names, and what it takes from another package is
  in that package's (or that module's) ``__all__``.
- No import cycle between modules, function-local imports included.
- No function or method body (docstring excluded) over 100 lines.

The source is read with :mod:`ast`, so these tests see every import, including those inside
functions, without running any of it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capture", "analyze", "pipelines")
HEAVY = ("analyze", "pipelines", "pandas", "matplotlib", "dask", "distributed")
CAPTURE_SHARED = {"capture", "capture.format", "capture.moments", "capture.reshape", "capture.storage", "capture.store"}
MAX_BODY_LINES = 100

# -- the public face, pinned: a change here is a change of the public API ----------------------

PUBLIC = {
    "capture": [
        "CALL_COLUMNS",
        "CONV_METHODS",
        "CaptureError",
        "CaptureOptions",
        "DEFAULT_LAYER_TYPES",
        "DEFAULT_LAYER_TYPE_NAMES",
        "FORMAT_NAME",
        "FORMAT_VERSION",
        "GramBlock",
        "Moments",
        "PHASES",
        "Recorder",
        "RunInfo",
        "StoreFormatError",
        "TIMESERIES_METHODS",
        "batch_moments",
        "discover_layers",
        "merge_moments",
        "open_run",
        "to_matrix",
        "tree_merge",
    ],
    "analyze": [
        "AnalysisError",
        "AnalysisOptions",
        "AnalysisResult",
        "LayerFailure",
        "MEASURES",
        "MEASURE_NAMES",
        "OutputFolder",
        "SEMANTICS",
        "SIMILARITY_COLUMNS",
        "STATS",
        "Selection",
        "SimilarityMatrix",
        "SimilarityResult",
        "Spectrum",
        "SpectrumKey",
        "TABLE_COLUMNS",
        "analyze_runs",
        "analyze_similarity",
        "atomic_write_bytes",
        "compute_stat",
        "compute_stats",
        "inspect_run",
        "parse_epochs",
        "publish_outputs",
        "publish_report",
        "publish_similarity",
        "report_html",
        "resolve_cache_dir",
        "run_stats",
        "similarity",
        "similarity_matrices",
        "spectrum_of",
        "write_outputs",
        "write_report",
    ],
    "pipelines": [
        "AbstractWriter",
        "CSVWriter",
        "CSVandPlottingWriter",
        "CheckLayerSat",
        "CompositWriter",
        "Conv2DPCALayer",
        "DELVE_LAYER_TYPES",
        "LinearPCALayer",
        "NPYWriter",
        "PrintWriter",
        "STATMAP",
        "SaturationTracker",
        "SweepConfig",
        "TRACKER_STATS",
        "TensorBoardWriter",
        "TorchCovarianceMatrix",
        "WRITERS",
        "change_all_pca_layer_thresholds",
        "change_all_pca_layer_thresholds_and_inject_random_directions",
        "compare_runs",
        "compute_cov_determinant",
        "compute_cov_trace",
        "compute_diag_trace",
        "compute_intrinsic_dimensionality",
        "compute_saturation",
        "extract_layer_stat",
        "get_writer",
        "plot_stat",
        "read_npy_folder",
        "reconstruct_csv_from_npy_data",
        "run_demo",
        "sweep",
    ],
    "pipelines.dropin": [
        "AbstractWriter",
        "CSVWriter",
        "CSVandPlottingWriter",
        "CheckLayerSat",
        "CompositWriter",
        "Conv2DPCALayer",
        "DELVE_LAYER_TYPES",
        "LinearPCALayer",
        "NPYWriter",
        "PrintWriter",
        "STATMAP",
        "SaturationTracker",
        "TRACKER_STATS",
        "TensorBoardWriter",
        "TorchCovarianceMatrix",
        "WRITERS",
        "change_all_pca_layer_thresholds",
        "change_all_pca_layer_thresholds_and_inject_random_directions",
        "compute_cov_determinant",
        "compute_cov_trace",
        "compute_diag_trace",
        "compute_intrinsic_dimensionality",
        "compute_saturation",
        "extract_layer_stat",
        "get_writer",
        "plot_scatter_from_results",
        "plot_stat",
        "plot_stat_level_from_results",
        "read_npy_folder",
        "reconstruct_csv_from_npy_data",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert PUBLIC[package] == sorted(PUBLIC[package]), "keep the pinned list sorted"
    assert sorted(module.__all__) == PUBLIC[package]
    assert len(module.__all__) == len(set(module.__all__)), f"{package}.__all__ has duplicates"


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_every_public_name_is_importable(package: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)  # noqa: S102 - what a user's star import gets
    assert sorted(n for n in namespace if n != "__builtins__") == PUBLIC[package]
    module = importlib.import_module(package)
    for name in PUBLIC[package]:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):  # defined here, not borrowed
            assert _top(value.__module__) == _top(package), f"{package}.{name} comes from {value.__module__}"


def test_pipelines_re_exports_the_drop_in() -> None:
    import pipelines
    import pipelines.dropin

    delve_names = set(PUBLIC["pipelines.dropin"]) - {"plot_scatter_from_results", "plot_stat_level_from_results"}
    assert delve_names <= set(PUBLIC["pipelines"])
    for name in delve_names:
        assert getattr(pipelines, name) is getattr(pipelines.dropin, name), name


# -- the modules, read as source ------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One module of the three packages."""

    name: str  # dotted, e.g. "pipelines.dropin.writers"; a package is its __init__
    path: Path
    is_package: bool

    @property
    def tree(self) -> ast.Module:
        return _parse(self.path)

    @property
    def package(self) -> str:
        """The dotted package this module belongs to (itself for an ``__init__``)."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def modules() -> dict[str, Source]:
    found: dict[str, Source] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = Source(".".join(parts), path, is_package)
    return found


def declared_all(module: str) -> frozenset[str]:
    """The literal ``__all__`` of a module of the three packages (empty if it has none)."""
    source = modules().get(module)
    if source is None:
        return frozenset()
    for node in source.tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return frozenset(ast.literal_eval(node.value))
    return frozenset()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _top(module: str) -> str:
    return module.split(".")[0]


@dataclass(frozen=True)
class Imported:
    """One name (or module) a module imports from one of the three packages."""

    importer: Source
    module: str  # the module the name comes from
    name: str | None  # None for ``import module``
    line: int

    def __str__(self) -> str:
        what = f"from {self.module} import {self.name}" if self.name else f"import {self.module}"
        return f"{_shown(self.importer.path)}:{self.line}: {what}"


def imports(source: Source) -> Iterator[Imported]:
    """Every import of a project module in ``source``, at any depth (function-local too)."""
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in PACKAGES:
                    yield Imported(source, alias.name, None, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importer's package
                base = source.package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if _top(module) in PACKAGES:
                for alias in node.names:
                    yield Imported(source, module, alias.name, node.lineno)


def _violations(item: Imported) -> list[str]:
    importer, module, name = item.importer, item.module, item.name
    cross = _top(module) != _top(importer.name)
    problems = []
    if name == "*":
        return [f"{item}: star import"]
    if name is not None and _is_private(name):
        problems.append(f"{item}: imports the private name {name!r}")
    if cross and any(_is_private(part) for part in module.split(".")):
        problems.append(f"{item}: imports from a private module of another package")
    if cross and name is not None and not _is_private(name):
        if f"{module}.{name}" in modules():
            problems.append(f"{item}: imports a module of another package (import names from its __all__)")
        else:
            exported = set(declared_all(module))
            parts = module.split(".")
            for i in range(1, len(parts)):
                exported |= declared_all(".".join(parts[:i]))
            if name not in exported:
                problems.append(f"{item}: {name!r} is in no __all__ of {module} or its packages")
    return problems


def _private_attribute_uses(source: Source) -> Iterator[str]:
    """``module._name`` where ``module`` is bound to a project module by an import."""
    bound: set[str] = set()
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if _top(a.name) in PACKAGES}
        elif isinstance(node, ast.ImportFrom) and _top(node.module or "") in PACKAGES:
            bound |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in modules()}
    for node in ast.walk(source.tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _is_private(node.attr)
        ):
            yield f"{_shown(source.path)}:{node.lineno}: uses {node.value.id}.{node.attr}"


def test_sources_are_found() -> None:
    found = modules()
    assert {"capture", "analyze", "pipelines", "pipelines.dropin", "pipelines.dropin.tracker"} <= set(found)
    assert declared_all("pipelines.dropin.writers") >= {"CSVWriter", "get_writer"}


def test_import_rules_catch_each_kind_of_violation(tmp_path: Path) -> None:
    path = tmp_path / "fake.py"
    path.write_text(
        "from analyze.stats import REGISTRY\n"  # in analyze.stats.__all__: fine
        "from capture import Recorder\n"  # in capture.__all__: fine
        "from analyze.reduce import _private\n"
        "from analyze.cli import not_exported\n"
        "from analyze import stats\n"
        "import analyze.reduce as reduce\n"
        "def f():\n"
        "    from pipelines._plots import Line\n"
        "    return reduce._hidden\n"
    )
    fake = Source("capture.fake", path, is_package=False)
    problems = [p for item in imports(fake) for p in _violations(item)] + list(_private_attribute_uses(fake))
    found = sorted(int(p.split(":")[1]) for p in problems)
    assert found == [3, 4, 5, 8, 9], problems


def test_no_module_takes_private_or_unexported_names() -> None:
    problems = [p for source in modules().values() for item in imports(source) for p in _violations(item)]
    problems += [p for source in modules().values() for p in _private_attribute_uses(source)]
    assert not problems, "\n".join(problems)


# -- import cycles --------------------------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import submodule`` -> the submodule).

    The implicit import of a parent package's ``__init__`` is not an edge: a package's
    ``__init__`` re-exporting its modules is the public face, not a cycle.
    """
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for source in known.values():
        for item in imports(source):
            target = f"{item.module}.{item.name}" if item.name else item.module
            if target not in known:
                target = item.module
            if target in known and target != source.name:
                graph[source.name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of ``graph`` that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:  # walk from the first member back to it inside the component
        members, path, seen = set(component), [component[0]], {component[0]}
        while True:
            nxt = min(n for n in graph[path[-1]] if n in members and (n == path[0] or n not in seen))
            if nxt == path[0]:
                break
            path.append(nxt)
            seen.add(nxt)
        cycles.append([*path, path[0]])
    return cycles


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


# -- function size ----------------------------------------------------------------------------------


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return (node.end_lineno or node.lineno) - body[0].lineno + 1


def test_body_lines_skips_the_docstring() -> None:
    tree = ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n    return a\n')
    assert body_lines(tree.body[0]) == 2


def test_no_function_body_over_100_lines() -> None:
    long = [
        f"{_shown(source.path)}:{node.lineno}: {node.name} has {body_lines(node)} lines"
        for source in modules().values()
        for node in ast.walk(source.tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and body_lines(node) > MAX_BODY_LINES
    ]
    assert not long, "\n".join(long)


# -- layers point one way -----------------------------------------------------------------------------


def _imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_capture_imports_no_analysis_and_no_heavy_libraries() -> None:
    for path, names in _imported_modules("capture").items():
        bad = {n for n in names if n.split(".")[0] in HEAVY}
        assert not bad, f"{path} imports {sorted(bad)}"


def test_importing_capture_loads_nothing_heavy() -> None:
    code = f"import sys, capture; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import capture loaded: {out}"


def test_analyze_uses_only_the_shared_part_of_capture_and_never_pipelines() -> None:
    for path, names in _imported_modules("analyze").items():
        assert not {n for n in names if n.split(".")[0] == "pipelines"}, path
        captured = {n for n in names if n.split(".")[0] == "capture"}
        assert captured <= CAPTURE_SHARED, f"{path} imports {sorted(captured - CAPTURE_SHARED)}"


def test_the_native_tools_do_not_use_the_drop_in() -> None:
    for path, names in _imported_modules("pipelines").items():
        if "/dropin/" in path or path.endswith("pipelines/__init__.py"):
            continue
        assert not {n for n in names if n.startswith("pipelines.dropin")}, path
