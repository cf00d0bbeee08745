"""Faults and bad input during analysis.

- Damaged stores: a corrupted or truncated raw chunk, a truncated gram block, a missing raw or
  gram array, a missing calls array, mangled metadata, a store of another format or of a newer
  format version: one clear error naming the run, the layer, the epoch(s) and the chunk or block;
  with ``on_error="skip"`` (API and ``delve-analyze stats --on-error skip``) the other layers are
  analysed exactly as from an intact store and the failure is listed (``result.failures``; the
  CLI's stderr and ``provenance.json``).
- A store still being written (capture paused mid-epoch, or running, in a thread): only committed
  epochs are analysed, with a clean run's numbers; the open epoch is reported as incomplete.
- Bad options through the command line: exit status 2, one line on stderr, nothing written.
- NaN / Inf activations, an all-zero layer, a single sample, layers too wide to analyse.
- Concurrent analyses into one output folder and one covariance cache.

``docs/reliability.md`` sums up what is tried and what happens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import delve_analyze, invoke
from torch import nn

from analyze import AnalysisError, analyze_runs, inspect_run, run_stats
from analyze.api import MAX_WIDTH
from analyze.outputs import publish_outputs
from analyze.reduce import ChunkReadError
from capture import CaptureError, Recorder, StoreFormatError, open_run
from capture.recorder import MAX_GRAM_WIDTH

STATS = ("lsat", "idim", "trc")
EPOCHS = 3
LAYERS = ("conv", "fc1", "fc2")


class Net(nn.Module):
    """Conv2d(1->3, 3x3, padding 1) on 4x4 maps -> ReLU -> Linear(48->5) -> ReLU -> Linear(5->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc1 = nn.Linear(48, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def capture(
    path: str | Path,
    epochs: int = EPOCHS,
    step: Callable[[int, int], None] | None = None,
) -> None:
    """A deterministic run: per epoch four training batches and one evaluation batch of 8 samples."""
    torch.manual_seed(0)
    net = Net()
    # lz4: a garbage raw chunk is then detectable (a Blosc frame); uncompressed zeros would be valid data
    with Recorder(net, path, mode="both", chunk_bytes=512, gram_block_rows=16, compression="lz4") as rec:
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(epoch)
            net.train()
            for i in range(4):
                net(torch.randn(8, 1, 4, 4, generator=g))
                if step is not None:
                    step(epoch, i)
            net.eval()
            with torch.no_grad():
                net(torch.randn(8, 1, 4, 4, generator=g))
            rec.add_scalar("epoch_seconds", 0.5 * epoch)
            rec.end_epoch()


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    capture(path)
    return str(path)


def rows(
    table: pd.DataFrame, epochs: list[int] | None = None, layers: tuple[str, ...] | None = None
) -> pd.DataFrame:
    """The table without its run name, restricted and in a canonical order."""
    keep = np.ones(len(table), dtype=bool)
    if epochs is not None:
        keep &= table["epoch"].isin(epochs).to_numpy()
    if layers is not None:
        keep &= table["layer"].isin(layers).to_numpy()
    keys = ["epoch", "phase", "layer", "conv_method", "timeseries_method", "stat", "threshold"]
    out = table[keep].drop(columns="run").sort_values(keys, kind="mergesort").reset_index(drop=True)
    return out.astype({"value": "float64"})


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert len(got) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def stats_of(store: str, **kwargs: Any) -> pd.DataFrame:
    return run_stats(store, stats=STATS, progress=False, **kwargs)


# -- damaged stores --------------------------------------------------------------------------------


def _chunk_files(store: Path, array: str) -> list[Path]:
    root = store / "rank-00000" / array
    return sorted((p for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"), key=str)


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(len(path.read_bytes())))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


#: name -> (layer, source, damage(store), what the error names besides run and layer)
DAMAGE: dict[str, tuple[str, str, Callable[[Path], None], str]] = {
    "garbage raw chunk": (
        "conv",
        "raw",
        lambda s: _garbage(_chunk_files(s, "layers/conv/raw")[1]),
        r"epoch\(s\) \[0, 1, 2\]: reading chunks .* failed: ChunkChecksumError: .*array "
        r"'rank-00000/layers/conv/raw', chunk 1: .* the chunk is damaged",
    ),
    "truncated raw chunk": (
        "fc1",
        "raw",
        lambda s: _truncate(_chunk_files(s, "layers/fc1/raw")[0]),
        r"epoch\(s\) \[0, 1, 2\]: reading chunks .* failed: ChunkChecksumError: .*array "
        r"'rank-00000/layers/fc1/raw', chunk 0: .* the chunk is damaged",
    ),
    "truncated gram block": (
        "fc1",
        "gram",
        lambda s: _truncate(_chunk_files(s, "layers/fc1/gram/none/m2")[1]),
        r"epoch 0, train: reading 'none' gram blocks \[0, 1\]",
    ),
    "missing raw array": (
        "conv",
        "raw",
        lambda s: shutil.rmtree(s / "rank-00000/layers/conv/raw"),
        r"epoch\(s\) \[0, 1, 2\]: its stored arrays cannot be opened .*layers/conv/raw",
    ),
    "missing gram array": (
        "fc2",
        "gram",
        lambda s: shutil.rmtree(s / "rank-00000/layers/fc2/gram/none/mean"),
        r"epoch\(s\) \[0, 1, 2\]: the 'none' gram blocks of rank 0 cannot be read: .*gram/none/mean",
    ),
}


@pytest.fixture
def damaged(clean: str, tmp_path: Path) -> Callable[[str], Path]:
    def make(kind: str) -> Path:
        store = tmp_path / f"{kind.replace(' ', '-')}.zarr"
        shutil.copytree(clean, store)
        DAMAGE[kind][2](store)
        return store

    return make


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_layer_raises_a_clear_error(kind: str, damaged: Callable[[str], Path]) -> None:
    layer, source, _, names = DAMAGE[kind]
    store = damaged(kind)
    with pytest.raises(ChunkReadError) as info:
        stats_of(str(store), source=source)
    message = str(info.value)
    assert message.startswith(f"{store}: layer {layer!r}: "), message
    assert re.search(names, message), message
    assert "\n" not in message


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_layer_is_skipped_and_listed(kind: str, damaged: Callable[[str], Path], clean: str) -> None:
    layer, source, _, _ = DAMAGE[kind]
    store = damaged(kind)
    result = analyze_runs(str(store), stats=STATS, source=source, on_error="skip", progress=False)
    assert [(f.layer, f.error.split(":")[0]) for f in result.failures] == [(layer, "ChunkReadError")]
    others = tuple(n for n in LAYERS if n != layer)
    assert layer not in set(result.table["layer"])
    want = stats_of(clean, source=source)
    assert_same(rows(result.table, layers=others), rows(want, layers=others))
    # the recorded scalars still come back
    assert set(result.table.loc[result.table["phase"] == "", "stat"]) == {"epoch_seconds"}


def test_damaged_layer_through_the_cli(damaged: Callable[[str], Path], clean: str, tmp_path: Path) -> None:
    """The installed console script: an error line (exit 1), or with --on-error skip, a report."""
    store = damaged("garbage raw chunk")
    out = tmp_path / "out"
    runs = [
        [*delve_analyze(), "stats", str(store), "-o", str(out), "--no-plots", "--stats", "lsat,idim,trc", "--source", "raw"],
        [*delve_analyze(), "stats", str(store), "-o", str(out), "--no-plots", "--stats", "lsat,idim,trc",
         "--source", "raw", "--on-error", "skip"],
    ]  # fmt: skip
    failed = subprocess.run(runs[0], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stderr
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"Error: {store}: layer 'conv': epoch(s) [0, 1, 2]: reading chunks "), line
    assert not out.exists()
    skipped = subprocess.run(runs[1], capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    (warning,) = skipped.stderr.strip().splitlines()
    assert warning.startswith(f"Warning: skipped {store.stem} layer 'conv': ChunkReadError: ")
    provenance = json.loads((out / "provenance.json").read_text())
    assert [(f["run"], f["layer"]) for f in provenance["failures"]] == [(store.stem, "conv")]
    assert "ChunkReadError" in provenance["failures"][0]["error"]
    table = pd.read_csv(out / "stats.csv", keep_default_na=False)
    table["threshold"] = pd.to_numeric(table["threshold"])
    want = stats_of(clean, source="raw")
    got = table[table["phase"] != ""].assign(value=lambda t: t["value"].astype(float))
    assert_same(rows(got, layers=("fc1", "fc2")), rows(want, layers=("fc1", "fc2")))


def _newer(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["delve_pipeline"]["format_version"] = 99
    (store / "zarr.json").write_text(json.dumps(meta))


def _other_format(store: Path) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["delve_pipeline"]["format"] = "someone-else.run"
    (store / "zarr.json").write_text(json.dumps(meta))


#: name -> (make the bad store from a copy of a clean one, exception, message pattern)
BAD_STORES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "newer format version": (_newer, StoreFormatError, "store format version 99 is newer than this package"),
    "another format": (_other_format, StoreFormatError, "not a delve-pipeline run store"),
    "plain zarr group": (
        lambda s: (shutil.rmtree(s), zarr.open_group(s, mode="w")),
        StoreFormatError,
        "not a delve-pipeline run store",
    ),
    "folder of other files": (
        lambda s: (shutil.rmtree(s), s.mkdir(), (s / "notes.txt").write_text("hi")),
        StoreFormatError,
        "not a zarr v3 group",
    ),
    "a file": (lambda s: (shutil.rmtree(s), s.write_text("x")), StoreFormatError, "not a zarr v3 group"),
    "nothing": (shutil.rmtree, FileNotFoundError, "no run store here"),
    "mangled rank metadata": (
        lambda s: (s / "rank-00000" / "zarr.json").write_text("{not json"),
        StoreFormatError,
        "unreadable group metadata",
    ),
    "missing calls array": (
        lambda s: shutil.rmtree(s / "rank-00000" / "calls"),
        StoreFormatError,
        "rank-00000: its state or its calls array cannot be read",
    ),
    "rank group without state": (
        lambda s: (s / "rank-00000" / "zarr.json").write_text(
            json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
        ),
        StoreFormatError,
        "a rank group without its 'delve_pipeline' attribute",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_STORES))
def test_bad_store(kind: str, clean: str, tmp_path: Path) -> None:
    make, error, pattern = BAD_STORES[kind]
    store = tmp_path / "bad.zarr"
    shutil.copytree(clean, store)
    make(store)
    with pytest.raises(error, match=pattern) as info:
        stats_of(str(store))
    assert str(info.value).startswith(str(store)) and "\n" not in str(info.value)
    result = invoke("stats", str(store), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {store}") and re.search(pattern, line), line
    assert not (tmp_path / "out").exists()


# -- a store still being written -------------------------------------------------------------------


def test_store_being_written(clean: str, tmp_path: Path) -> None:
    """Capture paused in the middle of epoch 1 in a thread: epoch 0 analyses as the clean run's."""
    store = tmp_path / "live.zarr"
    reached, go = threading.Event(), threading.Event()

    def step(epoch: int, i: int) -> None:
        if (epoch, i) == (1, 2):
            reached.set()
            go.wait(60)

    thread = threading.Thread(target=capture, args=(store,), kwargs={"step": step})
    thread.start()
    try:
        assert reached.wait(60)
        time.sleep(0.2)  # let the writer open epoch 1 on disk
        run = open_run(store)
        assert (run.epochs, run.incomplete_epoch) == ([0], 1)
        assert inspect_run(store)["incomplete_epoch"] == 1
        shown = invoke("inspect", str(store))
        assert shown.exit_code == 0 and "incomplete epoch: 1 (not analysed)" in shown.output
        for source in ("raw", "gram"):
            assert_same(rows(stats_of(str(store), source=source)), rows(stats_of(clean, source=source), [0]))
        with pytest.raises(AnalysisError, match=r"epoch\(s\) \[1\] out of range; complete epochs are 0-0"):
            stats_of(str(store), epochs="1")
    finally:
        go.set()
        thread.join(60)
    for source in ("raw", "gram"):
        assert_same(rows(stats_of(str(store), source=source)), rows(stats_of(clean, source=source)))


def test_analysis_while_capture_appends(clean: str, tmp_path: Path) -> None:
    """Analyses (with a cache and published outputs) in a loop while a thread captures."""
    store, out, cache = tmp_path / "live.zarr", tmp_path / "out", tmp_path / "cache"
    first_analysis = threading.Event()

    def step(epoch: int, i: int) -> None:
        if (epoch, i) == (1, 0):  # the first analysis certainly runs while capture goes on
            first_analysis.wait(60)
        time.sleep(0.03)

    thread = threading.Thread(target=capture, args=(store,), kwargs={"step": step})
    thread.start()
    want = {source: rows(stats_of(clean, source=source)) for source in ("raw", "gram")}
    seen = []
    while thread.is_alive() or not seen:
        try:
            ready = bool(open_run(store).epochs)
        except (FileNotFoundError, StoreFormatError):  # not created yet
            ready = False
        if not ready:
            assert thread.is_alive()
            time.sleep(0.05)
            continue
        source = ("raw", "gram")[len(seen) % 2]
        result = analyze_runs(str(store), stats=STATS, source=source, cache_dir=cache, progress=False)
        epochs = sorted(set(result.table["epoch"]))
        seen.append((source, epochs))
        assert_same(
            rows(result.table), want[source][want[source]["epoch"].isin(epochs)].reset_index(drop=True)
        )
        publish_outputs(result, out, plots=False)
        first_analysis.set()
    thread.join(60)
    assert len(seen) >= 2 and seen[0][1] == [0], seen
    result = analyze_runs(str(store), stats=STATS, cache_dir=cache, progress=False)
    assert_same(rows(result.table), want["gram"])
    _assert_cache_intact(cache)
    _assert_output_intact(out)


# -- bad options through the command line ----------------------------------------------------------

#: (arguments after ``stats RUN -o OUT`` with ``{out}`` standing for OUT, fragments of the one-line
#: message, separated by ``|``)
BAD_OPTIONS = [
    (["--threshold", "0"], "'0'|(0, 1]"),
    (["--threshold", "1.5"], "'1.5'|(0, 1]"),
    (["--threshold", "-0.2"], "'-0.2'|(0, 1]"),
    (["--threshold", "nan"], "'nan'|(0, 1]"),
    (["--threshold", "abc"], "'abc'|(0, 1]"),
    (["--threshold", "0.9", "--threshold", "0.9"], "duplicate thresholds"),
    (["--stats", "lsat,bogus"], "unknown statistic 'bogus'"),
    (["--stats", ","], "name at least one statistic"),
    (["--conv-method", "bogus"], "'--conv-method': unknown conv method 'bogus'; valid values are: channelwise"),
    (["--timeseries-method", "bogus"], "unknown time-series method 'bogus'"),
    (["--phase", "test"], "'--phase': unknown phase 'test'; valid values are: train, eval"),
    (["--compat", "delve-9"], "'--compat': unknown value 'delve-9'"),
    (["--scheduler", "bogus"], "is neither one of"),
    (["--source", "bogus"], "'--source': unknown value 'bogus'; valid values are: auto, raw, gram"),
    (["--epochs", "7"], "epoch(s) [7] out of range; complete epochs are 0-2"),
    (["--epochs", "1-9"], "out of range; complete epochs are 0-2"),
    (["--epochs", "-5"], "epoch(s) [-5] out of range"),
    (["--epochs", "x"], "'--epochs': cannot read 'x'"),
    (["--layers", "nomatch*"], "layers: 'nomatch*' matches no layer; layers are: conv, fc1, fc2"),
    (["--layers", "conv", "--layers", "zzz"], "'zzz' matches no layer"),
    (["--interpolation", "bilinear"], "'--downsample': interpolation 'bilinear' needs a target size"),
    (["--downsample", "0"], "'--downsample': must be a positive integer, got 0"),
    (["--log-interval", "0"], "'--log-interval': must be a positive integer, got 0"),
    (["--max-samples", "-3"], "'--max-samples': must be a positive integer, got -3"),
    (["--device", "tpu"], "'--device': must be 'cpu', 'cuda' or 'cuda:i', got 'tpu'"),
    (["--cache-dir", "{out}/cache"], "'--cache-dir'|is inside the output folder"),
    (["--source", "gram", "--conv-method", "max"], "the store holds no gram moments for max"),
    (["--no-such-option"], "No such option|--no-such-option"),
]


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.mark.parametrize("args, fragment", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option(args: list[str], fragment: str, clean: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [a.format(out=out) for a in args]
    result = invoke("stats", clean, "-o", str(out), *args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and all(f in line for f in fragment.split("|")), line
    assert _leftovers(tmp_path, set()) == []  # no output folder, staging folder or cache


def test_bad_output_folder(clean: str, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("keep me")
    result = invoke("stats", clean, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "not an analysis output" in line
    assert sorted(os.listdir(tmp_path / "out")) == ["thesis.tex"] and _leftovers(tmp_path, {"out"}) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--threshold", "1.5"], "'1.5'|(0, 1]"),
        (["--layers", "nomatch*"], "'nomatch*' matches no layer"),
    ],
)
def test_bad_option_console_script(args: list[str], fragment: str, clean: str, tmp_path: Path) -> None:
    """The same through the installed ``delve-analyze`` (a fresh process)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [*delve_analyze(), "stats", clean, "-o", str(out), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and all(f in line for f in fragment.split("|")), line
    assert _leftovers(tmp_path, set()) == []


# -- odd values ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Epoch 0: ``nonfinite`` sees NaN / Inf in 3 of 16 samples, ``zero`` is all zeros, ``plain`` is normal.
    Epoch 1: a single sample per layer."""
    path = tmp_path_factory.mktemp("odd") / "odd.zarr"
    torch.manual_seed(0)
    layers = {"nonfinite": nn.Linear(4, 3), "zero": nn.Linear(4, 3), "plain": nn.Linear(4, 3)}
    with torch.no_grad():
        layers["zero"].weight.zero_()
        layers["zero"].bias.zero_()
    with Recorder(layers, path, mode="both") as rec:
        for n in (16, 1):
            x = torch.randn(n, 4, generator=torch.Generator().manual_seed(n))
            bad = x.clone()
            if n > 1:
                bad[3, 1], bad[5, 0], bad[9, 2] = float("nan"), float("inf"), -float("inf")
            layers["nonfinite"](bad)
            layers["zero"](x)
            layers["plain"](x)
            rec.end_epoch()
    return str(path)


@pytest.mark.parametrize("source", ["raw", "gram"])
def test_odd_values(odd: str, source: str) -> None:
    with pytest.warns(RuntimeWarning, match=r"layer 'nonfinite', epoch 0, train: 3 sample\(s\) with NaN/Inf"):
        result = analyze_runs(odd, stats=STATS, source=source, progress=False)
    t = result.table.set_index(["epoch", "layer", "stat"])["value"]
    assert all(np.isnan(t[(0, "nonfinite", s)]) for s in STATS)
    assert list(result.nonfinite.values()) == [3]
    assert [t[(0, "zero", s)] for s in STATS] == [0.0, 0.0, 0.0]  # nothing varies: no dimension used
    assert all(t[(1, layer, "trc")] == 0.0 for layer in ("nonfinite", "zero", "plain"))  # one sample
    assert all(t[(1, layer, "lsat")] == 0.0 for layer in ("nonfinite", "zero", "plain"))
    assert 0 < t[(0, "plain", "lsat")] <= 1 and t[(0, "plain", "trc")] > 0


def test_odd_values_sources_agree_and_cli_reports_them(odd: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        raw, gram = (rows(stats_of(odd, source=s)) for s in ("raw", "gram"))
    finite = np.isfinite(raw["value"]) & np.isfinite(gram["value"])
    assert (np.isnan(raw["value"]) == np.isnan(gram["value"])).all()
    np.testing.assert_allclose(raw["value"][finite], gram["value"][finite], rtol=1e-9, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        result = invoke("stats", odd, "-o", str(tmp_path / "out"), "--no-plots")
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert [(n["layer"], n["epoch"], n["count"]) for n in provenance["nonfinite_samples"]] == [
        ("nonfinite", 0, 3)
    ]


class Wide(nn.Module):
    """A conv whose flattened maps are 12800 wide, and a Linear 9000 wide."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.wide = nn.Linear(4, MAX_WIDTH + 808)
        self.small = nn.Linear(4, 3)

    def forward(self, maps: torch.Tensor, x: torch.Tensor) -> None:
        self.conv(maps)
        self.wide(x)
        self.small(x)


def test_too_wide_to_analyse(tmp_path: Path) -> None:
    store = str(tmp_path / "wide.zarr")
    torch.manual_seed(0)
    net = Wide()
    with Recorder(net, store) as rec:
        net(torch.randn(4, 1, 40, 40), torch.randn(4, 4))
        rec.end_epoch()
    with pytest.raises(
        AnalysisError, match=r"layer 'conv': the 'flatten' matrix is 12800 columns wide.*--downsample"
    ):
        stats_of(store, conv_methods="flatten")
    with pytest.raises(
        AnalysisError, match=r"layer 'wide': the 'none' matrix is 9000 columns wide.*leave the layer out"
    ):
        stats_of(store, layers="wide")
    result = analyze_runs(store, stats=STATS, conv_methods="flatten", on_error="skip", progress=False)
    assert sorted(f.layer for f in result.failures) == ["conv", "wide"]
    assert set(result.table["layer"]) == {"small"}
    downsampled = stats_of(
        store, conv_methods="flatten", interpolation="bilinear", downsample=8, layers="conv"
    )
    assert set(downsampled["stat"]) == set(STATS) and np.isfinite(downsampled["value"]).all()
    cli_run = invoke("stats", store, "-o", tmp_path / "out", "--conv-method", "flatten")
    assert cli_run.exit_code == 2
    (line,) = cli_run.stderr.strip().splitlines()
    assert "12800 columns wide" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["gram", "both"])
def test_too_wide_to_capture_in_gram_mode(tmp_path: Path, mode: str) -> None:
    store = str(tmp_path / "wide.zarr")
    net = Wide()
    rec = Recorder(net, store, mode=mode, conv_methods=("flatten",))
    with pytest.raises(
        CaptureError,
        match=rf"layer 'conv': the 'flatten' matrix is 12800 wide.*limit {MAX_GRAM_WIDTH}.*downsample",
    ):
        net(torch.randn(2, 1, 40, 40), torch.randn(2, 4))
    rec.close()
    run = open_run(store)
    assert run.epochs == [] and run.layers == []


# -- concurrent analyses ---------------------------------------------------------------------------


def _assert_cache_intact(cache: Path) -> None:
    """Every cache entry is a whole ``.npz`` that loads; no temporary file is left."""
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and all(p.suffix == ".npz" and not p.name.startswith(".") for p in files), files
    for p in files:
        with np.load(p, allow_pickle=False) as z:
            for k in z.files:
                z[k]  # noqa: B018 - reads (and so checks) the array


def _assert_output_intact(out: Path) -> None:
    """Every file matches its hash in provenance.json; no staging or swapped-out folder is left."""
    provenance = json.loads((out / "provenance.json").read_text())
    for name, digest in provenance["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert not [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]


def test_two_analyses_into_one_folder_threads(clean: str, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    reference = tmp_path / "reference"
    publish_outputs(analyze_runs(clean, stats=STATS, progress=False), reference, plots=False)
    errors: list[BaseException] = []

    def analyse(barrier: threading.Barrier) -> None:
        result = analyze_runs(clean, stats=STATS, cache_dir=cache, progress=False)
        barrier.wait()
        try:
            publish_outputs(result, out, plots=False)
        except FileExistsError as exc:  # the other one swapped its folder in between: a clear refusal
            errors.append(exc)

    for _ in range(4):
        barrier = threading.Barrier(2)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(analyse, [barrier, barrier]))
        _assert_output_intact(out)
        assert (out / "stats.csv").read_bytes() == (reference / "stats.csv").read_bytes()
    assert all("another analysis published to this folder" in str(e) for e in errors)
    _assert_cache_intact(cache)


def test_two_analyses_into_one_folder_forced_race(
    clean: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other analysis lands between this one's check and its rename: a one-line refusal."""
    out = tmp_path / "out"
    result = analyze_runs(clean, stats=STATS, progress=False)
    original = os.replace
    armed = {"on": True}

    def replace(src: Any, dst: Any) -> None:
        if armed["on"] and os.path.basename(str(src)).startswith(".out.partial-"):
            armed["on"] = False
            publish_outputs(result, out, plots=False)
        original(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for _ in ("out absent", "out present"):
        armed["on"] = True
        with pytest.raises(FileExistsError, match="another analysis published to this folder"):
            publish_outputs(result, out, plots=False)
        _assert_output_intact(out)
    assert _leftovers(tmp_path, {"out"}) == []


def test_two_analyses_into_one_folder_processes(clean: str, tmp_path: Path) -> None:
    """Two ``delve-analyze stats`` processes into one folder (and its default cache) at once."""
    out = tmp_path / "out"
    command = [*delve_analyze(), "stats", clean, "-o", str(out), "--no-plots", "--stats", "lsat,idim,trc"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outcomes = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)  # reads and closes both pipes
        outcomes.append((proc.returncode, err))
    for code, err in outcomes:
        assert code == 0 or (code == 2 and "another analysis published" in err and err.count("\n") == 1), err
    assert any(code == 0 for code, _ in outcomes)
    _assert_output_intact(out)
    reference = tmp_path / "reference"
    publish_outputs(analyze_runs(clean, stats=STATS, progress=False), reference, plots=False)
    assert (out / "stats.csv").read_bytes() == (reference / "stats.csv").read_bytes()
    _assert_cache_intact(tmp_path / "out.cache")
