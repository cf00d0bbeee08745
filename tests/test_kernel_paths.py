"""One set of moment kernels (capture.moments), checked on every path that uses it.

- Moments of any layout and method are within 1e-12 relative of a two-pass float64 numpy
  reference, also with a large common offset (+1000) on the values.
- The same rows in the same batches give the same bits on every path: the kernel itself, the
  capture hook's blocks (what the drop-in tracker receives), the reduction of a raw store, the
  ``Moments`` shell, ``TorchCovarianceMatrix`` and the PCA layers.
- Merging partial moments in any grouping equals one pass to 1e-12.
- The shift rule (the first slab's mean) and the ``mean`` conv method in float64.

The references are independent of the package: numpy float64, two passes, and the reshaping rules
in numpy (``reference_matrix``, tests/conftest.py; ``mean`` in float64).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from analyze import analyze_runs
from analyze.reduce import RawSource, raw_reduction_graph
from capture import GramBlock, Recorder, open_run
from capture.format import BLOCK_KIND_EPOCH, BLOCK_KIND_LAST_CALL
from capture.moments import (
    Moments,
    batch_moments,
    helper_thread,
    merge_moments,
    shift_of,
    slab_rows,
    tree_merge,
)
from capture.reshape import METHODS, matrix_source
from pipelines.dropin import Conv2DPCALayer, LinearPCALayer, TorchCovarianceMatrix

pytestmark = pytest.mark.filterwarnings("error")

# -- references ----------------------------------------------------------------------------------


def two_pass(mat: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and centred second moment of the rows of ``mat``, float64, two passes."""
    x = np.asarray(mat, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    return len(x), mean, centred.T @ centred


def rel(actual: Any, expected: Any) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max(initial=0.0)
    diff = np.abs(actual - expected).max(initial=0.0)
    return diff / scale if scale > 0 else diff


def assert_same_bits(a: tuple, b: tuple, what: str) -> None:
    assert int(a[0]) == int(b[0]), what
    for x, y, name in ((a[1], b[1], "mean"), (a[2], b[2], "m2")):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and np.array_equal(x, y), f"{what}: {name} differs ({rel(x, y):.1e})"


# -- the kernel against the reference ------------------------------------------------------------

matrix_cases = st.fixed_dictionaries(
    {
        "n": st.integers(1, 9000),
        "d": st.one_of(st.integers(1, 24), st.sampled_from([300, 700])),  # wide: several slabs
        "dtype": st.sampled_from([np.float32, np.float64, np.float16]),
        "offset": st.sampled_from([0.0, 1000.0]),
        "layout": st.sampled_from(["sample", "feature", "feature-runs"]),
        "seed": st.integers(0, 2**32 - 1),
    }
)


@settings(max_examples=40, deadline=None)
@given(case=matrix_cases)
def test_batch_moments_match_the_two_pass_reference(case: dict[str, Any]) -> None:
    rng = np.random.default_rng(case["seed"])
    n, d = case["n"], case["d"]
    spread = rng.uniform(0.1, 3.0, size=d)
    rows = (rng.standard_normal((n, d)) * spread + case["offset"] + rng.standard_normal(d)).astype(
        case["dtype"]
    )
    if case["layout"] == "sample":
        x, feature_major = rows, False
    elif case["layout"] == "feature":
        x, feature_major = np.ascontiguousarray(rows.T), True
    else:  # (d, a, b) view of an (a, d, b) array, as a channelwise conv map (N, C, positions)
        b = max(1, n // max(1, int(rng.integers(1, 8))))
        a = n // b
        rows = rows[: a * b]
        x, feature_major = rows.reshape(a, b, d).transpose(0, 2, 1).copy().transpose(1, 0, 2), True
    count, mean, m2 = batch_moments(x, feature_major)
    ref = two_pass(rows)
    assert count == ref[0]
    assert rel(mean, ref[1]) <= 1e-12
    assert rel(m2, ref[2]) <= 1e-12
    assert np.array_equal(m2, m2.T)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize(("layout", "method"), [(lay, m) for lay, ms in METHODS.items() for m in ms])
def test_every_layout_and_method_matches_the_reference(
    layout: str, method: str, offset: float, reference_matrix: Any
) -> None:
    rng = np.random.default_rng(7)
    shape = {"conv": (13, 5, 9, 7), "sequence": (11, 6, 4), "flat": (300, 7)}[layout]
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    mat, feature_major = matrix_source(x, layout, method)
    got = batch_moments(mat, feature_major)
    ref = two_pass(reference_matrix(x, layout, method))
    assert got[0] == ref[0] and rel(got[1], ref[1]) <= 1e-12 and rel(got[2], ref[2]) <= 1e-12


def test_torch_inputs_give_torch_results_with_the_same_bits() -> None:
    x = np.random.default_rng(1).standard_normal((700, 5)).astype(np.float32) + 1000
    a = batch_moments(x)
    b = batch_moments(torch.from_numpy(x))
    assert isinstance(b[2], torch.Tensor) and b[2].dtype == torch.float64
    assert_same_bits(a, (b[0], b[1].numpy(), b[2].numpy()), "torch")


@pytest.mark.parametrize("feature_major", [False, True])
def test_a_helper_thread_changes_no_bit(feature_major: bool) -> None:
    """A long batch is taken as two halves; the second may run on the helper thread."""
    rng = np.random.default_rng(4)
    d = 300
    rows = (rng.standard_normal((2 * slab_rows(d) + 77, d)) + 1000).astype(np.float32)
    x = np.ascontiguousarray(rows.T) if feature_major else rows
    serial = batch_moments(x, feature_major)
    assert_same_bits(batch_moments(x, feature_major, helper=helper_thread()), serial, "helper")
    ref = two_pass(rows)
    assert rel(serial[1], ref[1]) <= 1e-12 and rel(serial[2], ref[2]) <= 1e-12
    # long batches added to a block's shifted sums (wide: fewer than 8 rows per feature)
    wide = (rng.standard_normal((2 * slab_rows(1100) + 150, 1100)) + 1000).astype(np.float32)
    a, b = Moments(), Moments()
    for part in (wide[:100], wide[100:]):
        a.update(part.T if feature_major else part, feature_major)
        b.update(part.T if feature_major else part, feature_major, helper=helper_thread())
    assert a._block is not None  # the streamed shifted-sums path
    assert_same_bits(a.compute(), b.compute(), "helper, shifted sums")
    assert rel(a.m2, two_pass(wide)[2]) <= 1e-12


@pytest.mark.parametrize("feature_major", [False, True])
def test_short_batches_stream_through_one_slab(feature_major: bool) -> None:
    """Short batches (fewer than 8 rows per feature) fill one slab after the other of a block."""
    rng = np.random.default_rng(6)
    d = 1100
    step = slab_rows(d)
    rows = (rng.standard_normal((3 * step + 17, d)) * 2 + 1000).astype(np.float32)

    def fed(part: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(part.T) if feature_major else part

    # one short batch of several slabs: the bits of batch_moments
    alone = Moments().update(fed(rows), feature_major).compute()
    assert_same_bits(alone, batch_moments(fed(rows), feature_major), "one short batch")
    # batches of any sizes, slabs across their boundaries; one of them with a NaN
    sizes = [100, step - 50, 30, step + 300, len(rows) - (100 + step - 50 + 30 + step + 300)]
    parts = np.split(rows, np.cumsum(sizes)[:-1])
    acc = Moments(keep_last=True)
    flags = []
    for part in parts:
        acc.update(fed(part), feature_major)
        flags.append(acc.last_finite)
    assert flags == [True] * len(parts)
    ref = two_pass(rows)
    got = acc.compute()
    assert got[0] == len(rows) and rel(got[1], ref[1]) <= 1e-12 and rel(got[2], ref[2]) <= 1e-12
    assert_same_bits(acc.last(), batch_moments(fed(parts[-1]), feature_major), "last batch")
    bad = parts[2].copy()
    bad[3, 5] = np.nan
    acc.update(fed(bad), feature_major)
    assert acc.last_finite is False
    acc.update(fed(parts[0]), feature_major)
    assert acc.last_finite is True  # a finite batch after a NaN is known to be finite


def test_the_blas_without_the_gil_gives_the_wrappers_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The products go through scipy's Cython BLAS pointer (no GIL); scipy's wrapper is the fallback."""
    import capture.moments as kernels

    rng = np.random.default_rng(8)
    x = rng.standard_normal((3000, 300)) + 1000
    fm = np.ascontiguousarray(x.T)
    direct = (
        batch_moments(x),
        batch_moments(fm, True),
        Moments().update(x[:100]).update(x[100:300]).compute(),
    )
    monkeypatch.setattr(kernels, "_blas_dsyrk", kernels._wrapper_dsyrk())
    wrapped = (
        batch_moments(x),
        batch_moments(fm, True),
        Moments().update(x[:100]).update(x[100:300]).compute(),
    )
    for a, b in zip(direct, wrapped, strict=True):
        assert_same_bits(a, b, "BLAS through the wrapper")


# -- the shift rule ------------------------------------------------------------------------------


def test_shift_is_the_first_slab_mean_and_ignores_non_finite_values() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5000, 300)) + 50
    k = slab_rows(300)
    assert k < len(x)
    np.testing.assert_allclose(shift_of(x), x[:k].mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(
        shift_of(np.ascontiguousarray(x.T), feature_major=True), x[:k].mean(0), rtol=1e-14
    )
    x[3, 1] = np.nan
    x[4, 2] = np.inf
    assert shift_of(x)[1:3].tolist() == [0.0, 0.0] and np.isfinite(shift_of(x)).all()
    # a non-finite first batch does not spoil the next block (the shift is taken per block)
    acc = Moments()
    acc.update(x[:10])
    assert acc.last_finite is False and not np.isfinite(acc.mean).all()
    acc.reset()
    acc.update(x[10:])
    assert acc.last_finite and rel(acc.m2, two_pass(x[10:])[2]) <= 1e-12


def test_a_far_first_row_does_not_cost_accuracy(reference_matrix: Any) -> None:
    """A conv map's corner (zero padding) can lie far from the mean when the inputs carry an offset."""
    rng = np.random.default_rng(3)
    maps = (rng.standard_normal((8, 4, 16, 16)) * 0.01 + 1000).astype(np.float32)
    maps[:, :, 0, 0] = 0.0  # every map's first position is 1e5 standard deviations away
    mat, fm = matrix_source(maps, "conv", "channelwise")
    got = batch_moments(mat, fm)
    ref = two_pass(reference_matrix(maps, "conv", "channelwise"))
    assert rel(got[1], ref[1]) <= 1e-12 and rel(got[2], ref[2]) <= 1e-12
    acc = Moments()
    for part in np.array_split(reference_matrix(maps, "conv", "channelwise"), 40):  # short batches
        acc.update(part)
    assert rel(acc.m2, ref[2]) <= 1e-12


# -- merging ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 3000),
    d=st.integers(1, 6),
    offset=st.sampled_from([0.0, 1000.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_grouping_of_blocks_equals_one_pass(data: Any, n: int, d: int, offset: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + offset
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=8), label="cuts"))
    shards = np.split(x, cuts)
    ref = two_pass(x)
    # Chan merges of the shards' moments, in any binary grouping
    parts = [batch_moments(s) for s in shards]
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 2), label="merge position")
        parts[i : i + 2] = [merge_moments(parts[i], parts[i + 1])]
    # the shell: updates, merges of other shells
    left, right = Moments(), Moments()
    split = data.draw(st.integers(0, len(shards)), label="split")
    for s in shards[:split]:
        left.update(s)
    for s in shards[split:]:
        right.update(s)
    shell = left.merge(right).compute()
    for got in (parts[0], tree_merge([batch_moments(s) for s in shards]), shell):
        assert got[0] == n and rel(got[1], ref[1]) <= 1e-12 and rel(got[2], ref[2]) <= 1e-12


# -- the same bits on every path --------------------------------------------------------------------


class Replay(nn.Module):
    """Stands in for a layer of the given family: returns the next of ``outputs``."""

    def __init__(self, kind: type[nn.Module], outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.layer = kind(1, 1) if kind is nn.Linear else kind(1, 1, 1)
        self.outputs = list(outputs)
        self.layer.forward = self._next  # type: ignore[method-assign]

    def _next(self, _: Any) -> torch.Tensor:
        return self.outputs.pop(0)

    def forward(self, x: Any) -> torch.Tensor:
        return self.layer(x)


def hook_blocks(layout: str, method: str, calls: list[np.ndarray], path: Path | None) -> list[GramBlock]:
    """The blocks a gram Recorder (and so the drop-in tracker) gets for these layer outputs."""
    kind = nn.Conv2d if layout == "conv" else nn.Linear
    model = Replay(kind, [torch.from_numpy(c) for c in calls])
    blocks: list[GramBlock] = []
    methods = {"conv_methods": (method,)} if layout == "conv" else {}
    if layout == "sequence":
        methods = {"timeseries_methods": (method,)}
    mode = "gram" if path is None else "both"
    with Recorder(model.layer, path, mode=mode, on_block=blocks.append, **methods) as rec:
        for _ in calls:
            model(None)
        rec.end_epoch()
    return blocks


def reduce_raw(path: Path, layout: str, method: str) -> tuple:
    """The reduction of the store's raw rows of epoch 0, train (one group)."""
    run = open_run(path)
    part = run.ranks[0]
    name = run.layers[0]
    raw = part.raw(name)
    src = RawSource(
        store=str(path),
        array_path=f"{part.group.path}/{part.layers[name].raw_array}",
        stored_dtype="float32",
        layout=layout,
        chunk_rows=raw.chunk_rows,
        rows=raw.rows,
    )
    result = raw_reduction_graph(src, {(0, "train"): [(0, raw.rows)]}, [method]).compute(scheduler="sync")
    return result[((0, "train"), method)][:3]


def test_a_leaf_of_several_chunks_matches_the_reference_and_counts_nonfinite_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reduction sums the chunks of a leaf into one accumulator: one leaf of 8 chunks or 8
    leaves of one chunk, both within 1e-12 of the two-pass reference (+1000 offset); a NaN / Inf
    row is counted in whichever chunk of the leaf it comes."""
    from analyze import reduce as reduce_module

    rng = np.random.default_rng(5)
    d, chunk_rows = 6, 40
    calls = [(rng.standard_normal((32, d)) * 3 + 1000).astype(np.float32) for _ in range(10)]
    bad = [c.copy() for c in calls]
    bad[2][5, 1], bad[3][0, 0], bad[7][9, 4] = np.nan, np.inf, -np.inf  # chunks 1, 2 and 5 of 8
    results = {}
    for name, data in (("clean", calls), ("bad", bad)):
        path = tmp_path / f"{name}.zarr"
        model = Replay(nn.Linear, [torch.from_numpy(c) for c in data])
        with Recorder(model.layer, path, mode="raw", dtype="float32", chunk_bytes=chunk_rows * d * 4) as rec:
            for _ in data:
                model(None)
            rec.end_epoch()
        run = open_run(path)
        part, layer = run.ranks[0], run.layers[0]
        raw = part.raw(layer)
        assert raw.chunk_rows == chunk_rows
        src = RawSource(
            str(path),
            f"{part.group.path}/{part.layers[layer].raw_array}",
            "float32",
            "flat",
            raw.chunk_rows,
            raw.rows,
        )
        for leaf_bytes in (chunk_rows * d * 4, 8 * chunk_rows * d * 4):
            monkeypatch.setattr(reduce_module, "LEAF_BYTES", leaf_bytes)
            graph = raw_reduction_graph(src, {"g": [(0, raw.rows)]}, ["none"], task_bytes=1, row_bytes=d * 4)
            got = graph.compute(scheduler="sync")
            results[name, leaf_bytes] = got[("g", "none")]
    ref = two_pass(np.concatenate(calls))
    for leaf_bytes in (chunk_rows * d * 4, 8 * chunk_rows * d * 4):
        n, mean, m2, nonfinite = results["clean", leaf_bytes]
        assert n == ref[0] and nonfinite == 0
        assert rel(mean, ref[1]) <= 1e-12 and rel(m2, ref[2]) <= 1e-12
        n, mean, m2, nonfinite = results["bad", leaf_bytes]
        assert n == ref[0] and nonfinite == 3 and not np.isfinite(mean).all()


PATHS_CASES = [(lay, m) for lay, ms in METHODS.items() for m in ms]


@pytest.mark.parametrize(("layout", "method"), PATHS_CASES)
@pytest.mark.parametrize("batches", ["one", "short", "long"])
def test_the_same_rows_give_the_same_bits_on_every_path(
    tmp_path: Path, layout: str, method: str, batches: str, reference_matrix: Any
) -> None:
    rng = np.random.default_rng(11)
    shape = {"conv": (6, 3, 5, 5), "sequence": (40, 5, 3), "flat": (40, 9)}[layout]
    count = {"one": 1, "short": 3, "long": 3}[batches]
    if batches == "long":  # enough rows per feature for each call to get its own moments
        shape = (shape[0] * 40, *shape[1:])
    calls = [(rng.standard_normal(shape) * 3 + 1000).astype(np.float32) for _ in range(count)]
    sources = [matrix_source(c, layout, method) for c in calls]
    per_call = [batch_moments(m, fm) for m, fm in sources]
    shell = Moments()
    for m, fm in sources:
        shell.update(m, fm)
    expected = shell.compute()
    if count == 1:
        assert_same_bits(per_call[0], expected, "Moments.update == batch_moments")

    # the capture hook: the epoch block and the last-call block; the drop-in tracker reads these
    blocks = hook_blocks(layout, method, calls, tmp_path / "run.zarr")
    (epoch_block,) = [b for b in blocks if b.kind == BLOCK_KIND_EPOCH]
    (last_block,) = [b for b in blocks if b.kind == BLOCK_KIND_LAST_CALL]
    assert_same_bits((epoch_block.count, epoch_block.mean, epoch_block.m2), expected, "hook block")
    assert_same_bits((last_block.count, last_block.mean, last_block.m2), per_call[-1], "last-call block")
    stored = open_run(tmp_path / "run.zarr").ranks[0].gram(open_run(tmp_path / "run.zarr").layers[0], method)
    assert_same_bits(stored.read(0), expected, "stored gram block")

    # the reduction of the raw store: per chunk the same kernel (one chunk here: the same bits for
    # one call; merged over the chunk tree otherwise, so only close)
    reduced = reduce_raw(tmp_path / "run.zarr", layout, method)
    ref = two_pass(np.concatenate([reference_matrix(c, layout, method) for c in calls]))
    if count == 1:
        assert_same_bits(reduced, per_call[0], "reduction")
    assert rel(reduced[1], ref[1]) <= 1e-12 and rel(reduced[2], ref[2]) <= 1e-12
    assert rel(expected[2], ref[2]) <= 1e-12

    # the drop-in metrics and the PCA layers, fed the same matrices
    if layout == "flat" or (layout == "conv" and method == "channelwise"):
        tcm = TorchCovarianceMatrix()
        pca: LinearPCALayer = (
            LinearPCALayer(shape[1]) if layout == "flat" else Conv2DPCALayer(shape[1], verbose=False)
        )
        for c in calls:
            tcm.update(torch.from_numpy(reference_matrix(c, layout, method)))
            pca(torch.from_numpy(c))
        assert_same_bits((tcm._tlen, tcm.moments.mean.numpy(), tcm._cov_mtx.numpy()), expected, "metrics")
        got = pca._moments.compute()
        assert_same_bits((got[0], got[1].numpy(), got[2].numpy()), expected, "PCA layer")


# -- ``mean`` in float64 ------------------------------------------------------------------------------


def spectrum_stats(cov: np.ndarray) -> dict[str, float]:
    lam = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0.0, None)
    p = lam[lam > 0] / lam.sum()
    return {
        "trc": float(np.trace(cov)),
        "pr": float(lam.sum() ** 2 / np.sum(lam**2)),
        "erank": math.exp(-float(np.sum(p * np.log(p)))),
    }


def test_mean_method_averages_in_float64(tmp_path: Path, reference_matrix: Any) -> None:
    """trc / pr / erank of ``mean`` within 1e-12 of float64 (float32 averaging is off by ~1e-6 here)."""
    rng = np.random.default_rng(5)
    calls = [
        (100 + rng.standard_normal((32, 6, 1, 1)) + rng.standard_normal((32, 6, 16, 16))).astype(np.float32)
        for _ in range(3)
    ]
    path = tmp_path / "run.zarr"
    hook_blocks("conv", "mean", calls, path)
    ref_cov = two_pass(np.concatenate([reference_matrix(c, "conv", "mean") for c in calls]))[2] / 96
    want = spectrum_stats(ref_cov)
    float32_means = np.concatenate([c.reshape(32, 6, -1).mean(axis=2, dtype=np.float32) for c in calls])
    assert (
        rel(spectrum_stats(two_pass(float32_means)[2] / 96)["trc"], want["trc"]) > 1e-9
    )  # the test can fail
    for source in ("raw", "gram"):
        result = analyze_runs(
            path, conv_methods="mean", stats=("trc", "pr", "erank"), source=source, progress=False
        )
        rows = result.table[(result.table["layer"] != "") & (result.table["phase"] == "train")]
        got = dict(zip(rows["stat"], rows["value"], strict=True))
        for stat, value in want.items():
            assert abs(got[stat] - value) <= 1e-12 * abs(value), (source, stat, got[stat], value)
