"""What a killed write leaves inside a run store does not disturb reading it, nor raise a warning.

zarr's local store writes every file through a temporary ``<name>.<id>.partial`` next to it and a
rename, so a process killed in the middle of a write leaves that temporary file behind; a process
killed while creating its rank group leaves the group's folder without its ``zarr.json``.
tests/test_reliability_capture.py kills real training processes at such points; here the leftovers
are made by hand, so that every one of them is present in every run of the test.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from analyze import run_stats
from capture import Recorder, open_run


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of a two-layer MLP, raw and gram."""
    path = tmp_path_factory.mktemp("leftovers") / "clean.zarr"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with Recorder(net, path, mode="both") as rec:
        for epoch in range(2):
            for _ in range(3):
                net(torch.randn(8, 5))
            rec.add_scalar("epoch", epoch)
            rec.end_epoch()
    return path


def _torn(path: Path) -> None:
    """The temporary file of an interrupted write of ``path`` (``zarr.json`` -> ``zarr.<id>.partial``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".3f2a9c.partial").write_bytes(b'{"zarr_format": 3, "node_')


@pytest.mark.parametrize(
    "where",
    ["root metadata", "rank metadata", "array metadata", "a rank folder without metadata", "all at once"],
)
def test_leftovers_of_a_killed_write_are_ignored(clean: Path, tmp_path: Path, where: str) -> None:
    store = tmp_path / "killed.zarr"
    shutil.copytree(clean, store)
    layer = open_run(clean).ranks[0].layers["0"].raw_array
    leftovers = {
        "root metadata": lambda: _torn(store / "zarr.json"),
        "rank metadata": lambda: _torn(store / "rank-00000" / "zarr.json"),
        "array metadata": lambda: _torn(store / "rank-00000" / layer / "zarr.json"),
        "a rank folder without metadata": lambda: _torn(store / "rank-00001" / "zarr.json"),
    }
    for name, make in leftovers.items():
        if where in (name, "all at once"):
            make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = open_run(store)
        table = run_stats(store, stats=("lsat", "trc"), progress=False)
    assert (run.epochs, run.incomplete_epoch, run.layers) == ([0, 1], None, ["0", "2"])
    expected = run_stats(clean, stats=("lsat", "trc"), progress=False)
    pd.testing.assert_frame_equal(table.drop(columns="run"), expected.drop(columns="run"), check_exact=True)
