"""The drop-in writers, plots and npy tools (:mod:`pipelines.dropin`) against delve 0.1.50's writers and tools.

delve's writers and ours get the same calls, in the order delve's SaturationTracker makes
them (``add_scalar('epoch', e)``, then one ``add_scalars(prefix='', value_dict=...,
sample_value_dict={})`` per phase and layer, then ``save()``), in separate folders; the
files must agree.
"""

from __future__ import annotations

import inspect
import os
import pickle
import sys
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from pipelines import (  # noqa: E402
    STATMAP,
    WRITERS,
    AbstractWriter,
    CompositWriter,
    CSVandPlottingWriter,
    CSVWriter,
    NPYWriter,
    PrintWriter,
    TensorBoardWriter,
    extract_layer_stat,
    get_writer,
    plot_stat,
    reconstruct_csv_from_npy_data,
)

LAYERS = (("conv", 4), ("features-0_fc", 6))  # a layer name with "_" in it
ALL_STATS = ("lsat", "idim", "trc", "dtrc", "det", "cov")


@pytest.fixture(scope="module")
def dw():
    return pytest.importorskip("delve.writers")


@pytest.fixture(scope="module")
def dtools():
    return pytest.importorskip("delve.tools")


def _covariances(epochs: int, seed: int = 0) -> list[dict[tuple[str, str], np.ndarray]]:
    """Per epoch, a float64 population covariance per (phase, layer), with a spread spectrum."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        covs = {}
        for phase in ("train", "eval"):
            for layer, d in LAYERS:
                x = rng.normal(size=(40, d)) * np.geomspace(3.0, 0.05, d)
                x = x @ np.linalg.qr(rng.normal(size=(d, d)))[0]
                covs[phase, layer] = np.cov(x.T, bias=True)
        out.append(covs)
    return out


def _delve_values(phase: str, layer: str, cov: np.ndarray, stats=ALL_STATS, thresh: float = 0.99) -> dict:
    """The value_dict delve's tracker passes for one phase and layer (delve's own metrics)."""
    import torch
    from delve import metrics

    c = torch.from_numpy(cov)
    compute = {
        "lsat": lambda: metrics.compute_saturation(c, thresh=thresh),
        "idim": lambda: metrics.compute_intrinsic_dimensionality(c, thresh=thresh),
        "cov": lambda: c.cpu().numpy(),
        "det": lambda: metrics.compute_cov_determinant(c),
        "trc": lambda: metrics.compute_cov_trace(c),
        "dtrc": lambda: metrics.compute_diag_trace(c),
    }
    return {f"{phase}-{STATMAP[s]}_{layer}": compute[s]() for s in stats}


def _emit(ws, covs, stats=ALL_STATS, first_epoch: int = 0) -> None:
    """Drive writers as delve's SaturationTracker does, one save per epoch."""
    for e, per_epoch in enumerate(covs, start=first_epoch):
        for w in ws:
            w.add_scalar("epoch", e)
        for phase in ("train", "eval"):
            for layer, _ in LAYERS:
                values = _delve_values(phase, layer, per_epoch[phase, layer], stats)
                for w in ws:
                    w.add_scalars(prefix="", value_dict=values, sample_value_dict={})
        for w in ws:
            w.save()


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# -- CSV, npy, plots ----------------------------------------------------------------------------


def test_csv_matches_delve(tmp_path, dw):
    covs = _covariances(3)
    _emit([CSVWriter(str(tmp_path / "ours")), dw.CSVWriter(str(tmp_path / "delve"))], covs)
    ours = (tmp_path / "ours.csv").read_text()
    assert ours == (tmp_path / "delve.csv").read_text()
    header = ours.splitlines()[0]
    assert header.startswith(";epoch;train-saturation_conv;train-intrinsic-dimensionality_conv;")
    assert "covariance-matrix" not in header
    assert len(ours.splitlines()) == 4


def test_npy_matches_delve(tmp_path, dw):
    covs = _covariances(2)
    _emit([NPYWriter(str(tmp_path / "ours")), dw.NPYWriter(str(tmp_path / "delve"))], covs)
    ours, theirs = tmp_path / "ours", tmp_path / "delve"
    names = _tree(ours)
    assert names == _tree(theirs)
    assert "_train-saturation_conv/_train-saturation_conv_epoch1.npy" in names
    assert "epoch/epoch_epoch0.npy" in names
    assert (ours / "epoch_counter.pkl").read_bytes() == (theirs / "epoch_counter.pkl").read_bytes()
    for name in names:
        if name.endswith(".npy"):
            a, b = np.load(ours / name), np.load(theirs / name)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    cov = np.load(
        ours / "_eval-covariance-matrix_features-0_fc/_eval-covariance-matrix_features-0_fc_epoch1.npy"
    )
    assert cov.dtype == np.float64 and cov.shape == (6, 6)
    np.testing.assert_array_equal(cov, covs[1]["eval", "features-0_fc"])


def test_plot_writer_matches_delve(tmp_path, dw):
    covs = _covariances(2)
    (tmp_path / "ours").mkdir()
    (tmp_path / "delve").mkdir()
    plt.close("all")
    ours = CSVandPlottingWriter(str(tmp_path / "ours" / "run"))
    _emit([ours], covs, stats=("lsat", "idim", "cov"))
    assert plt.get_fignums() == []  # no pyplot state
    _emit([dw.CSVandPlottingWriter(str(tmp_path / "delve" / "run"))], covs, stats=("lsat", "idim", "cov"))
    plt.close("all")
    pngs = _tree(tmp_path / "ours")
    assert pngs == _tree(tmp_path / "delve")
    assert "run_lsat_eval_epoch_1.png" in pngs and "run_idim_train_epoch_0.png" in pngs
    assert (tmp_path / "ours" / "run.csv").read_text() == (tmp_path / "delve" / "run.csv").read_text()


def test_plot_manipulation_func_is_applied(tmp_path):
    seen = []
    w = CSVandPlottingWriter(str(tmp_path / "run"), plot_manipulation_func=lambda ax: seen.append(ax) or ax)
    _emit([w], _covariances(1), stats=("lsat",))
    assert len(seen) == 2 and sorted(p.name for p in tmp_path.glob("*.png")) == [
        "run_lsat_eval_epoch_0.png",
        "run_lsat_train_epoch_0.png",
    ]


def test_print_writer_matches_delve(capsys, dw):
    values = {"train-saturation_conv": 0.5, "train-intrinsic-dimensionality_conv": 2}
    for w in (PrintWriter(savepath="x"), dw.PrintWriter(savepath="x")):
        w.add_scalar("epoch", 0)
        w.add_scalars(prefix="", value_dict=values, sample_value_dict={})
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == out[3:] and out[0] == "epoch : 0" and out[1] == "_train-saturation_conv : 0.5"


def test_npy_zip_next_to_folder(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "other.txt").write_text("not archived")
    w = NPYWriter(str(tmp_path / "run"), zip=True)
    w.add_scalar("epoch", 0)
    w.save()
    with zipfile.ZipFile(tmp_path / "run.zip") as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
    assert sorted(names) == ["run/epoch/epoch_epoch0.npy", "run/epoch_counter.pkl"]
    assert list(elsewhere.iterdir()) == []


# -- registry, composite, subclasses --------------------------------------------------------------


def test_registry_matches_delve(dw):
    assert {k: v.__name__ for k, v in WRITERS.items()} == {k: v.__name__ for k, v in dw.WRITERS.items()}
    assert STATMAP == dw.STATMAP


def test_get_writer_list_matches_delve(tmp_path, dw):
    ours = get_writer(["csv", "npy"], {"savepath": str(tmp_path / "ours")})
    assert isinstance(ours, CompositWriter)
    assert [type(w) for w in ours.writers] == [CSVWriter, NPYWriter]
    theirs = dw.CompositWriter([dw.CSVWriter(str(tmp_path / "delve")), dw.NPYWriter(str(tmp_path / "delve"))])
    _emit([ours, theirs], _covariances(2))
    assert _tree(tmp_path / "ours") == _tree(tmp_path / "delve")
    assert (tmp_path / "ours.csv").read_text() == (tmp_path / "delve.csv").read_text()
    single = PrintWriter()
    assert get_writer(single, {"savepath": "x"}) is single


def test_unknown_writer_name():
    with pytest.raises(ValueError, match="'xls'") as err:
        get_writer(["csv", "xls"], {"savepath": "unused"})
    for name in WRITERS:
        assert name in str(err.value)


def test_delve_style_user_subclass(tmp_path):
    class ListWriter(AbstractWriter):  # written against delve's interface: five methods
        def __init__(self, **kwargs):
            super().__init__()
            self.seen = []

        def resume_from_saved_state(self, initial_epoch):
            self.seen.append(("resume", initial_epoch))

        def add_scalar(self, name, value, **kwargs):
            self.seen.append((name, value))

        def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
            for k, v in value_dict.items():
                self.add_scalar(k, v)

        def save(self):
            self.seen.append("save")

        def close(self):
            pass

    class NoResume(AbstractWriter):  # four methods are enough here
        def add_scalar(self, name, value, **kwargs): ...
        def add_scalars(self, prefix, value_dict, global_step=None, **kwargs): ...
        def save(self): ...
        def close(self): ...

    mine = ListWriter()
    composite = get_writer([mine, NoResume(), "csv"], {"savepath": str(tmp_path / "run")})
    with pytest.warns(UserWarning) as record:
        composite.resume_from_saved_state(3)
    assert any("NoResume" in str(r.message) for r in record)  # the rest: no run.csv yet
    composite.add_scalars(prefix="", value_dict={"train-saturation_a": 0.5}, sample_value_dict={})
    composite.save()
    assert mine.seen == [("resume", 3), ("train-saturation_a", 0.5), "save"]

    class Incomplete(AbstractWriter):
        def add_scalar(self, name, value, **kwargs): ...

    with pytest.raises(TypeError):
        Incomplete()


# -- resuming -----------------------------------------------------------------------------------


def test_csv_resume_appends_rows(tmp_path, dw):
    covs = _covariances(3)
    _emit([CSVWriter(str(tmp_path / "full"))], covs)
    _emit([CSVWriter(str(tmp_path / "run"))], covs[:2])
    _emit([CSVWriter(str(tmp_path / "run"), resume=True)], covs[2:], first_epoch=2)
    assert (tmp_path / "run.csv").read_text() == (tmp_path / "full.csv").read_text()

    # delve's hook, as a tracker with initial_epoch=2 calls it; delve's writer gives the same file
    for name, cls in (("hook", CSVWriter), ("delve", dw.CSVWriter)):
        _emit([cls(str(tmp_path / name))], covs[:2])
        w = cls(str(tmp_path / name))
        w.resume_from_saved_state(2)
        _emit([w], covs[2:], first_epoch=2)
    assert (tmp_path / "hook.csv").read_text() == (tmp_path / "full.csv").read_text()
    assert (tmp_path / "delve.csv").read_text() == (tmp_path / "full.csv").read_text()

    with pytest.warns(UserWarning, match="has 3 rows but initial_epoch is 5"):
        CSVWriter(str(tmp_path / "run")).resume_from_saved_state(5)
    with pytest.warns(UserWarning, match="does not exist"):
        CSVWriter(str(tmp_path / "missing"), resume=True)


def test_npy_resume_continues_numbering(tmp_path):
    covs = _covariances(3)
    _emit([NPYWriter(str(tmp_path / "full"))], covs)
    _emit([NPYWriter(str(tmp_path / "run"))], covs[:2])
    _emit([NPYWriter(str(tmp_path / "run"), resume=True)], covs[2:], first_epoch=2)
    assert _tree(tmp_path / "run") == _tree(tmp_path / "full")
    assert (tmp_path / "run" / "epoch_counter.pkl").read_bytes() == (
        tmp_path / "full" / "epoch_counter.pkl"
    ).read_bytes()
    with open(tmp_path / "run" / "epoch_counter.pkl", "rb") as fh:
        assert pickle.load(fh)["_train-saturation_conv"] == 2


def test_plot_writer_resume(tmp_path):
    covs = _covariances(2)
    _emit([CSVandPlottingWriter(str(tmp_path / "run"))], covs[:1], stats=("lsat",))
    _emit(
        [CSVandPlottingWriter(str(tmp_path / "run"), resume=True)], covs[1:], stats=("lsat",), first_epoch=1
    )
    assert len(pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)) == 2
    assert (tmp_path / "run_lsat_train_epoch_1.png").exists()


# -- TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_missing_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install delve-pipeline\[tensorboard\]"):
        get_writer("tensorboard", {"savepath": str(tmp_path / "tb")})


def test_tensorboard_writes_events(tmp_path):
    pytest.importorskip("tensorboardX")
    w = TensorBoardWriter(str(tmp_path / "tb"))
    _emit([w], _covariances(1))  # covariance matrices are skipped, not an error
    w.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


# -- reconstruct_csv_from_npy_data ----------------------------------------------------------------


def _normalise_delve(df: pd.DataFrame) -> pd.DataFrame:
    """delve's reconstructed table with our fixes: no covariance column, no leading '_'."""
    df = df[[c for c in df.columns if "covariance-matrix" not in c]]
    df = df.rename(columns=lambda c: c[1:] if c.startswith("_") else c)
    return df.map(lambda v: v.item() if isinstance(v, np.ndarray) else v)


def _idim_reference(cov: np.ndarray, t: float) -> int:
    """delve 0.1.50's rule in plain numpy: count of cumulative fractions below t."""
    w = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0, None)
    return int(np.sum(np.cumsum(w) / np.sum(w) < t))


@pytest.fixture(scope="module")
def npy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("npy_run")
    covs = _covariances(3, seed=1)
    _emit([NPYWriter(str(root / "run")), CSVWriter(str(root / "run"))], covs)
    return root, covs


def test_reconstruct_without_threshold(npy_run, dtools, tmp_path):
    root, _ = npy_run
    ours = reconstruct_csv_from_npy_data(str(root / "run"), savefile=str(tmp_path / "rec.csv"))
    # the CSV writer's file, byte for byte
    assert (tmp_path / "rec.csv").read_text() == (root / "run.csv").read_text()
    theirs = _normalise_delve(
        dtools.reconstruct_csv_from_npy_data(str(root / "run"), str(tmp_path / "d.csv"))
    )
    assert sorted(theirs.columns) == sorted(ours.columns)
    pd.testing.assert_frame_equal(theirs[ours.columns], ours, check_dtype=False)


@pytest.mark.parametrize("thresh", [0.99, 0.9])
def test_reconstruct_at_threshold_matches_delve(npy_run, dtools, tmp_path, thresh):
    root, _ = npy_run
    ours = reconstruct_csv_from_npy_data(str(root / "run"), str(tmp_path / "rec.csv"), thresh=thresh)
    theirs = dtools.reconstruct_csv_from_npy_data(
        str(root / "run"), str(tmp_path / "d.csv"), thresh=thresh, stats=["lsat", "idim"]
    )
    theirs = _normalise_delve(theirs)
    assert sorted(theirs.columns) == sorted(ours.columns)
    pd.testing.assert_frame_equal(theirs[ours.columns], ours, check_dtype=False)
    if thresh == 0.99:  # the training threshold: the stored values, the CSV writer's file
        assert (tmp_path / "rec.csv").read_text() == (root / "run.csv").read_text()


@pytest.mark.parametrize("thresh", [0.5, 0.8, 0.95, 0.999])
def test_reconstruct_new_threshold_vs_numpy(npy_run, thresh):
    root, covs = npy_run
    df = reconstruct_csv_from_npy_data(str(root / "run"), thresh=thresh)
    default = reconstruct_csv_from_npy_data(str(root / "run"), thresh=thresh, semantics="default")
    for phase in ("train", "eval"):
        for layer, d in LAYERS:
            ref = [_idim_reference(c[phase, layer], thresh) for c in covs]
            assert df[f"{phase}-intrinsic-dimensionality_{layer}"].tolist() == ref
            assert df[f"{phase}-saturation_{layer}"].tolist() == [r / d for r in ref]
            # the documented rule: the smallest k whose fraction reaches t (here one more)
            assert default[f"{phase}-intrinsic-dimensionality_{layer}"].tolist() == [r + 1 for r in ref]
    # values that do not depend on the threshold are read as stored
    assert df["epoch"].tolist() == [0, 1, 2]
    stored = pd.read_csv(root / "run.csv", sep=";", index_col=0)
    np.testing.assert_array_equal(df["train-covariance-trace_conv"], stored["train-covariance-trace_conv"])


def test_reconstruct_new_stat_and_column_order(tmp_path):
    covs = _covariances(2)
    _emit([NPYWriter(str(tmp_path / "run")), CSVWriter(str(tmp_path / "run"))], covs, stats=("lsat", "cov"))
    df = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.99, stats=("lsat", "idim"))
    assert list(df.columns[:4]) == [
        "epoch",
        "train-saturation_conv",
        "train-intrinsic-dimensionality_conv",  # computed now, placed with its layer
        "train-saturation_features-0_fc",
    ]
    stored = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    pd.testing.assert_series_equal(df["eval-saturation_conv"], stored["eval-saturation_conv"])


def test_reconstruct_errors(tmp_path):
    w = NPYWriter(str(tmp_path / "run"))
    w.add_scalars(prefix="", value_dict={"train-saturation_a": 0.5})
    w.save()
    stats = ["lsat", "idim"]
    with pytest.warns(UserWarning, match="intrinsic-dimensionality"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), stats=stats)
    assert stats == ["lsat", "idim"]  # not modified
    with pytest.raises(FileNotFoundError, match="Covariance"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.9)
    with pytest.raises(ValueError, match="'sat'"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), stats=["sat"])
    with pytest.raises(ValueError, match="thresh"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=1.5)
    with pytest.raises(FileNotFoundError):
        reconstruct_csv_from_npy_data(str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "None")


# -- plotting helpers ---------------------------------------------------------------------------


def test_extract_layer_stat_matches_delve(dw):
    df = pd.DataFrame(
        {
            "epoch": [0, 1],
            "train-saturation_a": [0.1, 0.2],
            "train-saturation_b_1": [0.3, 0.4],
            "eval-saturation_a": [0.5, 0.6],
            "train-intrinsic-dimensionality_a": [1, 2],
        }
    )
    for mode in ("train", "eval"):
        ours = extract_layer_stat(df, epoch=1, primary_metric="epoch", state_mode=mode)
        theirs = dw.extract_layer_stat(df, epoch=1, primary_metric="epoch", state_mode=mode)
        pd.testing.assert_frame_equal(ours[0], theirs[0])
        assert ours[1] == theirs[1]
    last, _ = extract_layer_stat(df)  # epoch=-1: the last row
    assert last.to_dict("list") == {"train-saturation_a": [0.2], "train-saturation_b_1": [0.4]}
    # a layer whose name contains the other phase's name is not mixed in
    tricky = pd.DataFrame({"eval-saturation_pretrained": [0.1], "train-saturation_x": [0.2]})
    assert list(extract_layer_stat(tricky, state_mode="train")[0].columns) == ["train-saturation_x"]
    with pytest.raises(ValueError, match="Epoch 7"):
        extract_layer_stat(df, epoch=7)


def test_plot_stat_signature_and_output(tmp_path, dw):
    ours = inspect.signature(plot_stat).parameters
    theirs = inspect.signature(dw.plot_stat).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert {k: p.default for k, p in ours.items() if k in theirs} == {k: p.default for k, p in theirs.items()}
    row = pd.DataFrame({"train-saturation_a": [0.2], "train-saturation_b_1": [0.4]}, index=[3])
    ax = plot_stat(row, "lsat", savepath=str(tmp_path / "run.csv"), epoch=3)
    assert (tmp_path / "run_lsat_train_epoch_3.png").exists()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b_1"]
    assert ax.get_ylabel() == "saturation" and ax.get_title() == "run epoch: 3"


def test_plot_writer_embedded_samples(tmp_path):
    w = CSVandPlottingWriter(str(tmp_path / "run"))
    for e in range(2):
        w.add_scalar("epoch", e)
        w.add_scalars(
            prefix="",
            value_dict={"train-saturation_a": 0.5},
            sample_value_dict={"embed": [(float(e), 1.0), (2.0, 3.0)]},
        )
        w.save()
    assert (tmp_path / "run_embed_train_epoch_1.png").exists()  # delve's name: last sample entry
