"""The analysis commands of ``delve-analyze`` and the pieces every command is built from.

``delve-analyze stats RUN... -o OUT`` analyses run stores and writes an output folder
(:func:`analyze.outputs.write_analysis`, with ``--report`` also the HTML report);
``delve-analyze report RUN... -o OUT`` writes the HTML report alone (:func:`analyze.publish_report`);
``delve-analyze similarity RUN... -o OUT`` compares their layers
(:func:`analyze.similarity_outputs.publish_similarity`); ``delve-analyze inspect RUN`` describes a
store.

The options that choose what is analysed (:func:`analysis_options`) are one click option per
:class:`analyze.AnalysisOptions` field: click only parses them, :func:`options_from` builds the
:class:`~analyze.AnalysisOptions` that validates them, and a refused value is reported against
its option (``Error: Invalid value for '--threshold': ...``). Valid names come from the registries
(:data:`capture.reshape.CONV_METHODS`, :data:`capture.reshape.TIMESERIES_METHODS`,
:data:`analyze.stats.STATS`, :data:`analyze.stats.SEMANTICS`), so ``--help`` lists them.
:func:`cache_options` and :func:`cache_dir_from` give every command that writes a folder the one
cache rule (``OUT.cache``, ``--cache-dir``, ``--no-cache``).

Errors
------
Bad input (an invalid option, a missing or foreign store, an option the library refuses)
exits with status 2 and one line on stderr, ``Error: ...``, without a traceback. Nothing is
written on failure: the output folder appears (or is replaced) only once every file is
written.

Assembling the command line
---------------------------
:func:`make_cli` builds a group from a list of commands, once. :data:`cli` (``python -m analyze``)
is the group of :data:`ANALYSIS_COMMANDS`; ``pipelines.cli`` builds ``delve-analyze``, the same
commands plus ``demo``, ``sweep`` and ``compare``. A command that raises :class:`InputError` or a
:class:`click.UsageError` gets the one-line error report.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from analyze.inspection import human_bytes
from analyze.options import ON_ERROR, PAIRS, SCHEDULERS, SOURCES, AnalysisError, AnalysisOptions
from analyze.output_folder import check_output_dir, resolve_cache_dir
from analyze.result import AnalysisResult
from analyze.similarity_api import SIMILARITY_DEFAULTS
from analyze.similarity_measures import MEASURE_NAMES, PARAMETERS
from analyze.stats import SEMANTICS, STATS
from capture.format import PHASES, StoreFormatError
from capture.reshape import CONV_METHODS, INTERPOLATION_MODES, TIMESERIES_METHODS

__all__ = [
    "ANALYSIS_COMMANDS",
    "InputError",
    "OneLineErrorGroup",
    "analyse_for_command",
    "analysis_options",
    "cache_dir_from",
    "cache_options",
    "check_runs",
    "cli",
    "inspect_command",
    "main",
    "make_cli",
    "one_line",
    "options_from",
    "out_option",
    "progress_from",
    "progress_option",
    "report_command",
    "similarity_command",
    "stats_command",
    "storage_option",
    "parse_storage_options",
]

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


# --------------------------------------------------------------------------- shared options

_DEFAULTS = AnalysisOptions()


def _choices(names: Any) -> str:
    return "[" + "|".join(names) + "]"


def _default(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
    return f"  [default: {text}]"


def analysis_options(
    verb: str = "analyse", defaults: AnalysisOptions = _DEFAULTS, exclude: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options that choose what is analysed: one per :class:`analyze.AnalysisOptions` field.

    Click parses them (numbers, repetitions); :func:`options_from` turns them into an
    :class:`~analyze.AnalysisOptions`, which validates them. An option the user does not give
    takes its value in ``defaults`` (shown by ``--help``). ``verb`` words the help texts;
    ``exclude`` names fields that the command does not offer (they keep their default).
    """
    options = [
        click.option(
            "--threshold",
            "thresholds",
            multiple=True,
            metavar="T",
            help="Variance threshold in (0, 1] for lsat / idim; repeat for several."
            + _default(defaults.thresholds),
        ),
        click.option(
            "--conv-method",
            "conv_methods",
            multiple=True,
            metavar=_choices(CONV_METHODS),
            help="Reduction of conv maps; repeat for several." + _default(defaults.conv_methods),
        ),
        click.option(
            "--timeseries-method",
            "timeseries_methods",
            multiple=True,
            metavar=_choices(TIMESERIES_METHODS),
            help="Reduction of sequences; repeat for several." + _default(defaults.timeseries_methods),
        ),
        click.option(
            "--stats",
            "stats",
            metavar="LIST",
            help=f"Comma-separated statistics, from: {', '.join(STATS)}." + _default(defaults.stats),
        ),
        click.option(
            "--phase",
            "phases",
            multiple=True,
            metavar=_choices(PHASES),
            help=f"Phase to {verb}; repeat for several.  [default: all]",
        ),
        click.option("--epochs", metavar="SPEC", help="Epochs: 'all', 'last' / '-1', or e.g. '0,2,5-7'."),
        click.option(
            "--layers",
            "layers",
            multiple=True,
            metavar="GLOB",
            help=f"Layers to {verb} (glob pattern on layer names); repeat for several.  [default: all]",
        ),
        click.option(
            "--compat",
            metavar=_choices(SEMANTICS),
            help="Reproduce this release's numbers (bugs included) instead of the documented definitions.",
        ),
        click.option(
            "--device",
            metavar="cpu|cuda|cuda:i",
            help="Where Gram products run." + _default(defaults.device),
        ),
        click.option(
            "--scheduler",
            metavar="|".join(SCHEDULERS) + "|ADDRESS",
            help="dask scheduler, or a dask.distributed scheduler address (tcp://host:port)."
            + _default(defaults.scheduler),
        ),
        click.option(
            "--source",
            metavar=_choices(SOURCES),
            help="Stored data to reduce: gram moments when they serve the request (auto), raw outputs, or gram."
            + _default(defaults.source),
        ),
        click.option(
            "--on-error",
            metavar=_choices(ON_ERROR),
            help="On a layer that cannot be analysed: stop, or skip it and report it."
            + _default(defaults.on_error),
        ),
        click.option("--log-interval", type=int, metavar="N", help="Use every N-th call of a layer."),
        click.option(
            "--max-samples", type=int, metavar="N", help="At most N samples per epoch, phase and layer."
        ),
        click.option(
            "--interpolation",
            metavar=_choices(INTERPOLATION_MODES),
            help="Resize conv maps larger than --downsample with this mode (needs --downsample).",
        ),
        click.option("--downsample", type=int, metavar="N", help="Target size of --interpolation."),
    ]
    add = _apply(options)

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        command = add(command)
        params = command.__click_params__  # type: ignore[attr-defined]
        command.__click_params__ = [p for p in params if p.name not in exclude]  # type: ignore[attr-defined]
        return command

    return apply


def _apply(options: list[Callable[[Any], Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def options_from(
    ctx: click.Context, values: dict[str, Any], defaults: AnalysisOptions | None = None
) -> AnalysisOptions:
    """The :class:`~analyze.AnalysisOptions` of a command's parsed :func:`analysis_options`.

    ``values`` are the command's parameters (other names are ignored); options not given keep
    their value in ``defaults`` (by default :class:`~analyze.AnalysisOptions`' own). A refused
    value is a :class:`click.BadParameter` naming its option.
    """
    given = {}
    for name in AnalysisOptions.keys():
        value = values.get(name)
        if value is None or value == ():
            continue
        if name == "stats":
            value = tuple(n.strip() for n in value.split(",") if n.strip())
        given[name] = value
    try:
        return AnalysisOptions(**given) if defaults is None else defaults.replace(**given)
    except AnalysisError as exc:
        param = next((p for p in ctx.command.params if p.name == exc.argument), None)
        if param is None:
            raise click.UsageError(one_line(exc), ctx) from None
        raise click.BadParameter(one_line(exc.reason), ctx, param) from None


def cache_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--cache-dir`` and ``--no-cache``: the cache rule of every command that writes a folder."""
    return _apply(
        [
            click.option(
                "--cache-dir",
                type=click.Path(path_type=Path, file_okay=False),
                default=None,
                help="Keep reduced covariances here; re-runs with other thresholds or statistics read no "
                "activation.  [default: OUT.cache next to OUT]",
            ),
            click.option("--no-cache", is_flag=True, help="Do not read or write the covariance cache."),
        ]
    )(command)


def cache_dir_from(ctx: click.Context, out: Path, cache_dir: Path | None, no_cache: bool) -> Path | None:
    """The cache folder of a command writing ``out`` (:func:`analyze.output_folder.resolve_cache_dir`)."""
    if no_cache and cache_dir is not None:
        raise click.UsageError("--cache-dir and --no-cache exclude each other", ctx)
    try:
        return resolve_cache_dir(out, False if no_cache else (cache_dir or True))
    except ValueError as exc:
        param = next(p for p in ctx.command.params if p.name == "cache_dir")
        raise click.BadParameter(one_line(exc), ctx, param) from None


progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress bars on stderr.  [default: when stderr is a terminal]",
)


def progress_from(flag: bool | None) -> bool:
    """``--progress`` / ``--no-progress``, or whether stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def parse_storage_options(values: Sequence[str]) -> dict[str, Any] | None:
    """The storage options of repeated ``--storage-option KEY=VALUE`` (None when none is given).

    A ``VALUE`` that reads as JSON (``true``, ``8``, ``{"a": 1}``, ``"quoted"``) takes that value,
    any other is the string itself; a dotted ``KEY`` sets an entry of a nested mapping
    (``client_kwargs.region_name=eu-west-1``).

    Examples
    --------
    >>> parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=true",
    ...                        "client_kwargs.region_name=eu-west-1"])
    {'endpoint_url': 'http://127.0.0.1:9000', 'anon': True, 'client_kwargs': {'region_name': 'eu-west-1'}}
    >>> parse_storage_options(["anon"])
    Traceback (most recent call last):
    ...
    ValueError: 'anon' is not KEY=VALUE
    """
    if not values:
        return None
    out: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        names = key.strip().split(".")
        if not sep or not all(n.strip() for n in names):
            raise ValueError(f"{item!r} is not KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        node = out
        for name in names[:-1]:
            node = node.setdefault(name.strip(), {})
            if not isinstance(node, dict):
                raise ValueError(f"{item!r}: {name!r} is given a value and entries")
        node[names[-1].strip()] = value
    return out


def _storage_options_callback(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> Any:
    try:
        return parse_storage_options(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


#: ``--storage-option KEY=VALUE`` (repeatable): the options of the filesystem of runs at URLs,
#: parsed by :func:`parse_storage_options` into the parameter ``storage_options`` (a dict or None).
storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_storage_options_callback,
    help="Option of the filesystem of runs at URLs (s3://...), e.g. endpoint_url=http://host:9000 or "
    "anon=true: a JSON value or a string, a dotted KEY for a nested option; repeat for several.  "
    "[default: the storage library's settings: AWS_ENDPOINT_URL, ...]",
)


def check_runs(runs: Sequence[str], storage_options: dict[str, Any] | None = None) -> None:
    """Open every store's metadata first: a missing or foreign store fails before any work.

    ``storage_options`` apply to the runs at URLs (:func:`capture.storage.options_for`).
    """
    from capture.storage import is_url, options_for
    from capture.store import open_run

    if storage_options and not any(is_url(r) for r in runs):
        raise InputError("--storage-option applies to runs at URLs (s3://, gs://, ...); every run is a local path")
    for run in runs:
        try:
            open_run(run, options_for(run, storage_options))
        except (FileNotFoundError, NotADirectoryError, StoreFormatError) as exc:
            raise InputError(str(exc)) from None
        except OSError as exc:  # the network, credentials: not a usage error, but no traceback either
            raise click.ClickException(one_line(exc)) from None


@contextmanager
def _library_errors() -> Iterator[None]:
    """The library's errors as one-line reports: bad input exits 2, a damaged store 1."""
    from analyze.reduce import ChunkReadError

    try:
        yield
    except _LIBRARY_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    except ChunkReadError as exc:  # a damaged store: not a usage error, but no traceback either
        raise click.ClickException(one_line(exc)) from None


@contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """The library's warnings of the block, each as one line ``Warning: ...`` on stderr after it."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        click.echo(f"Warning: {one_line(warning.message)}", err=True)


def check_target(out: Path, runs: Sequence[str], storage_options: dict[str, Any] | None = None) -> None:
    """Before any work: ``OUT`` may receive an output folder, and every store opens."""
    try:
        check_output_dir(out)
    except FileExistsError as exc:
        raise InputError(str(exc)) from None
    check_runs(runs, storage_options)


# --------------------------------------------------------------------------- stats


def out_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``-o`` / ``--out``: the output folder of a command (required)."""
    return click.option(
        "-o",
        "--out",
        required=True,
        type=click.Path(path_type=Path, dir_okay=True, file_okay=False),
        help=help,
    )


def analyse_for_command(
    runs: Sequence[str],
    out: Path,
    options: AnalysisOptions,
    cache: Path | None,
    progress: bool,
    storage_options: dict[str, Any] | None = None,
) -> AnalysisResult:
    """What ``stats`` and ``report`` share: check ``OUT`` and the stores, then analyse them.

    Skipped layers are reported on stderr (``Warning: ...``); bad input raises :class:`InputError`,
    a damaged store a :class:`click.ClickException`, and so does an analysis without any statistic.
    """
    check_target(out, runs, storage_options)

    from analyze import api

    with _library_errors():
        result = api.analyze_runs(
            list(runs), options, cache_dir=cache, progress=progress, storage_options=storage_options
        )

    for failure in result.failures:
        where = f"epoch {failure.epoch}: " if failure.epoch is not None else ""
        click.echo(
            f"Warning: skipped {failure.run} layer {failure.layer!r}: {where}{one_line(failure.error)}",
            err=True,
        )
    if result.table.empty:
        raise click.ClickException("no statistic could be computed; nothing written")
    return result


@click.command("stats")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@out_option("Output folder (created; an earlier output folder is replaced as a whole).")
@analysis_options("analyse")
@click.option("--no-plots", is_flag=True, help="Write the CSVs and provenance only.")
@click.option(
    "--report",
    is_flag=True,
    help="Also write report.html: the analysis as one self-contained HTML page (see 'report').",
)
@cache_options
@storage_option
@progress_option
@click.pass_context
def stats_command(
    ctx: click.Context,
    runs: tuple[str, ...],
    out: Path,
    no_plots: bool,
    report: bool,
    cache_dir: Path | None,
    no_cache: bool,
    storage_options: dict[str, Any] | None,
    progress: bool | None,
    **analysis: Any,
) -> None:
    """Compute layer statistics of run stores and write them to OUT.

    OUT receives stats.csv (the tidy table), one delve-format CSV per run, conv method,
    time-series method and threshold ({run}_{conv}_{ts}_t{threshold}.csv), plots/,
    report.html with --report, and provenance.json. OUT appears only once everything is
    written.
    """
    options = options_from(ctx, analysis)
    cache = cache_dir_from(ctx, out, cache_dir, no_cache)
    result = analyse_for_command(runs, out, options, cache, progress_from(progress), storage_options)

    from analyze.output_folder import OutputFolder
    from analyze.outputs import PROVENANCE_FORMAT, write_analysis
    from analyze.report import write_report

    try:
        with OutputFolder(out, format=PROVENANCE_FORMAT) as folder:
            if report:
                write_report(result, folder, progress=progress_from(progress))
            written = write_analysis(result, folder, plots=not no_plots)
    except FileExistsError as exc:  # OUT appeared while the analysis ran
        raise InputError(str(exc)) from None
    final = Path(written["provenance"][0]).parent
    counts = ", ".join(
        f"{len(written[k])} {label}"
        for k, label in (("delve_csv", "delve CSV(s)"), ("plots", "plot(s)"))
        if written[k] or k == "delve_csv"
    )
    extra = ", report.html" if report else ""
    click.echo(f"wrote {final}: stats.csv ({len(result.table)} rows), {counts}{extra}, provenance.json")


# --------------------------------------------------------------------------- report


@click.command("report")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@out_option("Output folder: report.html and provenance.json (created; an earlier output folder is replaced).")
@analysis_options("analyse")
@click.option(
    "--similarity",
    "measures",
    multiple=True,
    type=click.Choice(MEASURE_NAMES),
    metavar=_choices(MEASURE_NAMES),
    help="Also draw the representational similarity matrices of this measure (conv maps pooled by mean "
    "unless --conv-method is given); repeat for several.",
)
@click.option(
    "--similarity-pairs",
    "pairs",
    multiple=True,
    type=click.Choice(PAIRS),
    metavar=_choices(PAIRS),
    help="What the similarity matrices compare: layers of an epoch, a layer over epochs, a layer across "
    "runs; repeat for several.  [default: layers]",
)
@cache_options
@storage_option
@progress_option
@click.pass_context
def report_command(
    ctx: click.Context,
    runs: tuple[str, ...],
    out: Path,
    measures: tuple[str, ...],
    pairs: tuple[str, ...],
    cache_dir: Path | None,
    no_cache: bool,
    storage_options: dict[str, Any] | None,
    progress: bool | None,
    **analysis: Any,
) -> None:
    """Write a self-contained HTML report of run stores to OUT/report.html.

    One page, images embedded, no script and no network, that opens from disk: each run's
    description (as 'inspect' shows it), the saturation profile per epoch, the epoch x layer
    heatmaps of every statistic and phase, the spectra, the similarity matrices with
    --similarity, and the options and package versions used. OUT (report.html and
    provenance.json) appears only once everything is written.
    """
    from analyze.report_similarity import compute_similarity

    options = options_from(ctx, analysis)
    cache = cache_dir_from(ctx, out, cache_dir, no_cache)
    if pairs and not measures:
        raise click.UsageError("--similarity-pairs needs --similarity", ctx)
    result = analyse_for_command(runs, out, options, cache, progress_from(progress), storage_options)
    frame = None
    if measures:
        with _library_errors(), _warnings_on_stderr():
            frame = compute_similarity(
                runs,
                measures,
                pairs or ("layers",),
                options_from(ctx, analysis, SIMILARITY_DEFAULTS),
                cache_dir=cache,
                progress=progress_from(progress),
                storage_options=storage_options,
            )

    from analyze.report import publish_report

    try:
        path = publish_report(result, out, similarity=frame, progress=progress_from(progress))
    except FileExistsError as exc:  # OUT appeared while the analysis ran
        raise InputError(str(exc)) from None
    size = human_bytes(path.stat().st_size)
    click.echo(f"wrote {path.parent}: report.html ({size}), provenance.json")


# --------------------------------------------------------------------------- similarity


def _similarity_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--measure``, ``--pairs``, ``--svcca-threshold``, ``--minibatch-size`` (validated by the options)."""
    return _apply(
        [
            click.option(
                "--measure",
                "measures",
                multiple=True,
                metavar=_choices(MEASURE_NAMES),
                help="Similarity measure; repeat for several." + _default(_DEFAULTS.measures),
            ),
            click.option(
                "--pairs",
                metavar=_choices(PAIRS),
                help="Compare every pair of layers of a run and epoch (layers), each layer across epochs "
                "(epochs), or each layer across runs (runs)." + _default(_DEFAULTS.pairs),
            ),
            click.option(
                "--svcca-threshold",
                metavar="T",
                help="Share of each layer's variance kept by svcca, in (0, 1]."
                + _default(PARAMETERS["svcca_threshold"].default),
            ),
            click.option(
                "--minibatch-size",
                metavar="N",
                help="Consecutive rows per minibatch of minibatch_cka (>= 4)."
                + _default(PARAMETERS["minibatch_size"].default),
            ),
        ]
    )(command)


#: Analysis options that do not apply to similarity (it reads raw rows and computes no statistic).
_NOT_SIMILARITY = ("thresholds", "stats", "compat", "source")


@click.command("similarity")
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@out_option("Output folder (created; an earlier output folder is replaced as a whole).")
@_similarity_options
@analysis_options("compare", defaults=SIMILARITY_DEFAULTS, exclude=_NOT_SIMILARITY)
@click.option("--no-plots", is_flag=True, help="Write similarity.csv and provenance.json only.")
@cache_options
@storage_option
@progress_option
@click.pass_context
def similarity_command(
    ctx: click.Context,
    runs: tuple[str, ...],
    out: Path,
    no_plots: bool,
    cache_dir: Path | None,
    no_cache: bool,
    storage_options: dict[str, Any] | None,
    progress: bool | None,
    **analysis: Any,
) -> None:
    """Compare the layers of run stores by representational similarity and write OUT.

    OUT receives similarity.csv (run_a, epoch_a, layer_a, run_b, epoch_b, layer_b, phase,
    conv_method, timeseries_method, measure, value), one heatmap per matrix in plots/ and
    provenance.json. The stores must hold raw activations. OUT appears only once everything
    is written.
    """
    options = options_from(ctx, analysis, SIMILARITY_DEFAULTS)
    cache = cache_dir_from(ctx, out, cache_dir, no_cache)
    check_target(out, runs, storage_options)

    from analyze.similarity_api import analyze_similarity
    from analyze.similarity_outputs import publish_similarity

    with _library_errors():
        with _warnings_on_stderr():
            result = analyze_similarity(
                list(runs),
                options=options,
                cache_dir=cache,
                progress=progress_from(progress),
                storage_options=storage_options,
            )
        written = publish_similarity(result, out, plots=not no_plots)
    final = Path(written["provenance"][0]).parent
    click.echo(
        f"wrote {final}: similarity.csv ({len(result.table)} rows), {len(written['plots'])} plot(s), provenance.json"
    )


# --------------------------------------------------------------------------- inspect


def render_inspection(info: dict[str, Any]) -> str:
    """:func:`analyze.inspect_run`'s dictionary as text tables (:mod:`analyze.inspection`'s layout)."""
    from analyze.inspection import layer_table, samples_table, store_summary

    out = [f"{label + ':':<9} {value}" for label, value in store_summary(info)]
    layers = layer_table(info)
    out += ["", f"{layers.caption}:", _table(layers.header, layers.rows)]
    samples = samples_table(info)
    if samples is not None:
        out += ["", f"{samples.caption}:", _table(samples.header, samples.rows)]
    return "\n".join(out)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command("inspect")
@click.argument("run", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of tables.")
@storage_option
def inspect_command(run: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Describe a run store: layers, shapes, epochs, phases, samples, modes and size."""
    check_runs([run], storage_options)
    from analyze.api import inspect_run
    from analyze.outputs import to_jsonable

    try:
        info = inspect_run(run, storage_options)
    except _LIBRARY_ERRORS as exc:
        raise InputError(one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(to_jsonable(info), indent=2, sort_keys=True, allow_nan=False))
    else:
        click.echo(render_inspection(info))


# --------------------------------------------------------------------------- the group


def make_cli(commands: Sequence[click.Command]) -> click.Group:
    """The ``delve-analyze`` group of ``commands``: one-line errors, ``-h``, ``--version``.

    Every command line of the project is built by this factory, once, from a list of commands.
    """

    @click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="delve-pipeline", prog_name="delve-analyze")
    def group() -> None:
        """Layer saturation of PyTorch models from captured activations.

        Capture activations during training with capture.Recorder, then analyse the run
        stores with these commands.
        """

    for command in commands:
        group.add_command(command)
    return group


#: The analysis commands (``python -m analyze`` offers these).
ANALYSIS_COMMANDS: tuple[click.Command, ...] = (
    stats_command,
    report_command,
    similarity_command,
    inspect_command,
)
#: ``python -m analyze``: the group of :data:`ANALYSIS_COMMANDS`.
cli = make_cli(ANALYSIS_COMMANDS)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``python -m analyze`` (the analysis commands)."""
    cli.main(args=None if argv is None else list(argv), prog_name="delve-analyze")
    raise SystemExit(0)  # pragma: no cover - cli.main exits


if __name__ == "__main__":  # pragma: no cover
    main()
