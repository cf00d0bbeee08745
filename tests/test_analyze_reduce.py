"""The analysis stage's numbers against numpy float64 references computed here.

Every store is written by :class:`capture.Recorder` while a plain forward hook (:class:`Tape`)
keeps what the layers really output. The references (below and in conftest.py) reshape those
outputs by the documented rules, select samples by delve's rules, and compute covariances and
every statistic in float64 numpy; :func:`analyze.analyze_runs` must agree, from raw and from gram stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import numpy_matrix, population_cov
from torch import nn

from analyze import AnalysisError, analyze_runs, inspect_run, parse_epochs
from capture import Recorder, StoreFormatError, open_run

ALL_CONV = ("channelwise", "mean", "max", "median", "flatten")
ALL_TS = ("last_timestep", "timestepwise")
SCALARS = ("lsat", "idim", "trc", "dtrc", "det", "logdet", "pr", "erank")
THRESHOLDS = (0.9, 0.99, 1.0)
PHASES = ("train", "eval")
IDIM_TOLERANCE = 1e-12  # the default idim's documented tolerance, written out independently

#: MixedNet's layers and the layout the default semantics give their outputs.
MIXED_LAYOUTS = {
    "conv2d": "conv",  # strided Conv2d, (B, 3, 4, 4)
    "conv1d": "conv",  # a Conv1d output is a conv map under the default semantics, (B, 4, 16)
    "bilstm": "sequence",  # bidirectional, not batch first: (T, B, 6) becomes (B, T, 6)
    "gru": "sequence",  # (B, 16, 3)
    "seq_fc": "sequence",  # a Linear on a 3-D input, (B, 16, 2)
    "out": "flat",  # (B, 2)
}

pytestmark = pytest.mark.filterwarnings("error")


# --------------------------------------------------------------------------- what the layers output


@dataclass
class Call:
    """One forward call of one layer, as a plain forward hook sees it."""

    layer: str
    epoch: int
    phase: str
    counter: int  # the layer's forward calls so far, train and eval together, 1-based (delve's counter)
    tensor: torch.Tensor  # the output, samples first, in the dtype it is stored in

    @property
    def x(self) -> np.ndarray:
        return self.tensor.to(torch.float64).numpy()


@dataclass
class Tape:
    """Plain forward hooks on ``modules``: every output, samples first (``cast``: as stored)."""

    modules: dict[str, nn.Module]
    cast: torch.dtype | None = None
    epoch: int = 0
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._count: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(module, nn.RNNBase) and not module.batch_first:
                out = out.transpose(0, 1)  # samples first
            out = out.detach().clone()
            if self.cast is not None:
                out = out.to(self.cast)
            self._count[name] = self._count.get(name, 0) + 1
            phase = "train" if module.training else "eval"
            self.calls.append(Call(name, self.epoch, phase, self._count[name], out))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def selected(
        self,
        layer: str,
        epoch: int,
        phase: str,
        log_interval: int | None = None,
        max_samples: int | None = None,
        calls: tuple[int | None, int | None] | None = None,
    ) -> list[Call]:
        """The calls (cut to the sample budget) that delve's selection rules keep."""
        kept: list[Call] = []
        budget = max_samples
        for c in self.calls:
            if (c.layer, c.epoch, c.phase) != (layer, epoch, phase):
                continue
            if log_interval is not None and c.counter % log_interval != 0:
                continue
            if budget is not None:
                if budget == 0:
                    break
                c = Call(c.layer, c.epoch, c.phase, c.counter, c.tensor[:budget])
                budget -= len(c.tensor)
            kept.append(c)
        return kept if calls is None else kept[slice(*calls)]


def train(
    net: nn.Module,
    recorders: Sequence[Recorder],
    tape: Tape | None,
    *,
    shape: tuple[int, ...],
    epochs: int = 2,
    train_batches: Sequence[int] = (12, 12, 7),
    eval_batches: Sequence[int] = (10, 9),
    seed: int = 1,
    lr: float = 0.1,
) -> None:
    """A training loop: SGD steps on train batches, eval batches under ``no_grad``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for epoch in range(epochs):
        if tape is not None:
            tape.epoch = epoch
        net.train()
        for b in train_batches:
            loss = net(torch.randn(b, *shape, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            for b in eval_batches:
                net(torch.randn(b, *shape, generator=gen))
        for rec in recorders:
            rec.add_scalar("epoch", epoch)
            rec.end_epoch()


# --------------------------------------------------------------------------- references (float64 numpy)


def method_of(layout: str, cm: str, tm: str) -> str | None:
    return {"conv": cm, "sequence": tm, "flat": None}[layout]


@dataclass
class Ref:
    """Every statistic of one covariance, the documented default definitions."""

    cov: np.ndarray
    thresholds: Sequence[float]

    def __post_init__(self) -> None:
        self.lam = np.clip(np.sort(np.linalg.eigvalsh(self.cov))[::-1], 0.0, None)
        self.d = len(self.cov)
        total = self.lam.sum()
        sign, logabs = np.linalg.slogdet(self.cov)
        v: dict[Any, float] = {
            "trc": float(np.trace(self.cov)),
            "dtrc": float(total),
            "det": float(np.linalg.det(self.cov)),
            "logdet": float(logabs) if sign > 0 else -math.inf,
        }
        if total > 0:
            frac = np.cumsum(self.lam) / total
            for t in self.thresholds:
                k = next(i + 1 for i, f in enumerate(frac) if f >= t - IDIM_TOLERANCE)
                v["idim", t], v["lsat", t] = k, k / self.d
            v["pr"] = total**2 / np.sum(self.lam**2)
            p = self.lam[self.lam > 0] / total
            v["erank"] = math.exp(-np.sum(p * np.log(p)))
        else:
            for t in self.thresholds:
                v["idim", t] = v["lsat", t] = 0.0
            v["pr"] = v["erank"] = 0.0
        self.values = v

    def vectors(self) -> np.ndarray:
        """The two leading eigenvectors, each with its largest-magnitude entry positive."""
        w, vec = np.linalg.eigh(self.cov)
        top = vec[:, np.argsort(w)[::-1][:2]]
        idx = np.argmax(np.abs(top), axis=0)
        return top * np.sign(top[idx, np.arange(top.shape[1])])

    def problems(self, got: dict[Any, float], delta: float) -> list[str]:
        """Differences beyond what a covariance accurate to ``delta`` (relative) explains."""
        out = []
        lam_max = self.lam[0] if self.d else 0.0
        cond_err = 10 * self.d * delta * lam_max / max(self.lam[-1], 1e-300)
        for key, want in self.values.items():
            stat = key[0] if isinstance(key, tuple) else key
            have = got.get(key)
            if have is None:
                out.append(f"{key}: missing")
                continue
            if stat in ("idim", "lsat"):
                ok = have == want
            elif stat in ("trc", "dtrc"):
                ok = abs(have - want) <= 10 * delta * (abs(want) + lam_max)
            elif stat in ("pr", "erank"):
                ok = abs(have - want) <= 100 * self.d * delta * max(abs(want), 1.0)
            elif cond_err < 1e-3:  # det, logdet of a well-conditioned covariance
                ok = (
                    abs(have - want) <= cond_err * abs(want)
                    if stat == "det"
                    else abs(have - want) <= cond_err
                )
            else:  # singular or nearly: det is round-off, bounded by the smallest eigenvalue's error
                bound = math.log(self.lam[-1] + 10 * self.d * delta * lam_max) + (self.d - 1) * math.log(
                    lam_max
                )
                log_have = have if stat == "logdet" else (math.log(abs(have)) if have else -math.inf)
                ok = log_have <= bound + 1e-9
            if not ok:
                out.append(f"{key}: got {have!r}, want {want!r}")
        return out


#: Relative accuracy of the analysed covariance: the values are the float32 activations
#: themselves, or (``mean``) their float64 averages.
DELTA = 1e-12


def table_values(table: Any) -> dict[tuple, dict[Any, float]]:
    """``(epoch, phase, layer, conv, ts)`` -> ``{stat or (stat, threshold): value}``."""
    out: dict[tuple, dict[Any, float]] = {}
    for row in table.itertuples(index=False):
        if row.layer == "":
            continue
        key = (row.epoch, row.phase, row.layer, row.conv_method, row.timeseries_method)
        stat = (row.stat, row.threshold) if row.stat in ("idim", "lsat") else row.stat
        out.setdefault(key, {})[stat] = row.value
    return out


# --------------------------------------------------------------------------- stores


@dataclass
class Stores:
    raw: str
    gram: str
    tape: Tape


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, mixed_net: Any) -> Stores:
    """MixedNet trained 2 epochs; a raw store (many small chunks) and a gram store (several blocks)."""
    root = tmp_path_factory.mktemp("mixed")
    net = mixed_net(0)
    tape = Tape({name: getattr(net, name) for name in MIXED_LAYOUTS})
    with (
        Recorder(net, root / "raw.zarr", mode="raw", chunk_bytes=2048) as raw,
        Recorder(
            net,
            root / "gram.zarr",
            mode="gram",
            conv_methods=ALL_CONV,
            timeseries_methods=ALL_TS,
            gram_block_rows=16,
        ) as gram,
    ):
        assert raw.layer_names == list(MIXED_LAYOUTS)
        train(net, [raw, gram], tape, shape=(1, 8, 8))
    tape.remove()
    return Stores(str(root / "raw.zarr"), str(root / "gram.zarr"), tape)


# --------------------------------------------------------------------------- every statistic and method


@pytest.mark.parametrize("source", ["raw", "gram"])
def test_every_statistic_and_method_matches_numpy(mixed: Stores, source: str) -> None:
    path = mixed.raw if source == "raw" else mixed.gram
    stats = [*SCALARS, "spectrum", "cov"] + (["embed"] if source == "raw" else [])
    result = analyze_runs(
        path,
        thresholds=THRESHOLDS,
        conv_methods=ALL_CONV,
        timeseries_methods=ALL_TS,
        stats=stats,
        progress=False,
    )
    assert not result.nonfinite and not result.failures
    got = table_values(result.table)
    run = source
    problems: list[str] = []
    refs: dict[tuple, tuple[Ref, np.ndarray]] = {}
    checked = set()
    for epoch in (0, 1):
        for phase in PHASES:
            for layer, layout in MIXED_LAYOUTS.items():
                for cm in ALL_CONV:
                    for tm in ALL_TS:
                        method = method_of(layout, cm, tm)
                        where = (epoch, phase, layer, cm, tm)
                        checked.add(where)
                        if (epoch, phase, layer, method) not in refs:
                            calls = mixed.tape.selected(layer, epoch, phase)
                            mat = np.concatenate([numpy_matrix(c.x, layout, method) for c in calls])
                            refs[epoch, phase, layer, method] = (Ref(population_cov(mat), THRESHOLDS), mat)
                        ref, mat = refs[epoch, phase, layer, method]
                        delta = DELTA
                        problems += [f"{where} {p}" for p in ref.problems(got.get(where, {}), delta)]
                        key = (run, *where)
                        lam = result.spectra[key]
                        scale = 10 * ref.d * delta * ref.lam[0]
                        if not np.allclose(lam, ref.lam, rtol=0, atol=scale):
                            problems.append(f"{where} spectrum {lam} != {ref.lam}")
                        if not np.allclose(result.covariances[key], ref.cov, rtol=0, atol=scale):
                            problems.append(f"{where} cov differs")
                        if source == "raw":
                            want = (mat - mat.mean(axis=0)) @ ref.vectors()
                            have = result.embeddings[key]
                            tol = 100 * delta * np.abs(want).max()
                            if have.shape != want.shape or not np.allclose(have, want, rtol=0, atol=tol):
                                problems.append(f"{where} embed differs")
    assert not problems, "\n".join(problems[:20])
    # Nothing else in the table: every (epoch, phase, layer, conv, ts) of it was checked.
    assert set(got) == checked and len(checked) == 2 * 2 * 6 * 5 * 2
    scalars = result.table[result.table["layer"] == ""]
    assert scalars[["epoch", "stat", "value"]].values.tolist() == [[0, "epoch", 0], [1, "epoch", 1]]


# --------------------------------------------------------------------------- analysis-time interpolation


class InterpNet(nn.Module):
    """Conv maps of 10x10, 5x5 and 6x3 (resized by downsample=4) and 4x4 (not: not larger)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Conv2d(1, 3, 3, padding=1)  # 10x10
        self.strided = nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 5x5
        self.tall = nn.Conv2d(3, 2, (5, 1), stride=(1, 4))  # 6x3: only one side larger than 4
        self.small = nn.Conv2d(4, 2, 2)  # 4x4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.big(x))
        b = self.strided(a)
        return self.small(b).mean((1, 2, 3)) + self.tall(a).mean((1, 2, 3))


def test_analysis_time_interpolation_matches_torch_interpolate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = InterpNet()
    names = ["big", "strided", "tall", "small"]
    tape = Tape({n: getattr(net, n) for n in names})
    with (
        Recorder(net, tmp_path / "raw.zarr", chunk_bytes=1024) as raw,
        Recorder(
            net,
            tmp_path / "gram.zarr",
            mode="gram",
            interpolation="bilinear",
            downsample=4,
            conv_methods=("channelwise", "max", "flatten"),
        ) as gram,
    ):
        train(net, [raw, gram], tape, shape=(1, 10, 10), epochs=1, train_batches=(6, 5), eval_batches=(4,))
    tape.remove()
    methods = ("channelwise", "max", "flatten")
    result = analyze_runs(
        tmp_path / "raw.zarr",
        conv_methods=methods,
        stats=("cov", "trc"),
        interpolation="bilinear",
        downsample=4,
        progress=False,
    )
    for layer in names:
        for phase in PHASES:
            xs = []
            for c in tape.selected(layer, 0, phase):
                t = c.tensor
                if t.shape[2] > 4 or t.shape[3] > 4:  # delve's rule: only maps larger than the size
                    t = F.interpolate(t, size=4, mode="bilinear")
                    assert t.shape[2:] == (4, 4)
                xs.append(t.to(torch.float64).numpy())
            for m in methods:
                want = population_cov(np.concatenate([numpy_matrix(x, "conv", m) for x in xs]))
                have = result.covariances[("raw", 0, phase, layer, m, "last_timestep")]
                np.testing.assert_allclose(have, want, rtol=0, atol=1e-12 * np.abs(want).max())
    assert len(result.covariances[("raw", 0, "train", "small", "flatten", "last_timestep")]) == 2 * 4 * 4
    # The same resizing done by the capture hook (gram mode) gives the same statistics.
    captured = analyze_runs(
        tmp_path / "gram.zarr", conv_methods=methods, stats=("trc", "lsat", "idim"), progress=False
    )
    analysed = analyze_runs(
        tmp_path / "raw.zarr",
        conv_methods=methods,
        stats=("trc", "lsat", "idim"),
        interpolation="bilinear",
        downsample=4,
        progress=False,
    )
    np.testing.assert_allclose(captured.table["value"], analysed.table["value"], rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- sample selection


SELECTIONS = [
    {"log_interval": 2},
    {"max_samples": 20},
    {"log_interval": 3, "max_samples": 15},
    {"calls": (1, None)},
    {"calls": (-1, None)},
    {"log_interval": 2, "calls": (0, 1)},
]


@pytest.mark.parametrize("selection", SELECTIONS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_selection_log_interval_max_samples_calls(mixed: Stores, selection: dict[str, Any]) -> None:
    layers = {"conv2d": "conv", "bilstm": "sequence", "out": "flat"}
    result = analyze_runs(
        mixed.raw,
        layers=list(layers),
        conv_methods=("channelwise", "flatten"),
        stats=("cov",),
        progress=False,
        **selection,
    )
    checked = 0
    for epoch in (0, 1):
        for phase in PHASES:
            for layer, layout in layers.items():
                calls = mixed.tape.selected(layer, epoch, phase, **selection)
                for cm in ("channelwise", "flatten"):
                    key = (Path(mixed.raw).stem, epoch, phase, layer, cm, "last_timestep")
                    if not calls:  # e.g. log_interval=3 keeps no eval call of epoch 0: no value at all
                        assert key not in result.covariances
                        continue
                    method = method_of(layout, cm, "last_timestep")
                    want = population_cov(np.concatenate([numpy_matrix(c.x, layout, method) for c in calls]))
                    have = result.covariances[key]
                    np.testing.assert_allclose(have, want, rtol=0, atol=1e-12 * np.abs(want).max())
                    checked += 1
    assert checked >= 3 * 3 * 2


# --------------------------------------------------------------------------- several ranks


def test_multi_rank_store_analyses_the_union_of_the_data(tmp_path: Path) -> None:
    """Two processes of one run (rank 0 and 1) with different data: the covariance of the union."""
    path = tmp_path / "ddp.zarr"

    def model() -> nn.Module:
        torch.manual_seed(0)  # the same weights in every rank, as under DDP
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))

    tapes = []
    batches = {0: ((8, 8), (5,)), 1: ((6,), (7, 3))}
    for rank in (0, 1):
        net = model()
        tape = Tape({"0": net[0], "3": net[3]})
        with Recorder(net, path, mode="both", rank=rank, world_size=2, chunk_bytes=512) as rec:
            train(
                net,
                [rec],
                tape,
                shape=(1, 6, 6),
                train_batches=batches[rank][0],
                eval_batches=batches[rank][1],
                seed=10 + rank,
                lr=0.0,
            )
        tape.remove()
        tapes.append(tape)
        if rank == 0:  # rank 1 has not committed anything yet: no complete epoch
            assert open_run(path).epochs == []
            with pytest.raises(AnalysisError, match="no complete epoch"):
                analyze_runs(path, progress=False)
    assert [p.rank for p in open_run(path).ranks] == [0, 1]
    for source in ("raw", "gram"):
        result = analyze_runs(
            path, conv_methods=("channelwise",), stats=("cov", "trc"), source=source, progress=False
        )
        for epoch in (0, 1):
            for phase in PHASES:
                for layer, layout in (("0", "conv"), ("3", "flat")):
                    calls = [c for tape in tapes for c in tape.selected(layer, epoch, phase)]
                    want = population_cov(np.concatenate([numpy_matrix(c.x, layout, "channelwise") for c in calls]))
                    have = result.covariances[("ddp", epoch, phase, layer, "channelwise", "last_timestep")]
                    np.testing.assert_allclose(have, want, rtol=0, atol=1e-12 * np.abs(want).max())


# --------------------------------------------------------------------------- numerical edge cases


class ConstAndFree(nn.Module):
    """``const`` outputs the same row for every input (zero weights); ``free`` is an ordinary Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.const = nn.Linear(3, 4)
        self.free = nn.Linear(3, 2)
        with torch.no_grad():
            self.const.weight.zero_()
            self.const.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.const(x).sum(1, keepdim=True) + self.free(x)


ZERO_VARIANCE = {"lsat": 0.0, "idim": 0.0, "trc": 0.0, "dtrc": 0.0, "det": 0.0, "pr": 0.0, "erank": 0.0}


@pytest.fixture(scope="module")
def edge_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Tape]:
    """ConstAndFree: train 2 batches of 6, eval a single sample; both raw and gram."""
    torch.manual_seed(3)
    net = ConstAndFree()
    path = tmp_path_factory.mktemp("edge") / "edge.zarr"
    tape = Tape({"const": net.const, "free": net.free})
    with Recorder(net, path, mode="both") as rec:
        train(net, [rec], tape, shape=(3,), epochs=1, train_batches=(6, 6), eval_batches=(1,), lr=0.0)
    tape.remove()
    return str(path), tape


@pytest.mark.parametrize("source", ["raw", "gram"])
def test_zero_covariance_constant_layer_and_single_sample(edge_store: tuple[str, Tape], source: str) -> None:
    path, tape = edge_store
    result = analyze_runs(path, stats=(*SCALARS, "spectrum"), source=source, progress=False)
    got = table_values(result.table)
    for layer, phase in (("const", "train"), ("const", "eval"), ("free", "eval")):
        values = got[(0, phase, layer, "channelwise", "last_timestep")]
        assert {
            k[0] if isinstance(k, tuple) else k: v for k, v in values.items() if k != "logdet"
        } == ZERO_VARIANCE
        assert values["logdet"] == -math.inf
        assert np.array_equal(
            result.spectra[("edge", 0, phase, layer, "channelwise", "last_timestep")],
            [0.0] * (4 if layer == "const" else 2),
        )
    # The one layer with variance: an ordinary spectrum, equal to the reference.
    mat = np.concatenate([c.x for c in tape.selected("free", 0, "train")])
    ref = Ref(population_cov(mat), (0.99,))
    assert not ref.problems(got[(0, "train", "free", "channelwise", "last_timestep")], 1e-12)
    assert ref.values["trc"] > 0


@pytest.mark.parametrize("source", ["raw", "gram"])
def test_nonfinite_activations_warn_count_and_give_nan(tmp_path: Path, source: str) -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(6, 3)
    x[1, 0] = math.nan
    x[4, 2] = math.inf
    with Recorder(net, tmp_path / "nf.zarr", mode="both") as rec:
        net.train()
        net(x)
        net.eval()
        clean = torch.randn(5, 3)
        with torch.no_grad():
            out = net(clean)
        rec.end_epoch()
    with pytest.warns(RuntimeWarning, match="2 sample.*NaN/Inf"):
        result = analyze_runs(
            tmp_path / "nf.zarr", stats=(*SCALARS, "spectrum"), source=source, progress=False
        )
    key = ("nf", 0, "train", "0", "channelwise", "last_timestep")
    assert result.nonfinite == {key: 2}
    got = table_values(result.table)
    assert all(math.isnan(v) for v in got[key[1:]].values())
    assert np.isnan(result.spectra[key]).all()
    ref = Ref(population_cov(out.to(torch.float64).numpy()), (0.99,))
    assert not ref.problems(got[(0, "eval", "0", "channelwise", "last_timestep")], 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_storage(tmp_path: Path, dtype: torch.dtype) -> None:
    """Stored values are the outputs rounded to the storage type; the analysis uses exactly those."""
    name = str(dtype).removeprefix("torch.")
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    tape = Tape({"0": net[0], "3": net[3]}, cast=dtype)
    with Recorder(net, tmp_path / "lp.zarr", dtype=name, chunk_bytes=256) as rec:
        train(net, [rec], tape, shape=(2, 4, 4), epochs=1, train_batches=(9, 8), eval_batches=(7,))
    tape.remove()
    layers = {layer["name"]: layer for layer in inspect_run(tmp_path / "lp.zarr")["layers"]}
    assert {layers["0"]["stored_dtype"], layers["3"]["stored_dtype"]} == {name}
    methods = ("channelwise", "max", "mean", "flatten")
    result = analyze_runs(
        tmp_path / "lp.zarr",
        conv_methods=methods,
        stats=("cov", "embed", *SCALARS),
        interpolation="bilinear",  # resizes nothing here (2x2 maps)
        downsample=3,
        progress=False,
    )
    got = table_values(result.table)
    for phase in PHASES:
        for layer, layout in (("0", "conv"), ("3", "flat")):
            for m in methods:
                calls = tape.selected(layer, 0, phase)
                mat = np.concatenate(
                    [numpy_matrix(c.x, layout, m if layout == "conv" else "none") for c in calls]
                )
                ref = Ref(population_cov(mat), (0.99,))
                key = ("lp", 0, phase, layer, m, "last_timestep")
                delta = 1e-12
                np.testing.assert_allclose(
                    result.covariances[key], ref.cov, rtol=0, atol=delta * np.abs(ref.cov).max()
                )
                assert not ref.problems(got[key[1:]], delta)
                want = (mat - mat.mean(axis=0)) @ ref.vectors()
                np.testing.assert_allclose(
                    result.embeddings[key], want, rtol=0, atol=100 * delta * np.abs(want).max()
                )


# --------------------------------------------------------------------------- parse_epochs


@pytest.mark.parametrize(
    ("spec", "available", "expected"),
    [
        (None, [0, 1, 2, 3], [0, 1, 2, 3]),
        ("all", [0, 1, 2, 3], [0, 1, 2, 3]),
        ("", [2, 3], [2, 3]),
        ("last", [0, 1, 2, 3], [3]),
        ("-1", [0, 1, 2, 3], [3]),
        (-1, [4, 5], [5]),
        ("0,2-3", [0, 1, 2, 3], [0, 2, 3]),
        (" 3 , 1-1,3 ", [0, 1, 2, 3], [1, 3]),
        (2, [0, 1, 2], [2]),
        ([3, 0, 3], [0, 1, 2, 3], [0, 3]),
        ("last,0", [0, 1, 2], [0, 2]),
    ],
)
def test_parse_epochs(spec: Any, available: list[int], expected: list[int]) -> None:
    assert parse_epochs(spec, available) == expected


@pytest.mark.parametrize(
    ("spec", "available", "match"),
    [
        ("x", [0, 1], "cannot read 'x'"),
        ("1-", [0, 1], "cannot read"),
        ("0,,1", [0, 1], "cannot read"),
        ("5", [0, 1], r"epoch\(s\) \[5\] out of range; complete epochs are 0-1"),
        ("1-3", [0, 1], r"\[2, 3\] out of range"),
        ("-2", [0, 1], "out of range"),
        ([7], [0, 1], "out of range"),
        (3, [], "complete epochs are none"),
        ("last", [], "no complete epoch"),
    ],
)
def test_parse_epochs_errors(spec: Any, available: list[int], match: str) -> None:
    with pytest.raises(AnalysisError, match=match):
        parse_epochs(spec, available)


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gram_only(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A gram-only store of a Conv2d and a Linear that captured ``channelwise`` only."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    path = tmp_path_factory.mktemp("gram_only") / "g.zarr"
    with Recorder(net, path, mode="gram") as rec:
        train(net, [rec], None, shape=(1, 4, 4), epochs=1, train_batches=(5,), eval_batches=())
    return str(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": "nope*"}, r"layers: 'nope\*' matches no layer; layers are: 0, 2"),
        ({"layers": ["0", "x?"]}, "'x\\?' matches no layer"),
        ({"thresholds": 0}, "threshold"),
        ({"thresholds": 1.5}, "threshold"),
        ({"thresholds": [0.5, -0.1]}, "threshold"),
        ({"thresholds": math.nan}, "threshold"),
        ({"conv_methods": "avg"}, "unknown conv method 'avg'; valid values are: channelwise, mean"),
        ({"timeseries_methods": "first"}, "unknown time-series method 'first'"),
        ({"stats": ["lsat", "sat"]}, "'sat'"),
        ({"phases": "test"}, "unknown phase 'test'"),
        ({"compat": "delve"}, "compat"),
        ({"scheduler": "fast"}, "scheduler"),
        ({"conv_methods": ("channelwise", "mean")}, "did not capture the mean reduction"),
        ({"log_interval": 2}, "need raw activations"),
        ({"max_samples": 0}, "max_samples"),
        ({"interpolation": "bilinear", "downsample": 2}, "need raw activations"),
        ({"interpolation": "cubic", "downsample": 2}, "interpolation"),
        ({"source": "raw"}, "source='raw' needs raw activations"),
    ],
)
def test_analysis_errors(gram_only: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(AnalysisError, match=match):
        analyze_runs(gram_only, progress=False, **kwargs)


def test_missing_and_foreign_stores(tmp_path: Path, gram_only: str) -> None:
    with pytest.raises(FileNotFoundError, match="no run store here"):
        analyze_runs(tmp_path / "missing.zarr", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a store")
    with pytest.raises(StoreFormatError):
        analyze_runs([gram_only, foreign], progress=False)
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(StoreFormatError, match="not a delve-pipeline run store"):
        analyze_runs(tmp_path / "other.zarr", progress=False)
    # The gram-only store itself analyses fine for what it captured.
    ok = analyze_runs(gram_only, phases="train", log_interval=1, progress=False)  # 1 keeps every call
    assert set(ok.table["layer"]) == {"0", "2", ""} and ok.table["value"].notna().all()


# --------------------------------------------------------------------------- the chunk reader


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_chunk_reader_reads_what_zarr_reads(tmp_path: Path, dtype: str, compression: str) -> None:
    """``RawChunks`` (plain file reads, the reduction's reader) against zarr's own read."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(2, 3, 3))
    with Recorder(net, tmp_path / "r.zarr", dtype=dtype, compression=compression, chunk_bytes=300) as rec:
        for b in (5, 4, 6):
            net(torch.randn(b, 2, 5, 5))
        rec.end_epoch()
    raw = open_run(tmp_path / "r.zarr").ranks[0].raw("0")
    reader = raw.reader()
    assert reader.files() is not None and reader.n_chunks >= 3
    chunks = list((c, r, x.copy()) for c, r, x in reader.chunks())
    assert [c for c, _, _ in chunks] == list(range(reader.n_chunks))
    assert [r for _, r, _ in chunks] == [c * reader.chunk_rows for c in range(reader.n_chunks)]
    expected = raw[:]  # zarr, decoded
    np.testing.assert_array_equal(np.concatenate([x for _, _, x in chunks]), expected)
    assert expected.dtype == (np.float16 if dtype == "float16" else np.float32)
    # a sub-range, and an array that is not plain chunk files (zarr reads it): the same values
    c, first, x = next(iter(reader.chunks(2, 3)))
    np.testing.assert_array_equal(x, expected[first : first + len(x)])
    other = zarr.create_array(
        tmp_path / "v2keys.zarr",
        shape=raw.array.shape,
        chunks=raw.array.chunks,
        dtype=raw.array.dtype,
        chunk_key_encoding={"name": "v2", "separator": "."},
    )
    other[:] = raw.array[:]
    via_zarr = type(reader)(
        str(tmp_path / "v2keys.zarr"), "", raw.rows, reader.chunk_rows, reader.stored_dtype
    )
    assert via_zarr.files() is None
    np.testing.assert_array_equal(np.concatenate([x for _, _, x in via_zarr.chunks()]), expected)
