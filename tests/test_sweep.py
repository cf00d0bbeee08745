"""Sweeps: the combined table equals analyze_runs, the cache is reused, configuration errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from _runs import make_run

from analyze import AnalysisOptions, analyze_runs
from analyze import reduce as analyze_reduce
from analyze.outputs import sorted_table
from pipelines.sweep import SWEEP_NAME, SweepConfig, SweepConfigError, load_config, sweep

THRESHOLDS = [0.9, 0.99]
CONV_METHODS = ["channelwise", "mean"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sweep-runs")
    return [make_run(root / "a.zarr", seed=0), make_run(root / "b.zarr", seed=1)]


def _config(runs: list[Path], out: Path, **extra: object) -> dict:
    return {
        "runs": [str(r) for r in runs],
        "output": str(out),
        "thresholds": THRESHOLDS,
        "conv_methods": CONV_METHODS,
        "stats": ["lsat", "idim"],
        **extra,
    }


def test_table_equals_analyze_runs_and_files(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = sweep(_config(runs, out), progress=False)
    reference = sorted_table(
        analyze_runs(
            [str(r) for r in runs],
            thresholds=THRESHOLDS,
            conv_methods=CONV_METHODS,
            stats=["lsat", "idim"],
            progress=False,
        )
    )
    pd.testing.assert_frame_equal(table, reference)
    assert set(table["run"]) == {"a", "b"}
    lsat = table[table["stat"] == "lsat"]
    assert set(lsat["threshold"]) == set(THRESHOLDS) and set(lsat["conv_method"]) == set(CONV_METHODS)
    # the conv reductions differ on the conv layer (every pixel a sample vs channel means) ...
    idim = table[table["stat"] == "idim"].set_index(
        ["run", "epoch", "phase", "layer", "threshold", "conv_method"]
    )["value"]
    conv = idim.xs("conv", level="layer")
    assert not conv.xs("mean", level="conv_method").equals(conv.xs("channelwise", level="conv_method"))
    # ... and not on the linear layers
    fc = idim.xs("fc", level="layer")
    assert fc.xs("mean", level="conv_method").equals(fc.xs("channelwise", level="conv_method"))
    assert len(table) == len(reference) > 0

    # sweep.csv is written as analyze's stats.csv is
    assert (out / SWEEP_NAME).read_bytes() == reference.to_csv(index=False, lineterminator="\n").encode()
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == [f"sweep_{s}_{p}.png" for s in ("idim", "lsat") for p in ("eval", "train")]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["format"] == "delve-pipeline.sweep"
    assert provenance["config"]["thresholds"] == THRESHOLDS
    assert set(provenance["files"]) == {SWEEP_NAME, *(f"plots/{p}" for p in plots)}
    # provenance records the options as AnalysisOptions.to_dict gives them
    assert (
        AnalysisOptions.from_dict(provenance["options"]) == SweepConfig.from_dict(_config(runs, out)).options
    )
    # the cache is kept next to the output folder (which is replaced as a whole), not inside it
    assert (tmp_path / "out.cache").is_dir() and not (out / "cache").exists()


def test_same_sweep_same_bytes(runs: list[Path], tmp_path: Path) -> None:
    sweep(_config(runs, tmp_path / "one", plots=False), progress=False)
    sweep(
        _config(runs, tmp_path / "two", plots=False, cache_dir=str(tmp_path / "one.cache")),
        progress=False,
    )
    assert not (tmp_path / "two.cache").exists()  # the second sweep read the first one's cache
    assert (tmp_path / "one" / SWEEP_NAME).read_bytes() == (tmp_path / "two" / SWEEP_NAME).read_bytes()


def test_second_sweep_reads_no_activation(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = analyze_reduce.chunk_reads["tasks"]
    sweep(_config(runs, out, plots=False), progress=False)
    after_first = analyze_reduce.chunk_reads["tasks"]
    assert after_first > before  # the first sweep reduced raw activations
    # other thresholds, other statistics, same covariances: everything comes from the cache
    table = sweep(_config(runs, out, thresholds=[0.5, 0.8], stats=["lsat", "pr"]), progress=False)
    assert analyze_reduce.chunk_reads["tasks"] == after_first
    reference = sorted_table(
        analyze_runs(
            [str(r) for r in runs],
            thresholds=[0.5, 0.8],
            conv_methods=CONV_METHODS,
            stats=["lsat", "pr"],
            progress=False,
        )
    )
    pd.testing.assert_frame_equal(table, reference)
    # the plots of the first sweep's statistics are gone, the new ones are there
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "sweep_lsat_eval.png",
        "sweep_lsat_train.png",
        "sweep_pr_eval.png",
        "sweep_pr_train.png",
    ]


def test_a_failure_while_writing_leaves_the_earlier_output(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    module = importlib.import_module("pipelines.sweep")  # ``pipelines.sweep`` is also a function's name
    out = tmp_path / "out"
    sweep(_config(runs, out), progress=False)
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(module, "panels_png", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        sweep(_config(runs, out, thresholds=[0.5], stats=["pr"]), progress=False)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.cache"]  # no staging folder left


def test_toml_output_relative_to_the_file(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cfg" / "sweep.toml"
    config.parent.mkdir()
    config.write_text(
        f'runs = ["{runs[0]}", "{runs[1]}"]\noutput = "result"\nthresholds = 0.95\n'
        'conv_methods = "mean"\nstats = ["lsat"]\nepochs = "last"\nlayers = ["conv", "fc"]\n'
        'phases = ["train"]\n'
    )
    monkeypatch.chdir(runs[0].parent)  # the output is relative to the TOML file, not to the cwd
    table = sweep(config, progress=False)
    assert (config.parent / "result" / SWEEP_NAME).is_file()
    assert not (runs[0].parent / "result").exists()
    rows = table[table["phase"] != ""]
    assert set(rows["epoch"]) == {1} and set(rows["phase"]) == {"train"}
    assert set(rows["layer"]) == {"conv", "fc"} and set(rows["threshold"]) == {0.95}


def test_relative_runs_in_toml(runs: list[Path], tmp_path: Path) -> None:
    folder = runs[0].parent
    config = folder / "relative.toml"
    config.write_text(f'runs = ["a.zarr", "b.zarr"]\noutput = "{tmp_path / "out"}"\nplots = false\n')
    cfg = load_config(config)
    assert cfg.runs == (str(folder / "a.zarr"), str(folder / "b.zarr"))
    table = sweep(cfg, progress=False)
    assert set(table["run"]) == {"a", "b"}


def test_config_defaults_and_round_trip(tmp_path: Path) -> None:
    cfg = SweepConfig.from_dict({"runs": "x.zarr"}, base_dir=tmp_path)
    assert cfg.runs == (str(tmp_path / "x.zarr"),)
    options = cfg.options
    assert options.thresholds == (0.99,) and options.conv_methods == ("channelwise",)
    assert options.stats == ("lsat",)  # a sweep's own default; every other default is AnalysisOptions'
    assert options.replace(stats=("lsat", "idim")) == AnalysisOptions()
    assert cfg.output == str(tmp_path / "sweep-out") and cfg.cache_dir == str(tmp_path / "sweep-out.cache")
    assert SweepConfig.from_dict(cfg.to_dict(), base_dir="/elsewhere") == cfg  # absolute paths stay
    assert SweepConfig.from_dict({"runs": ["x"], "compat": "default"}).options.compat is None
    # no cache: cache_dir = false, which survives a round trip
    off = SweepConfig.from_dict({"runs": "x.zarr", "cache_dir": False}, base_dir=tmp_path)
    assert off.cache_dir is None and off.to_dict()["cache_dir"] is False
    assert SweepConfig.from_dict(off.to_dict()) == off
    # every analysis option is a key (here: sample selection and resizing)
    more = SweepConfig.from_dict(
        {"runs": "x", "log_interval": 2, "interpolation": "bilinear", "downsample": 4, "calls": [0, 3]}
    )
    assert (more.options.log_interval, more.options.downsample, more.options.calls) == (2, 4, (0, 3))


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"runs": ["a"], "thresold": [0.9]}, "unknown key 'thresold'; valid keys are: runs, output"),
        ({"output": "x"}, "'runs' is required"),
        ({"runs": []}, "'runs' must not be empty"),
        ({"runs": "a", "thresholds": [0.9, 1.5]}, r"'thresholds': '1.5' is not a number in \(0, 1\]"),
        ({"runs": "a", "thresholds": "high"}, "'thresholds': 'high' is not a number"),
        ({"runs": "a", "thresholds": [0.9, 0.9]}, r"'thresholds': duplicate thresholds in \[0.9, 0.9\]"),
        (
            {"runs": "a", "conv_methods": ["channelwise", "avg"]},
            "'conv_methods': unknown conv method 'avg'; valid values",
        ),
        (
            {"runs": "a", "timeseries_methods": ["first"]},
            "'timeseries_methods': unknown time-series method 'first'",
        ),
        ({"runs": "a", "stats": ["sat"]}, "'stats': unknown statistic 'sat'"),
        ({"runs": "a", "stats": ["cov"]}, "'stats': 'cov' is not a scalar statistic"),
        ({"runs": "a", "phases": ["test"]}, "'phases': unknown phase 'test'"),
        ({"runs": "a", "epochs": [0, -1]}, "'epochs': a list must hold non-negative integers"),
        ({"runs": "a", "epochs": 1.5}, "'epochs': must be"),
        ({"runs": "a", "layers": [1]}, "'layers': must be a string or a list of strings"),
        (
            {"runs": "a", "compat": "delve"},
            "'compat': unknown value 'delve'; valid values are: default, delve-0.1.50",
        ),
        ({"runs": "a", "scheduler": "fast"}, "'scheduler': 'fast' is neither one of"),
        ({"runs": "a", "device": "gpu"}, "'device': must be 'cpu', 'cuda' or 'cuda:i'"),
        (
            {"runs": "a", "source": "both"},
            "'source': unknown value 'both'; valid values are: auto, raw, gram",
        ),
        ({"runs": "a", "on_error": "ignore"}, "'on_error'"),
        (
            {"runs": "a", "interpolation": "bilinear"},
            "'downsample': interpolation 'bilinear' needs a target size",
        ),
        ({"runs": "a", "task_bytes": 0}, "'task_bytes': must be a positive integer, got 0"),
        ({"runs": "a", "output": "o", "cache_dir": "o/cache"}, "'cache_dir': .* is inside the output folder"),
        ({"runs": "a", "cache_dir": 3}, "'cache_dir' must be a folder"),
        ({"runs": "a", "plots": "yes"}, "'plots' must be true or false"),
        ({"runs": "a", "output": 3}, "'output' must be a string"),
        ({"runs": [1, 2]}, "'runs' must be a string or a list of strings"),
    ],
)
def test_config_errors(config: dict, match: str) -> None:
    with pytest.raises(SweepConfigError, match=match) as info:
        SweepConfig.from_dict(config)
    assert "\n" not in str(info.value) and str(info.value).startswith("sweep config: ")


def test_toml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('runs = ["a.zarr"\n')
    with pytest.raises(SweepConfigError, match="not valid TOML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such sweep configuration"):
        load_config(tmp_path / "missing.toml")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('runs = ["a.zarr"]\n[extra]\nx = 1\n')
    with pytest.raises(SweepConfigError, match="unknown key 'extra'"):
        sweep(unknown, progress=False)


def test_analysis_errors_surface(runs: list[Path], tmp_path: Path) -> None:
    from analyze import AnalysisError

    with pytest.raises(AnalysisError, match="epochs"):
        sweep(_config(runs, tmp_path / "out", epochs=[7]), progress=False)
    with pytest.raises(FileNotFoundError):
        sweep(_config([tmp_path / "missing.zarr"], tmp_path / "out2"), progress=False)


def test_refuses_foreign_output_folder(runs: list[Path], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an analysis output"):
        sweep(_config(runs, tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_gram_store_with_uncaptured_method_can_be_skipped(runs: list[Path], tmp_path: Path) -> None:
    gram = make_run(tmp_path / "g.zarr", seed=2, mode="gram")  # channelwise moments only
    cfg = _config([runs[0], gram], tmp_path / "out", on_error="skip", plots=False)
    table = sweep(cfg, progress=False)
    g = table[(table["run"] == "g") & (table["layer"] == "conv")]
    assert set(g["conv_method"]) == set()  # the conv layer of the gram store was skipped as a whole
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert [f["layer"] for f in provenance["failures"]] == ["conv"]
