"""Tests of analyze.stats against independent numpy references and against delve 0.1.50 itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from delve import metrics as delve_metrics
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from analyze import stats
from analyze.stats import (
    REGISTRY,
    SEMANTICS,
    STATS,
    Spectrum,
    check_semantics,
    check_stats,
    check_threshold,
    check_thresholds,
    compute_stat,
    compute_stats,
    delve_embed,
    pca_embed,
    spectrum_of,
)

# No numpy RuntimeWarning may leak from the module. Small eigh calls in torch are ~100x slower
# with several threads contending with BLAS.
pytestmark = [pytest.mark.filterwarnings("error"), pytest.mark.usefixtures("one_thread")]

THRESHOLDS = (0.5, 0.9, 0.99, 0.999, 1.0)
SIZES = (1, 2, 3, 7, 16, 50)
KINDS = ("lowrank", "decaying", "flat", "few-samples", "many-samples")
TOL = 1e-12  # the default idim's documented tolerance, written out independently
DELVE = "delve-0.1.50"


# --------------------------------------------------------------------------- test data


def one_pass_cov(x: np.ndarray) -> np.ndarray:
    """Population covariance the way the capture (and delve) builds it: S/n - m m^T."""
    n = x.shape[0]
    m = x.sum(axis=0) / n
    return x.T @ x / n - np.outer(m, m)


def make_cov(kind: str, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, d, KINDS.index(kind)])
    if kind in ("lowrank", "decaying", "flat"):
        if kind == "lowrank":
            lam = np.zeros(d)
            r = max(1, d // 3)
            lam[:r] = rng.uniform(0.5, 3.0, r)
        elif kind == "decaying":
            lam = np.logspace(0.0, -3.0, d) * rng.uniform(0.9, 1.1, d)
        else:
            lam = rng.uniform(0.8, 1.2, d)
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        c = (q * lam) @ q.T
        return (c + c.T) / 2
    n = d // 2 + 2 if kind == "few-samples" else 4 * d + 3
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, d) + rng.uniform(-5, 5, d)
    return one_pass_cov(x)


CASES = [(kind, d, seed) for kind in KINDS for d in SIZES for seed in (0, 1)]


# --------------------------------------------------------------------------- independent references


def ref_eigenvalues(c: np.ndarray) -> np.ndarray:
    """Clamped eigenvalues, descending, by a different solver path (eigvalsh, lower triangle)."""
    w = np.linalg.eigvalsh((c + c.T) / 2, UPLO="L")
    return np.sort(np.maximum(w, 0.0))[::-1]


def ref_idim_default(lam: np.ndarray, t: float) -> int:
    """Brute force: the smallest k whose top-k eigenvalues explain >= t - TOL of the total."""
    total = math.fsum(lam)
    if total == 0:
        return 0
    for k in range(1, len(lam) + 1):
        if math.fsum(lam[:k]) / total >= t - TOL:
            return k
    return len(lam)


def ref_pr(lam: np.ndarray) -> float:
    total = math.fsum(lam)
    return 0.0 if total == 0 else total**2 / math.fsum(lam**2)


def ref_erank(lam: np.ndarray) -> float:
    total = math.fsum(lam)
    if total == 0:
        return 0.0
    h = 0.0
    for v in lam:
        if v > 0:
            q = v / total
            h -= q * math.log(q)
    return math.exp(h)


def delve_values(c: np.ndarray, t: float) -> dict[str, float]:
    tc = torch.from_numpy(c.copy())
    return {
        "idim": delve_metrics.compute_intrinsic_dimensionality(tc.clone(), thresh=t),
        "lsat": delve_metrics.compute_saturation(tc.clone(), thresh=t),
        "trc": float(delve_metrics.compute_cov_trace(tc.clone())),
        "dtrc": float(delve_metrics.compute_diag_trace(tc.clone())),
        "det": float(delve_metrics.compute_cov_determinant(tc.clone())),
    }


# --------------------------------------------------------------------------- delve-0.1.50 semantics vs delve


@pytest.mark.parametrize(("kind", "d", "seed"), CASES)
def test_delve_semantics_match_delve(kind: str, d: int, seed: int) -> None:
    c = make_cov(kind, d, seed)
    s = spectrum_of(c)
    lam = np.sort(np.maximum(np.linalg.eigh(c, UPLO="U")[0], 0.0))[::-1]
    p = np.cumsum(lam) / np.sum(lam)
    for t in THRESHOLDS:
        ref = delve_values(c, t)
        idim = compute_stat("idim", s, t, DELVE)
        lsat = compute_stat("lsat", s, t, DELVE)
        assert lsat == idim / d
        if np.all(np.abs(p - t) > TOL):
            assert idim == ref["idim"], (t, p)
            assert lsat == ref["lsat"]
        else:
            # Some fraction is within round-off of t (t = 1 with a null space, or an exact tie):
            # delve's answer there depends on MKL's eigenvalues and torch's summation order.
            assert np.count_nonzero(p < t - TOL) <= ref["idim"] <= np.count_nonzero(p < t + TOL)
            assert np.count_nonzero(p < t - TOL) <= idim <= np.count_nonzero(p < t + TOL)
        assert t == 1.0 or np.all(np.abs(p - t) > TOL), "thresholds below 1 must be compared exactly"
    ref = delve_values(c, 0.99)
    np.testing.assert_allclose(compute_stat("trc", s), ref["trc"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(compute_stat("dtrc", s), ref["dtrc"], rtol=1e-12, atol=1e-15 * ref["trc"])
    det = compute_stat("det", s)
    lam_max = lam[0]
    if np.linalg.matrix_rank(c) == d:
        np.testing.assert_allclose(det, ref["det"], rtol=1e-6, atol=0)
        assert det > 0
    else:  # singular: both determinants are round-off around 0
        bound = 1e-8 * lam_max**d
        assert abs(det) <= bound and abs(ref["det"]) <= bound


def test_delve_semantics_exact_ties_identity() -> None:
    """Identity: fractions k/d exactly; t = 0.5 lands on one. delve counts it out, default in."""
    c = np.eye(4)
    s = spectrum_of(c)
    for t in (0.25, 0.5, 0.75, 1.0):
        assert compute_stat("idim", s, t, DELVE) == delve_values(c, t)["idim"] == round(4 * t) - 1
        assert compute_stat("idim", s, t) == round(4 * t)


# --------------------------------------------------------------------------- default semantics vs references


@pytest.mark.parametrize(("kind", "d", "seed"), CASES)
def test_default_semantics_match_references(kind: str, d: int, seed: int) -> None:
    c = make_cov(kind, d, seed)
    s = spectrum_of(c)
    lam = ref_eigenvalues(c)
    np.testing.assert_allclose(compute_stat("spectrum", s), lam, rtol=0, atol=1e-12 * lam[0])
    for t in THRESHOLDS:
        expected = ref_idim_default(lam, t)
        assert compute_stat("idim", s, t) == expected
        assert compute_stat("lsat", s, t) == expected / d
    np.testing.assert_allclose(compute_stat("trc", s), np.sum(np.diag(c)), rtol=1e-13)
    np.testing.assert_allclose(compute_stat("dtrc", s), math.fsum(lam), rtol=1e-12)
    np.testing.assert_allclose(compute_stat("pr", s), ref_pr(lam), rtol=1e-9)
    np.testing.assert_allclose(compute_stat("erank", s), ref_erank(lam), rtol=1e-9)
    sign, logabs = np.linalg.slogdet(c)
    if np.linalg.matrix_rank(c) == d:
        assert sign > 0
        np.testing.assert_allclose(compute_stat("logdet", s), math.fsum(np.log(lam)), rtol=1e-9)
        np.testing.assert_allclose(compute_stat("det", s), np.prod(lam), rtol=1e-6)
    else:
        assert compute_stat("logdet", s) == (logabs if sign > 0 else -math.inf)


def test_default_is_the_number_of_needed_eigenvalues_at_one() -> None:
    """t = 1: the numerical rank, whatever the round-off in the null space."""
    for seed in range(5):
        c = make_cov("lowrank", 30, seed)
        assert compute_stat("idim", spectrum_of(c), 1.0) == 10


# --------------------------------------------------------------------------- properties

eigenvalue = st.one_of(st.just(0.0), st.floats(1e-6, 1e6))
eigenvalues = st.lists(eigenvalue, min_size=1, max_size=40).map(lambda v: np.sort(np.array(v))[::-1])
threshold = st.floats(1e-6, 1.0, exclude_min=True)


def spectrum_from(lam: np.ndarray) -> Spectrum:
    return Spectrum(raw=lam, trace=float(np.sum(lam)), det=float(np.prod(lam)), logdet_sign=1.0, logabsdet=0.0)


@settings(max_examples=150, deadline=None)
@given(lam=eigenvalues, t1=threshold, t2=threshold)
def test_idim_monotone_in_threshold(lam: np.ndarray, t1: float, t2: float) -> None:
    s = spectrum_from(lam)
    lo, hi = sorted((t1, t2))
    for sem in SEMANTICS:
        assert compute_stat("idim", s, lo, sem) <= compute_stat("idim", s, hi, sem)


@settings(max_examples=150, deadline=None)
@given(lam=eigenvalues, t=threshold)
def test_default_and_delve_relation(lam: np.ndarray, t: float) -> None:
    s = spectrum_from(lam)
    d = len(lam)
    default = compute_stat("idim", s, t)
    delve = compute_stat("idim", s, t, DELVE)
    if np.sum(lam) == 0:
        assert default == delve == 0
        return
    p = np.cumsum(lam) / np.sum(lam)
    assert delve == np.count_nonzero(p < t)
    assert 1 <= default <= d and 0 <= delve <= d - (t == 1.0 and p[-1] >= 1.0)
    if not np.any((p >= t - TOL) & (p < t)):
        assert default == delve + 1
    else:
        assert default == np.count_nonzero(p < t - TOL) + 1 <= delve
    # brute force, away from the tolerance edge
    q = np.array([math.fsum(lam[:k]) for k in range(1, d + 1)]) / math.fsum(lam)
    assume(np.all(np.abs(q - (t - TOL)) > 1e-14))
    assert default == ref_idim_default(lam, t)


@settings(max_examples=150, deadline=None)
@given(lam=eigenvalues, k=st.integers(-20, 20), t=threshold)
def test_scale_invariance_and_pr_erank_bounds(lam: np.ndarray, k: int, t: float) -> None:
    s, scaled = spectrum_from(lam), spectrum_from(lam * 2.0**k)
    for name in ("idim", "lsat"):
        for sem in SEMANTICS:
            assert compute_stat(name, s, t, sem) == compute_stat(name, scaled, t, sem)
    pr, er = compute_stat("pr", s), compute_stat("erank", s)
    np.testing.assert_allclose(compute_stat("pr", scaled), pr, rtol=1e-12)
    np.testing.assert_allclose(compute_stat("erank", scaled), er, rtol=1e-12)
    rank = np.count_nonzero(lam > 0)
    if rank == 0:
        assert pr == er == 0
    else:  # exp(Renyi-2 entropy) <= exp(Shannon entropy) <= rank
        assert 1 - 1e-12 <= pr <= er * (1 + 1e-12) and er <= rank * (1 + 1e-12)
        np.testing.assert_allclose(pr, ref_pr(lam), rtol=1e-12)
        np.testing.assert_allclose(er, ref_erank(lam), rtol=1e-9)


# --------------------------------------------------------------------------- edge cases

SCALARS = ("lsat", "idim", "trc", "dtrc", "det", "logdet", "pr", "erank")


def scalar_values(s: Spectrum, semantics: str, t: float = 0.99) -> dict[str, float]:
    return {
        n: compute_stat(n, s, t if REGISTRY[n].thresholded else None, semantics) for n in SCALARS
    }


@pytest.mark.parametrize("d", [1, 3])
def test_all_zero_covariance(d: int) -> None:
    s = spectrum_of(np.zeros((d, d)))
    expected = {"lsat": 0.0, "idim": 0.0, "trc": 0.0, "dtrc": 0.0, "det": 0.0, "logdet": -math.inf,
                "pr": 0.0, "erank": 0.0}
    for sem in SEMANTICS:
        for t in THRESHOLDS:
            assert scalar_values(s, sem, t) == expected
    for t in THRESHOLDS:
        assert delve_values(np.zeros((d, d)), t)["idim"] == 0
    np.testing.assert_array_equal(compute_stat("spectrum", s), np.zeros(d))


def test_single_sample_gives_zero_covariance() -> None:
    x = np.random.default_rng(3).standard_normal((1, 6))
    c = one_pass_cov(x)
    assert not c.any()
    s = spectrum_of(c)
    assert compute_stat("idim", s, 0.99) == compute_stat("lsat", s, 0.99) == 0.0
    assert compute_stat("idim", s, 0.99, DELVE) == 0.0


def test_width_one() -> None:
    c = np.array([[2.5]])
    s = spectrum_of(c)
    for t in THRESHOLDS:
        assert compute_stat("idim", s, t) == compute_stat("lsat", s, t) == 1.0
        assert compute_stat("idim", s, t, DELVE) == delve_values(c, t)["idim"] == 0
    assert scalar_values(s, "default") == {"lsat": 1.0, "idim": 1.0, "trc": 2.5, "dtrc": 2.5, "det": 2.5,
                                           "logdet": math.log(2.5), "pr": 1.0, "erank": 1.0}
    np.testing.assert_array_equal(s.vectors, [[1.0]])


@pytest.mark.parametrize("where", [(0, 1), (1, 0), (2, 2)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_covariance_gives_nan(where: tuple[int, int], bad: float) -> None:
    c = np.eye(3)
    c[where] = bad
    s = spectrum_of(c, keep_cov=True)
    assert not s.finite
    for sem in SEMANTICS:
        for t in THRESHOLDS:
            assert all(math.isnan(v) for v in scalar_values(s, sem, t).values())
    assert np.isnan(compute_stat("spectrum", s)).all()
    assert np.isnan(s.vectors).all() and s.vectors.shape == (3, 2)
    np.testing.assert_array_equal(compute_stat("cov", s), c)


def test_eigensolver_failure_gives_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigh", fail)
    s = spectrum_of(np.eye(2))
    assert all(math.isnan(v) for v in scalar_values(s, "default").values())


def test_round_off_negative_eigenvalue_and_negative_det() -> None:
    s = Spectrum(raw=[2.0, -1e-17], trace=2.0, det=-2e-17, logdet_sign=-1.0, logabsdet=math.log(2e-17))
    np.testing.assert_array_equal(s.eigenvalues, [2.0, 0.0])
    assert scalar_values(s, "default") == {"lsat": 0.5, "idim": 1.0, "trc": 2.0, "dtrc": 2.0, "det": -2e-17,
                                           "logdet": -math.inf, "pr": 1.0, "erank": 1.0}
    singular = spectrum_of(np.ones((2, 2)))
    assert compute_stat("logdet", singular) == -math.inf
    assert compute_stat("idim", singular, 1.0) == 1.0


def test_overflowing_determinant_no_warning() -> None:
    s = spectrum_of(np.diag([1e200, 1e200, 1e200]))
    assert compute_stat("det", s) == math.inf
    np.testing.assert_allclose(compute_stat("logdet", s), 3 * math.log(1e200), rtol=1e-14)
    assert compute_stat("pr", s) == pytest.approx(3.0) and compute_stat("erank", s) == pytest.approx(3.0)


# --------------------------------------------------------------------------- spectrum storage


def test_spectrum_round_trip_serves_every_threshold_without_cov() -> None:
    c = make_cov("decaying", 12, 0)
    s = spectrum_of(c)
    stored = {k: np.asarray(v) for k, v in s.to_dict().items()}  # e.g. read back as 0-d arrays
    assert "cov" not in stored
    back = Spectrum.from_dict(stored)
    assert back.width == 12
    for sem in SEMANTICS:
        a = compute_stats(s, SCALARS + ("spectrum",), THRESHOLDS, sem)
        b = compute_stats(back, SCALARS + ("spectrum",), THRESHOLDS, sem)
        assert [(v.stat, v.threshold) for v in a] == [(v.stat, v.threshold) for v in b]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.value, y.value)


def test_spectrum_validation() -> None:
    with pytest.raises(ValueError, match="descending"):
        Spectrum(raw=[1.0, 2.0], trace=3.0, det=2.0, logdet_sign=1.0, logabsdet=0.7)
    with pytest.raises(ValueError, match="unknown spectrum field"):
        Spectrum.from_dict({"raw": [1.0], "trace": 1.0, "det": 1.0, "logdet_sign": 1.0, "logabsdet": 0.0,
                            "eigvals": [1.0]})
    with pytest.raises(ValueError, match="vectors"):
        Spectrum(raw=[1.0, 0.5], trace=1.5, det=0.5, logdet_sign=1.0, logabsdet=0.0, vectors=np.ones((3, 1)))
    for bad in (np.zeros((2, 3)), np.zeros((0, 0)), np.zeros(3), np.zeros((2, 2, 2))):
        with pytest.raises(ValueError, match="square"):
            spectrum_of(bad)
    s = spectrum_of(np.eye(3))
    with pytest.raises(ValueError):
        s.raw[0] = 5.0  # read-only


def test_spectrum_uses_upper_triangle_like_delve() -> None:
    c = np.array([[2.0, 1.0], [-7.0, 2.0]])  # lower triangle ignored by eigh(UPLO="U")
    np.testing.assert_allclose(spectrum_of(c).raw, [3.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(delve_metrics.compute_diag_trace(torch.from_numpy(c)), 4.0, rtol=1e-15)


def test_vectors_sign_and_count() -> None:
    c = make_cov("many-samples", 6, 0)
    s = spectrum_of(c, n_vectors=3)
    assert s.vectors.shape == (6, 3)
    w, v = np.linalg.eigh(c)
    for j in range(3):
        ref = v[:, -1 - j]
        ref = ref if ref[np.argmax(np.abs(ref))] > 0 else -ref
        np.testing.assert_allclose(s.vectors[:, j], ref, atol=1e-12)
    assert spectrum_of(c, n_vectors=0).vectors is None
    assert spectrum_of(np.eye(1), n_vectors=5).vectors.shape == (1, 1)


# --------------------------------------------------------------------------- registry and validation


def test_registry_names() -> None:
    assert STATS == ("lsat", "idim", "trc", "dtrc", "det", "logdet", "pr", "erank", "spectrum", "cov", "embed")
    assert stats.THRESHOLDED_STATS == ("lsat", "idim")
    assert stats.SCALAR_STATS == SCALARS
    assert stats.ARRAY_STATS == ("spectrum", "cov") and stats.SAMPLE_STATS == ("embed",)
    assert SEMANTICS == ("default", "delve-0.1.50")


def test_check_stats() -> None:
    assert check_stats(["trc", "lsat"]) == ("trc", "lsat")
    assert check_stats("idim") == ("idim",)
    with pytest.raises(ValueError) as err:
        check_stats(["lsat", "saturation"], argument="--stats")
    message = str(err.value)
    assert "--stats" in message and "'saturation'" in message and all(n in message for n in STATS)
    with pytest.raises(ValueError, match="duplicates"):
        check_stats(["lsat", "lsat"])
    with pytest.raises(ValueError, match="at least one"):
        check_stats([])


@pytest.mark.parametrize("good", [0.5, 1, 1.0, "0.99", np.float32(0.25), 1e-9])
def test_check_threshold_accepts(good: object) -> None:
    assert check_threshold(good) == float(good)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, math.nan, math.inf, True, False, "abc", "", None, [0.5]])
def test_check_threshold_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"invalid --threshold .*: must be a number in \(0, 1\]") as err:
        check_threshold(bad, argument="--threshold")
    assert "\n" not in str(err.value)


def test_check_thresholds_and_semantics() -> None:
    assert check_thresholds((0.9, 0.99)) == (0.9, 0.99)
    assert check_thresholds("0.5") == (0.5,)
    for bad in ([], [0.9, 0.9], [0.9, 2.0]):
        with pytest.raises(ValueError):
            check_thresholds(bad)
    assert check_semantics("default") == "default"
    with pytest.raises(ValueError, match="'default', 'delve-0.1.50'"):
        check_semantics("delve")


def test_compute_stat_errors_and_compute_stats_order() -> None:
    s = spectrum_of(np.diag([3.0, 1.0]))
    with pytest.raises(ValueError, match="needs a threshold"):
        compute_stat("lsat", s)
    with pytest.raises(ValueError, match="takes no threshold"):
        compute_stat("trc", s, 0.5)
    with pytest.raises(ValueError, match="delve_embed"):
        compute_stat("embed", s)
    with pytest.raises(ValueError, match="need="):
        compute_stat("cov", s)
    with pytest.raises(ValueError, match="invalid semantics"):
        compute_stat("idim", s, 0.5, semantics="delve")
    np.testing.assert_array_equal(compute_stat("cov", spectrum_of(np.diag([3.0, 1.0]), keep_cov=True)),
                                  np.diag([3.0, 1.0]))
    got = compute_stats(s, ["trc", "lsat", "idim"], thresholds=[0.9, 0.5], semantics=DELVE)
    assert [tuple(v) for v in got] == [("trc", None, 4.0), ("lsat", 0.9, 0.5), ("lsat", 0.5, 0.0),
                                       ("idim", 0.9, 1.0), ("idim", 0.5, 0.0)]


# --------------------------------------------------------------------------- embeddings


def delve_embed_reference(cov: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """delve/torchcallback.py add_saturations, stat 'embed', transcribed."""
    cov_mat = torch.from_numpy(cov)
    transformation_matrix = torch.mm(cov_mat[0:2].transpose(0, 1), cov_mat[0:2])
    out = []
    for sample in torch.from_numpy(samples):
        coord = torch.matmul(transformation_matrix, sample)
        out.append((coord[0], coord[1]))
    return np.array([[float(a), float(b)] for a, b in out])


@pytest.mark.parametrize("d", [2, 3, 9])
def test_delve_embed_matches_delve(d: int) -> None:
    rng = np.random.default_rng(d)
    x = rng.standard_normal((20, d)) + 2.0
    c = one_pass_cov(x)
    ref = delve_embed_reference(c, x)
    np.testing.assert_allclose(delve_embed(c, x), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


def test_delve_embed_width_one() -> None:
    x = np.array([[1.0], [3.0]])
    c = one_pass_cov(x)
    with pytest.raises(IndexError):
        delve_embed_reference(c, x)  # delve itself fails here
    out = delve_embed(c, x)
    np.testing.assert_allclose(out[:, 0], [1.0, 3.0])
    assert np.isnan(out[:, 1]).all()


def test_pca_embed() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1]) + 10.0
    s = spectrum_of(one_pass_cov(x))
    w, v = np.linalg.eigh(np.cov(x.T, bias=True))
    ref = (x - x.mean(axis=0)) @ v[:, ::-1][:, :2]
    out = pca_embed(x, s.vectors)
    for j in range(2):  # eigenvector signs are a convention
        sign = np.sign(out[0, j] * ref[0, j])
        np.testing.assert_allclose(out[:, j], sign * ref[:, j], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(pca_embed(x, s.vectors, mean=np.zeros(5)), x @ s.vectors[:, :2], rtol=1e-12)
    one = pca_embed(x[:, :1], spectrum_of(one_pass_cov(x[:, :1])).vectors)
    assert np.isnan(one[:, 1]).all()
    with pytest.raises(ValueError, match="samples"):
        pca_embed(x[:, :3], s.vectors)
