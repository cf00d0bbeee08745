"""AnalysisOptions: normalisation, round trips, one-line errors, and the same refusals everywhere.

The Python API, the command line (``stats`` and ``compare``) and sweep configurations all build an
:class:`analyze.AnalysisOptions`; a bad value is refused by all of them with the same reason, each
naming the option its own way (``thresholds: ...``, ``Invalid value for '--threshold': ...``,
``sweep config: 'thresholds': ...``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _runs import make_run
from click.testing import CliRunner

from analyze import AnalysisError, AnalysisOptions, analyze_runs, run_stats
from analyze.options import POSITIONAL, SCHEDULERS, resolve_options
from analyze.stats import STATS
from capture import CONV_METHODS, PHASES, TIMESERIES_METHODS
from pipelines.cli import cli
from pipelines.sweep import SweepConfig, SweepConfigError

EVERY_FIELD = {
    "thresholds": (0.5, 0.99),
    "conv_methods": ("mean", "max"),
    "timeseries_methods": ("timestepwise",),
    "stats": ("lsat", "trc", "embed"),
    "phases": ("eval",),
    "epochs": (0, 2),
    "layers": ("conv*", "fc"),
    "compat": "delve-0.1.50",
    "device": "cuda:1",
    "scheduler": "tcp://127.0.0.1:8786",
    "interpolation": "bilinear",
    "downsample": 4,
    "log_interval": 2,
    "max_samples": 100,
    "calls": (0, -1),
    "source": "raw",
    "on_error": "skip",
    "task_bytes": 2**20,
    "measures": ("svcca", "cka"),
    "svcca_threshold": 0.95,
    "minibatch_size": 64,
    "pairs": "epochs",
}


# --------------------------------------------------------------------------- the object


def test_defaults_and_field_order() -> None:
    options = AnalysisOptions()
    assert options.thresholds == (0.99,) and options.stats == ("lsat", "idim")
    assert options.conv_methods == ("channelwise",) and options.timeseries_methods == ("last_timestep",)
    assert options.phases == PHASES and options.epochs is None and options.layers is None
    assert (options.device, options.scheduler, options.source, options.on_error) == (
        "cpu",
        "threads",
        "auto",
        "raise",
    )
    assert AnalysisOptions.keys()[: len(POSITIONAL)] == POSITIONAL
    assert set(AnalysisOptions.keys()) == set(EVERY_FIELD)


@pytest.mark.parametrize("values", [{}, EVERY_FIELD, {"epochs": "last", "compat": "default"}, {"epochs": -1}])
def test_round_trip_through_a_dict_and_json(values: dict[str, Any]) -> None:
    options = AnalysisOptions(**values)
    data = options.to_dict()
    assert list(data) == list(AnalysisOptions.keys())
    assert AnalysisOptions.from_dict(data) == options
    assert AnalysisOptions.from_dict(json.loads(json.dumps(data))) == options  # what provenance.json holds
    assert all(not isinstance(v, tuple) for v in data.values())


def test_every_field_is_kept() -> None:
    options = AnalysisOptions(**EVERY_FIELD)
    for name, value in EVERY_FIELD.items():
        assert getattr(options, name) == value, name
    assert options.delve_compat and options.needs_covariance and options.semantics == "delve-0.1.50"
    assert options.selection.key() == (2, 100, (0, -1), True)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"thresholds": 0.9}, {"thresholds": (0.9,)}),
        ({"thresholds": "0.9"}, {"thresholds": (0.9,)}),
        ({"thresholds": [1, "0.5"]}, {"thresholds": (1.0, 0.5)}),
        ({"thresholds": np.array([0.25, 0.75])}, {"thresholds": (0.25, 0.75)}),
        ({"conv_methods": "mean"}, {"conv_methods": ("mean",)}),
        ({"stats": "pr", "phases": "train"}, {"stats": ("pr",), "phases": ("train",)}),
        ({"layers": "fc*"}, {"layers": ("fc*",)}),
        ({"layers": []}, {"layers": None}),
        ({"epochs": "all"}, {"epochs": None}),
        ({"epochs": " last "}, {"epochs": "last"}),
        ({"epochs": [3, 1]}, {"epochs": (3, 1)}),
        ({"epochs": np.int64(2)}, {"epochs": 2}),
        ({"compat": "default"}, {"compat": None}),
        ({"calls": [None, 5]}, {"calls": (None, 5)}),
        ({"log_interval": np.int32(3)}, {"log_interval": 3}),
    ],
)
def test_normalisation(given: dict[str, Any], expected: dict[str, Any]) -> None:
    options = AnalysisOptions(**given)
    for name, value in expected.items():
        assert getattr(options, name) == value, name
        assert type(getattr(options, name)) is type(value), name


def test_frozen_and_replace_validates() -> None:
    options = AnalysisOptions()
    with pytest.raises(AttributeError):
        options.thresholds = (0.5,)  # type: ignore[misc]
    assert options.replace(stats="trc").stats == ("trc",)
    with pytest.raises(AnalysisError, match="^stats: unknown statistic 'x'"):
        options.replace(stats="x")


# --------------------------------------------------------------------------- refusals

#: (field, bad value, fragment of the reason)
BAD_VALUES = [
    ("thresholds", 0, "'0' is not a number in (0, 1]"),
    ("thresholds", 1.5, "'1.5' is not a number in (0, 1]"),
    ("thresholds", math.nan, "'nan' is not a number in (0, 1]"),
    ("thresholds", True, "'True' is not a number in (0, 1]"),
    ("thresholds", "abc", "'abc' is not a number in (0, 1]"),
    ("thresholds", [], "name at least one threshold"),
    ("thresholds", [0.9, 0.9], "duplicate thresholds in [0.9, 0.9]"),
    ("thresholds", None, "must be a number or a list of numbers in (0, 1], got None"),
    ("conv_methods", "avg", "unknown conv method 'avg'; valid values are: " + ", ".join(CONV_METHODS)),
    ("conv_methods", [], "name at least one conv method"),
    ("conv_methods", ["mean", "mean"], "duplicate conv methods"),
    (
        "timeseries_methods",
        "first",
        "unknown time-series method 'first'; valid values are: " + ", ".join(TIMESERIES_METHODS),
    ),
    ("stats", ["lsat", "sat"], "unknown statistic 'sat'; valid values are: " + ", ".join(STATS)),
    ("stats", [1], "must be a string or a list of strings, got [1]"),
    ("phases", "test", "unknown phase 'test'; valid values are: train, eval"),
    ("epochs", "x-y", "cannot read 'x-y' (use e.g. 'all', 'last', '0,2,5-7')"),
    (
        "epochs",
        1.5,
        "must be 'all', 'last', a spec like '0,2,5-7', an integer or a list of integers, got 1.5",
    ),
    ("epochs", [0, -1], "a list must hold non-negative integers, got [0, -1]"),
    ("epochs", [], "name at least one epoch"),
    ("layers", [1], "must be a string or a list of strings, got [1]"),
    ("layers", ["a", "a"], "duplicate layer patterns"),
    ("compat", "delve", "unknown value 'delve'; valid values are: default, delve-0.1.50"),
    ("device", "tpu", "must be 'cpu', 'cuda' or 'cuda:i', got 'tpu'"),
    ("device", "cudax", "must be 'cpu', 'cuda' or 'cuda:i', got 'cudax'"),
    ("scheduler", "fast", "'fast' is neither one of " + ", ".join(SCHEDULERS) + " nor a scheduler address"),
    ("interpolation", "cubic", "unknown value 'cubic'; valid values are: nearest"),
    ("downsample", 0, "must be a positive integer, got 0"),
    ("log_interval", 2.0, "must be a positive integer, got 2.0"),
    ("max_samples", -3, "must be a positive integer, got -3"),
    ("calls", (1, 2, 3), "must be a (start, stop) window of integers or None, got (1, 2, 3)"),
    ("source", "both", "unknown value 'both'; valid values are: auto, raw, gram"),
    ("on_error", "ignore", "unknown value 'ignore'; valid values are: raise, skip"),
    ("task_bytes", None, "must be a positive integer, got None"),
]


@pytest.mark.parametrize(
    ("field", "value", "reason"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES]
)
def test_bad_value_names_the_argument(field: str, value: Any, reason: str) -> None:
    extra = (
        {"interpolation": "bilinear"}
        if field == "downsample"
        else {"downsample": 2}
        if field == "interpolation"
        else {}
    )
    with pytest.raises(AnalysisError) as info:
        AnalysisOptions(**{field: value}, **extra)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.argument == field and reason in err.reason
    assert str(err) == f"{field}: {err.reason}" and "\n" not in str(err)


def test_interpolation_and_downsample_go_together() -> None:
    with pytest.raises(AnalysisError, match="^downsample: interpolation 'bilinear' needs a target size"):
        AnalysisOptions(interpolation="bilinear")
    with pytest.raises(AnalysisError, match="^interpolation: downsample 4 needs an interpolation mode"):
        AnalysisOptions(downsample=4)


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(
        AnalysisError, match="^treshold: unknown option; valid options are: thresholds, conv_methods"
    ):
        AnalysisOptions.from_dict({"treshold": 0.9})


def test_resolve_options() -> None:
    assert resolve_options() == AnalysisOptions()
    assert resolve_options(None, 0.9, "mean") == AnalysisOptions(thresholds=0.9, conv_methods="mean")
    base = AnalysisOptions(stats="trc", phases="eval")
    assert resolve_options(base, thresholds=0.5) == base.replace(thresholds=0.5)
    assert resolve_options({"stats": ["pr"]}) == AnalysisOptions(stats="pr")
    with pytest.raises(TypeError, match="unexpected keyword argument 'treshold'"):
        resolve_options(treshold=0.9)
    with pytest.raises(TypeError, match="multiple values for the option 'thresholds'"):
        resolve_options(None, 0.9, thresholds=0.5)
    with pytest.raises(TypeError, match="at most 10 options are positional"):
        resolve_options(None, *range(11))


# --------------------------------------------------------------------------- the same refusals everywhere

#: (field, value for the API and the sweep configuration, the command-line option, its arguments)
EVERYWHERE = [
    ("thresholds", [0.9, 1.5], "--threshold", ["--threshold", "0.9", "--threshold", "1.5"]),
    ("thresholds", [0.9, 0.9], "--threshold", ["--threshold", "0.9", "--threshold", "0.9"]),
    ("conv_methods", ["avg"], "--conv-method", ["--conv-method", "avg"]),
    ("timeseries_methods", ["first"], "--timeseries-method", ["--timeseries-method", "first"]),
    ("stats", ["lsat", "sat"], "--stats", ["--stats", "lsat,sat"]),
    ("stats", ["lsat", "lsat"], "--stats", ["--stats", "lsat,lsat"]),
    ("phases", ["test"], "--phase", ["--phase", "test"]),
    ("epochs", "x-y", "--epochs", ["--epochs", "x-y"]),
    ("compat", "delve", "--compat", ["--compat", "delve"]),
    ("device", "tpu", "--device", ["--device", "tpu"]),
    ("scheduler", "fast", "--scheduler", ["--scheduler", "fast"]),
    ("source", "both", "--source", ["--source", "both"]),
    ("on_error", "ignore", "--on-error", ["--on-error", "ignore"]),
    ("log_interval", 0, "--log-interval", ["--log-interval", "0"]),
    ("max_samples", -3, "--max-samples", ["--max-samples", "-3"]),
    ("interpolation", "fancy", "--interpolation", ["--interpolation", "fancy", "--downsample", "4"]),
    ("downsample", 0, "--downsample", ["--interpolation", "bilinear", "--downsample", "0"]),
]


@pytest.mark.parametrize(
    ("field", "value", "option", "args"), EVERYWHERE, ids=[" ".join(a) for _, _, _, a in EVERYWHERE]
)
@pytest.mark.parametrize("command", ["stats", "compare"])
def test_api_cli_and_sweep_refuse_alike(
    field: str, value: Any, option: str, args: list[str], command: str, tmp_path: Path
) -> None:
    extra: dict[str, Any] = {}
    if field == "interpolation":
        extra = {"downsample": 4}
    elif field == "downsample":
        extra = {"interpolation": "bilinear"}
    # the API (nothing is opened: the options are checked first)
    with pytest.raises(AnalysisError) as api:
        analyze_runs(tmp_path / "missing.zarr", **{field: value}, **extra, progress=False)
    assert api.value.argument == field
    reason = api.value.reason
    # the command line, against the option the user typed
    runs = ["missing.zarr"] if command == "stats" else ["a.zarr", "b.zarr"]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [command, *runs, "-o", str(out), *args], prog_name="delve-analyze")
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert (
        result.stderr
        == f"Error: Invalid value for '{option}': {reason} (see 'delve-analyze {command} --help')\n"
    )
    assert not out.exists()
    # a sweep configuration, against its key
    with pytest.raises(SweepConfigError) as swept:
        SweepConfig.from_dict({"runs": ["a.zarr"], field: value, **extra})
    assert str(swept.value) == f"sweep config: {field!r}: {reason}"


# --------------------------------------------------------------------------- the entry points


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("options") / "a.zarr", seed=3)


def test_positional_order_options_object_and_keywords_agree(store: Path) -> None:
    keywords = run_stats(
        store, thresholds=0.9, conv_methods="mean", stats=("lsat", "pr"), phases="train", progress=False
    )
    positional = run_stats(store, 0.9, "mean", "last_timestep", ("lsat", "pr"), "train", progress=False)
    options = AnalysisOptions(thresholds=0.9, conv_methods="mean", stats=("lsat", "pr"), phases="train")
    as_object = run_stats(store, options, progress=False)
    overridden = run_stats(store, options.replace(thresholds=0.5), thresholds=0.9, progress=False)
    from_dict = run_stats(store, options.to_dict(), progress=False)
    for other in (positional, as_object, overridden, from_dict):
        pd.testing.assert_frame_equal(other, keywords)
    assert set(keywords["threshold"].dropna()) == {0.9} and set(keywords["phase"]) == {"train", ""}


def test_result_records_the_options(store: Path) -> None:
    options = AnalysisOptions(thresholds=(0.5, 0.9), stats="lsat", epochs="last")
    result = analyze_runs(store, options, progress=False)
    assert result.options == options.to_dict()
    assert AnalysisOptions.from_dict(result.options) == options


def test_unknown_keyword_is_a_type_error(store: Path) -> None:
    with pytest.raises(TypeError, match="treshold"):
        analyze_runs(store, treshold=0.9, progress=False)


def test_doctests() -> None:
    import doctest

    import analyze.options

    failed, attempted = doctest.testmod(analyze.options)
    assert attempted > 0 and failed == 0
