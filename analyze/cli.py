"""The ``delve-analyze`` command line: a thin shell over :mod:`analyze`.

``delve-analyze stats RUN... -o OUT`` analyses run stores and writes an output folder
(:func:`analyze.outputs.publish_outputs`); ``delve-analyze inspect RUN`` describes a store.

Valid names for ``--conv-method``, ``--timeseries-method``, ``--stats`` and ``--compat``
come from the registries (:data:`capture.reshape.CONV_METHODS`,
:data:`capture.reshape.TIMESERIES_METHODS`, :data:`analyze.stats.STATS`,
:data:`analyze.stats.SEMANTICS`), so ``--help`` and error messages list them.

Errors
------
Bad input (an invalid option, a missing or foreign store, an option the library refuses)
exits with status 2 and one line on stderr, ``Error: ...``, without a traceback. Nothing is
written on failure: the output folder appears (or is replaced) only once every file is
written.

Extending
---------
:data:`cli` is a :class:`click.Group`; other packages add commands with
``cli.add_command(...)`` (``pipelines.cli`` adds ``demo``, ``sweep`` and ``compare``). A
command that raises :class:`InputError` or a :class:`click.UsageError` gets the same
one-line error report.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from analyze.stats import DEFAULT_SEMANTICS, SEMANTICS, STATS, check_stats, check_threshold
from capture.format import PHASES, StoreFormatError
from capture.reshape import CONV_METHODS, INTERPOLATION_MODES, TIMESERIES_METHODS

__all__ = ["cli", "main", "InputError", "SCHEDULERS"]

SCHEDULERS = ("synchronous", "threads", "processes")
_LIBRARY_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, FileExistsError)


class InputError(click.ClickException):
    """Bad input found by a command or the library: ``Error: <message>`` on stderr, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(message: Any) -> str:
    """An exception or message as a single line (``KeyError`` quotes dropped).

    Examples
    --------
    >>> one_line(KeyError("no layer 'x'")), one_line("a\\n  b")
    ("no layer 'x'", 'a b')
    """
    if isinstance(message, KeyError) and message.args and isinstance(message.args[0], str):
        message = message.args[0]
    return " ".join(str(message).split())


class OneLineErrorGroup(click.Group):
    """A click group whose usage errors are reported on one line, with a pointer to ``--help``.

    click prints the usage and a hint on lines of their own; here the report is
    ``Error: <message> (see '<command> --help')``, one line, exit status 2.
    """

    @staticmethod
    def _flatten(exc: click.UsageError) -> InputError:
        message = exc.format_message()
        if exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
        flat = InputError(message)
        flat.exit_code = exc.exit_code
        return flat

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise self._flatten(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise self._flatten(exc) from None


# --------------------------------------------------------------------------- option callbacks


def _thresholds(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[float, ...]:
    if not values:
        return (0.99,)
    out = []
    for v in values:
        try:
            out.append(check_threshold(v))
        except ValueError:
            raise click.BadParameter(f"{v!r}: must be a number in (0, 1]", ctx, param) from None
    if len(set(out)) != len(out):
        raise click.BadParameter(f"duplicate thresholds {list(values)}", ctx, param)
    return tuple(out)


def _stats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    try:
        return check_stats(names)
    except ValueError:
        pass
    unknown = [n for n in names if n not in STATS]
    if unknown:
        raise click.BadParameter(
            f"unknown statistic {unknown[0]!r}; valid: {', '.join(STATS)}", ctx, param
        ) from None
    if not names:
        raise click.BadParameter(f"name at least one statistic; valid: {', '.join(STATS)}", ctx, param)
    raise click.BadParameter(f"duplicate statistics in {value!r}", ctx, param)


def _scheduler(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in SCHEDULERS or "://" in value:
        return value
    raise click.BadParameter(
        f"{value!r} is neither one of {', '.join(SCHEDULERS)} nor a scheduler address (tcp://host:port)",
        ctx,
        param,
    )


def _unique(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _defaulted(default: tuple[str, ...]) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], Any]:
    def callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(values)) or default

    return callback


def analysis_options(verb: str = "analyse") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that choose what is analysed, shared by ``stats`` and the pipelines' commands.

    ``--threshold``, ``--conv-method``, ``--timeseries-method``, ``--stats``, ``--phase``,
    ``--epochs``, ``--layers`` and ``--compat``, validated and defaulted by the same callbacks.
    """
    options = [
        click.option(
            "--threshold",
            "thresholds",
            multiple=True,
            callback=_thresholds,
            metavar="T",
            help="Variance threshold in (0, 1] for lsat / idim; repeat for several.  [default: 0.99]",
        ),
        click.option(
            "--conv-method",
            "conv_methods",
            multiple=True,
            type=click.Choice(list(CONV_METHODS)),
            callback=_defaulted(("channelwise",)),
            help="Reduction of conv maps; repeat for several.  [default: channelwise]",
        ),
        click.option(
            "--timeseries-method",
            "timeseries_methods",
            multiple=True,
            type=click.Choice(list(TIMESERIES_METHODS)),
            callback=_defaulted(("last_timestep",)),
            help="Reduction of sequences; repeat for several.  [default: last_timestep]",
        ),
        click.option(
            "--stats",
            "stats",
            default="lsat,idim",
            show_default=True,
            callback=_stats,
            metavar="LIST",
            help=f"Comma-separated statistics, from: {', '.join(STATS)}.",
        ),
        click.option(
            "--phase",
            "phases",
            multiple=True,
            type=click.Choice(list(PHASES)),
            callback=_defaulted(tuple(PHASES)),
            help=f"Phase to {verb}; repeat for several.  [default: all]",
        ),
        click.option(
            "--epochs", default=None, metavar="SPEC", help="Epochs: 'all', 'last' / '-1', or e.g. '0,2,5-7'."
        ),
        click.option(
            "--layers",
            "layers",
            multiple=True,
            callback=_unique,
            metavar="GLOB",
            help=f"Layers to {verb} (glob pattern on layer names); repeat for several.  [default: all]",
        ),
        click.option(
            "--compat",
            type=click.Choice([s for s in SEMANTICS if s != DEFAULT_SEMANTICS]),
            default=None,
            help="Reproduce this release's numbers (bugs included) instead of the documented definitions.",
        ),
    ]

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# --------------------------------------------------------------------------- the group


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="delve-pipeline", prog_name="delve-analyze")
def cli() -> None:
    """Layer saturation of PyTorch models from captured activations.

    Capture activations during training with capture.Recorder, then analyse the run
    stores with these commands.
    """


def _check_runs(runs: Sequence[str]) -> None:
    """Open every store's metadata first: a missing or foreign store fails before any work."""
    from capture.store import open_run

    for run in runs:
        try:
            open_run(run)
        except (FileNotFoundError, NotADirectoryError, StoreFormatError) as exc:
            raise InputError(str(exc)) from None


@cli.command("stats")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=True, file_okay=False),
    help="Output folder (created; an earlier output folder is replaced as a whole).",
)
@analysis_options("analyse")
@click.option(
    "--device", default="cpu", show_default=True, help="Where Gram products run: cpu, cuda or cuda:i."
)
@click.option(
    "--scheduler",
    default="threads",
    show_default=True,
    callback=_scheduler,
    metavar="synchronous|threads|processes|ADDRESS",
    help="dask scheduler, or a dask.distributed scheduler address (tcp://host:port).",
)
@click.option(
    "--source",
    type=click.Choice(["auto", "raw", "gram"]),
    default="auto",
    show_default=True,
    help="Stored data to reduce: gram moments when they serve the request (auto), raw outputs, or gram.",
)
@click.option("--no-plots", is_flag=True, help="Write the CSVs and provenance only.")
@click.option(
    "--on-error",
    type=click.Choice(["raise", "skip"]),
    default="raise",
    show_default=True,
    help="On a layer that cannot be analysed: stop, or skip it and report it.",
)
@click.option(
    "--log-interval", type=click.IntRange(min=1), default=None, help="Use every N-th call of a layer."
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=None,
    help="At most N samples per epoch, phase and layer.",
)
@click.option(
    "--interpolation",
    type=click.Choice(list(INTERPOLATION_MODES)),
    default=None,
    help="Resize conv maps larger than --downsample with this mode (needs --downsample).",
)
@click.option(
    "--downsample",
    type=click.IntRange(min=1),
    default=None,
    help="Target size of --interpolation.",
    metavar="N",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep reduced covariances here; re-runs with other thresholds or statistics read no activation.  "
    "[default: OUT.cache next to OUT]",
)
@click.option("--no-cache", is_flag=True, help="Do not read or write the covariance cache.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress bars on stderr.  [default: when stderr is a terminal]",
)
@click.pass_context
def stats_command(
    ctx: click.Context,
    runs: tuple[str, ...],
    out: Path,
    thresholds: tuple[float, ...],
    conv_methods: tuple[str, ...],
    timeseries_methods: tuple[str, ...],
    stats: tuple[str, ...],
    phases: tuple[str, ...],
    epochs: str | None,
    layers: tuple[str, ...],
    compat: str | None,
    device: str,
    scheduler: str,
    source: str,
    no_plots: bool,
    on_error: str,
    log_interval: int | None,
    max_samples: int | None,
    interpolation: str | None,
    downsample: int | None,
    cache_dir: Path | None,
    no_cache: bool,
    progress: bool | None,
) -> None:
    """Compute layer statistics of run stores and write them to OUT.

    OUT receives stats.csv (the tidy table), one delve-format CSV per run, conv method,
    time-series method and threshold ({run}_{conv}_{ts}_t{threshold}.csv), plots/ and
    provenance.json. OUT appears only once everything is written.
    """
    from analyze.outputs import check_output_dir, publish_outputs

    if (interpolation is None) != (downsample is None):
        raise click.UsageError("--interpolation and --downsample go together", ctx)
    try:
        check_output_dir(out)
    except FileExistsError as exc:
        raise InputError(str(exc)) from None
    _check_runs(runs)

    from analyze.api import analyze_runs
    from analyze.reduce import ChunkReadError

    try:
        result = analyze_runs(
            list(runs),
            thresholds=thresholds,
            conv_methods=conv_methods,
            timeseries_methods=timeseries_methods,
            stats=stats,
            phases=phases,
            epochs=epochs,
            layers=list(layers) or None,
            compat=compat,
            device=device,
            scheduler=scheduler,
            interpolation=interpolation,
            downsample=downsample,
            log_interval=log_interval,
            max_samples=max_samples,
            source=source,
            cache_dir=None if no_cache else (cache_dir or out.parent / f"{out.name}.cache"),
            on_error=on_error,
            progress=sys.stderr.isatty() if progress is None else progress,
        )
    except _LIBRARY_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    except ChunkReadError as exc:  # a damaged store: not a usage error, but no traceback either
        raise click.ClickException(one_line(exc)) from None

    for failure in result.failures:
        where = f"epoch {failure.epoch}: " if failure.epoch is not None else ""
        click.echo(
            f"Warning: skipped {failure.run} layer {failure.layer!r}: {where}{one_line(failure.error)}",
            err=True,
        )
    if result.table.empty:
        raise click.ClickException("no statistic could be computed; nothing written")

    try:
        written = publish_outputs(result, out, plots=not no_plots)
    except FileExistsError as exc:  # OUT appeared while the analysis ran
        raise InputError(str(exc)) from None
    final = Path(written["provenance"][0]).parent
    counts = ", ".join(
        f"{len(written[k])} {label}"
        for k, label in (("delve_csv", "delve CSV(s)"), ("plots", "plot(s)"))
        if written[k] or k == "delve_csv"
    )
    click.echo(f"wrote {final}: stats.csv ({len(result.table)} rows), {counts}, provenance.json")


# --------------------------------------------------------------------------- inspect


def _human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Examples
    --------
    >>> _human_bytes(512), _human_bytes(1536), _human_bytes(3 * 2**30)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _epoch_ranges(epochs: Sequence[int]) -> str:
    """Runs of consecutive epochs.

    Examples
    --------
    >>> _epoch_ranges([0, 1, 2, 5]), _epoch_ranges([])
    ('0-2, 5', 'none')
    """
    runs: list[list[int]] = []
    for e in sorted(int(e) for e in epochs):
        if runs and runs[-1][1] == e - 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


#: Up to this many epochs ``inspect`` shows samples per epoch; beyond, their range.
_INSPECT_EPOCH_COLUMNS = 6


def render_inspection(info: dict[str, Any]) -> str:
    """:func:`analyze.inspect_run`'s dictionary as text tables."""
    out = [
        f"run:      {info.get('path')}",
        f"format:   version {info.get('format_version')}, created {info.get('created')}",
        f"modes:    {', '.join(info.get('modes', [])) or 'none'}",
        f"ranks:    {len(info.get('ranks', []))}",
        f"size:     {_human_bytes(int(info.get('bytes', 0)))}",
        f"epochs:   {_epoch_ranges(info.get('epochs', []))} ({len(info.get('epochs', []))} complete)",
    ]
    if info.get("incomplete_epoch") is not None:
        out.append(f"incomplete epoch: {info['incomplete_epoch']} (not analysed)")
    out.append(f"phases:   {', '.join(info.get('phases', [])) or 'none'}")
    layers = info.get("layers", [])
    out += ["", "layers:"]
    out.append(
        _table(
            ["name", "type", "layout", "sample shape", "stored dtype", "raw", "gram methods"],
            [
                [
                    lay["name"],
                    lay.get("type"),
                    lay.get("layout"),
                    "x".join(str(s) for s in lay.get("sample_shape", [])) or "-",
                    lay.get("stored_dtype") or "-",
                    "yes" if lay.get("raw") else "no",
                    ",".join(lay.get("gram_methods", [])) or "-",
                ]
                for lay in layers
            ],
        )
    )
    samples: dict[tuple[str, str, int], int] = {
        (s["layer"], s["phase"], int(s["epoch"])): int(s["samples"]) for s in info.get("samples", [])
    }
    epochs = sorted({e for _, _, e in samples})
    phases = [p for p in info.get("phases", []) if any(k[1] == p for k in samples)]
    if samples:
        out += ["", "samples recorded (rows of dim 0) per layer and phase:"]
        if len(epochs) <= _INSPECT_EPOCH_COLUMNS:
            header = ["layer", *[f"{p} e{e}" for p in phases for e in epochs]]
            rows = [
                [lay["name"], *[samples.get((lay["name"], p, e), 0) for p in phases for e in epochs]]
                for lay in layers
            ]
        else:
            header = ["layer", *[f"{p} per epoch" for p in phases], *[f"{p} total" for p in phases]]
            rows = []
            for lay in layers:
                per = {p: [samples.get((lay["name"], p, e), 0) for e in epochs] for p in phases}
                rows.append(
                    [
                        lay["name"],
                        *[f"{min(v)}" if min(v) == max(v) else f"{min(v)}..{max(v)}" for v in per.values()],
                        *[sum(v) for v in per.values()],
                    ]
                )
        out.append(_table(header, rows))
    return "\n".join(out)


@cli.command("inspect")
@click.argument("run", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of tables.")
def inspect_command(run: str, as_json: bool) -> None:
    """Describe a run store: layers, shapes, epochs, phases, samples, modes and size."""
    _check_runs([run])
    from analyze.api import inspect_run
    from analyze.outputs import to_jsonable

    try:
        info = inspect_run(run)
    except _LIBRARY_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(to_jsonable(info), indent=2, sort_keys=True, allow_nan=False))
    else:
        click.echo(render_inspection(info))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``delve-analyze`` and ``python -m analyze``."""
    cli.main(args=None if argv is None else list(argv), prog_name="delve-analyze")
    raise SystemExit(0)  # pragma: no cover - cli.main exits


if __name__ == "__main__":  # pragma: no cover
    main()
