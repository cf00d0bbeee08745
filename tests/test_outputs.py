"""analyze.outputs and analyze.plots on AnalysisResults built by hand with known numbers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analyze import outputs
from analyze.outputs import (
    DELVE_STATNAMES,
    check_output_dir,
    delve_csv_name,
    delve_frame,
    publish_outputs,
    sorted_table,
    write_outputs,
)
from analyze.result import TABLE_COLUMNS, AnalysisResult, LayerFailure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (layer, conv_method, timeseries_method) as the lead's analyze_runs writes them: every row names
# the combination it belongs to; flat and sequence layers repeat their values for each conv method.
LAYERS = [("conv", "channelwise"), ("lstm", None), ("fc", None)]


def _value(epoch: int, phase: str, layer: str, stat: str, t: float | None) -> float:
    """Known, distinct, not-round numbers."""
    base = {"conv": 0.1, "lstm": 0.2, "fc": 0.3}[layer] + 0.01 * epoch + (0.001 if phase == "eval" else 0.0)
    if stat == "lsat":
        return base + (0.5 if t == 0.99 else 0.0)
    if stat == "idim":
        return float(round(base * 10) + (1 if t == 0.99 else 0))
    if stat == "trc":
        return base * 3.0
    if stat == "logdet":
        return -math.inf if layer == "fc" else math.log(base)
    raise AssertionError(stat)


def make_result(
    stats: tuple[str, ...] = ("lsat", "idim", "trc"),
    thresholds: tuple[float, ...] = (0.99, 0.9),
    conv_methods: tuple[str, ...] = ("channelwise",),
    epochs: tuple[int, ...] = (0, 1),
    eval_layers: tuple[str, ...] = ("conv", "lstm"),
    shuffle: int | None = 3,
) -> AnalysisResult:
    rows: list[tuple[Any, ...]] = []
    spectra: dict[tuple[Any, ...], np.ndarray] = {}
    for e in epochs:
        rows.append(("net", e, "", "", "", "", math.nan, "epoch", float(e)))
        rows.append(("net", e, "", "", "", "", math.nan, "acc", 0.5 + 0.1 * e))
        for phase in ("train", "eval"):
            for layer, own_conv in LAYERS:
                if phase == "eval" and layer not in eval_layers:
                    continue
                for cm in conv_methods:
                    if own_conv is not None and cm != own_conv and cm != "mean":
                        continue
                    tm = "last_timestep"
                    shift = 0.001 if cm == "mean" and own_conv is not None else 0.0
                    for stat in stats:
                        ts: tuple[float | None, ...] = thresholds if stat in ("lsat", "idim") else (None,)
                        for t in ts:
                            v = _value(e, phase, layer, stat, t)
                            if stat not in ("idim", "logdet"):
                                v += shift
                            rows.append(
                                ("net", e, phase, layer, cm, tm, math.nan if t is None else t, stat, v)
                            )
                    spectra[("net", e, phase, layer, cm, tm)] = np.array([2.0, 1.0, 0.5, 0.0])
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if shuffle is not None:
        table = table.sample(frac=1.0, random_state=shuffle).reset_index(drop=True)
    return AnalysisResult(
        table=table,
        spectra=spectra,
        options={
            "thresholds": list(thresholds),
            "conv_methods": list(conv_methods),
            "timeseries_methods": ["last_timestep"],
            "stats": list(stats),
            "phases": ["train", "eval"],
        },
        inputs={"net": {"path": "/data/net.zarr", "content_hash": "abc123"}},
        layer_order={"net": [name for name, _ in LAYERS]},
        scalar_names={"net": ["epoch", "acc"]},
    )


def tiny_result() -> AnalysisResult:
    """One flat layer, two epochs, numbers whose text is known."""
    rows = [
        ("r", 0, "", "", "", "", math.nan, "epoch", 0.0),
        ("r", 1, "", "", "", "", math.nan, "epoch", 1.0),
        ("r", 0, "train", "fc", "channelwise", "last_timestep", 0.99, "lsat", 0.5),
        ("r", 0, "train", "fc", "channelwise", "last_timestep", 0.99, "idim", 2.0),
        ("r", 0, "train", "fc", "channelwise", "last_timestep", math.nan, "trc", 0.1 + 0.2),
        ("r", 1, "train", "fc", "channelwise", "last_timestep", 0.99, "lsat", 0.25),
        ("r", 1, "train", "fc", "channelwise", "last_timestep", 0.99, "idim", 1.0),
        ("r", 1, "train", "fc", "channelwise", "last_timestep", math.nan, "trc", 1e-300),
        ("r", 0, "eval", "fc", "channelwise", "last_timestep", 0.99, "lsat", 0.75),
        ("r", 0, "eval", "fc", "channelwise", "last_timestep", 0.99, "idim", 3.0),
        ("r", 0, "eval", "fc", "channelwise", "last_timestep", math.nan, "trc", 2.0),
        ("r", 1, "eval", "fc", "channelwise", "last_timestep", 0.99, "lsat", 1.0),
        ("r", 1, "eval", "fc", "channelwise", "last_timestep", 0.99, "idim", 4.0),
        ("r", 1, "eval", "fc", "channelwise", "last_timestep", math.nan, "trc", 1 / 3),
    ]
    table = pd.DataFrame(rows[::-1], columns=list(TABLE_COLUMNS))
    return AnalysisResult(
        table=table,
        options={"stats": ["lsat", "idim", "trc"], "thresholds": [0.99]},
        layer_order={"r": ["fc"]},
        scalar_names={"r": ["epoch"]},
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- delve-format CSVs


def test_delve_csv_exact_text(tmp_path: Path) -> None:
    written = write_outputs(tiny_result(), tmp_path, plots=False)
    assert [p.name for p in written["delve_csv"]] == ["r_channelwise_last_timestep_t0.99.csv"]
    assert (tmp_path / "r_channelwise_last_timestep_t0.99.csv").read_text() == (
        ";epoch;train-saturation_fc;train-intrinsic-dimensionality_fc;train-covariance-trace_fc;"
        "eval-saturation_fc;eval-intrinsic-dimensionality_fc;eval-covariance-trace_fc\n"
        "0;0.0;0.5;2;0.30000000000000004;0.75;3;2.0\n"
        "1;1.0;0.25;1;1e-300;1.0;4;0.3333333333333333\n"
    )


def test_recorded_scalar_types_are_kept_when_the_result_has_them(tmp_path: Path) -> None:
    result = tiny_result()
    result.scalars = {"r": {0: {"epoch": 0}, 1: {"epoch": 1}}}  # type: ignore[attr-defined]
    text = delve_frame(result, "r", "channelwise", "last_timestep", 0.99).to_csv(sep=";")
    assert text.splitlines()[1].startswith("0;0;0.5;2;")


def test_delve_csv_column_order_and_files(tmp_path: Path) -> None:
    result = make_result(stats=("lsat", "idim", "trc"), thresholds=(0.99, 0.9))
    written = write_outputs(result, tmp_path, plots=False)
    assert sorted(p.name for p in written["delve_csv"]) == [
        "net_channelwise_last_timestep_t0.9.csv",
        "net_channelwise_last_timestep_t0.99.csv",
    ]
    frame = pd.read_csv(tmp_path / "net_channelwise_last_timestep_t0.9.csv", sep=";", index_col=0)
    expected = ["epoch", "acc"]
    for phase, layers in (("train", ["conv", "lstm", "fc"]), ("eval", ["conv", "lstm"])):
        for layer in layers:
            for stat in ("lsat", "idim", "trc"):
                expected.append(f"{phase}-{DELVE_STATNAMES[stat]}_{layer}")
    assert list(frame.columns) == expected
    assert list(frame.index) == [0, 1]
    assert frame.loc[1, "eval-saturation_lstm"] == pytest.approx(_value(1, "eval", "lstm", "lsat", 0.9))
    other = pd.read_csv(tmp_path / "net_channelwise_last_timestep_t0.99.csv", sep=";", index_col=0)
    assert other.loc[0, "train-saturation_conv"] == pytest.approx(_value(0, "train", "conv", "lsat", 0.99))
    # the statistics without a threshold are the same in both files
    assert other["train-covariance-trace_fc"].tolist() == frame["train-covariance-trace_fc"].tolist()


def test_delve_csv_per_conv_method(tmp_path: Path) -> None:
    result = make_result(conv_methods=("channelwise", "mean"), thresholds=(0.99,), stats=("lsat",))
    write_outputs(result, tmp_path, plots=False)
    chan = pd.read_csv(tmp_path / "net_channelwise_last_timestep_t0.99.csv", sep=";", index_col=0)
    mean = pd.read_csv(tmp_path / "net_mean_last_timestep_t0.99.csv", sep=";", index_col=0)
    assert list(chan.columns) == list(mean.columns)
    assert mean.loc[0, "train-saturation_conv"] == pytest.approx(chan.loc[0, "train-saturation_conv"] + 0.001)
    assert mean["train-saturation_fc"].tolist() == chan["train-saturation_fc"].tolist()


def test_neutral_methods_appear_in_every_csv() -> None:
    """A layer whose rows name no method (``""`` / ``"none"``) belongs to every combination."""
    rows = [
        ("r", 0, "train", "fc", "none", "none", 0.9, "lsat", 0.5),
        ("r", 0, "train", "conv", "max", "none", 0.9, "lsat", 0.25),
        ("r", 0, "train", "conv", "mean", "", 0.9, "lsat", 0.125),
    ]
    result = AnalysisResult(
        pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), layer_order={"r": ["conv", "fc"]}
    )
    tables = outputs.delve_tables(result)
    assert sorted(tables) == ["r_max_none_t0.9.csv", "r_mean_none_t0.9.csv"]
    for name, frame in tables.items():
        assert list(frame.columns) == ["train-saturation_conv", "train-saturation_fc"]
        assert frame.loc[0, "train-saturation_conv"] == (0.25 if "_max_" in name else 0.125)


def test_idim_with_nan_stays_float() -> None:
    rows = [
        ("r", 0, "train", "fc", "none", "none", 0.9, "idim", 2.0),
        ("r", 1, "train", "fc", "none", "none", 0.9, "idim", math.nan),
    ]
    result = AnalysisResult(pd.DataFrame(rows, columns=list(TABLE_COLUMNS)))
    text = delve_frame(result, "r", "none", "none", 0.9).to_csv(sep=";")
    assert text == ";train-intrinsic-dimensionality_fc\n0;2.0\n1;\n"


def test_only_scalar_statistics_reach_the_csv() -> None:
    rows = [
        ("r", 0, "train", "fc", "none", "none", math.nan, "trc", 2.0),
        ("r", 0, "train", "fc", "none", "none", math.nan, "logdet", -math.inf),
        ("r", 0, "train", "fc", "none", "none", math.nan, "pr", 1.5),
        ("r", 0, "train", "fc", "none", "none", math.nan, "erank", 1.25),
        ("r", 0, "train", "fc", "none", "none", math.nan, "det", 0.0),
        ("r", 0, "train", "fc", "none", "none", math.nan, "dtrc", 2.0),
    ]
    result = AnalysisResult(
        pd.DataFrame(rows, columns=list(TABLE_COLUMNS)),
        options={"stats": ["trc", "logdet", "pr", "erank", "det", "dtrc", "spectrum"]},
    )
    assert outputs._thresholds(result) == [None]
    (name,) = outputs.delve_tables(result)
    assert name == "r_none_none.csv"
    text = outputs.delve_tables(result)[name].to_csv(sep=";")
    assert text == (
        ";train-covariance-trace_fc;train-covariance-logdeterminant_fc;train-participation-ratio_fc;"
        "train-effective-rank_fc;train-covariance-determinant_fc;train-diagonal-trace_fc\n"
        "0;2.0;-inf;1.5;1.25;0.0;2.0\n"
    )


def _feed_delve_writer(writer: Any, result: AnalysisResult, threshold: float, stats: tuple[str, ...]) -> None:
    """Give delve's writer the values in the order delve's SaturationTracker does, with delve's types."""
    table = result.table
    for e in sorted(set(table["epoch"])):
        writer.add_scalar("epoch", int(e))  # the same numbers as float in our table
        acc = table[(table.epoch == e) & (table.stat == "acc")]["value"].item()
        writer.add_scalar("acc", acc)
        for phase in ("train", "eval"):
            for layer, _ in LAYERS:
                values: dict[str, Any] = {}
                for stat in stats:
                    sel = table[
                        (table.epoch == e)
                        & (table.phase == phase)
                        & (table.layer == layer)
                        & (table.stat == stat)
                        & (table.conv_method == "channelwise")
                    ]
                    if stat in ("lsat", "idim"):
                        sel = sel[sel.threshold == threshold]
                    if sel.empty:
                        continue
                    v = sel["value"].item()
                    # delve: lsat a Python float, idim a Python int, trc/det numpy float64 from torch
                    values[f"{phase}-{DELVE_STATNAMES[stat]}_{layer}"] = (
                        int(v) if stat == "idim" else np.float64(v) if stat in ("trc", "det") else float(v)
                    )
                if values:
                    writer.add_scalars(prefix="", value_dict=values, sample_value_dict={})
    writer.save()


def test_same_text_as_delves_csv_writer(tmp_path: Path) -> None:
    writers = pytest.importorskip("delve.writers")
    stats = ("lsat", "idim", "trc")
    result = make_result(stats=stats, thresholds=(0.99, 0.9))
    # delve writes the epoch scalar as an int; give the result the recorded values
    result.scalars = {  # type: ignore[attr-defined]
        "net": {e: {"epoch": e, "acc": 0.5 + 0.1 * e} for e in (0, 1)}
    }
    write_outputs(result, tmp_path / "ours", plots=False)
    for t in (0.99, 0.9):
        savepath = tmp_path / "delve" / f"t{t}"
        savepath.parent.mkdir(parents=True, exist_ok=True)
        _feed_delve_writer(writers.CSVWriter(str(savepath)), result, t, stats)
        ours = (tmp_path / "ours" / delve_csv_name("net", "channelwise", "last_timestep", t)).read_bytes()
        assert ours == Path(f"{savepath}.csv").read_bytes()


def test_delve_csv_name() -> None:
    assert delve_csv_name("mnist", "channelwise", "last_timestep", 0.99) == (
        "mnist_channelwise_last_timestep_t0.99.csv"
    )
    assert delve_csv_name("a", "mean", "timestepwise", 1.0) == "a_mean_timestepwise_t1.0.csv"
    assert delve_csv_name("a", "mean", "timestepwise", 0.9999999) == "a_mean_timestepwise_t0.9999999.csv"
    assert delve_csv_name("x/y z", "max", "last_timestep", None) == "x-y-z_max_last_timestep.csv"


def test_run_names_that_collide_after_sanitising_are_refused() -> None:
    rows = [
        ("a/b", 0, "train", "fc", "none", "none", 0.9, "lsat", 0.5),
        ("a b", 0, "train", "fc", "none", "none", 0.9, "lsat", 0.5),
    ]
    with pytest.raises(ValueError, match="would both write"):
        outputs.delve_tables(AnalysisResult(pd.DataFrame(rows, columns=list(TABLE_COLUMNS))))


# --------------------------------------------------------------------------- stats.csv


def test_stats_csv_exact_text_and_order(tmp_path: Path) -> None:
    write_outputs(tiny_result(), tmp_path, plots=False)
    assert (tmp_path / "stats.csv").read_text() == (
        "run,epoch,phase,layer,conv_method,timeseries_method,threshold,stat,value\n"
        "r,0,,,,,,epoch,0.0\n"
        "r,0,train,fc,channelwise,last_timestep,0.99,lsat,0.5\n"
        "r,0,train,fc,channelwise,last_timestep,0.99,idim,2.0\n"
        "r,0,train,fc,channelwise,last_timestep,,trc,0.30000000000000004\n"
        "r,0,eval,fc,channelwise,last_timestep,0.99,lsat,0.75\n"
        "r,0,eval,fc,channelwise,last_timestep,0.99,idim,3.0\n"
        "r,0,eval,fc,channelwise,last_timestep,,trc,2.0\n"
        "r,1,,,,,,epoch,1.0\n"
        "r,1,train,fc,channelwise,last_timestep,0.99,lsat,0.25\n"
        "r,1,train,fc,channelwise,last_timestep,0.99,idim,1.0\n"
        "r,1,train,fc,channelwise,last_timestep,,trc,1e-300\n"
        "r,1,eval,fc,channelwise,last_timestep,0.99,lsat,1.0\n"
        "r,1,eval,fc,channelwise,last_timestep,0.99,idim,4.0\n"
        "r,1,eval,fc,channelwise,last_timestep,,trc,0.3333333333333333\n"
    )


def test_stats_csv_does_not_depend_on_row_order_and_round_trips(tmp_path: Path) -> None:
    a, b = make_result(shuffle=1), make_result(shuffle=2)
    assert not a.table.equals(b.table)
    write_outputs(a, tmp_path / "a", plots=False)
    write_outputs(b, tmp_path / "b", plots=False)
    assert (tmp_path / "a" / "stats.csv").read_bytes() == (tmp_path / "b" / "stats.csv").read_bytes()
    back = pd.read_csv(tmp_path / "a" / "stats.csv", keep_default_na=False)
    expected = sorted_table(a)
    assert back["value"].astype(float).tolist() == expected["value"].tolist()
    # layers in first-seen order (conv, lstm, fc), not alphabetical
    first = back[(back.epoch == 0) & (back.phase == "train") & (back.stat == "trc")]
    assert first["layer"].tolist() == ["conv", "lstm", "fc"]


def test_sorted_table_rejects_a_table_without_the_columns() -> None:
    with pytest.raises(ValueError, match="lacks the column"):
        sorted_table(AnalysisResult(pd.DataFrame({"run": ["r"]})))


# --------------------------------------------------------------------------- determinism, atomicity


def test_rewrites_are_byte_identical(tmp_path: Path) -> None:
    small = {"stats": ("lsat", "trc"), "thresholds": (0.99,)}
    result = make_result(**small)
    write_outputs(result, tmp_path / "a")
    first = tree(tmp_path / "a")
    assert any(name.endswith(".png") for name in first)
    write_outputs(result, tmp_path / "a")  # over itself
    write_outputs(make_result(shuffle=7, **small), tmp_path / "b")  # another row order
    for other in (tree(tmp_path / "a"), tree(tmp_path / "b")):
        assert sorted(other) == sorted(first)
        for name, data in first.items():
            if name != "provenance.json":
                assert other[name] == data, name
    prov_a = json.loads(first["provenance.json"])
    prov_b = json.loads(tree(tmp_path / "b")["provenance.json"])
    assert prov_a["files"] == prov_b["files"]
    for name, data in first.items():
        if name.endswith(".csv"):
            assert not re.search(rb"\d{4}-\d\d-\d\dT\d\d:\d\d", data), name  # no timestamps


def test_no_temporary_files_are_left(tmp_path: Path) -> None:
    write_outputs(make_result(stats=("lsat",), thresholds=(0.99,)), tmp_path)
    assert (tmp_path / "plots").is_dir()
    hidden = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert hidden == []


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.csv"
    target.write_text("old")

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        outputs.atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.csv"]


def test_publish_leaves_nothing_behind_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("plotting failed")

    from analyze import plots

    monkeypatch.setattr(plots, "heatmap_png", broken)
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError, match="plotting failed"):
        publish_outputs(make_result(), out)
    assert not out.exists()
    assert list((tmp_path / "nested").iterdir()) == []

    # an earlier output folder stays as it was
    publish_outputs(make_result(), out, plots=False)
    before = tree(out)
    with pytest.raises(RuntimeError, match="plotting failed"):
        publish_outputs(make_result(stats=("lsat",)), out)
    assert tree(out) == before
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["out"]


def test_publish_replaces_an_earlier_output_as_a_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = publish_outputs(make_result(thresholds=(0.99, 0.9)), out, plots=False)
    assert all(p.parent == out for p in first["delve_csv"])
    publish_outputs(make_result(thresholds=(0.9,)), out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "net_channelwise_last_timestep_t0.9.csv",
        "provenance.json",
        "stats.csv",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_output_dir_refuses_foreign_folders(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"
    assert check_output_dir(tmp_path) == tmp_path  # empty
    (tmp_path / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an analysis output"):
        check_output_dir(tmp_path)
    with pytest.raises(FileExistsError, match="not a folder"):
        check_output_dir(tmp_path / "data.txt")
    with pytest.raises(FileExistsError):
        publish_outputs(make_result(), tmp_path, plots=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


# --------------------------------------------------------------------------- provenance


def test_provenance(tmp_path: Path) -> None:
    result = make_result()
    result.failures.append(LayerFailure("net", "bad", None, "boom"))
    result.nonfinite[("net", 1, "train", "fc", "channelwise", "last_timestep")] = 3
    result.options["nan_option"] = math.nan
    written = write_outputs(result, tmp_path, plots=False)
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert written["provenance"] == [tmp_path / "provenance.json"]
    assert prov["format"] == "delve-pipeline.analysis"
    assert prov["inputs"] == {"net": {"path": "/data/net.zarr", "content_hash": "abc123"}}
    assert prov["options"]["thresholds"] == [0.99, 0.9]
    assert prov["options"]["nan_option"] == "nan"
    for dist in ("delve-pipeline", "numpy", "pandas", "zarr", "dask", "matplotlib", "python"):
        assert prov["versions"][dist]
    assert prov["created"].startswith(str(pd.Timestamp.now(tz="UTC").year))
    assert prov["failures"] == [{"run": "net", "layer": "bad", "epoch": None, "error": "boom"}]
    assert prov["nonfinite_samples"][0]["count"] == 3
    assert prov["rows"] == len(result.table)
    files = {p.name: p for kind in ("stats", "delve_csv") for p in written[kind]}
    assert set(prov["files"]) == set(files)
    for name, path in files.items():
        assert prov["files"][name] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_to_jsonable() -> None:
    value = {("a", 1): (np.float64(1.5), np.int64(2), math.inf, {3}, np.arange(2), Path("/x"))}
    assert outputs.to_jsonable(value) == {"a/1": [1.5, 2, "inf", [3], [0, 1], "/x"]}


# --------------------------------------------------------------------------- plots


def test_plots_exist_and_are_valid_pngs(tmp_path: Path) -> None:
    from matplotlib import image
    from matplotlib import pyplot as plt

    open_before = plt.get_fignums()
    written = write_outputs(make_result(stats=("lsat", "idim", "trc"), thresholds=(0.99, 0.9)), tmp_path)
    names = sorted(p.name for p in written["plots"])
    stem = "net_channelwise_last_timestep"
    expected = []
    for kind in ("profile", "heatmap"):
        for phase in ("train", "eval"):
            for t in ("0.99", "0.9"):
                for stat in ("lsat", "idim"):
                    expected.append(f"{stem}_t{t}_{stat}_{phase}_{kind}.png")
            expected.append(f"{stem}_trc_{phase}_{kind}.png")
    expected += [f"{stem}_train_spectrum_epoch1.png", f"{stem}_eval_spectrum_epoch1.png"]
    assert names == sorted(expected)
    for path in written["plots"]:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        pixels = image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert plt.get_fignums() == open_before  # no pyplot figure was opened


def test_no_plots_when_asked(tmp_path: Path) -> None:
    written = write_outputs(make_result(), tmp_path, plots=False)
    assert written["plots"] == []
    assert not (tmp_path / "plots").exists()


def test_plot_functions_handle_nan_and_many_epochs() -> None:
    from analyze import plots

    epochs = list(range(30))
    values = np.linspace(0, 1, 30 * 3).reshape(30, 3)
    values[4, 1] = np.nan
    assert (
        plots.layer_profile_png(values, epochs, ["a", "b", "c"], "saturation", "t", (0, 1))[:8]
        == PNG_SIGNATURE
    )
    assert plots.heatmap_png(np.full((2, 2), np.nan), [0, 1], ["a", "b"], "x", "t")[:8] == PNG_SIGNATURE
    spectra = [np.zeros(3), np.logspace(0, -8, 200)]
    assert plots.spectrum_png(spectra, ["dead", "wide"], "t")[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="shape"):
        plots.heatmap_png(np.zeros((2, 3)), [0], ["a"], "x", "t")
