"""The ``delve-analyze`` command line: CliRunner for most cases, the installed script for some."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_usage_error, invoke, run_delve_analyze
from torch import nn

from analyze.cli import InputError, OneLineErrorGroup, cli, render_inspection
from analyze.stats import STATS
from capture import CONV_METHODS, TIMESERIES_METHODS, Recorder


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run store: a conv and two linear layers, 2 epochs, train and eval, two scalars."""
    path = tmp_path_factory.mktemp("runs") / "net.zarr"
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5), nn.ReLU(), nn.Linear(5, 2)
    )
    with Recorder(net, path, mode="raw") as rec:
        for epoch in range(2):
            net.train()
            for _ in range(2):
                net(torch.randn(16, 1, 4, 4))
            net.eval()
            with torch.no_grad():
                net(torch.randn(8, 1, 4, 4))
            rec.add_scalar("epoch", epoch)
            rec.add_scalar("acc", 0.5 + 0.125 * epoch)
            rec.end_epoch()
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- option validation


def test_help_lists_the_registered_names() -> None:
    result = invoke("stats", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name in [*CONV_METHODS, *TIMESERIES_METHODS, *STATS, "delve-0.1.50"]:
        assert name in text
    top = invoke("--help")
    assert top.exit_code == 0 and "stats" in top.stdout and "inspect" in top.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--threshold", "0"], ["--threshold", "'0'", "(0, 1]"]),
        (["--threshold", "1.5"], ["--threshold", "'1.5'"]),
        (["--threshold", "abc"], ["--threshold", "'abc'"]),
        (["--threshold", "nan"], ["--threshold"]),
        (["--threshold", "0.9", "--threshold", "0.9"], ["duplicate"]),
        (["--conv-method", "pixelwise"], ["--conv-method", "pixelwise", "channelwise"]),
        (["--timeseries-method", "first"], ["--timeseries-method", "last_timestep"]),
        (["--stats", "lsat,sat"], ["--stats", "'sat'", "lsat, idim"]),
        (["--stats", " , "], ["--stats", "at least one"]),
        (["--stats", "lsat,lsat"], ["duplicate"]),
        (["--phase", "test"], ["--phase"]),
        (["--compat", "delve-0.2"], ["--compat"]),
        (["--scheduler", "fast"], ["--scheduler", "synchronous"]),
        (["--log-interval", "0"], ["--log-interval"]),
        (["--max-samples", "-3"], ["--max-samples"]),
        (["--interpolation", "bilinear"], ["--downsample"]),
        (["--downsample", "4"], ["--interpolation"]),
        (["--interpolation", "fancy", "--downsample", "4"], ["--interpolation"]),
    ],
)
def test_bad_options_exit_2_with_one_line(
    store: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "out"
    result = invoke("stats", store, "-o", out, "--no-plots", *args)
    assert_usage_error(result, *fragments)
    assert "(see 'delve-analyze stats --help')" in result.stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_missing_arguments(tmp_path: Path, store: Path) -> None:
    assert_usage_error(invoke("stats", "-o", tmp_path / "out"), "RUN")
    assert_usage_error(invoke("stats", store), "--out")
    assert_usage_error(invoke("nosuchcommand"), "nosuchcommand")
    assert not (tmp_path / "out").exists()


def test_missing_store(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("stats", tmp_path / "missing.zarr", "-o", out)
    assert_usage_error(result, "missing.zarr", "no run store")
    assert not out.exists()


def test_folder_that_is_not_a_store(tmp_path: Path, store: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    out = tmp_path / "out"
    result = invoke("stats", store, folder, "-o", out)
    assert_usage_error(result, "photos")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_zarr_group_that_is_not_a_run_store(tmp_path: Path) -> None:
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["x"] = 1
    result = invoke("stats", tmp_path / "other.zarr", "-o", tmp_path / "out")
    assert_usage_error(result, "not a delve-pipeline run store")
    assert not (tmp_path / "out").exists()


def test_foreign_output_folder_is_left_alone(tmp_path: Path, store: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke("stats", store, "-o", out, "--no-plots")
    assert_usage_error(result, "mine", "not an analysis output")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- errors from the library


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--epochs", "7"], ["epochs", "[7]"]),
        (["--epochs", "x-y"], ["epochs"]),
        (["--layers", "nomatch*"], ["layers", "'nomatch*'"]),
    ],
)
def test_library_errors_exit_2_and_write_nothing(
    store: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "out"
    result = invoke("stats", store, "-o", out, "--no-plots", *args)
    assert_usage_error(result, *fragments)
    assert not out.exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a real analysis


def test_stats_writes_the_output_folder(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    result = invoke(
        "stats", store, "-o", out, "--stats", "lsat,trc", "--threshold", "0.9", "--threshold", "0.99"
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.startswith(f"wrote {out}")
    assert len(result.stdout.splitlines()) == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "net_channelwise_last_timestep_t0.9.csv",
        "net_channelwise_last_timestep_t0.99.csv",
        "plots",
        "provenance.json",
        "stats.csv",
    ]
    header = (out / "net_channelwise_last_timestep_t0.99.csv").read_text().splitlines()[0]
    assert header.startswith(
        ";epoch;acc;train-saturation_0;train-covariance-trace_0;train-saturation_3;train-covariance-trace_3;"
    )
    assert ";eval-saturation_0;" in header
    assert len((out / "net_channelwise_last_timestep_t0.99.csv").read_text().splitlines()) == 3
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["inputs"]["net"]["path"] == os.path.abspath(store)
    assert prov["options"]["thresholds"] == [0.9, 0.99]
    assert leftovers(tmp_path) == []


def test_rerun_replaces_the_folder_with_identical_bytes(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = ("stats", store, "-o", out, "--no-plots", "--compat", "delve-0.1.50", "--scheduler", "synchronous")
    assert invoke(*args).exit_code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "stale.csv").write_text("from an earlier analysis")
    second = invoke(*args)
    assert second.exit_code == 0, second.stderr
    again = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(again) == sorted(first)  # the stale file is gone with the old folder
    for name, data in first.items():
        if name != "provenance.json":
            assert again[name] == data, name
    assert leftovers(tmp_path) == []


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failure_while_writing_leaves_the_earlier_output(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "res"
    assert invoke("stats", store, "-o", out, "--stats", "lsat").exit_code == 0
    before = tree(out)

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("plotting failed")

    from analyze import plots

    monkeypatch.setattr(plots, "heatmap_png", broken)
    result = invoke("stats", store, "-o", out, "--stats", "lsat,trc", "--threshold", "0.5")
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert tree(out) == before  # every byte of the earlier output is still there
    assert leftovers(tmp_path) == []


def test_cache_rule(store: Path, tmp_path: Path) -> None:
    """``OUT.cache`` next to OUT by default, ``--cache-dir`` elsewhere, ``--no-cache`` none."""
    out = tmp_path / "res"
    assert invoke("stats", store, "-o", out, "--no-plots").exit_code == 0
    assert (tmp_path / "res.cache").is_dir() and not (out / "cache").exists()
    assert invoke("stats", store, "-o", tmp_path / "two", "--no-plots", "--no-cache").exit_code == 0
    assert not (tmp_path / "two.cache").exists()
    elsewhere = tmp_path / "kept"
    assert invoke("stats", store, "-o", tmp_path / "three", "--no-plots", "--cache-dir", elsewhere).exit_code == 0
    assert elsewhere.is_dir() and not (tmp_path / "three.cache").exists()
    assert (tmp_path / "two" / "stats.csv").read_bytes() == (tmp_path / "three" / "stats.csv").read_bytes()
    assert_usage_error(
        invoke("stats", store, "-o", out, "--cache-dir", out / "c"), "'--cache-dir'", "inside the output folder"
    )
    assert_usage_error(invoke("stats", store, "-o", out, "--cache-dir", elsewhere, "--no-cache"), "exclude")


def test_provenance_records_the_analysis_options(store: Path, tmp_path: Path) -> None:
    from analyze import AnalysisOptions

    out = tmp_path / "res"
    args = ("--no-plots", "--stats", "lsat,pr", "--threshold", "0.9", "--phase", "train", "--epochs", "last")
    assert invoke("stats", store, "-o", out, *args).exit_code == 0
    recorded = json.loads((out / "provenance.json").read_text())["options"]
    expected = AnalysisOptions(stats=("lsat", "pr"), thresholds=0.9, phases="train", epochs="last")
    assert recorded == expected.to_dict()


def test_skipped_layers_are_reported_on_stderr(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import analyze.api
    from analyze.result import LayerFailure

    real = analyze.api.analyze_runs

    def flaky(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        result.failures.append(LayerFailure("net", "5", None, "boom\nsecond line"))
        return result

    monkeypatch.setattr(analyze.api, "analyze_runs", flaky)
    result = invoke("stats", store, "-o", tmp_path / "res", "--no-plots", "--on-error", "skip")
    assert result.exit_code == 0
    assert result.stderr == "Warning: skipped net layer '5': boom second line\n"


# --------------------------------------------------------------------------- inspect


def test_inspect_prints_tables(store: Path) -> None:
    result = invoke("inspect", store)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "epochs:   0-1 (2 complete)" in text
    assert "phases:   train, eval" in text
    assert "modes:    raw" in text
    assert "Conv2d" in text and "3x4x4" in text and "float32" in text
    assert "train e0" in text and "eval e1" in text
    samples = text.split("samples recorded")[1]
    row = next(line for line in samples.splitlines() if line.startswith("0 "))
    assert row.split()[1:] == ["32", "32", "8", "8"]
    assert "incomplete" not in text


def test_inspect_json(store: Path) -> None:
    result = invoke("inspect", store, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["epochs"] == [0, 1]
    assert [layer["name"] for layer in info["layers"]] == ["0", "3", "5"]
    assert info["bytes"] > 0


def test_inspect_errors(tmp_path: Path) -> None:
    assert_usage_error(invoke("inspect", tmp_path / "nope.zarr"), "nope.zarr")
    assert_usage_error(invoke("inspect", tmp_path), str(tmp_path))


def test_render_inspection_summarises_many_epochs_and_an_incomplete_one() -> None:
    info = {
        "path": "r.zarr",
        "format_version": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "modes": ["gram"],
        "ranks": [0, 1],
        "layers": [
            {
                "name": "fc",
                "type": "Linear",
                "layout": "flat",
                "sample_shape": [5],
                "stored_dtype": None,
                "raw": False,
                "gram_methods": ["none"],
            }
        ],
        "epochs": [0, 1, 2, 3, 4, 5, 6, 9],
        "incomplete_epoch": 10,
        "phases": ["train"],
        "samples": [{"epoch": e, "phase": "train", "layer": "fc", "samples": 10} for e in range(7)]
        + [{"epoch": 9, "phase": "train", "layer": "fc", "samples": 12}],
        "bytes": 3 * 2**20,
    }
    text = render_inspection(info)
    assert "epochs:   0-6, 9 (8 complete)" in text
    assert "incomplete epoch: 10" in text
    assert "size:     3.0 MiB" in text
    samples = text.split("samples recorded")[1]
    assert "train per epoch" in samples and "train total" in samples
    row = next(line for line in samples.splitlines() if line.startswith("fc "))
    assert row.split() == ["fc", "10..12", "82"]


# --------------------------------------------------------------------------- extension


def test_added_commands_get_one_line_errors() -> None:
    group = OneLineErrorGroup()

    @group.command()
    @click.option("--n", type=int)
    def count(n: int) -> None:
        if n < 0:
            raise InputError("n: must be >= 0\n(got a negative number)")
        click.echo(n)

    runner = CliRunner()
    assert runner.invoke(group, ["count", "--n", "3"]).stdout == "3\n"
    assert_usage_error(runner.invoke(group, ["count", "--n", "x"]), "--n")
    assert_usage_error(runner.invoke(group, ["count", "--n", "-1"]), "must be >= 0 (got a negative number)")


# --------------------------------------------------------------------------- assembly


def test_one_factory_builds_every_group() -> None:
    import pipelines.cli
    from analyze.cli import ANALYSIS_COMMANDS, make_cli

    assert sorted(cli.commands) == ["inspect", "report", "similarity", "stats"]  # python -m analyze
    assert sorted(pipelines.cli.cli.commands) == [
        "compare",
        "demo",
        "inspect",
        "report",
        "similarity",
        "stats",
        "sweep",
    ]
    for command in ANALYSIS_COMMANDS:  # the same command objects in both groups
        assert pipelines.cli.cli.commands[command.name] is command is cli.commands[command.name]
    group = make_cli([ANALYSIS_COMMANDS[-1]])
    assert sorted(group.commands) == ["inspect"] and group is not cli


def test_no_import_cycle_between_the_demo_and_the_command_line() -> None:
    code = "import sys, pipelines.demo; print('pipelines.cli' in sys.modules, 'analyze.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --------------------------------------------------------------------------- the installed script


def test_console_script_bad_threshold(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_delve_analyze("stats", store, "-o", out, "--threshold", "1.5")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("Error: Invalid value for '--threshold'")
    assert not out.exists()


def test_console_script_missing_store_and_inspect(store: Path, tmp_path: Path) -> None:
    proc = run_delve_analyze("stats", tmp_path / "gone.zarr", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"Error: {tmp_path / 'gone.zarr'}: no run store here"]
    assert not (tmp_path / "out").exists()

    proc = run_delve_analyze("inspect", store, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs"] == [0, 1]


def test_python_dash_m_analyze(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "analyze", "stats", str(store), "-o", str(out), "--no-plots", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote ")
    assert (out / "stats.csv").is_file()
