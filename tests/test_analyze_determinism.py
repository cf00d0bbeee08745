"""Reproducibility of the analysis.

* raw and gram stores of the same training give the same numbers;
* a re-run with other thresholds or scalar statistics and a ``cache_dir`` reads no activation;
* the numbers are bit-for-bit the same whatever the scheduler (synchronous, threads, processes,
  a ``dask.distributed`` cluster) and the task size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from analyze import AnalysisResult, analyze_runs, write_outputs
from analyze import reduce as reduce_module
from analyze.outputs import delve_csv_name
from capture import Recorder, open_run

ALL_CONV = ("channelwise", "mean", "max", "median", "flatten")
ALL_TS = ("last_timestep", "timestepwise")
SCALARS = ("lsat", "idim", "trc", "dtrc", "det", "logdet", "pr", "erank")
ANALYSIS: dict[str, Any] = {
    "thresholds": (0.9, 0.99, 1.0),
    "conv_methods": ALL_CONV,
    "timeseries_methods": ALL_TS,
    "stats": (*SCALARS, "spectrum"),
    "progress": False,
}
#: The methods of the separate gram store (fewer than the "both" store's: gram capture costs time).
SEPARATE = (("channelwise", "median"), ("timestepwise",))
KEY_COLUMNS = ["epoch", "phase", "layer", "conv_method", "timeseries_method", "threshold", "stat"]


@dataclass
class Stores:
    both: str  # mode="both"
    raw: str  # mode="raw", small chunks
    gram: str  # mode="gram", small blocks


@pytest.fixture(scope="module", autouse=True)
def small_leaves() -> Any:
    """Leaves of two 4 KiB chunks: the tree has many leaves here, each of several chunks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reduce_module, "LEAF_BYTES", 8 * 2**10)
        yield


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, mixed_net: Any) -> Stores:
    """MixedNet (a strided Conv2d, a Conv1d, a bidirectional LSTM, a GRU, Linear layers on 3-D and 2-D
    inputs) trained 2 epochs, recorded by three Recorders at once."""
    root = tmp_path_factory.mktemp("determinism")
    net = mixed_net(0)
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    paths = Stores(str(root / "both.zarr"), str(root / "raw.zarr"), str(root / "gram.zarr"))
    methods = {"conv_methods": ALL_CONV, "timeseries_methods": ALL_TS}
    with (
        Recorder(net, paths.both, mode="both", chunk_bytes=4096, gram_block_rows=20, **methods) as both,
        Recorder(net, paths.raw, mode="raw", chunk_bytes=512) as raw,
        Recorder(
            net,
            paths.gram,
            mode="gram",
            gram_block_rows=7,
            conv_methods=SEPARATE[0],
            timeseries_methods=SEPARATE[1],
        ) as gram,
    ):
        for epoch in range(2):
            net.train()
            for b in (16, 16, 16, 9):
                loss = net(torch.randn(b, 1, 8, 8, generator=gen)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                for b in (12, 12):
                    net(torch.randn(b, 1, 8, 8, generator=gen))
            for rec in (both, raw, gram):
                rec.add_scalar("epoch", epoch)
                rec.end_epoch()
    return paths


# --------------------------------------------------------------------------- raw == gram


def _singular(spectrum: np.ndarray) -> bool:
    return bool(spectrum[-1] <= 1e-9 * spectrum[0])


def assert_same_numbers(a: AnalysisResult, b: AnalysisResult, rtol: float) -> None:
    """Same rows and values to ``rtol``; det / logdet of a singular covariance are round-off on both sides."""
    ta, tb = a.table.reset_index(drop=True), b.table.reset_index(drop=True)
    pd.testing.assert_frame_equal(ta[KEY_COLUMNS], tb[KEY_COLUMNS])
    (run_a,), (run_b,) = set(ta["run"]), set(tb["run"])
    spectra = {k[1:]: v for k, v in a.spectra.items()}
    bad = []
    for row, vb in zip(ta.itertuples(index=False), tb["value"], strict=True):
        va = row.value
        if row.layer == "":
            ok = va == vb
        elif row.stat in ("det", "logdet") and _singular(lam := spectra[row[1:6]]):
            # |det| <= (smallest eigenvalue + round-off) * largest^(d-1): tiny on both sides
            bound = math.log(1e-8) + len(lam) * math.log(lam[0])
            logs = [v if row.stat == "logdet" else math.log(abs(v)) if v else -math.inf for v in (va, vb)]
            ok = all(v <= bound for v in logs)
        else:
            ok = va == vb or abs(va - vb) <= rtol * abs(vb)
        if not ok:
            bad.append(f"{row[1:8]}: {va!r} != {vb!r}")
    assert not bad, "\n".join(bad[:20])
    assert {k[1:] for k in a.spectra} == {k[1:] for k in b.spectra}
    for key, lam in a.spectra.items():
        other = b.spectra[(run_b, *key[1:])]
        np.testing.assert_allclose(lam, other, rtol=0, atol=rtol * lam[0] * len(lam), err_msg=str(key))
    assert run_a and run_b


@pytest.mark.parametrize("pair", ["both-store", "separate-stores"])
def test_raw_and_gram_stores_give_the_same_results(stores: Stores, pair: str) -> None:
    if pair == "both-store":
        a = analyze_runs(stores.both, source="raw", **ANALYSIS)
        b = analyze_runs(stores.both, source="gram", **ANALYSIS)
        assert len(a.table) == 2 * 2 * 6 * 5 * 2 * 12 + 2  # epochs, phases, layers, conv, ts, values; scalars
    else:
        methods = {"conv_methods": SEPARATE[0], "timeseries_methods": SEPARATE[1]}
        a = analyze_runs(stores.raw, **{**ANALYSIS, **methods})
        b = analyze_runs(stores.gram, **{**ANALYSIS, **methods})
    assert_same_numbers(a, b, rtol=1e-10)


# --------------------------------------------------------------------------- cache


def test_cached_rerun_reads_no_activation_chunks(stores: Stores, tmp_path: Path) -> None:
    reads = reduce_module.chunk_reads
    cache = tmp_path / "cache"
    common = {"timeseries_methods": ALL_TS, "scheduler": "threads", "progress": False}

    reads.update(tasks=0, rows=0)
    analyze_runs(stores.raw, thresholds=0.99, stats=("lsat", "idim"), cache_dir=cache, **common)
    assert reads["tasks"] > 0 and reads["rows"] > 0

    # New thresholds and other scalar statistics: every covariance comes from the cache.
    again_args = {"thresholds": (0.5, 0.9, 1.0), "stats": (*SCALARS, "spectrum"), **common}
    reads.update(tasks=0, rows=0)
    again = analyze_runs(stores.raw, cache_dir=cache, **again_args)
    assert reads == {"tasks": 0, "rows": 0}
    fresh = analyze_runs(stores.raw, **again_args)
    pd.testing.assert_frame_equal(again.table, fresh.table, check_exact=True)
    assert again.spectra.keys() == fresh.spectra.keys()
    assert all(np.array_equal(again.spectra[k], fresh.spectra[k]) for k in fresh.spectra)

    # Another conv method: only the conv layers are read again, each row once.
    run = open_run(stores.raw)
    conv_rows = sum(run.ranks[0].raw(layer).rows for layer in ("conv2d", "conv1d"))
    reads.update(tasks=0, rows=0)
    more = analyze_runs(stores.raw, conv_methods=("channelwise", "mean"), cache_dir=cache, **again_args)
    assert reads["rows"] == conv_rows
    fresh_more = analyze_runs(stores.raw, conv_methods=("channelwise", "mean"), **again_args)
    pd.testing.assert_frame_equal(more.table, fresh_more.table, check_exact=True)

    reads.update(tasks=0, rows=0)
    analyze_runs(stores.raw, conv_methods=("mean", "channelwise"), cache_dir=cache, **again_args)
    assert reads == {"tasks": 0, "rows": 0}


# --------------------------------------------------------------------------- schedulers and task sizes


@dataclass
class Baseline:
    result: AnalysisResult
    files: dict[str, bytes]


def output_files(result: AnalysisResult, folder: Path) -> dict[str, bytes]:
    """The bytes of ``write_outputs``' files (``provenance.json`` holds a timestamp: left out)."""
    write_outputs(result, folder, plots=False)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "provenance.json"}


def assert_identical(base: Baseline, result: AnalysisResult, folder: Path) -> None:
    pd.testing.assert_frame_equal(base.result.table, result.table, check_exact=True)
    assert base.result.spectra.keys() == result.spectra.keys()
    for key, lam in base.result.spectra.items():
        assert np.array_equal(lam, result.spectra[key]), key
    files = output_files(result, folder)
    assert files.keys() == base.files.keys()
    for name, data in base.files.items():
        assert files[name] == data, name


@pytest.fixture(scope="module")
def baseline(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    reduce_module.chunk_reads.update(tasks=0, rows=0)
    result = analyze_runs(stores.raw, scheduler="synchronous", task_bytes=64 * 2**20, **ANALYSIS)
    assert reduce_module.chunk_reads["tasks"] == 6  # one task per layer reads all of its chunks
    files = output_files(result, tmp_path_factory.mktemp("baseline"))
    (run,) = result.layer_order
    delve_csvs = {
        delve_csv_name(run, conv, ts, threshold)
        for conv in ALL_CONV
        for ts in ALL_TS
        for threshold in ANALYSIS["thresholds"]
    }
    assert set(files) == {"stats.csv", *delve_csvs}
    assert all(data.count(b"\n") > 1 for data in files.values())  # a header and rows in every file
    return Baseline(result, files)


@pytest.mark.parametrize(
    ("scheduler", "task_bytes"),
    [
        ("synchronous", 4 * 2**10),
        ("threads", 4 * 2**10),
        ("threads", 64 * 2**10),
        ("threads", 64 * 2**20),
        ("processes", 16 * 2**20),
    ],
)
def test_identical_across_schedulers_and_task_sizes(
    stores: Stores, baseline: Baseline, tmp_path: Path, scheduler: str, task_bytes: int
) -> None:
    reduce_module.chunk_reads.update(tasks=0, rows=0)
    result = analyze_runs(stores.raw, scheduler=scheduler, task_bytes=task_bytes, **ANALYSIS)
    if task_bytes == 4 * 2**10 and scheduler != "processes":
        assert reduce_module.chunk_reads["tasks"] > 20  # many small tasks (leaves of 2 chunks)
    assert_identical(baseline, result, tmp_path)


def test_identical_on_a_distributed_cluster(stores: Stores, baseline: Baseline, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster:
        for task_bytes in (4 * 2**10, 64 * 2**20):
            result = analyze_runs(
                stores.raw, scheduler=cluster.scheduler_address, task_bytes=task_bytes, **ANALYSIS
            )
            assert_identical(baseline, result, tmp_path / str(task_bytes))
