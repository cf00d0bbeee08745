"""In-memory references of the similarity measures, written from the papers' formulas.

They hold every activation in memory and follow the papers literally: CKA from centred matrices
(Kornblith et al. 2019), the unbiased HSIC estimator on n x n Gram matrices (Song et al. 2012),
minibatch CKA on explicit minibatches (Nguyen et al. 2021), SVCCA by SVD truncation then CCA by
QR / SVD of the data matrices (Raghu et al. 2017), PWCCA's weights from the canonical variates
and the neurons (Morcos et al. 2018). Shared by test_similarity_measures.py (the streaming core)
and test_similarity.py (the whole pipeline, from run stores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from analyze.similarity_measures import CCA_RANK_TOLERANCE


def centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0)


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = centred(x), centred(y)
    den = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    return 0.0 if den == 0 else float(np.linalg.norm(xc.T @ yc) ** 2 / den)


def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 - the paper's name
    """Song et al. (2012), eq. (5): the diagonals are zeroed, then the three terms."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    ones = np.ones(n)
    return float(
        (
            np.einsum("ij,ji->", kt, lt)  # tr(K~ L~)
            + (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
        )
        / (n * (n - 3))
    )


def _ratio(kl: float, kk: float, ll: float) -> float:
    return 0.0 if kk <= 0 or ll <= 0 else kl / np.sqrt(kk * ll)


def ref_cka_debiased(x: np.ndarray, y: np.ndarray, centre: bool = True) -> float:
    """Gram matrices of the data (centred first unless ``centre=False``: the estimator is invariant)."""
    xs, ys = (centred(x), centred(y)) if centre else (np.asarray(x, float), np.asarray(y, float))
    k, l = xs @ xs.T, ys @ ys.T  # noqa: E741
    return _ratio(ref_hsic_unbiased(k, l), ref_hsic_unbiased(k, k), ref_hsic_unbiased(l, l))


def ref_minibatch_cka(x: np.ndarray, y: np.ndarray, size: int) -> float:
    kl = kk = ll = 0.0
    for lo in range(0, x.shape[0], size):
        xb, yb = centred(x[lo : lo + size]), centred(y[lo : lo + size])
        if xb.shape[0] < 4:
            continue
        k, l = xb @ xb.T, yb @ yb.T  # noqa: E741
        kl += ref_hsic_unbiased(k, l)
        kk += ref_hsic_unbiased(k, k)
        ll += ref_hsic_unbiased(l, l)
    return _ratio(kl, kk, ll)


def _basis(x: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis of the centred data's kept principal directions (from its SVD) and the kept
    right singular vectors. ``threshold``: the SVCCA truncation (share of the variance s^2)."""
    u, s, vt = np.linalg.svd(centred(x), full_matrices=False)
    var = s**2
    k = int(np.count_nonzero(var > CCA_RANK_TOLERANCE * var[0])) if var[0] > 0 else 0
    if threshold is not None and k:
        k = min(k, int(np.searchsorted(np.cumsum(var) / var.sum(), threshold - 1e-12)) + 1)
    return u[:, :k], vt[:k].T


def ref_svcca(x: np.ndarray, y: np.ndarray, threshold: float = 0.99) -> float:
    (_, vx), (_, vy) = _basis(x, threshold), _basis(y, threshold)
    if vx.shape[1] == 0 or vy.shape[1] == 0:
        return 0.0
    qx, _ = np.linalg.qr(centred(x) @ vx)  # the SVD-reduced layer, then CCA by QR + SVD
    qy, _ = np.linalg.qr(centred(y) @ vy)
    return float(np.mean(np.linalg.svd(qx.T @ qy, compute_uv=False)))


def ref_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    (qx, _), (qy, _) = _basis(x, None), _basis(y, None)
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return 0.0
    u, rho, vt = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h, neurons = (qx @ u, centred(x)) if qx.shape[1] <= qy.shape[1] else (qy @ vt.T, centred(y))
    alpha = np.abs(h.T @ neurons).sum(axis=1)  # alpha_i = sum_j |<h_i, x_j>|
    return float(np.sum(alpha * rho) / np.sum(alpha))


REFERENCES: dict[str, Callable[..., float]] = {
    "cka": ref_cka,
    "cka_debiased": ref_cka_debiased,
    "svcca": ref_svcca,
    "pwcca": ref_pwcca,
}
