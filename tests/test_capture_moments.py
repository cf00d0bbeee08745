"""capture.moments and capture.reshape against float64 numpy references (tests/conftest.py).

- Merging partial moments in any grouping and order equals a one-pass float64 covariance.
- Every conv / time-series reshaping rule equals a direct numpy implementation on random shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import covariance64, numpy_matrix, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.moments import Moments, batch_moments, merge_moments, tree_merge
from capture.reshape import (
    CONV_METHODS,
    INTERPOLATION_MODES,
    TIMESERIES_METHODS,
    layout_of,
    matrix_width,
    methods_for_layout,
    to_matrix,
)

# -- moments: merge equivalence ------------------------------------------------------------------


def merge_in_random_tree(parts: list, data: st.DataObject) -> tuple:
    """Merge neighbours chosen by hypothesis until one is left (any binary grouping)."""
    parts = list(parts)
    while len(parts) > 1:
        i = data.draw(st.integers(0, len(parts) - 2), label="merge position")
        parts[i : i + 2] = [merge_moments(parts[i], parts[i + 1])]
    return parts[0]


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 50),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.sampled_from([0.0, 1.0, 1e4]),
)
def test_merge_in_any_grouping_and_order_equals_one_pass(data, n, d, seed, scale, offset):
    rng = np.random.default_rng(seed)
    # a mean 1e4 spreads away: sum-of-squares formulas would lose ~1e-8 here, Chan's merge does not
    # (the offset is relative to the spread: the float64 data itself only holds offset * 1e-16)
    x = (rng.standard_normal((n, d)) + offset * rng.standard_normal(d)) * scale
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=6), label="cuts"))
    shards = np.split(x, cuts)  # empty shards included
    order = data.draw(st.permutations(range(len(shards))), label="order")
    parts = [batch_moments(shards[i]) for i in order]
    count, mean, m2 = covariance64(x)
    tol = 1e-10
    for got in (merge_in_random_tree(parts, data), tree_merge(parts)):
        assert got[0] == count
        assert np.abs(got[1] - mean).max() <= tol * np.abs(x).max()
        assert rel_err(got[2] / got[0], m2 / count) <= tol
    acc = Moments()
    for i in order:
        acc.update(shards[i])
    assert acc.count == count
    assert rel_err(acc.covariance(), m2 / count) <= tol


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 30), d=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_batch_moments_layouts_and_types_agree(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    count, mean, m2 = batch_moments(x)
    ref = covariance64(x) if n else (0, np.zeros(d), np.zeros((d, d)))
    assert count == n and mean.dtype == np.float64 and m2.shape == (d, d)
    assert rel_err(mean, ref[1]) <= 1e-12 and rel_err(m2, ref[2]) <= 1e-12
    for other in (
        batch_moments(np.ascontiguousarray(x.T), feature_major=True),
        batch_moments(torch.from_numpy(x)),
    ):
        assert other[0] == n
        assert rel_err(np.asarray(other[1]), ref[1]) <= 1e-12
        assert rel_err(np.asarray(other[2]), ref[2]) <= 1e-12
    torch_fm = batch_moments(torch.from_numpy(x).T, feature_major=True)
    assert torch_fm[2].dtype == torch.float64 and rel_err(torch_fm[2].numpy(), ref[2]) <= 1e-12


def test_moments_shell_merge_reset_and_empty():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    left, right = Moments().update(a), Moments().update(b)
    assert left.merge(Moments()) is left and left.count == 7  # merging nothing is a no-op
    left.merge(right)
    count, _, m2 = covariance64(np.concatenate([a, b]))
    assert left.count == count and rel_err(left.covariance(), m2 / count) <= 1e-12
    assert left.dim == 3
    left.reset()
    assert left.dim is None
    with pytest.raises(ValueError, match="no samples"):
        left.covariance()
    with pytest.raises(ValueError, match="at least one"):
        tree_merge([])


# -- reshaping rules ------------------------------------------------------------------------------

conv_shapes = st.tuples(st.integers(1, 3), st.integers(1, 4)).flatmap(
    lambda nc: st.lists(st.integers(1, 5), min_size=1, max_size=3).map(lambda sp: (*nc, *sp))
)


@settings(max_examples=60, deadline=None)
@given(shape=conv_shapes, method=st.sampled_from(sorted(CONV_METHODS)), seed=st.integers(0, 2**32 - 1))
def test_conv_methods_match_numpy(shape, method, seed):
    rng = np.random.default_rng(seed)
    # few distinct values so that max / median meet ties
    x = rng.integers(-3, 4, size=shape).astype(np.float32) + rng.standard_normal(shape).astype(np.float32)
    expected = numpy_matrix(x, "conv", method)
    got_np = to_matrix(x, "conv", method)
    got_t = to_matrix(torch.from_numpy(x), "conv", method)
    got_fm = to_matrix(torch.from_numpy(x), "conv", method, feature_major=True)
    assert isinstance(got_np, np.ndarray) and isinstance(got_t, torch.Tensor)
    if method == "mean":  # float32 sums in another order: compare with the float64 mean
        np.testing.assert_allclose(got_np, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got_np, expected)
    np.testing.assert_array_equal(got_t.numpy(), got_np)
    np.testing.assert_array_equal(got_fm.numpy(), got_np.T)
    assert matrix_width(shape[1:], "conv", method) == expected.shape[1]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4)),
    method=st.sampled_from(sorted(TIMESERIES_METHODS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_timeseries_methods_match_numpy(shape, method, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    expected = numpy_matrix(x, "sequence", method)
    np.testing.assert_array_equal(to_matrix(x, "sequence", method), expected)
    np.testing.assert_array_equal(
        to_matrix(torch.from_numpy(x), "sequence", method, feature_major=True).numpy(), expected.T
    )
    assert matrix_width(shape[1:], "sequence", method) == expected.shape[1]


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**32 - 1))
def test_flat_layout_flattens_samples(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    expected = x.reshape(len(x), -1)
    np.testing.assert_array_equal(to_matrix(x, "flat"), expected)
    assert matrix_width(tuple(shape[1:]), "flat") == expected.shape[1]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
    mode=st.sampled_from(["bilinear", "nearest", "area", "bicubic", "linear"]),
    size=st.integers(1, 6),
    method=st.sampled_from(sorted(CONV_METHODS)),
    one_d=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_interpolation_follows_delve_rule(shape, mode, size, method, one_d, seed):
    if one_d:
        shape = shape[:3]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    spatial = shape[2:]
    # delve's rule: resize only when an extent is strictly larger than the size, to size x size; a
    # mode that does not apply to the map's rank leaves it unchanged
    resized = len(spatial) in INTERPOLATION_MODES[mode] and max(spatial) > size
    ref = F.interpolate(torch.from_numpy(x), size=size, mode=mode).numpy() if resized else x
    expected = numpy_matrix(ref, "conv", method)
    got = to_matrix(x, "conv", method, interpolation=mode, downsample=size)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    width = matrix_width(shape[1:], "conv", method, interpolation=mode, downsample=size)
    assert width == expected.shape[1]


def test_layout_rules():
    # default semantics: the module type decides for convs; delve-0.1.50 looks at the rank alone
    assert layout_of("conv", 4) == "conv" and layout_of("conv", 3) == "conv"
    assert layout_of("conv", 3, compat=True) == "sequence"
    assert layout_of("recurrent", 3) == "sequence" and layout_of("dense", 3) == "sequence"
    assert layout_of("dense", 2) == "flat" and layout_of("dense", 4) == "conv"
    assert methods_for_layout("conv", ["mean"], ["timestepwise"]) == ("mean",)
    assert methods_for_layout("sequence", ["mean"], ["timestepwise"]) == ("timestepwise",)
    assert methods_for_layout("flat", ["mean"], ["timestepwise"]) == ("none",)
    with pytest.raises(ValueError, match="unknown conv method 'avg'.*channelwise"):
        to_matrix(np.zeros((1, 1, 2, 2)), "conv", "avg")
    with pytest.raises(ValueError, match="unknown time-series method"):
        to_matrix(np.zeros((1, 2, 2)), "sequence", "first")
    with pytest.raises(ValueError, match="unknown layout"):
        to_matrix(np.zeros((1, 2)), "table")


def test_one_blas_thread_limits_every_blas_while_any_caller_is_inside():
    """The limit holds for nested and overlapping callers (threads) and restores the counts found."""
    import threading

    threadpoolctl = pytest.importorskip("threadpoolctl")
    from capture.moments import one_blas_thread, shifted_sums

    shifted_sums(np.ones((2, 2)))  # scipy's BLAS loaded, as in use

    def counts():
        return sorted(
            {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}
        )

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert counts() == [2]
        inside, release = threading.Event(), threading.Event()

        def other():
            with one_blas_thread():
                inside.set()
                release.wait(10)

        worker = threading.Thread(target=other)
        with one_blas_thread():
            with one_blas_thread():
                assert counts() == [1]
            worker.start()
            inside.wait(10)
        assert counts() == [1]  # the other thread is still inside
        release.set()
        worker.join()
        assert counts() == [2]
