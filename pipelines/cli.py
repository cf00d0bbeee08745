"""The full ``delve-analyze`` command line: the analysis commands plus ``demo``, ``sweep`` and ``compare``.

:mod:`analyze.cli` holds the click group and its ``stats`` and ``inspect`` commands; this
module adds the pipelines' commands to that group, so ``delve-analyze`` (:func:`main`) offers
all of them. Each command parses its options, calls one library function and reports where
the files are. Bad input exits with status 2 and one line on stderr (``Error: ...``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from analyze.cli import InputError, analysis_options, cli, one_line
from capture.format import StoreFormatError
from pipelines.demo import DEFAULT_EPOCHS

__all__ = ["cli", "main", "demo_command", "sweep_command", "compare_command"]

#: Library errors that mean bad input (reported on one line, exit status 2).
_INPUT_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    StoreFormatError,
)


def _progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


_progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress bars on stderr.  [default: when stderr is a terminal]",
)


@cli.command("demo")
@click.option(
    "-o",
    "--out",
    default="demo-output",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder (absent, empty or an earlier demo output).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DEFAULT_EPOCHS,
    show_default=True,
    help="Epochs per model.",
)
@_progress_option
def demo_command(out: Path, seed: int, epochs: int, progress: bool | None) -> None:
    """Train two small models on scikit-learn's 8x8 digits, capture, analyse and report.

    A small CNN and an MLP with a deliberately too wide first layer are trained on the CPU;
    their layers are captured to OUT/runs/*.zarr and analysed into OUT/analysis (stats.csv,
    delve-format CSVs, plots/, provenance.json). Ends with a table of saturation per layer
    and accuracy. The same seed gives the same numbers.
    """
    from pipelines.demo import run_demo

    try:
        run_demo(out, seed=seed, epochs=epochs, progress=_progress(progress), print_report=True)
    except ImportError as exc:
        raise click.ClickException(one_line(exc)) from None
    except _INPUT_ERRORS as exc:
        raise InputError(one_line(exc)) from None


@cli.command("sweep")
@click.argument("config", metavar="CONFIG.toml", type=click.Path(path_type=Path, dir_okay=False))
@_progress_option
def sweep_command(config: Path, progress: bool | None) -> None:
    """Analyse runs over several thresholds and methods, as CONFIG.toml describes.

    Writes one combined tidy table (sweep.csv), comparison plots (plots/sweep_*.png) and
    provenance.json to the configuration's output folder; reduced covariances are cached, so
    a re-run with other thresholds or statistics reads no activation. Keys: runs (required),
    output, thresholds, conv_methods, timeseries_methods, stats, epochs, layers, phases,
    compat, scheduler, device, source, cache_dir, on_error, plots (see pipelines.sweep).
    """
    from pipelines.sweep import SWEEP_NAME, load_config, sweep

    try:
        cfg = load_config(config)
        table = sweep(cfg, progress=_progress(progress))
    except _INPUT_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    out = Path(cfg.output)
    plots = sorted((out / "plots").glob("sweep_*.png")) if cfg.plots else []
    click.echo(f"wrote {out}: {SWEEP_NAME} ({len(table)} rows), {len(plots)} plot(s), provenance.json")


@cli.command("compare")
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder (absent, empty or an earlier output folder).",
)
@analysis_options("compare")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep reduced covariances here.",
)
@click.option("--no-plots", is_flag=True, help="Write compare.csv and provenance.json only.")
@_progress_option
def compare_command(
    run_a: str,
    run_b: str,
    out: Path,
    thresholds: tuple[float, ...],
    conv_methods: tuple[str, ...],
    timeseries_methods: tuple[str, ...],
    stats: tuple[str, ...],
    phases: tuple[str, ...],
    epochs: str | None,
    layers: tuple[str, ...],
    compat: str | None,
    cache_dir: Path | None,
    no_plots: bool,
    progress: bool | None,
) -> None:
    """Compare the statistics of RUN_A and RUN_B side by side.

    Writes OUT/compare.csv (value_a, value_b and difference = value_b - value_a per epoch,
    phase, layer, method, threshold and statistic), OUT/plots/compare_{stat}.png and
    OUT/provenance.json.
    """
    from pipelines.compare import COMPARE_NAME, compare_runs

    try:
        frame = compare_runs(
            run_a,
            run_b,
            out,
            plots=not no_plots,
            progress=_progress(progress),
            thresholds=thresholds,
            conv_methods=conv_methods,
            timeseries_methods=timeseries_methods,
            stats=stats,
            phases=phases,
            epochs=epochs,
            layers=list(layers) or None,
            compat=compat,
            cache_dir=cache_dir,
        )
    except _INPUT_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    diff = frame["difference"].abs()
    largest = f", largest |difference| {diff.max():.4g}" if diff.notna().any() else ""
    click.echo(f"wrote {out}: {COMPARE_NAME} ({len(frame)} rows{largest}), provenance.json")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``delve-analyze`` (all commands) and ``python -m pipelines.cli``."""
    cli.main(args=None if argv is None else list(argv), prog_name="delve-analyze")
    raise SystemExit(0)  # pragma: no cover - cli.main exits


if __name__ == "__main__":  # pragma: no cover
    main()
