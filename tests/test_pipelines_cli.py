"""``delve-analyze demo / sweep / compare`` (pipelines.cli): exit codes, stdout, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _runs import make_run
from conftest import assert_usage_error, invoke

from pipelines.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli-runs")
    return make_run(root / "a.zarr", seed=0), make_run(root / "b.zarr", seed=1)


def test_group_has_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("stats", "inspect", "demo", "sweep", "compare"):
        assert command in result.stdout


# --------------------------------------------------------------------------- demo


def test_demo(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    result = invoke("demo", "-o", out, "--epochs", 1, "--seed", 1, "--no-progress")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    assert str(out / "analysis" / "stats.csv") in result.stdout
    assert any(line.split()[:3] == ["mlp", "fc1", "512"] for line in result.stdout.splitlines())
    table = pd.read_csv(out / "analysis" / "stats.csv")
    assert set(table["epoch"]) == {0}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--epochs", "0"], ["--epochs", "0"]),
        (["--seed", "-3"], ["--seed"]),
        (["--epochs", "many"], ["--epochs"]),
    ],
)
def test_demo_bad_options(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    assert_usage_error(invoke("demo", "-o", tmp_path / "out", *args), *fragments)
    assert not (tmp_path / "out").exists()


def test_demo_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert_usage_error(invoke("demo", "-o", tmp_path, "--no-progress"), "not a demo output")


# --------------------------------------------------------------------------- sweep


def test_sweep(runs: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(
        f'runs = ["{runs[0]}", "{runs[1]}"]\noutput = "out"\nthresholds = [0.9, 0.99]\n'
        'conv_methods = ["channelwise", "mean"]\n'
    )
    result = invoke("sweep", config, "--no-progress")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'}: sweep.csv (")
    assert "2 plot(s)" in result.stdout
    assert (tmp_path / "out" / "sweep.csv").is_file()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('runs = ["a.zarr"]\nthreshold = 0.9\n', ["unknown key 'threshold'", "valid keys are: runs"]),
        ('runs = ["a.zarr"]\nthresholds = [2.0]\n', ["'thresholds'", "'2.0' is not a number in (0, 1]"]),
        ('runs = ["a.zarr"]\nconv_methods = ["avg"]\n', ["'conv_methods'", "'avg'"]),
        ('runs = ["a.zarr"\n', ["not valid TOML"]),
        ('runs = ["missing.zarr"]\n', ["missing.zarr"]),
    ],
)
def test_sweep_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text(text)
    assert_usage_error(invoke("sweep", config, "--no-progress"), *fragments)


def test_sweep_missing_config(tmp_path: Path) -> None:
    assert_usage_error(invoke("sweep", tmp_path / "nope.toml"), "nope.toml")


# --------------------------------------------------------------------------- compare


def test_compare(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = invoke("compare", *runs, "-o", out, "--stats", "lsat,pr", "--threshold", "0.9", "--no-progress")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.startswith(f"wrote {out}: compare.csv (")
    frame = pd.read_csv(out / "compare.csv", keep_default_na=False, na_values=[""])
    layer_rows = frame[frame["layer"].notna()]  # scalars have an empty layer
    assert set(layer_rows["stat"]) == {"lsat", "pr"}
    assert set(layer_rows["threshold"].dropna()) == {0.9}
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["compare_lsat.png", "compare_pr.png"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--threshold", "1.5"], ["threshold", "1.5"]),
        (["--stats", "lsat,sat"], ["--stats", "'sat'"]),
        (["--conv-method", "avg"], ["--conv-method"]),
        (["--epochs", "7"], ["epochs", "7"]),
        (["--layers", "nothing*"], ["nothing*"]),
    ],
)
def test_compare_bad_options(
    runs: tuple[Path, Path], tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    assert_usage_error(invoke("compare", *runs, "-o", tmp_path / "out", "--no-progress", *args), *fragments)
    assert not (tmp_path / "out").exists()


def test_compare_cache_rule(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """As ``stats``: ``OUT.cache`` next to OUT, ``--no-cache`` none."""
    result = invoke("compare", *runs, "-o", tmp_path / "cmp", "--no-plots", "--no-progress")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (tmp_path / "cmp.cache").is_dir()
    result = invoke("compare", *runs, "-o", tmp_path / "off", "--no-plots", "--no-cache", "--no-progress")
    assert result.exit_code == 0 and not (tmp_path / "off.cache").exists()
    assert (tmp_path / "cmp" / "compare.csv").read_bytes() == (tmp_path / "off" / "compare.csv").read_bytes()


def test_compare_missing_run(runs: tuple[Path, Path], tmp_path: Path) -> None:
    assert_usage_error(
        invoke("compare", runs[0], tmp_path / "nope.zarr", "-o", tmp_path / "out"), "nope.zarr"
    )
    assert_usage_error(invoke("compare", runs[0]), "RUN_B")


# --------------------------------------------------------------------------- entry points


def test_main_exits_with_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "--epochs" in capsys.readouterr().out


def test_python_m_pipelines_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (
        "--epochs" in done.stdout and "--seed" in done.stdout and "Usage: delve-analyze demo" in done.stdout
    )
    bad = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "sweep", "/nonexistent/sweep.toml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("Error: ")
