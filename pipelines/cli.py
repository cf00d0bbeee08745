"""The full ``delve-analyze`` command line: the analysis commands plus ``demo``, ``sweep`` and ``compare``.

:data:`cli` is built once, here, by :func:`analyze.cli.make_cli` from :data:`COMMANDS`: the
analysis commands of :mod:`analyze.cli` (``stats``, ``inspect``, ``similarity``) and this module's ``demo``,
``sweep`` and ``compare``. Each command parses its options, calls one library function and
reports where the files are. Bad input exits with status 2 and one line on stderr
(``Error: ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from analyze.cli import (
    ANALYSIS_COMMANDS,
    InputError,
    analysis_options,
    cache_dir_from,
    cache_options,
    check_runs,
    make_cli,
    one_line,
    options_from,
    progress_from,
    progress_option,
    storage_option,
)
from capture.format import StoreFormatError
from pipelines.demo import DEFAULT_EPOCHS

__all__ = ["COMMANDS", "cli", "main", "demo_command", "sweep_command", "compare_command"]

#: Library errors that mean bad input (reported on one line, exit status 2).
_INPUT_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    StoreFormatError,
)


@click.command("demo")
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
@progress_option
def demo_command(out: Path, seed: int, epochs: int, progress: bool | None) -> None:
    """Train two small models on scikit-learn's 8x8 digits, capture, analyse and report.

    A small CNN and an MLP with a deliberately too wide first layer are trained on the CPU;
    their layers are captured to OUT/runs/*.zarr and analysed into OUT/analysis (stats.csv,
    delve-format CSVs, plots/, provenance.json). Ends with a table of saturation per layer
    and accuracy. The same seed gives the same numbers. OUT appears (or is replaced) only
    once everything is written.
    """
    from pipelines.demo import run_demo

    try:
        run_demo(out, seed=seed, epochs=epochs, progress=progress_from(progress), print_report=True)
    except ImportError as exc:
        raise click.ClickException(one_line(exc)) from None
    except _INPUT_ERRORS as exc:
        raise InputError(one_line(exc)) from None


@click.command("sweep")
@click.argument("config", metavar="CONFIG.toml", type=click.Path(path_type=Path, dir_okay=False))
@storage_option
@progress_option
def sweep_command(config: Path, storage_options: dict[str, Any] | None, progress: bool | None) -> None:
    """Analyse runs over several thresholds and methods, as CONFIG.toml describes.

    Writes one combined tidy table (sweep.csv), comparison plots (plots/sweep_*.png) and
    provenance.json to the configuration's output folder; reduced covariances are cached
    (in OUTPUT.cache unless cache_dir says otherwise), so a re-run with other thresholds or
    statistics reads no activation. Keys: runs (required), output, plots, cache_dir and every
    analysis option (thresholds, conv_methods, timeseries_methods, stats, phases, epochs,
    layers, compat, device, scheduler, ...; see pipelines.sweep). Runs may be URLs;
    --storage-option entries are added to the configuration's storage_options.
    """
    from pipelines.sweep import SWEEP_NAME, load_config, sweep

    try:
        cfg = load_config(config)
        table = sweep(cfg, progress=progress_from(progress), storage_options=storage_options)
    except _INPUT_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    out = Path(cfg.output)
    plots = sorted((out / "plots").glob("sweep_*.png")) if cfg.plots else []
    click.echo(f"wrote {out}: {SWEEP_NAME} ({len(table)} rows), {len(plots)} plot(s), provenance.json")


@click.command("compare")
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
@click.option("--no-plots", is_flag=True, help="Write compare.csv and provenance.json only.")
@cache_options
@storage_option
@progress_option
@click.pass_context
def compare_command(
    ctx: click.Context,
    run_a: str,
    run_b: str,
    out: Path,
    no_plots: bool,
    cache_dir: Path | None,
    no_cache: bool,
    storage_options: dict[str, Any] | None,
    progress: bool | None,
    **analysis: Any,
) -> None:
    """Compare the statistics of RUN_A and RUN_B side by side.

    Writes OUT/compare.csv (value_a, value_b and difference = value_b - value_a per epoch,
    phase, layer, method, threshold and statistic), OUT/plots/compare_{stat}.png and
    OUT/provenance.json. OUT appears only once everything is written.
    """
    from pipelines.compare import COMPARE_NAME, compare_runs

    options = options_from(ctx, analysis)
    cache = cache_dir_from(ctx, out, cache_dir, no_cache)
    check_runs([run_a, run_b], storage_options)
    try:
        frame = compare_runs(
            run_a,
            run_b,
            out,
            options,
            cache_dir=cache or False,
            plots=not no_plots,
            progress=progress_from(progress),
            storage_options=storage_options,
        )
    except _INPUT_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    diff = frame["difference"].abs()
    largest = f", largest |difference| {diff.max():.4g}" if diff.notna().any() else ""
    click.echo(f"wrote {out}: {COMPARE_NAME} ({len(frame)} rows{largest}), provenance.json")


#: Every command of ``delve-analyze``, in the order ``--help`` lists them.
COMMANDS: tuple[click.Command, ...] = (*ANALYSIS_COMMANDS, demo_command, sweep_command, compare_command)
#: The ``delve-analyze`` group.
cli = make_cli(COMMANDS)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``delve-analyze`` (all commands) and ``python -m pipelines.cli``."""
    cli.main(args=None if argv is None else list(argv), prog_name="delve-analyze")
    raise SystemExit(0)  # pragma: no cover - cli.main exits


if __name__ == "__main__":  # pragma: no cover
    main()
