"""The drop-in tracker (default semantics) and the delve-compatible metrics.

- ``semantics="default"`` against a float64 numpy reference computed from what a plain forward
  hook saw: the covariance of every recorded sample of the epoch, the documented ``idim``.
- What delve 0.1.50 gets wrong or leaves undone, done as documented: ``stop()`` then
  ``add_saturations()``, a layer missing from an epoch, ``'lsat_eval'``, ``include_conv=False``,
  ``average_sat``, ``reset_covariance=False``, resuming with ``initial_epoch``.
- ``store=``: the same run re-analysed from the Zarr store gives the tracker's numbers.
- :mod:`pipelines.dropin.metrics` against ``delve.metrics`` / ``delve.torch_utils`` on random tensors.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import OracleNet, numpy_matrix
from torch import nn

import pipelines
import pipelines.dropin
from analyze import run_stats
from capture import Recorder, open_run
from capture.format import BLOCK_KIND_EPOCH
from capture.moments import Moments
from pipelines import (
    AbstractWriter,
    CheckLayerSat,
    SaturationTracker,
    TorchCovarianceMatrix,
    compute_cov_determinant,
    compute_cov_trace,
    compute_diag_trace,
    compute_intrinsic_dimensionality,
    compute_saturation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


LAYOUTS = {"conv": ("conv", "channelwise"), "fc": ("flat", "none"), "lstm": ("sequence", "last_timestep")}
LAYOUTS["head"] = ("sequence", "last_timestep")
LONG = {"lsat": "saturation", "idim": "intrinsic-dimensionality", "trc": "covariance-trace"}
LONG |= {"dtrc": "diagonal-trace", "det": "covariance-determinant"}


def _data(n: int = 36, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randn(n, 2, generator=g)


def _epoch(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, evaluate: bool = True) -> None:
    model.train()
    for i in range(0, len(x), 12):
        opt.zero_grad()
        ((model(x[i : i + 12]) - y[i : i + 12]) ** 2).mean().backward()
        opt.step()
    if evaluate:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x), 18):
                model(x[i : i + 18])


def _model() -> tuple[OracleNet, Any]:
    """The oracle model, smaller: input (B, 1, 6, 6), 3 conv maps, Linear(108->5), LSTM(5->4)."""
    torch.manual_seed(0)
    model = OracleNet(side=6, channels=3, features=5, hidden=4)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def _csv(savefile: Path) -> pd.DataFrame:
    return pd.read_csv(str(savefile) + ".csv", sep=";", index_col=0)


def _reference_idim(cov: np.ndarray, t: float = 0.99) -> int:
    w = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    p = np.cumsum(w) / w.sum()
    return int(np.argmax(p >= t - 1e-12) + 1)


def _selected(tape: Any, bounds: list[int], log_interval: int, max_samples: int | None) -> list[dict]:
    """Per epoch, ``{(phase, layer): sample matrix}`` of the calls the tracker's rules record."""
    counters: dict[str, int] = {}
    epochs: list[dict] = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        parts: dict[tuple[str, str], list[np.ndarray]] = {}
        seen: dict[tuple[str, str], int] = {}
        for call in tape.seen[start:stop]:
            counters[call.name] = counters.get(call.name, 0) + 1
            if counters[call.name] % log_interval:
                continue
            key = ("train" if call.training else "eval", call.name)
            out = call.output.numpy()
            if max_samples is not None:
                out = out[: max_samples - seen.get(key, 0)]
                if len(out) == 0:
                    continue
            seen[key] = seen.get(key, 0) + len(out)
            parts.setdefault(key, []).append(numpy_matrix(out, *LAYOUTS[call.name]).astype(np.float64))
        epochs.append({k: np.concatenate(v) for k, v in parts.items()})
    return epochs


@pytest.mark.parametrize(("log_interval", "max_samples"), [(1, None), (2, 20)])
def test_default_semantics_match_numpy_reference(tmp_path, hook_tape, log_interval, max_samples):
    model, opt = _model()
    x, y = _data()
    tape = hook_tape({"conv": model.conv, "fc": model.fc, "lstm": model.lstm, "head": model.head})
    savefile = tmp_path / "run"
    stats = ["lsat", "idim", "trc", "dtrc", "det", "cov"]
    tracker = SaturationTracker(
        str(savefile), ["csv", "npy"], model, stats=stats, log_interval=log_interval, max_samples=max_samples
    )
    bounds = [0]
    for e in range(2):
        _epoch(model, opt, x, y)
        tracker.add_scalar("epoch", e)
        tracker.add_saturations()
        bounds.append(len(tape.seen))
    tracker.close()
    table = _csv(savefile)
    expected = [
        f"{p}-{LONG[s]}_{layer}" for p in ("train", "eval") for layer in LAYOUTS for s in stats if s != "cov"
    ]
    assert list(table.columns) == ["epoch", *expected]
    for e, matrices in enumerate(_selected(tape, bounds, log_interval, max_samples)):
        assert len(matrices) == 8
        for (phase, layer), mat in matrices.items():
            cov = np.cov(mat.T, bias=True)
            row = table.iloc[e]
            idim = _reference_idim(cov)
            assert row[f"{phase}-intrinsic-dimensionality_{layer}"] == idim
            assert row[f"{phase}-saturation_{layer}"] == idim / cov.shape[0]
            assert row[f"{phase}-covariance-trace_{layer}"] == pytest.approx(np.trace(cov), rel=1e-9)
            eig = np.clip(np.linalg.eigvalsh(cov), 0, None).sum()
            assert row[f"{phase}-diagonal-trace_{layer}"] == pytest.approx(eig, rel=1e-9)
            assert row[f"{phase}-covariance-determinant_{layer}"] == pytest.approx(
                np.linalg.det(cov), rel=1e-6
            )
            name = f"_{phase}-covariance-matrix_{layer}"
            saved = np.load(savefile / name / f"{name}_epoch{e}.npy")
            np.testing.assert_allclose(saved, cov, rtol=1e-9, atol=1e-12 * np.abs(cov).max())


def test_reset_covariance_false_accumulates_epochs(tmp_path, hook_tape):
    model, opt = _model()
    x, y = _data()
    tape = hook_tape({"fc": model.fc})
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["trc"], reset_covariance=False)
    for _ in range(3):
        _epoch(model, opt, x, y, evaluate=False)
        tracker.add_saturations()
    tracker.close()
    outputs = [s.output.numpy().astype(np.float64) for s in tape.seen]
    got = _csv(tmp_path / "run")["train-covariance-trace_fc"].tolist()
    for e, per_epoch in enumerate((3, 6, 9)):  # 3 train batches per epoch
        assert got[e] == pytest.approx(np.trace(np.cov(np.concatenate(outputs[:per_epoch]).T, bias=True)))


def test_gram_blocks_merge_to_one_pass():
    """The tracker's blocks (several per epoch with a small ``gram_block_rows``) merge to one pass."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    blocks: list[Any] = []
    seen: list[torch.Tensor] = []
    rec = Recorder(layer, None, mode="gram", gram_block_rows=5, on_block=blocks.append)
    layer.register_forward_hook(lambda m, i, o: seen.append(o.detach().double()))
    for n in (3, 4, 6, 2):
        layer(torch.randn(n, 4))
    rec.end_epoch()
    rec.close()
    epoch_blocks = [b for b in blocks if b.kind == BLOCK_KIND_EPOCH]
    assert len(epoch_blocks) == 3
    merged = Moments()
    for b in epoch_blocks:
        merged.merge(Moments(b.count, b.mean, b.m2))
    x = torch.cat(seen).numpy()
    np.testing.assert_allclose(merged.covariance(), np.cov(x.T, bias=True), rtol=1e-12, atol=1e-15)
    last = [b for b in blocks if b.kind != BLOCK_KIND_EPOCH]
    assert len(last) == 1 and last[0].count == 2


@pytest.mark.parametrize("semantics", ["default", "delve-0.1.50"])
def test_stop_then_add_saturations_writes_nan_row(tmp_path, semantics):
    """delve crashes here (trc, dtrc, cov need a covariance); the row is NaN, columns stay aligned."""
    model, opt = _model()
    x, y = _data()
    savefile = tmp_path / "run"
    stats = ["lsat", "idim", "trc", "dtrc", "det", "cov"]
    tracker = SaturationTracker(str(savefile), ["csv", "npy"], model, stats=stats, semantics=semantics)
    for e in range(3):
        if e == 1:
            tracker.stop()
            assert not tracker.is_recording()
        else:
            tracker.resume()
        _epoch(model, opt, x, y)
        tracker.add_scalar("epoch", e)
        values = tracker.add_saturations()
    tracker.close()
    assert math.isfinite(values["train-saturation_fc"])
    table = _csv(savefile)
    assert table.shape[0] == 3
    assert table.iloc[1, 1:].isna().all()
    assert table.drop(index=1).iloc[:, 1:].notna().all().all()
    cov = np.load(savefile / "_train-covariance-matrix_fc" / "_train-covariance-matrix_fc_epoch1.npy")
    assert cov.shape == (5, 5) and np.isnan(cov).all()
    assert (savefile / "_train-covariance-matrix_fc" / "_train-covariance-matrix_fc_epoch2.npy").exists()


def test_layer_missing_from_an_epoch_is_nan(tmp_path):
    """delve raises ValueError when a layer recorded before is missing; here its values are NaN."""
    model, opt = _model()
    x, y = _data()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["lsat", "trc"])
    for e in range(3):
        _epoch(model, opt, x, y, evaluate=e != 1)  # no eval pass in epoch 1
        tracker.add_saturations()
    tracker.close()
    table = _csv(tmp_path / "run")
    eval_cols = [c for c in table.columns if c.startswith("eval-")]
    assert len(eval_cols) == 8
    assert table.loc[1, eval_cols].isna().all()
    assert table.loc[[0, 2], eval_cols].notna().all().all()
    assert table.filter(like="train-").notna().all().all()


def test_stat_restricted_to_a_phase(tmp_path):
    """``'lsat_eval'`` (accepted but ignored by delve) reports lsat for the eval phase."""
    runs = {}
    for key, stats in {"eval": ["lsat_eval"], "both": ["lsat", "lsat_eval"], "plain": ["lsat"]}.items():
        model, opt = _model()
        x, y = _data()
        tracker = SaturationTracker(str(tmp_path / key), "csv", model, stats=stats)
        _epoch(model, opt, x, y)
        tracker.add_saturations()
        tracker.close()
        runs[key] = _csv(tmp_path / key)
    assert list(runs["eval"].columns) == [f"eval-saturation_{layer}" for layer in LAYOUTS]
    pd.testing.assert_frame_equal(runs["both"], runs["plain"])
    pd.testing.assert_frame_equal(runs["eval"], runs["plain"][runs["eval"].columns])


def test_include_conv_ignore_names_filter_and_average(tmp_path):
    model, opt = _model()
    x, y = _data()
    tracker = SaturationTracker(
        str(tmp_path / "run"),
        "csv",
        model,
        stats=["lsat"],
        include_conv=False,
        ignore_layer_names=["head"],
        average_sat=True,
    )
    assert list(tracker.layers) == ["fc", "lstm"]
    _epoch(model, opt, x, y)
    values = tracker.add_saturations()
    tracker.close()
    table = _csv(tmp_path / "run")
    assert list(table.columns) == [
        "train-saturation_fc",
        "train-saturation_lstm",
        "eval-saturation_fc",
        "eval-saturation_lstm",
        "average-train-sat",
        "average-eval-sat",
    ]
    for phase in ("train", "eval"):
        mean = (values[f"{phase}-saturation_fc"] + values[f"{phase}-saturation_lstm"]) / 2
        assert table[f"average-{phase}-sat"].iloc[0] == pytest.approx(mean)
    only_fc = SaturationTracker(
        str(tmp_path / "f"), "csv", model, layer_filter=lambda d: {k: v for k, v in d.items() if k == "fc"}
    )
    assert list(only_fc.layers) == ["fc"]
    only_fc.close()


def test_resume_with_initial_epoch_keeps_rows(tmp_path):
    model, opt = _model()
    x, y = _data()
    savefile = tmp_path / "run"
    store = tmp_path / "run.zarr"

    def epochs(tracker: SaturationTracker, which: range) -> None:
        for e in which:
            _epoch(model, opt, x, y)
            tracker.add_scalar("epoch", e)
            tracker.add_saturations()
        tracker.close()

    epochs(
        SaturationTracker(str(savefile), ["csv", "npy"], model, stats=["lsat", "cov"], store=store), range(2)
    )
    before = Path(str(savefile) + ".csv").read_text().splitlines()
    resumed = SaturationTracker(
        str(savefile), ["csv", "npy"], model, stats=["lsat", "cov"], initial_epoch=2, store=store
    )
    epochs(resumed, range(2, 3))
    after = Path(str(savefile) + ".csv").read_text().splitlines()
    assert len(after) == 4 and after[:3] == before
    assert _csv(savefile)["epoch"].tolist() == [0, 1, 2]
    name = "_train-covariance-matrix_fc"
    assert sorted(p.name for p in (savefile / name).iterdir()) == [f"{name}_epoch{k}.npy" for k in range(3)]
    assert open_run(store).epochs == [0, 1, 2]


def test_store_is_reanalysed_to_the_same_numbers(tmp_path):
    model, opt = _model()
    x, y = _data()
    store = tmp_path / "run.zarr"
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["lsat", "idim"], store=store)
    for e in range(2):
        _epoch(model, opt, x, y)
        tracker.add_scalar("epoch", e)
        tracker.add_saturations()
    tracker.close()
    table = _csv(tmp_path / "run")
    run = open_run(store)
    assert run.epochs == [0, 1] and set(run.modes) == {"raw", "gram"}
    stats = run_stats(store, stats=["lsat", "idim"])
    stats = stats[stats["stat"].isin(["lsat", "idim"])]
    assert len(stats) == 2 * 2 * 4 * 2
    for row in stats.itertuples():
        column = f"{row.phase}-{LONG[row.stat]}_{row.layer}"
        assert table.loc[row.epoch, column] == pytest.approx(row.value, abs=1e-12), column


def test_nosave_writes_nothing_and_verbose_prints(tmp_path, capsys):
    model, opt = _model()
    x, y = _data()
    tracker = SaturationTracker(str(tmp_path / "run"), ["csv", "npy"], model, nosave=True, verbose=True)
    _epoch(model, opt, x, y)
    tracker.add_scalar("epoch", 0)
    values = tracker.add_saturations()
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    assert sorted(values) == sorted(f"{p}-saturation_{layer}" for p in ("train", "eval") for layer in LAYOUTS)
    assert "train-saturation_conv: " in capsys.readouterr().out


def test_embed_default_semantics_projects_last_batch(tmp_path):
    calls: list[dict] = []

    class Keep(AbstractWriter):
        def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
            pass

        def add_scalars(self, prefix: str, value_dict: Any, global_step: Any = None, **kwargs: Any) -> None:
            calls.append(kwargs["sample_value_dict"])

        def save(self) -> None:
            pass

        def close(self) -> None:
            pass

    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    tracker = SaturationTracker(str(tmp_path / "run"), Keep(), layer, stats=["lsat", "embed"])
    batches = [torch.randn(n, 4) for n in (7, 5)]
    with torch.no_grad():
        outs = [layer(b).double().numpy() for b in batches]
    tracker.add_saturations()
    tracker.close()
    points = np.array(calls[0]["embed"])
    allx = np.concatenate(outs)
    w, v = np.linalg.eigh(np.cov(allx.T, bias=True))
    expected = (outs[-1] - allx.mean(0)) @ v[:, ::-1][:, :2]
    assert points.shape == (5, 2)
    np.testing.assert_allclose(np.abs(points), np.abs(expected), rtol=1e-9, atol=1e-12)


def test_arguments_are_checked(tmp_path):
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="valid: lsat, idim, cov, det, trc, dtrc, embed"):
        SaturationTracker(str(tmp_path / "a"), "csv", net, stats=["sat"])
    with pytest.raises(ValueError, match="lsat_test"):
        SaturationTracker(str(tmp_path / "a"), "csv", net, stats=["lsat_test"])
    with pytest.raises(ValueError, match="semantics"):
        SaturationTracker(str(tmp_path / "a"), "csv", net, semantics="delve")
    with pytest.raises(ValueError, match="sat_threshold"):
        SaturationTracker(str(tmp_path / "a"), "csv", net, sat_threshold=1.5)
    with pytest.raises(ValueError, match="conv_method"):
        SaturationTracker(str(tmp_path / "a"), "csv", net, conv_method="sum")
    with pytest.warns(UserWarning, match="npy"):
        SaturationTracker(str(tmp_path / "a"), "csv", net, stats=["cov"]).close()


#: delve 0.1.50 module -> the names a delve script imports from it; each has its drop-in in pipelines.
DELVE_NAMES = {
    "delve.torchcallback": ("SaturationTracker", "CheckLayerSat"),
    "delve.writers": (
        "AbstractWriter",
        "CSVWriter",
        "CSVandPlottingWriter",
        "CompositWriter",
        "NPYWriter",
        "PrintWriter",
        "STATMAP",
        "TensorBoardWriter",
        "WRITERS",
        "extract_layer_stat",
        "plot_scatter_from_results",
        "plot_stat",
        "plot_stat_level_from_results",
    ),
    "delve.metrics": (
        "compute_cov_determinant",
        "compute_cov_trace",
        "compute_diag_trace",
        "compute_intrinsic_dimensionality",
        "compute_saturation",
    ),
    "delve.torch_utils": ("TorchCovarianceMatrix",),
    "delve.pca_layers": (
        "Conv2DPCALayer",
        "LinearPCALayer",
        "change_all_pca_layer_thresholds",
        "change_all_pca_layer_thresholds_and_inject_random_directions",
    ),
    "delve.tools": ("reconstruct_csv_from_npy_data",),
}


def _named_parameters(obj: Any) -> list[str]:
    """The parameter names of a function or a class's ``__init__``, without ``*args`` / ``**kwargs``."""
    signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [name for name, p in signature.parameters.items() if p.kind not in variadic]


@pytest.mark.parametrize("module", sorted(DELVE_NAMES))
def test_every_delve_name_has_a_drop_in_with_delves_arguments(module: str) -> None:
    theirs = pytest.importorskip(module)
    for name in DELVE_NAMES[module]:
        reference, ours = getattr(theirs, name), getattr(pipelines.dropin, name)
        if isinstance(reference, dict):
            assert list(ours) == list(reference), name
        else:
            expected = _named_parameters(reference)
            assert _named_parameters(ours)[: len(expected)] == expected, name
    assert CheckLayerSat is SaturationTracker
    assert inspect.signature(SaturationTracker.__init__).parameters["device"].default is None


# -- metrics against delve.metrics ---------------------------------------------------------------

delve_metrics = pytest.importorskip("delve.metrics")
delve_torch_utils = pytest.importorskip("delve.torch_utils")


def _random_cov(d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    x = x * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.cov(x.T, correction=0)


@pytest.mark.parametrize(("d", "n", "seed"), [(2, 50, 0), (5, 40, 1), (12, 200, 2), (30, 20, 3)])
@pytest.mark.parametrize("thresh", [0.5, 0.9, 0.99])
def test_metrics_match_delve(d, n, seed, thresh):
    cov = _random_cov(d, n, seed)
    kept = cov.clone()
    delve_idim = delve_metrics.compute_intrinsic_dimensionality(cov.clone(), thresh)
    assert compute_intrinsic_dimensionality(cov, thresh, semantics="delve-0.1.50") == delve_idim
    assert compute_saturation(cov, thresh, semantics="delve-0.1.50") == delve_metrics.compute_saturation(
        cov.clone(), thresh
    )
    assert compute_intrinsic_dimensionality(cov, thresh) == _reference_idim(cov.numpy(), thresh)
    assert compute_saturation(cov, thresh) == _reference_idim(cov.numpy(), thresh) / d
    assert compute_cov_trace(cov) == pytest.approx(
        float(delve_metrics.compute_cov_trace(cov.clone())), rel=1e-12
    )
    assert compute_diag_trace(cov) == pytest.approx(
        float(delve_metrics.compute_diag_trace(cov.clone())), rel=1e-9
    )
    if n > d:  # a singular covariance's determinant is round-off
        assert compute_cov_determinant(cov) == pytest.approx(
            float(delve_metrics.compute_cov_determinant(cov.clone())), rel=1e-6
        )
    assert torch.equal(cov, kept)  # inputs are not modified
    assert isinstance(compute_intrinsic_dimensionality(cov), int)


@pytest.mark.parametrize("center", [True, False])
def test_torch_covariance_matrix_matches_delve(center):
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 6, generator=g) * 3 + 10 for n in (5, 9, 1, 16)]
    theirs = delve_torch_utils.TorchCovarianceMatrix(device="cpu")
    ours, left, right = (
        TorchCovarianceMatrix(),
        TorchCovarianceMatrix(),
        TorchCovarianceMatrix(save_data=True),
    )
    for i, b in enumerate(batches):
        theirs.update(b, False)
        ours.update(b)
        (left if i < 2 else right).update(b)
    expected = theirs.fix(center=center)
    torch.testing.assert_close(ours.fix(center=center), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(left.merge(right).fix(center=center), expected, rtol=1e-9, atol=1e-9)
    assert ours._tlen == theirs._tlen == 31 and ours._input_dim == 6
    assert right.saved_samples is not None and right.saved_samples.shape == (17, 6)
    vae_theirs = delve_torch_utils.TorchCovarianceMatrix(device="cpu")
    vae_ours = TorchCovarianceMatrix()
    square = torch.randn(6, 6, generator=g)  # delve sizes its sums before transposing: square only
    vae_theirs.update(square, True)
    vae_ours.update(square, vae=True)
    torch.testing.assert_close(vae_ours.fix(), vae_theirs.fix(), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="no batch"):
        TorchCovarianceMatrix().fix()


def test_a_writer_written_for_delve_is_used_as_is(tmp_path):
    delve_writers = pytest.importorskip("delve.writers")
    model, opt = _model()
    x, y = _data()
    writer = delve_writers.CSVWriter(str(tmp_path / "theirs"))
    tracker = SaturationTracker(str(tmp_path / "run"), [writer, "csv"], model, stats=["lsat"])
    _epoch(model, opt, x, y)
    tracker.add_saturations()
    tracker.close()
    pd.testing.assert_frame_equal(_csv(tmp_path / "theirs"), _csv(tmp_path / "run"))
