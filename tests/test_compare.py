"""compare_runs: two runs side by side, their difference, plots, provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _runs import make_run

from analyze import AnalysisError, analyze_runs
from pipelines.compare import COMPARE_COLUMNS, COMPARE_NAME, compare_runs, side_by_side


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare-runs")
    # run B has one more layer and one more epoch than run A
    return make_run(root / "narrow.zarr", seed=0), make_run(root / "deep.zarr", seed=1, epochs=3, extra=True)


def _key(row: object) -> tuple:
    t = None if math.isnan(row.threshold) else row.threshold
    return (*(getattr(row, c) for c in COMPARE_COLUMNS[:5]), t, row.stat)


def _values(path: Path, **options: object) -> dict[tuple, float]:
    table = analyze_runs(str(path), progress=False, **options).table
    return {_key(r): r.value for r in table.itertuples(index=False)}


def test_side_by_side_values(runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = runs
    options = {"thresholds": [0.9, 0.99], "stats": ["lsat", "idim", "trc"]}
    frame = compare_runs(a, b, tmp_path / "out", progress=False, **options)
    assert tuple(frame.columns) == COMPARE_COLUMNS
    assert frame.attrs == {"run_a": "narrow", "run_b": "deep"}
    va, vb = _values(a, **options), _values(b, **options)
    assert len(frame) == len(set(va) | set(vb))
    for row in frame.itertuples(index=False):
        expected_a, expected_b = va.get(_key(row), math.nan), vb.get(_key(row), math.nan)
        np.testing.assert_equal(row.value_a, expected_a)
        np.testing.assert_equal(row.value_b, expected_b)
        np.testing.assert_allclose(row.difference, expected_b - expected_a, equal_nan=True)
    # the extra layer and the extra epoch are B only
    extra = frame[(frame["layer"] == "extra") | (frame["epoch"] == 2)]
    assert not extra.empty and extra["value_a"].isna().all() and extra["value_b"].notna().all()
    assert extra["difference"].isna().all()
    # the recorded scalar is compared too
    acc = frame[frame["stat"] == "accuracy"].set_index("epoch")
    assert acc.loc[0, "difference"] == pytest.approx(0.0625)
    assert acc.loc[0, "phase"] == "" and acc.loc[0, "layer"] == ""


def test_files(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    frame = compare_runs(*runs, out, progress=False, stats=["lsat", "pr"])
    text = (out / COMPARE_NAME).read_text()
    assert text.splitlines()[0] == ",".join(COMPARE_COLUMNS)
    assert len(text.splitlines()) == len(frame) + 1
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["compare_lsat.png", "compare_pr.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["run_a"] == "narrow" and provenance["run_b"] == "deep"
    assert set(provenance["inputs"]) == {"narrow", "deep"}
    assert set(provenance["files"]) == {COMPARE_NAME, "plots/compare_lsat.png", "plots/compare_pr.png"}
    # a second comparison into the same folder replaces the plots
    compare_runs(*runs, out, progress=False, stats=["idim"], plots=True)
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["compare_idim.png"]


def test_a_failure_while_writing_leaves_the_earlier_output(
    runs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    module = importlib.import_module("pipelines.compare")  # ``pipelines.compare`` is also a function's name
    out = tmp_path / "out"
    compare_runs(*runs, out, progress=False, stats=["lsat"])
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(module, "panels_png", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        compare_runs(*runs, out, progress=False, stats=["idim", "pr"])
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.cache"]  # no staging folder left


def test_cache_rule(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from analyze import reduce as analyze_reduce

    compare_runs(*runs, tmp_path / "one", progress=False, plots=False)
    assert (tmp_path / "one.cache").is_dir()  # the default: OUT.cache next to OUT
    before = analyze_reduce.chunk_reads["tasks"]
    again = compare_runs(*runs, tmp_path / "two", progress=False, plots=False, cache_dir=tmp_path / "one.cache")
    assert analyze_reduce.chunk_reads["tasks"] == before  # served from the first comparison's cache
    off = compare_runs(*runs, tmp_path / "three", progress=False, plots=False, cache_dir=False)
    assert not (tmp_path / "three.cache").exists() and not (tmp_path / "two.cache").exists()
    pd.testing.assert_frame_equal(again, off)
    with pytest.raises(ValueError, match="inside the output folder"):
        compare_runs(*runs, tmp_path / "four", progress=False, cache_dir=tmp_path / "four" / "cache")


def test_options_object(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from analyze import AnalysisOptions

    options = AnalysisOptions(stats="trc", phases="eval")
    frame = compare_runs(*runs, tmp_path / "a", options, progress=False, plots=False)
    same = compare_runs(*runs, tmp_path / "b", progress=False, plots=False, stats="trc", phases="eval")
    pd.testing.assert_frame_equal(frame, same)
    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert AnalysisOptions.from_dict(provenance["options"]) == options


def test_same_run_twice_has_no_difference(runs: tuple[Path, Path], tmp_path: Path) -> None:
    frame = compare_runs(runs[0], runs[0], tmp_path / "out", progress=False, plots=False)
    assert frame.attrs == {"run_a": "narrow", "run_b": "narrow-2"}
    assert (frame["difference"] == 0).all()
    assert not (tmp_path / "out" / "plots").exists()


def test_side_by_side_keeps_nan_thresholds_apart() -> None:
    table = pd.DataFrame(
        {
            "run": ["a", "a", "b", "b"],
            "epoch": [0] * 4,
            "phase": ["train"] * 4,
            "layer": ["fc"] * 4,
            "conv_method": ["none"] * 4,
            "timeseries_method": ["none"] * 4,
            "threshold": [0.99, math.nan, 0.99, math.nan],
            "stat": ["lsat", "trc", "lsat", "trc"],
            "value": [0.5, 2.0, 0.25, 3.0],
        }
    )
    frame = side_by_side(table, "a", "b")
    assert frame["difference"].tolist() == [-0.25, 1.0]
    assert frame["threshold"].isna().tolist() == [False, True]


def test_errors(runs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="threshold"):
        compare_runs(*runs, tmp_path / "a", progress=False, thresholds=[1.5])
    with pytest.raises(FileNotFoundError):
        compare_runs(runs[0], tmp_path / "missing.zarr", tmp_path / "b", progress=False)
    with pytest.raises(TypeError, match="runs"):
        compare_runs(*runs, tmp_path / "c", progress=False, runs=["x"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        compare_runs(*runs, tmp_path / "d", progress=False)
    assert not any((tmp_path / p).exists() for p in ("a", "b", "c"))
