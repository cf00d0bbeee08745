"""Similarity measures from streamed moments against in-memory references written from the papers.

The references below hold every activation in memory and follow the papers' formulas literally:
CKA from centred matrices (Kornblith et al. 2019), the unbiased HSIC estimator on n x n Gram
matrices (Song et al. 2012), minibatch CKA on explicit minibatches (Nguyen et al. 2021), SVCCA by
SVD truncation then CCA by QR / SVD of the data matrices (Raghu et al. 2017), PWCCA's weights from
the canonical variates and the neurons (Morcos et al. 2018). The streaming accumulators of
``analyze.similarity_moments`` must agree with them to 1e-10 relative over several chunkings, on
random data with large offsets and on the outputs of conv, linear, LSTM and GRU layers.
"""

from __future__ import annotations

import doctest
import warnings
from collections.abc import Callable, Sequence

import dask
import numpy as np
import pytest
import torch
from _similarity_refs import (
    REFERENCES,
    centred,
    ref_cka_debiased,
    ref_minibatch_cka,
    ref_svcca,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import analyze.similarity_measures as measures_module
import analyze.similarity_moments as moments_module
from analyze.similarity_measures import (
    DEGENERATE_VALUE,
    MEASURE_NAMES,
    MEASURES,
    check_measure_options,
    check_measures,
    cka,
    cka_debiased,
    minibatch_cka,
    needs_of,
    new_accumulator,
    pwcca,
    similarity_matrix,
    svcca,
)
from analyze.similarity_moments import JointMoments, MinibatchHSIC, merge_partials
from capture.reshape import to_matrix

RTOL = 1e-10
MOMENT_MEASURES = tuple(n for n in MEASURE_NAMES if MEASURES[n].needs == "moments")

# --------------------------------------------------------------------------- streaming helpers


def _chunk(layers: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in layers.items()}


def _bounds(n: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < n)), n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def stream_moments(layers: dict[str, np.ndarray], cuts: Sequence[int]) -> JointMoments:
    widths = {k: v.shape[1] for k, v in layers.items()}
    n = next(iter(layers.values())).shape[0]
    return merge_partials(
        [JointMoments.from_chunk(widths, _chunk(layers, a, b)) for a, b in _bounds(n, cuts)]
    )


def stream_minibatch(layers: dict[str, np.ndarray], cuts: Sequence[int], size: int) -> MinibatchHSIC:
    widths = {k: v.shape[1] for k, v in layers.items()}
    n = next(iter(layers.values())).shape[0]
    parts = [MinibatchHSIC.from_chunk(widths, _chunk(layers, a, b), a, size) for a, b in _bounds(n, cuts)]
    return merge_partials(parts)


def _chunkings(n: int) -> list[list[int]]:
    rng = np.random.default_rng(n)
    return [
        [],  # one chunk
        list(range(1, 6)) + [n - 1],  # single rows at both ends
        list(range(0, n, 37)),  # regular
        sorted(rng.choice(np.arange(1, n), size=9, replace=False).tolist()),  # irregular
    ]


def _rel_error(got: float, ref: float) -> float:
    return abs(got - ref) / max(abs(ref), 1e-300)


# --------------------------------------------------------------------------- data


def random_layers(n: int = 300, seed: int = 0, offset: float = 1000.0) -> dict[str, np.ndarray]:
    """Correlated layers of widths 1, 3, 8, 20 with large offsets and unequal scales."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 6))
    out = {}
    for name, width, scale in (("w1", 1, 0.5), ("w3", 3, 2.0), ("w8", 8, 1.0), ("w20", 20, 30.0)):
        mix = rng.normal(size=(6, width))
        out[name] = (np.tanh(base @ mix) + 0.7 * rng.normal(size=(n, width))) * scale + offset
    return out


class SeqNet(nn.Module):
    """Conv2d -> mean over space (recorded), Linear, LSTM and GRU over the conv maps as a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5 * 5, 12)
        self.lstm = nn.LSTM(6, 10, batch_first=True)
        self.gru = nn.GRU(10, 7, batch_first=True)
        self.head = nn.Linear(7 + 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv(x))
        flat = self.fc(maps.flatten(1))
        seq, _ = self.lstm(maps.flatten(2).transpose(1, 2))  # (B, 25, 10)
        seq2 = self.gru(seq)[0]
        return self.head(torch.cat([seq2[:, -1], flat], dim=1))


def make_model_layers() -> dict[str, np.ndarray]:
    """float32 outputs of the layers of a random SeqNet on 300 random inputs, one row per sample."""
    torch.manual_seed(0)
    net = SeqNet()
    outputs: dict[str, torch.Tensor] = {}
    for name in ("conv", "fc", "lstm", "gru", "head"):
        module = getattr(net, name)
        module.register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o[0] if isinstance(o, tuple) else o)
        )
    with torch.no_grad():
        net(torch.randn(300, 2, 5, 5))
    layouts = {
        "conv": ("conv", "mean"),
        "lstm": ("sequence", "last_timestep"),
        "gru": ("sequence", "last_timestep"),
    }
    layers = {}
    for name, out in outputs.items():
        layout, method = layouts.get(name, ("flat", "none"))
        layers[name] = to_matrix(out.numpy(), layout, method)
    assert {k: v.shape for k, v in layers.items()} == {
        "conv": (300, 6),
        "fc": (300, 12),
        "lstm": (300, 10),
        "gru": (300, 7),
        "head": (300, 3),
    }
    # the conv maps are averaged in float64 (capture.reshape's mean); the other outputs stay float32
    assert {k: v.dtype for k, v in layers.items()} == {k: np.float64 if k == "conv" else np.float32 for k in layers}
    return layers


@pytest.fixture(scope="module")
def model_layers() -> dict[str, np.ndarray]:
    return make_model_layers()


# --------------------------------------------------------------------------- accuracy against the references


def reference_matrices(
    layers: dict[str, np.ndarray], measures: Sequence[str] = MOMENT_MEASURES, size: int = 0
) -> dict[str, np.ndarray]:
    """Every reference measure for every ordered pair of layers (``size``: the minibatch size)."""
    out = {}
    for measure in measures:
        ref = (
            (lambda x, y: ref_minibatch_cka(x, y, size))
            if measure == "minibatch_cka"
            else REFERENCES[measure]
        )
        out[measure] = np.array([[ref(layers[a], layers[b]) for b in layers] for a in layers])
    return out


def worst_errors(source: JointMoments | MinibatchHSIC, refs: dict[str, np.ndarray]) -> dict[str, float]:
    """Assert that every streamed value is within RTOL of its reference; return the worst relative error."""
    worst = {}
    for measure, ref in refs.items():
        got = similarity_matrix(source, measure)
        err = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)
        assert err.max() <= RTOL, (measure, np.unravel_index(err.argmax(), err.shape), got, ref)
        worst[measure] = float(err.max())
    return worst


@pytest.fixture(scope="module")
def random_case() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    layers = random_layers()
    return layers, reference_matrices(layers)


@pytest.fixture(scope="module")
def model_case(model_layers: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return model_layers, reference_matrices(model_layers)


@pytest.mark.parametrize("chunking", range(4))
def test_moment_measures_match_references_on_offset_random_data(random_case, chunking: int) -> None:
    layers, refs = random_case
    worst_errors(stream_moments(layers, _chunkings(300)[chunking]), refs)


@pytest.mark.parametrize("chunking", range(4))
def test_moment_measures_match_references_on_conv_linear_lstm_gru_outputs(model_case, chunking: int) -> None:
    layers, refs = model_case
    worst_errors(stream_moments(layers, _chunkings(300)[chunking]), refs)


def test_sequential_updates_match_references_for_float16_and_float32_input() -> None:
    dtypes = [np.float16, np.float32, np.float16, np.float32]
    layers = {k: v.astype(t) for (k, v), t in zip(random_layers(offset=10.0).items(), dtypes, strict=True)}
    acc = JointMoments({k: v.shape[1] for k, v in layers.items()})
    for a, b in _bounds(300, _chunkings(300)[3]):
        acc.update(_chunk(layers, a, b))
    worst_errors(acc, reference_matrices(layers))


@pytest.mark.parametrize("size", [256, 64, 37, 4])
def test_minibatch_cka_matches_explicit_minibatches(model_layers: dict[str, np.ndarray], size: int) -> None:
    layers = {**model_layers, **{f"r{k}": v for k, v in random_layers(seed=3).items()}}
    refs = reference_matrices(layers, ["minibatch_cka"], size)
    for cuts in _chunkings(300):
        worst_errors(stream_minibatch(layers, cuts, size), refs)


def test_last_minibatch_below_four_rows_is_dropped_and_above_is_kept() -> None:
    layers = random_layers(n=70, seed=5)
    for n in (67, 66, 65, 64):  # last batches of 3, 2, 1 and 0 rows
        sub = {k: v[:n] for k, v in layers.items()}
        h = stream_minibatch(sub, [10, 40], 32)
        assert h.hsic_sums()[1] == 2
        assert minibatch_cka(h, "w3", "w8") == pytest.approx(
            ref_minibatch_cka(sub["w3"], sub["w8"], 32), rel=RTOL
        )
    sub = {k: v[:68] for k, v in layers.items()}
    assert stream_minibatch(sub, [10, 40], 32).hsic_sums()[1] == 3  # a last batch of 4 rows counts


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=90),
    size=st.integers(min_value=4, max_value=20),
    cuts=st.lists(st.integers(min_value=1, max_value=89), max_size=8),
)
def test_minibatch_partials_of_any_chunking_equal_the_explicit_partition(
    n: int, size: int, cuts: list[int]
) -> None:
    layers = random_layers(n=n, seed=n)
    h = stream_minibatch(layers, cuts, size)
    assert (h.start, h.stop) == (0, n)
    expected_batches = n // size + (n % size >= 4)
    assert h.hsic_sums()[1] == expected_batches
    got = similarity_matrix(h, "minibatch_cka", ["w1", "w8"], ["w3", "w20"])
    for i, a in enumerate(["w1", "w8"]):
        for j, b in enumerate(["w3", "w20"]):
            ref = ref_minibatch_cka(layers[a], layers[b], size)
            assert abs(got[i, j] - ref) <= RTOL * max(abs(ref), 1e-3), (a, b, got[i, j], ref)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=4, max_value=120),
    cuts=st.lists(st.integers(min_value=1, max_value=119), max_size=10),
)
def test_joint_moments_of_any_chunking_give_the_reference_cka(n: int, cuts: list[int]) -> None:
    layers = random_layers(n=n, seed=n + 1)
    source = stream_moments(layers, cuts)
    for measure in ("cka", "cka_debiased"):
        got = similarity_matrix(source, measure, ["w1", "w20"], ["w3", "w8"])
        for i, a in enumerate(["w1", "w20"]):
            for j, b in enumerate(["w3", "w8"]):
                ref = REFERENCES[measure](layers[a], layers[b])
                assert abs(got[i, j] - ref) <= RTOL * max(abs(ref), 1e-3), (measure, a, b, got[i, j], ref)


# --------------------------------------------------------------------------- the derivation, step by step


def test_streamed_terms_equal_their_definitions_for_the_final_mean() -> None:
    """m2 blocks, S = sum_k a_ik a_jk and R_ij = sum_k a_ik x~_jk, all centred on the final mean."""
    layers = random_layers()
    source = stream_moments(layers, _chunkings(300)[3])
    z = np.hstack([centred(v) for v in layers.values()])
    norms = np.stack([np.sum(centred(v) ** 2, axis=1) for v in layers.values()], axis=1)
    np.testing.assert_allclose(source.mean, np.hstack([v.mean(0) for v in layers.values()]), rtol=1e-14)
    np.testing.assert_allclose(source.m2, z.T @ z, rtol=1e-11, atol=1e-11 * np.abs(z.T @ z).max())
    np.testing.assert_allclose(source.norm_products, norms.T @ norms, rtol=1e-11)
    ref_r = norms.T @ z
    np.testing.assert_allclose(source.norm_moments, ref_r, rtol=0, atol=1e-11 * (norms.T @ np.abs(z)).max())
    assert source.count == 300


def test_feature_space_debiased_hsic_equals_the_gram_formula_step_by_step() -> None:
    """tr(K~L~) = ||X~'Y~||^2 - a.b; 1'K~1 = -tr(X~'X~); 1'K~L~1 = a.b; and translation invariance."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 3)) + 0.5 * rng.normal(size=(40, 1))
    xc, yc = centred(x), centred(y)
    k, l = xc @ xc.T, yc @ yc.T  # noqa: E741
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    a, b = np.diag(k), np.diag(l)
    ones = np.ones(40)
    assert np.trace(kt @ lt) == pytest.approx(np.linalg.norm(xc.T @ yc) ** 2 - a @ b, rel=1e-12)
    assert ones @ kt @ ones == pytest.approx(-np.trace(xc.T @ xc), rel=1e-12)
    assert ones @ kt @ lt @ ones == pytest.approx(a @ b, rel=1e-12)
    shifted = ref_cka_debiased(x + 3.0, y - 2.0, centre=False)  # raw Grams of translated data
    assert shifted == pytest.approx(ref_cka_debiased(x, y), rel=1e-9)
    m = JointMoments([5, 3]).update([x + 3.0, y - 2.0])
    assert cka_debiased(m, 0, 1) == pytest.approx(ref_cka_debiased(x, y), rel=RTOL)


def test_debiased_cka_is_negative_for_unrelated_layers_and_biased_cka_is_not() -> None:
    rng = np.random.default_rng(11)
    values = []
    for _ in range(20):
        m = JointMoments([30, 30]).update([rng.normal(size=(50, 30)), rng.normal(size=(50, 30))])
        values.append((cka(m, 0, 1), cka_debiased(m, 0, 1)))
    biased, debiased = np.array(values).T
    assert biased.min() > 0.3  # the bias of the plain estimator when n is close to the widths
    assert debiased.min() < 0 < debiased.max() and abs(debiased.mean()) < 0.02


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("measure", ["cka", "cka_debiased", "svcca", "minibatch_cka"])
def test_orthogonal_transform_and_isotropic_scaling_leave_the_measure_unchanged(
    model_layers: dict[str, np.ndarray], measure: str
) -> None:
    rng = np.random.default_rng(2)
    x, y = model_layers["fc"].astype(np.float64), model_layers["lstm"].astype(np.float64)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    layers = {"x": x, "y": y, "y2": 17.5 * y @ q - 40.0}
    source = (
        stream_minibatch(layers, [100, 201], 64)
        if measure == "minibatch_cka"
        else stream_moments(layers, [100, 201])
    )
    got = similarity_matrix(source, measure)
    assert got[0, 2] == pytest.approx(got[0, 1], rel=1e-12)
    assert got[1, 2] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(np.diagonal(got), 1.0, rtol=1e-12)


def test_a_layer_with_itself_gives_one_for_every_measure(model_layers: dict[str, np.ndarray]) -> None:
    for measure in MEASURE_NAMES:
        source = new_accumulator(
            MEASURES[measure].needs, {k: v.shape[1] for k, v in model_layers.items()}, minibatch_size=50
        )
        source.update(model_layers)
        np.testing.assert_allclose(
            np.diagonal(similarity_matrix(source, measure)), 1.0, rtol=1e-12, err_msg=measure
        )


def test_symmetric_measures_give_symmetric_matrices_and_pwcca_weights_the_narrower_layer() -> None:
    layers = random_layers(seed=9)
    source = stream_moments(layers, [150])
    for measure in MEASURE_NAMES:
        if MEASURES[measure].needs != "moments":
            continue
        got = similarity_matrix(source, measure)
        if MEASURES[measure].symmetric:
            np.testing.assert_allclose(got, got.T, rtol=1e-12)
    # pwcca takes the weights from the layer with fewer directions, the first one on a tie
    assert pwcca(source, "w3", "w20") == pytest.approx(pwcca(source, "w20", "w3"), rel=1e-12)
    x = {"a": layers["w8"], "b": layers["w20"][:, :8]}
    tie = stream_moments(x, [])
    assert pwcca(tie, "a", "b") != pytest.approx(pwcca(tie, "b", "a"), rel=1e-6)


# --------------------------------------------------------------------------- determinism of the merge tree


def _partials(layers: dict[str, np.ndarray], cuts: Sequence[int], size: int | None) -> list:
    widths = {k: v.shape[1] for k, v in layers.items()}
    if size is None:
        return [JointMoments.from_chunk(widths, _chunk(layers, a, b)) for a, b in _bounds(300, cuts)]
    return [MinibatchHSIC.from_chunk(widths, _chunk(layers, a, b), a, size) for a, b in _bounds(300, cuts)]


def _bits(source: JointMoments | MinibatchHSIC) -> list[bytes]:
    if isinstance(source, JointMoments):
        arrays = [source.mean, source.m2, source.norm_products, source.norm_moments]
    else:
        arrays = [source.sums, source.head, source.tail, source.hsic_sums()[0]]
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("size", [None, 32])
def test_same_partials_through_the_same_tree_give_identical_bits_under_any_dask_scheduler(
    size: int | None,
) -> None:
    layers = random_layers(seed=4)
    cuts = _chunkings(300)[3]
    widths = {k: v.shape[1] for k, v in layers.items()}
    tasks = []
    for a, b in _bounds(300, cuts):
        if size is None:
            tasks.append(dask.delayed(JointMoments.from_chunk)(widths, _chunk(layers, a, b)))
        else:
            tasks.append(dask.delayed(MinibatchHSIC.from_chunk)(widths, _chunk(layers, a, b), a, size))
    tree = dask.delayed(merge_partials)(tasks)
    results = [tree.compute(scheduler=s) for s in ("sync", "threads", "threads")]
    direct = merge_partials(_partials(layers, cuts, size))
    for r in results:
        assert _bits(r) == _bits(direct)
    measure = "cka" if size is None else "minibatch_cka"
    assert similarity_matrix(results[1], measure).tobytes() == similarity_matrix(direct, measure).tobytes()


def test_different_groupings_agree_to_1e_12() -> None:
    layers = random_layers(seed=6)
    cuts = _chunkings(300)[2]
    parts = _partials(layers, cuts, None)
    balanced = merge_partials(parts)
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    shuffled = merge_partials([parts[i] for i in np.random.default_rng(0).permutation(len(parts))])
    for other in (left, right, shuffled):
        for measure in MOMENT_MEASURES:
            np.testing.assert_allclose(
                similarity_matrix(other, measure),
                similarity_matrix(balanced, measure),
                rtol=1e-12,
                atol=1e-14,
            )
    mb = _partials(layers, cuts, 32)
    mb_left = mb[0]
    for p in mb[1:]:
        mb_left = mb_left.merge(p)
    np.testing.assert_allclose(mb_left.hsic_sums()[0], merge_partials(mb).hsic_sums()[0], rtol=1e-12)


# --------------------------------------------------------------------------- degenerate inputs


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


@pytest.mark.usefixtures("no_warnings")
def test_a_constant_layer_gives_the_degenerate_value_for_every_measure() -> None:
    layers = random_layers(n=100, seed=8)
    layers["const"] = np.full((100, 4), 0.1) + 1000.0
    layers["zero"] = np.zeros((100, 2), dtype=np.float32)
    widths = {k: v.shape[1] for k, v in layers.items()}
    for measure in MEASURE_NAMES:
        source = new_accumulator(MEASURES[measure].needs, widths, minibatch_size=16)
        for a, b in _bounds(100, [3, 33, 34, 90]):
            source.update(_chunk(layers, a, b))
        got = similarity_matrix(source, measure)
        assert np.all(got[-2:, :] == DEGENERATE_VALUE) and np.all(got[:, -2:] == DEGENERATE_VALUE), measure
        assert np.isfinite(got).all()
    assert not np.any(stream_moments(layers, [3, 33]).block("const", "const"))  # exactly zero moments


@pytest.mark.usefixtures("no_warnings")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_four_samples_give_documented_values(n: int) -> None:
    layers = {k: v[:n] for k, v in random_layers(seed=10).items()}
    moments = stream_moments(layers, [1])
    assert np.all(similarity_matrix(moments, "cka_debiased") == DEGENERATE_VALUE)
    assert np.all(similarity_matrix(stream_minibatch(layers, [1], 4), "minibatch_cka") == DEGENERATE_VALUE)
    for measure in ("cka", "svcca", "pwcca"):  # defined from 2 samples; one sample is a constant layer
        got = similarity_matrix(moments, measure)
        assert np.isfinite(got).all()
        if n == 1:
            assert np.all(got == DEGENERATE_VALUE)
        else:
            assert got[0, 1] == pytest.approx(REFERENCES[measure](layers["w1"], layers["w3"]), rel=1e-9)


@pytest.mark.usefixtures("no_warnings")
def test_width_one_layers_match_the_references_and_cka_is_the_squared_correlation() -> None:
    rng = np.random.default_rng(12)
    x = rng.normal(size=(200, 1)) + 500.0
    y = 0.3 * x + rng.normal(size=(200, 1))
    layers = {"x": x, "y": y}
    source = stream_moments(layers, [50, 51, 120])
    r = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert cka(source, "x", "y") == pytest.approx(r**2, rel=1e-12)
    assert svcca(source, "x", "y") == pytest.approx(abs(r), rel=1e-12)
    assert pwcca(source, "x", "y") == pytest.approx(abs(r), rel=1e-12)
    assert cka_debiased(source, "x", "y") == pytest.approx(ref_cka_debiased(x, y), rel=RTOL)
    h = stream_minibatch(layers, [50, 51, 120], 16)
    assert minibatch_cka(h, "x", "y") == pytest.approx(ref_minibatch_cka(x, y, 16), rel=RTOL)


def test_rank_deficient_layers_match_the_references() -> None:
    """Duplicated and dead (constant) units: CCA works on each layer's numerical range (a pseudo-inverse)."""
    base = random_layers(seed=14)
    mix = np.random.default_rng(14).normal(size=(2, 3))
    deficient = np.hstack([base["w8"], base["w8"][:, :2] @ mix, np.full((300, 1), 5.0)])  # rank 8 of 12
    layers = {"deficient": deficient, "w3": base["w3"], "w20": base["w20"], "w8": base["w8"]}
    worst_errors(stream_moments(layers, _chunkings(300)[3]), reference_matrices(layers))
    source = stream_moments(layers, [])
    assert svcca(source, "deficient", "w8", svcca_threshold=1.0) == pytest.approx(1.0, rel=1e-12)


def test_svcca_threshold_keeps_the_directions_that_explain_it() -> None:
    rng = np.random.default_rng(13)
    x = rng.normal(size=(400, 4)) * [10.0, 5.0, 2.0, 0.1]
    y = np.hstack([x[:, :1] + rng.normal(size=(400, 1)), rng.normal(size=(400, 3))])
    source = stream_moments({"x": x, "y": y}, [100])
    for t in (0.5, 0.8, 0.95, 0.999, 1.0):
        assert svcca(source, "x", "y", svcca_threshold=t) == pytest.approx(ref_svcca(x, y, t), rel=RTOL)


# --------------------------------------------------------------------------- registry and bad input


def test_registry_lists_every_measure_with_its_needs_and_parameters() -> None:
    assert MEASURE_NAMES == ("cka", "cka_debiased", "minibatch_cka", "svcca", "pwcca")
    assert needs_of(MEASURE_NAMES) == ("moments", "minibatch")
    assert MEASURES["svcca"].parameters == ("svcca_threshold",)
    assert MEASURES["minibatch_cka"].parameters == ("minibatch_size",)
    assert check_measure_options() == {"svcca_threshold": 0.99, "minibatch_size": 256}
    assert check_measures("pwcca") == ("pwcca",)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: check_measures(["cka", "rsa"]),
            "invalid measure 'rsa'; valid: cka, cka_debiased, minibatch_cka, svcca, pwcca",
        ),
        (lambda: check_measures([]), "measure must name at least one measure"),
        (
            lambda: check_measure_options(svcca_threshold=1.5),
            "invalid svcca_threshold 1.5: must be a number in (0, 1]",
        ),
        (lambda: check_measure_options(svcca_threshold=float("nan")), "invalid svcca_threshold nan"),
        (
            lambda: check_measure_options(minibatch_size=3),
            "invalid minibatch_size 3: must be an integer >= 4",
        ),
        (lambda: check_measure_options(minibatch_size=64.5), "invalid minibatch_size 64.5"),
        (lambda: check_measure_options(minibatch_size=True), "invalid minibatch_size True"),
        (lambda: MinibatchHSIC([3], minibatch_size=2), "invalid minibatch_size 2"),
        (lambda: check_measure_options(threshold=0.9), "unknown similarity option 'threshold'"),
        (lambda: JointMoments({"a": 0}), "layer 'a': width must be an integer >= 1"),
        (
            lambda: JointMoments({"a": 2, "b": 1}).update({"a": np.ones((5, 2)), "b": np.ones((4, 1))}),
            "layer 'b' has 4 rows but layer 'a' has 5",
        ),
        (
            lambda: JointMoments({"a": 2}).update({"a": np.ones((5, 3))}),
            "layer 'a': rows must have shape (n, 2), got (5, 3)",
        ),
        (
            lambda: JointMoments({"a": 2}).update({"a": np.full((5, 2), np.nan)}),
            "layer 'a' has NaN or infinite activations",
        ),
        (lambda: JointMoments({"a": 2}).update({"b": np.ones((5, 2))}), "unknown layer 'b' in chunk"),
        (
            lambda: JointMoments({"a": 2, "b": 1}).update({"a": np.ones((5, 2))}),
            "chunk has no rows for layer 'b'",
        ),
        (
            lambda: MinibatchHSIC([2]).merge(MinibatchHSIC([2], start=5)),
            "rows must be consecutive: the first part ends at row 0, the second starts at 5",
        ),
        (
            lambda: JointMoments([2]).merge(JointMoments([3])),
            "can only merge joint moments of the same layers",
        ),
        (lambda: new_accumulator("grams", [2]), "invalid need 'grams'"),
    ],
)
def test_bad_input_gets_a_one_line_error_naming_the_argument(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_measure_on_the_wrong_accumulator_or_layer_is_refused() -> None:
    m = JointMoments({"a": 2}).update({"a": np.eye(5, 2)})
    with pytest.raises(
        TypeError, match="measure 'minibatch_cka' is computed from MinibatchHSIC, got JointMoments"
    ):
        similarity_matrix(m, "minibatch_cka")
    with pytest.raises(KeyError, match="unknown layer 'b'"):
        cka(m, "a", "b")


@pytest.mark.parametrize("module", [moments_module, measures_module], ids=lambda m: m.__name__)
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


if __name__ == "__main__":  # the accuracy numbers: python tests/test_similarity_measures.py
    cases = {"random +1000": random_layers(), "conv/linear/LSTM/GRU": make_model_layers()}
    for label, layers in cases.items():
        refs = reference_matrices(layers)
        for k, cuts in enumerate(_chunkings(300)):
            print(
                label,
                f"chunking {k}",
                {m: f"{e:.1e}" for m, e in worst_errors(stream_moments(layers, cuts), refs).items()},
            )
        for size in (256, 64, 37, 4):
            refs = reference_matrices(layers, ["minibatch_cka"], size)
            errs = [
                worst_errors(stream_minibatch(layers, cuts, size), refs)["minibatch_cka"]
                for cuts in _chunkings(300)
            ]
            print(label, f"minibatch_cka size {size}: worst {max(errs):.1e}")
