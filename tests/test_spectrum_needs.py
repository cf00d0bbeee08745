"""The statistics do only the work asked for: ``spectrum_of(need=...)`` and every caller that passes it.

Each statistic of :data:`analyze.stats.REGISTRY` says which parts of a spectrum it needs; asking for
``lsat`` (or any statistic of the eigenvalues) computes the eigenvalues with ``eigvalsh`` and
nothing else: no eigenvectors (``eigh``), no determinant (one ``slogdet`` serves ``det`` and
``logdet``). The spies below count the calls of those numpy functions. Every value equals the one
computed from a spectrum holding every part, bit for bit, since each part always comes from the
same routine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _runs import make_run
from torch import nn

from analyze import analyze_runs, run_stats
from analyze.stats import (
    DELVE_SEMANTICS,
    REGISTRY,
    SEMANTICS,
    SPECTRUM_PARTS,
    STATS,
    Spectrum,
    compute_stat,
    delve_embed,
    pca_embed,
    spectrum_needs,
    spectrum_of,
)
from capture.moments import Moments
from pipelines import SaturationTracker
from pipelines.dropin import metrics
from pipelines.live_stats import live_values

SPIED = ("eigh", "eigvalsh", "det", "slogdet")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts the calls of numpy.linalg's eigh, eigvalsh, det and slogdet (which still run)."""
    counter: Counter = Counter()
    for name in SPIED:
        real = getattr(np.linalg, name)

        def spy(*args: object, _real: object = real, _name: str = name, **kwargs: object) -> object:
            counter[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(np.linalg, name, spy)
    yield counter


def _cov(d: int, seed: int, rank: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * d, rank or d)) @ rng.normal(size=(rank or d, d)) + 3.0
    x -= x.mean(axis=0)
    return x.T @ x / x.shape[0]


def _value(stat: str, s: Spectrum, semantics: str) -> object:
    return compute_stat(stat, s, 0.9 if REGISTRY[stat].thresholded else None, semantics)


# --------------------------------------------------------------------------- the registry and spectrum_of


def test_every_statistic_says_what_it_needs() -> None:
    for spec in REGISTRY.values():
        for semantics in SEMANTICS:
            assert set(spec.needs_under(semantics)) <= set(SPECTRUM_PARTS)
    assert spectrum_needs(["lsat", "idim", "trc", "dtrc", "pr", "erank", "spectrum"]) == frozenset()
    assert spectrum_needs(["det"]) == spectrum_needs(["logdet"]) == {"det"}
    assert spectrum_needs(["cov", "lsat"]) == {"cov"}
    assert spectrum_needs(["embed"]) == {"vectors"}
    assert spectrum_needs(["embed"], DELVE_SEMANTICS) == {"cov"}
    assert spectrum_needs(["lsat", "lsat"]) == frozenset()  # several phases' lists joined
    with pytest.raises(ValueError, match="invalid stats value 'sat'"):
        spectrum_needs(["sat"])
    with pytest.raises(ValueError, match="need: unknown part"):
        spectrum_of(np.eye(2), need=["eigenvalues"])


@pytest.mark.parametrize("d", [1, 7, 40])
def test_lsat_alone_computes_eigenvalues_only(calls: Counter, d: int) -> None:
    s = spectrum_of(_cov(d, 0), need=spectrum_needs(["lsat"]))
    assert calls == Counter(eigvalsh=1)
    assert s.parts == frozenset() and s.det is None and s.logabsdet is None and s.vectors is None
    assert s.cov is None
    assert sorted(s.to_dict()) == ["raw", "trace"]


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        (["det"], Counter(eigvalsh=1, slogdet=1)),
        (["logdet", "idim"], Counter(eigvalsh=1, slogdet=1)),
        (["embed"], Counter(eigvalsh=1, eigh=1)),
        (["cov", "trc"], Counter(eigvalsh=1)),
        (["lsat", "det", "logdet", "cov", "embed"], Counter(eigvalsh=1, eigh=1, slogdet=1)),
    ],
)
def test_each_part_is_computed_when_asked(calls: Counter, stats: list[str], expected: Counter) -> None:
    spectrum_of(_cov(12, 1), need=spectrum_needs(stats))
    assert calls == expected


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize(("d", "rank"), [(1, None), (9, None), (30, 10), (64, None)])
def test_values_equal_the_full_computation_bit_for_bit(semantics: str, d: int, rank: int | None) -> None:
    c = _cov(d, d, rank)
    full = spectrum_of(c, need=SPECTRUM_PARTS)
    assert full.parts == set(SPECTRUM_PARTS)
    for stat in STATS:
        if stat == "embed":
            continue
        lean = spectrum_of(c, need=spectrum_needs([stat], semantics))
        np.testing.assert_array_equal(lean.raw, full.raw)
        a, b = _value(stat, lean, semantics), _value(stat, full, semantics)
        np.testing.assert_array_equal(a, b, err_msg=stat)
    # the embeddings: the default one needs only the vectors, delve's only the covariance
    x = np.random.default_rng(d).normal(size=(5, d))
    lean = spectrum_of(c, need=spectrum_needs(["embed"]))
    np.testing.assert_array_equal(pca_embed(x, lean.vectors), pca_embed(x, full.vectors))
    lean = spectrum_of(c, need=spectrum_needs(["embed"], DELVE_SEMANTICS))
    np.testing.assert_array_equal(delve_embed(lean.cov, x), delve_embed(full.cov, x))


@pytest.mark.parametrize("d", [2, 10, 50, 200])
def test_eigvalsh_agrees_with_eigh_within_round_off(d: int) -> None:
    """The eigenvalues come from eigvalsh; eigh (delve's routine, with vectors) differs by a few ulps."""
    c = _cov(d, 3, rank=max(1, d // 2))
    lean = spectrum_of(c, need=())
    w = np.linalg.eigh(c, UPLO="U")[0][::-1]
    assert np.max(np.abs(lean.raw - w)) <= 64 * d * np.finfo(float).eps * w[0]
    # the vectors still come from eigh: eigenpairs of C
    v = spectrum_of(c, need=["vectors"], n_vectors=2).vectors
    np.testing.assert_allclose(c @ v, v * lean.raw[:2], atol=1e-12 * w[0])


def test_upper_triangle_only_without_vectors() -> None:
    c = np.array([[2.0, 1.0], [-50.0, 2.0]])  # the lower triangle is garbage
    np.testing.assert_allclose(spectrum_of(c, need=()).raw, [3.0, 1.0], rtol=1e-15)


def test_det_is_numpys_det_from_the_same_lu() -> None:
    """One LU (slogdet) serves det and logdet; det = sign * exp(logabsdet) is numpy's det, bit for bit."""
    rng = np.random.default_rng(7)
    cases = [np.eye(1) * 3.0, np.zeros((3, 3)), np.ones((4, 4)), np.diag([1e200] * 3), np.diag([1e-200] * 3)]
    cases.append(np.array([[1.0, 2.0], [2.0, 1.0]]))  # indefinite: a negative determinant
    for d in (2, 5, 17, 60, 150):
        for scale in (1e-3, 1.0, 1e3):
            x = rng.normal(size=(2 * d, d)) * scale
            cases.append(x.T @ x / (2 * d))
        cases.append(_cov(d, d, rank=max(1, d - 1)))  # singular up to round-off
    for c in cases:
        s = spectrum_of(c, need=["det"])
        with np.errstate(all="ignore"):
            want = float(np.linalg.det(c))
            sign, logabsdet = np.linalg.slogdet(c)
        assert compute_stat("det", s) == want, c.shape
        assert math.copysign(1.0, s.det) == math.copysign(1.0, want)
        assert (s.logdet_sign, s.logabsdet) == (float(sign), float(logabsdet))


def test_missing_parts_are_named_and_nan_covariances_give_nan_parts() -> None:
    lean = spectrum_of(_cov(4, 2), need=())
    for stat, part in (("det", "det"), ("logdet", "det"), ("cov", "cov")):
        with pytest.raises(ValueError, match=f"needs the spectrum part '{part}'.*need=spectrum_needs"):
            compute_stat(stat, lean)
    bad = np.eye(3)
    bad[1, 2] = np.nan
    s = spectrum_of(bad, need=["det"])
    assert s.parts == {"det"} and s.vectors is None and s.cov is None
    for stat in ("det", "logdet", "trc"):
        assert math.isnan(compute_stat(stat, s))
    assert math.isnan(compute_stat("lsat", s, 0.9))


def test_eigvalsh_failure_gives_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigvalsh", fail)
    s = spectrum_of(np.eye(2), need=["cov"])
    assert np.isnan(s.raw).all() and math.isnan(s.trace) and math.isnan(compute_stat("lsat", s, 0.5))
    assert s.det is None and s.vectors is None
    np.testing.assert_array_equal(s.cov, np.eye(2))


def test_partial_spectra_round_trip() -> None:
    s = spectrum_of(_cov(5, 4), need=["det"])
    assert sorted(s.to_dict()) == ["det", "logabsdet", "logdet_sign", "raw", "trace"]
    back = Spectrum.from_dict({k: np.asarray(v) for k, v in s.to_dict().items()})
    assert back.parts == {"det"}
    assert compute_stat("logdet", back) == compute_stat("logdet", s)
    assert compute_stat("det", back) == compute_stat("det", s)
    with pytest.raises(ValueError, match="det, logdet_sign and logabsdet come together"):
        Spectrum(raw=[1.0], trace=1.0, logdet_sign=1.0, logabsdet=0.0)


# --------------------------------------------------------------------------- the callers


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).relu()).relu())


def _train(tracker: SaturationTracker, net: nn.Module, epochs: int = 2) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for _ in range(epochs):
        for _ in range(3):
            net(torch.randn(16, 6)).sum().backward()
        rows.append(tracker.add_saturations())
    tracker.close()
    return rows


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_tracker_lsat_computes_eigenvalues_only(tmp_path: Path, calls: Counter, semantics: str) -> None:
    torch.manual_seed(0)
    net = _Mlp()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", net, semantics=semantics)
    rows = _train(tracker, net)
    assert calls == Counter(eigvalsh=2 * 3)  # 2 epochs, 3 layers
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_tracker_values_equal_the_full_computation(tmp_path: Path, semantics: str) -> None:
    stats = ["lsat", "idim", "det", "trc", "dtrc"]
    torch.manual_seed(0)
    net = _Mlp()
    tracker = SaturationTracker(str(tmp_path / "run"), "npy", net, stats=[*stats, "cov"], semantics=semantics)
    rows = _train(tracker, net)
    for row in rows:
        for name, value in row.items():
            if "covariance-matrix" not in name:
                continue
            full = spectrum_of(value, need=SPECTRUM_PARTS)
            layer = name.split("_", 1)[1]
            phase = name.split("-", 1)[0]
            expected = {
                "saturation": compute_stat("lsat", full, 0.99, semantics),
                "intrinsic-dimensionality": compute_stat("idim", full, 0.99, semantics),
                "covariance-determinant": compute_stat("det", full),
                "covariance-trace": compute_stat("trc", full),
                "diagonal-trace": compute_stat("dtrc", full),
            }
            for long, want in expected.items():
                assert row[f"{phase}-{long}_{layer}"] == want, (long, layer)


def test_tracker_det_alone_adds_one_determinant_per_layer(tmp_path: Path, calls: Counter) -> None:
    torch.manual_seed(0)
    net = _Mlp()
    _train(SaturationTracker(str(tmp_path / "run"), "csv", net, stats=["det", "lsat_train"]), net, epochs=1)
    assert calls == Counter(eigvalsh=3, slogdet=3)


def test_tracker_columns_follow_the_first_recording_without_a_batch_callback(tmp_path: Path) -> None:
    """Layers called in another order than defined: the columns follow the calls, as delve's do."""

    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.first(self.second(x))  # 'second' runs first

    torch.manual_seed(0)
    net = Reversed()
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", net, stats=["idim"])
    net(torch.randn(8, 4))
    tracker.add_saturations()
    tracker.close()
    header = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0).columns.tolist()
    assert header == ["train-intrinsic-dimensionality_second", "train-intrinsic-dimensionality_first"]


def test_dropin_metrics_do_only_their_work(calls: Counter) -> None:
    c = torch.from_numpy(_cov(6, 5))
    metrics.compute_saturation(c)
    metrics.compute_intrinsic_dimensionality(c)
    metrics.compute_diag_trace(c)
    metrics.compute_cov_trace(c)
    assert calls == Counter(eigvalsh=4)
    assert metrics.compute_cov_determinant(c) == float(np.linalg.det(c.numpy()))
    assert calls == Counter(eigvalsh=5, slogdet=1, det=1)  # the spectrum's determinant, the reference's


def test_live_values_do_only_their_work(calls: Counter) -> None:
    x = np.random.default_rng(1).normal(size=(50, 4))
    moments = {("train", "fc", "none"): Moments().update(x)}
    values = live_values(moments, ["lsat", "trc", "pr"], [0.5, 0.9])
    assert calls == Counter(eigvalsh=1)
    full = spectrum_of(np.cov(x.T, bias=True), need=SPECTRUM_PARTS)
    for v in values:
        want = compute_stat(v.stat, full, v.threshold)
        assert v.value == pytest.approx(want, rel=1e-12)


def test_analysis_computes_what_it_needs_and_its_cache_serves_every_scalar(
    tmp_path: Path, calls: Counter
) -> None:
    """lsat: eigenvalues and the determinant (so that the cache serves any scalar), no eigenvectors."""
    from analyze.reduce import chunk_reads

    run = make_run(tmp_path / "r.zarr", seed=3)
    kw = {"cache_dir": tmp_path / "cache", "scheduler": "synchronous", "progress": False, "source": "raw"}
    first = run_stats(run, stats=("lsat",), **kw)
    covariances = calls["eigvalsh"]
    assert covariances > 0 and calls == Counter(eigvalsh=covariances, slogdet=covariances)

    reads = chunk_reads["tasks"]
    scalar_stats = ("lsat", "det", "logdet", "trc", "pr")
    scalars = run_stats(run, stats=scalar_stats, thresholds=(0.5, 0.99), **kw)
    assert chunk_reads["tasks"] == reads and calls["eigvalsh"] == covariances  # all from the cache

    embedded = analyze_runs(run, stats=("lsat", "embed"), **kw)  # the eigenvectors: reduced once more
    assert chunk_reads["tasks"] > reads and calls["eigh"] == covariances
    assert embedded.embeddings

    # the same numbers as an analysis without a cache
    fresh = run_stats(run, stats=scalar_stats, thresholds=(0.5, 0.99), progress=False)
    keys = ["epoch", "phase", "layer", "stat", "threshold"]

    def values(table: pd.DataFrame, stat: str | None = None) -> pd.DataFrame:
        rows = table if stat is None else table[(table["stat"] == stat) & (table["threshold"] == 0.99)]
        return rows.sort_values(keys).set_index(keys)[["value"]].astype(float)

    pd.testing.assert_frame_equal(values(scalars), values(fresh), check_exact=True)
    for table in (first, embedded.table):
        pd.testing.assert_frame_equal(values(table, "lsat"), values(fresh, "lsat"), check_exact=True)
