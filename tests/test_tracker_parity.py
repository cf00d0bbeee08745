"""``SaturationTracker(semantics="delve-0.1.50")`` against delve 0.1.50 itself, on the same runs.

Each case trains a seeded model on seeded data twice, once under delve's tracker and once under
this package's, with the same batches, and compares what they wrote: the CSV (same columns in
the same order, values within a relative 1e-9, determinants within 1e-6), the npy folder (the
same file names, the same values) and the exact sequence of writer calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OracleNet
from torch import nn

from pipelines import AbstractWriter, SaturationTracker

delve_tc = pytest.importorskip("delve.torchcallback")
delve_writers = pytest.importorskip("delve.writers")

ALL_STATS = ["lsat", "idim", "trc", "dtrc", "det", "cov"]


# Tiny models run many times faster on one thread than on several competing ones.
pytestmark = pytest.mark.usefixtures("one_thread")


RTOL = 1e-9
RTOL_DET = 1e-6
#: delve averages each map in float32 for ``conv_method="mean"``; this package averages in float64
#: (tests/test_kernel_paths.py checks it against a float64 reference to 1e-12). Delve's float32
#: means carry a relative rounding of about 1e-7, which the covariance of the means keeps (and its
#: determinant multiplies by about the width times the condition number).
RTOL_FLOAT32_MEAN = 1e-6
RTOL_FLOAT32_MEAN_DET = 1e-5


# -- models --------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Two convs on 16 x 16 maps (interpolation resizes them) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class SeqNet(nn.Module):
    """An LSTM (batch first) over 4 steps, a Linear on its 3-D output and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.proj = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.lstm(x)
        return self.out(torch.tanh(self.proj(seq))[:, -1])


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)
        self.fc3 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


# (model, sample shape, tracker arguments, epochs, train batch, eval batch)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any], int, int, int]] = {
    "conv-linear-lstm": (OracleNet, (1, 8, 8), {"stats": ALL_STATS}, 2, 16, 32),
    "sampling": (
        OracleNet,
        (1, 8, 8),
        {"stats": ["idim", "lsat", "trc"], "log_interval": 3, "max_samples": 20},
        3,
        16,
        16,
    ),
    "interpolation-bilinear-max": (
        ConvNet,
        (1, 16, 16),
        {
            "stats": ALL_STATS,
            "interpolation_strategy": "bilinear",
            "interpolation_downsampling": 6,
            "conv_method": "max",
        },
        2,
        8,
        16,
    ),
    "interpolation-nearest-median": (
        ConvNet,
        (1, 16, 16),
        {
            "stats": ["lsat", "trc", "dtrc"],
            "interpolation_strategy": "nearest",
            "interpolation_downsampling": 7,
            "conv_method": "median",
        },
        2,
        8,
        16,
    ),
    "conv-mean": (ConvNet, (1, 16, 16), {"stats": ALL_STATS, "conv_method": "mean"}, 2, 12, 24),
    "conv-flatten": (
        lambda: OracleNet(side=4, channels=2),
        (1, 4, 4),
        {"stats": ["lsat", "idim", "trc", "cov"], "conv_method": "flatten"},
        2,
        40,
        40,
    ),
    "lstm-timestepwise": (
        SeqNet,
        (4, 3),
        {"stats": ALL_STATS, "timeseries_method": "timestepwise"},
        2,
        24,
        24,
    ),
    "lstm-last-timestep": (SeqNet, (4, 3), {"stats": ALL_STATS, "log_interval": 2}, 3, 10, 10),
    "mlp-layer-list": (MLP, (5,), {"stats": ALL_STATS, "max_samples": 25}, 3, 10, 20),
}


def _run(
    tracker_cls: Any,
    savefile: Path,
    case: str,
    save_to: Any = ("csv", "npy"),
    stats: list[str] | None = None,
    **extra: Any,
) -> Any:
    """One seeded training run under ``tracker_cls``; returns the tracker (closed)."""
    make, shape, kwargs, epochs, train_batch, eval_batch = CASES[case]
    if stats is not None:
        kwargs = {**kwargs, "stats": stats}
    torch.manual_seed(0)
    model = make()
    modules: Any = model
    if case == "mlp-layer-list":  # delve's list-of-layers form
        modules = [model.fc1, model.fc2, model.fc3]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, *shape, generator=g)
    y = torch.randn(48, 2, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    save = list(save_to) if isinstance(save_to, tuple) else save_to
    tracker = tracker_cls(str(savefile), save, modules, device="cpu", **kwargs, **extra)
    for epoch in range(epochs):
        model.train()
        for i in range(0, len(x), train_batch):
            opt.zero_grad()
            loss = ((model(x[i : i + train_batch]) - y[i : i + train_batch]) ** 2).mean()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x), eval_batch):
                model(x[i : i + eval_batch])
        tracker.add_scalar("epoch", epoch)
        tracker.add_saturations()
    tracker.close()
    return tracker


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep=";", index_col=0)


def _close(a: Any, b: Any, rtol: float) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    scale = np.maximum(np.abs(a), np.abs(b))
    return bool(np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= rtol * scale)))


def _rtol(name: str, case: str = "") -> float:
    if "mean" in case.split("-"):
        return RTOL_FLOAT32_MEAN_DET if "determinant" in name else RTOL_FLOAT32_MEAN
    return RTOL_DET if "determinant" in name else RTOL


def _npy_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.npy"))


@pytest.mark.parametrize("case", list(CASES))
def test_csv_and_npy_match_delve(tmp_path: Path, case: str) -> None:
    _run(delve_tc.SaturationTracker, tmp_path / "delve" / "run", case)
    _run(SaturationTracker, tmp_path / "ours" / "run", case, semantics="delve-0.1.50")

    theirs = _read_csv(tmp_path / "delve" / "run.csv")
    ours = _read_csv(tmp_path / "ours" / "run.csv")
    assert list(ours.columns) == list(theirs.columns)
    assert list(ours.index) == list(theirs.index)
    assert any(c.startswith("eval-") for c in ours.columns)
    for column in theirs.columns:
        assert _close(ours[column], theirs[column], _rtol(column, case)), (
            column,
            ours[column].tolist(),
            theirs[column].tolist(),
        )
        if "intrinsic-dimensionality" in column:
            assert ours[column].dtype == theirs[column].dtype  # written as integers

    delve_npy, our_npy = tmp_path / "delve" / "run", tmp_path / "ours" / "run"
    names = _npy_files(delve_npy)
    assert names and _npy_files(our_npy) == names
    for name in names:
        a, b = np.load(delve_npy / name), np.load(our_npy / name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if "covariance-matrix" in name:
            rtol = _rtol(name, case)
            assert np.allclose(b, a, rtol=rtol, atol=rtol * np.abs(a).max()), name
        else:
            assert _close(b, a, _rtol(name, case)), name


# -- the exact writer calls, embeddings included -------------------------------------------------


def _recording_writer(base: type) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
            self.calls.append(("add_scalar", name, value))

        def add_scalars(self, prefix: str, value_dict: Any, **kwargs: Any) -> None:
            self.calls.append(("add_scalars", prefix, dict(value_dict), dict(kwargs)))

        def save(self) -> None:
            self.calls.append(("save",))

        def resume_from_saved_state(self, initial_epoch: int) -> None:
            pass

        def close(self) -> None:
            self.calls.append(("close",))

    return Recording


def _as_floats(points: list[Any]) -> np.ndarray:
    return np.array([[float(p[0]), float(p[1])] for p in points]).reshape(-1, 2)


@pytest.mark.parametrize("case", ["conv-linear-lstm", "lstm-last-timestep"])
def test_writer_calls_match_delve(tmp_path: Path, case: str) -> None:
    """Same calls in the same order; same values; the same ``embed`` points (delve's rule)."""
    theirs = _recording_writer(delve_writers.AbstractWriter)()
    ours = _recording_writer(AbstractWriter)()
    stats = ["lsat", "idim", "trc", "embed"]
    _run(delve_tc.SaturationTracker, tmp_path / "d", case, save_to=theirs, stats=stats)
    _run(SaturationTracker, tmp_path / "o", case, save_to=ours, stats=stats, semantics="delve-0.1.50")

    assert [c[:2] for c in ours.calls] == [c[:2] for c in theirs.calls]
    embedded = 0
    for mine, ref in zip(ours.calls, theirs.calls, strict=True):
        if mine[0] == "add_scalar":
            assert mine[1:] == ref[1:]
        elif mine[0] == "add_scalars":
            assert mine[1] == ref[1] == ""
            assert list(mine[2]) == list(ref[2])
            for name, value in ref[2].items():
                assert _close(mine[2][name], value, _rtol(name)), name
            assert set(mine[3]) == set(ref[3]) == {"sample_value_dict"}
            assert list(mine[3]["sample_value_dict"]) == list(ref[3]["sample_value_dict"]) == ["embed"]
            a = _as_floats(mine[3]["sample_value_dict"]["embed"])
            b = _as_floats(ref[3]["sample_value_dict"]["embed"])
            assert a.shape == b.shape and len(a) > 0
            assert np.allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
            embedded += 1
    assert embedded > 0


def test_stopped_epochs_match_delve(tmp_path: Path) -> None:
    """delve's own stop()/resume() pattern: epochs recorded while stopped are NaN rows in both."""

    def run(cls: Any, savefile: Path, **extra: Any) -> pd.DataFrame:
        torch.manual_seed(0)
        model = MLP()
        tracker = cls(str(savefile), "csv", model, stats=["lsat"], device="cpu", **extra)
        g = torch.Generator().manual_seed(3)
        for epoch in range(4):
            if epoch % 2 == 1:
                tracker.resume()
            else:
                tracker.stop()
            model.train()
            model(torch.randn(20, 5, generator=g))
            model.eval()
            model(torch.randn(20, 5, generator=g))
            tracker.add_scalar("epoch", epoch)
            tracker.add_saturations()
        tracker.close()
        return _read_csv(savefile.with_suffix(".csv"))

    theirs = run(delve_tc.SaturationTracker, tmp_path / "d" / "run")
    ours = run(SaturationTracker, tmp_path / "o" / "run", semantics="delve-0.1.50")
    assert list(ours.columns) == list(theirs.columns)
    for column in theirs.columns:
        assert _close(ours[column], theirs[column], RTOL), column
    assert ours.iloc[0, 1:].isna().all() and ours.iloc[2, 1:].isna().all()
    assert not ours.iloc[1, 1:].isna().any()
    assert math.isfinite(ours.iloc[3, 1])
