"""PCA layers: project a layer's input onto the eigenspace that explains most of its variance.

A PCA layer sits between two layers of a network (``Linear -> LinearPCALayer -> ReLU``,
``Conv2d -> Conv2DPCALayer -> ...``). Its life runs in epochs:

* **Training mode** tracks the moments of the input (sample count, mean and centred second
  moment, float64, merged batch by batch with Chan's pairwise update from
  :mod:`capture.moments`). Until ``gradient_epoch_start`` epochs have been completed the input
  passes through unchanged; from then on it is projected onto the current eigenspace, which
  also projects the gradient that flows back through the layer.
* **Leaving training mode** (``model.eval()``, or the first eval-mode forward pass) ends the
  epoch when training data was seen: the eigen-decomposition of the epoch's covariance is
  computed, the moments are reset and ``epoch`` goes up by one.
* **Eval mode** projects every input with that fixed eigenspace.

The kept eigenspace is spanned by the top ``k`` eigenvectors, where ``k`` is the smallest number
whose eigenvalues explain at least ``threshold`` of the total variance. With ``centering`` the
layer computes ``P (x - mean) + mean`` from the eigenvectors of the covariance; without it,
``P x`` from the eigenvectors of the uncentred second moment ``E[x x^T]`` (delve's convention:
the subspace that best reconstructs ``x`` itself). :class:`Conv2DPCALayer` treats the
``C``-vector of every pixel of an ``(N, C, H, W)`` feature map as one sample.

Differences from delve 0.1.50
-----------------------------
* ``gradient_epoch_start`` is honoured: delve stores it and never uses it (its layers never
  project in training mode). Here training-mode inputs, and so the gradients, are projected
  from that epoch on; eval mode always projects once an eigenspace exists.
* The kept dimension is the smallest ``k`` whose top-``k`` eigenvalues reach ``threshold``.
  delve keeps the dimensions whose cumulative share is *below* the threshold and adds one only
  when the gap exceeds 0.02, so it often keeps one dimension too few (spectrum 100, 10, 1 at
  threshold 0.999: delve keeps 2, this module 3).
* Centring works: delve's ``mean`` buffer is never filled, so its "centred" projection adds
  and subtracts zero (and its Conv2D layer's bias convolutions do the same). Here ``mean`` is
  the mean of the epoch that produced the eigenspace.
* ``keepdim=False`` returns the coordinates ``(x - mean) @ V_k`` (or ``x @ V_k``); with
  centring delve adds the ``d``-dimensional mean to the ``k``-dimensional coordinates, which
  fails (or, for ``k = 1``, silently broadcasts to ``d`` columns).
* Setting ``centering`` re-decomposes the matching matrix (covariance or second moment); delve
  only re-selects dimensions from the eigenvectors of the matrix it had decomposed before.
* :class:`Conv2DPCALayer` counts epochs like the linear layer (delve's never increments
  ``epoch``) and owns no ``torch.nn.Conv2d`` submodules: delve's ``convolution`` and
  ``mean_subtracting_convolution`` register parameters (listed by ``parameters()``, handed
  to optimizers) that are replaced by new ``Parameter`` objects at every epoch.
* ``downsampling`` (target side length of the nearest-neighbour resize before tracking, as in
  delve) only ever shrinks the feature map; delve also upsamples smaller maps, which weights
  pixels unevenly for non-integer factors.
* :func:`change_all_pca_layer_thresholds_and_inject_random_directions` injects random
  directions into convolutional layers too: in delve the ``LinearPCALayer`` branch also catches
  ``Conv2DPCALayer`` (a subclass), labels it ``Linear-i`` and never touches the convolution it
  projects with. Random bases come from a seedable ``torch.Generator`` (delve: the global numpy
  state); ``device`` is accepted for compatibility and ignored, since the basis is written into
  the layer's own buffers on their device.
* ``threshold`` is a ``float`` (delve returns a one-element tensor) and must lie in ``(0, 1]``.
  Setting it before the first epoch only stores it (delve derives a dimension from an all-zero
  eigenspace); ``in_dim`` and ``sat`` are ``None`` until an eigenspace exists, and layers pass
  inputs through unchanged until then.
* Inputs of :class:`LinearPCALayer` may have any leading shape ``(..., in_features)`` (delve:
  2-D only). Moments are merged with Chan's update instead of delve's raw sums
  ``sum x x^T - n mean mean^T``, which cancel catastrophically for large means.
* State: the state dict holds the fitted eigenspace (``eigenvalues``, ``eigenvectors``,
  ``mean``, the kept basis) and, as extra state, threshold, centring, ``epoch`` and ``in_dim``;
  the moments of an unfinished epoch are not saved. delve's buffer names (``sum_squares``,
  ``running_sum``, ...) and its ``name``, ``pca_computed``, ``data_dtype`` attributes and
  ``is_floating_point`` override are gone; ``gradient_epoch`` remains as an alias of
  ``gradient_epoch_start``. Logging only happens with ``verbose``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.functional import interpolate

from capture.moments import Moments

__all__ = [
    "Conv2DPCALayer",
    "LinearPCALayer",
    "change_all_pca_layer_thresholds",
    "change_all_pca_layer_thresholds_and_inject_random_directions",
]

log = logging.getLogger(__name__)


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    return threshold


def _kept_dimension(eigenvalues: torch.Tensor, threshold: float) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues (sorted descending) reach ``threshold`` of the sum.

    A spectrum without variance keeps one dimension.
    """
    total = float(eigenvalues.sum())
    if total <= 0.0:
        return 1
    explained = eigenvalues.cumsum(0) / total
    k = int((explained < threshold).sum()) + 1
    # Rounding can leave the last cumulative share a hair below 1.
    return min(k, eigenvalues.numel())


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """A Haar-distributed ``rows x cols`` matrix with orthonormal columns (float64, CPU)."""
    gaussian = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    # Fixing the signs of R's diagonal makes Q uniformly distributed.
    return q * torch.sign(torch.diagonal(r))


class LinearPCALayer(nn.Module):
    """Project inputs of shape ``(..., in_features)`` onto their principal eigenspace.

    Parameters
    ----------
    in_features : int
        Size of the last input dimension.
    threshold : float
        Share of the variance, in ``(0, 1]``, that the kept eigenspace must explain.
    keepdim : bool
        Return the projection in input coordinates (``True``) or the ``k`` coordinates in the
        eigenbasis (``False``; the output width then follows the kept dimension, so this mode
        suits analysis in eval mode rather than training).
    verbose : bool
        Log the kept dimension at the end of every epoch.
    gradient_epoch_start : int
        Number of completed epochs after which training-mode inputs are projected too.
    centering : bool
        Subtract the mean before projecting (and add it back with ``keepdim``), using the
        eigenvectors of the covariance; otherwise those of the uncentred second moment.

    Attributes
    ----------
    epoch : int
        Completed epochs (eigenspace computations).
    in_dim : int or None
        Kept dimension ``k``; ``None`` before the first epoch ends.
    eigenvalues, eigenvectors : torch.Tensor
        Float64 eigen-decomposition of the last epoch, sorted by decreasing eigenvalue.
    mean : torch.Tensor
        Float64 mean of the last epoch's inputs.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = LinearPCALayer(3, threshold=0.9, gradient_epoch_start=1)
    >>> x = torch.randn(256, 1) * torch.tensor([[1.0, 2.0, 0.0]]) + 0.01 * torch.randn(256, 3)
    >>> bool(torch.equal(layer(x), x))  # training mode, epoch 0: track, pass through
    True
    >>> _ = layer.eval()  # ends the epoch and fits the eigenspace
    >>> layer.epoch, layer.in_dim, layer.fs_dim, layer.sat
    (1, 1, 3, 33.3333)
    >>> y = layer(x)  # eval mode: project onto the top eigenvector
    >>> bool(torch.allclose(y, x, atol=0.05))
    True
    >>> layer.threshold = 1.0
    >>> layer.in_dim
    3
    """

    _feature_dim: int = -1  # where the feature axis lies in an input tensor

    def __init__(
        self,
        in_features: int,
        threshold: float = 0.99,
        keepdim: bool = True,
        verbose: bool = False,
        gradient_epoch_start: int = 20,
        centering: bool = True,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = int(in_features)
        self.keepdim = keepdim
        self.verbose = verbose
        self.gradient_epoch_start = int(gradient_epoch_start)
        self.epoch = 0
        self.in_dim: int | None = None
        self._threshold = _check_threshold(threshold)
        self._centering = bool(centering)
        self._fit_centered = self._centering  # which matrix `eigenvectors` decompose
        self._moments = Moments()  # the current epoch's inputs (capture.moments kernels)

        d, f64 = self.in_features, torch.float64
        self.register_buffer("eigenvalues", torch.zeros(d, dtype=f64))
        self.register_buffer("eigenvectors", torch.zeros(d, d, dtype=f64))
        self.register_buffer("mean", torch.zeros(d, dtype=f64))
        # The first `in_dim` columns span the kept space: the top eigenvectors, or a random basis.
        self.register_buffer("_basis", torch.zeros(d, d, dtype=f64))

    # -- public state ------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        """Share of the variance the kept eigenspace explains; setting it re-selects ``k``."""
        return self._threshold

    @threshold.setter
    def threshold(self, threshold: float) -> None:
        self._threshold = _check_threshold(threshold)
        if self.in_dim is not None:
            self._select_eigenspace()

    @property
    def centering(self) -> bool:
        """Whether to project ``x - mean``; setting it re-decomposes the matching matrix."""
        return self._centering

    @centering.setter
    def centering(self, centering: bool) -> None:
        self._centering = bool(centering)
        if self.in_dim is None or self._centering == self._fit_centered:
            return
        # Covariance and second moment differ by mean mean^T; rebuild one from the other.
        vectors, values = self.eigenvectors, self.eigenvalues
        outer = torch.outer(self.mean, self.mean)
        matrix = (vectors * values) @ vectors.T
        self._decompose(matrix - outer if self._centering else matrix + outer)
        self._fit_centered = self._centering

    @property
    def gradient_epoch(self) -> int:
        """Alias of ``gradient_epoch_start`` (delve's attribute name)."""
        return self.gradient_epoch_start

    @gradient_epoch.setter
    def gradient_epoch(self, value: int) -> None:
        self.gradient_epoch_start = int(value)

    @property
    def fs_dim(self) -> int:
        """Dimension of the full feature space."""
        return self.in_features

    @property
    def sat(self) -> float | None:
        """Saturation: kept dimension as a percentage of ``fs_dim`` (rounded to 4 decimals)."""
        if self.in_dim is None:
            return None
        return round(100.0 * self.in_dim / self.fs_dim, 4)

    @property
    def reduced_transformation_matrix(self) -> torch.Tensor | None:
        """Float32 ``(fs_dim, in_dim)`` orthonormal basis of the kept space."""
        if self.in_dim is None:
            return None
        return self._basis[:, : self.in_dim].float()

    @property
    def transformation_matrix(self) -> torch.Tensor | None:
        """Float32 ``(fs_dim, fs_dim)`` orthogonal projector onto the kept space."""
        if self.in_dim is None:
            return None
        basis = self._basis[:, : self.in_dim]
        return (basis @ basis.T).float()

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, threshold={self.threshold}, keepdim={self.keepdim}, "
            f"centering={self.centering}, gradient_epoch_start={self.gradient_epoch_start}, "
            f"epoch={self.epoch}, in_dim={self.in_dim}"
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "threshold": self._threshold,
            "centering": self._centering,
            "fit_centered": self._fit_centered,
            "epoch": self.epoch,
            "in_dim": self.in_dim,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._threshold = _check_threshold(state["threshold"])
        self._centering = bool(state["centering"])
        self._fit_centered = bool(state["fit_centered"])
        self.epoch = int(state["epoch"])
        self.in_dim = None if state["in_dim"] is None else int(state["in_dim"])

    # -- lifecycle ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> LinearPCALayer:
        """Switch mode; leaving training mode ends the epoch (see the module docstring)."""
        if self.training and not mode and self._moments.count:
            self._end_epoch()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._track(x)
            if self.epoch < self.gradient_epoch_start:
                return x
        elif self._moments.count:  # training mode was left without train(False)
            self._end_epoch()
        if self.in_dim is None:
            return x
        return self._project(x)

    # -- internals ---------------------------------------------------------------------------

    def _samples(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The input as a sample matrix, and whether it is feature-major ``(d, n)``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs of shape (..., {self.in_features}), got {tuple(x.shape)}")
        return x.reshape(-1, self.in_features), False

    @torch.no_grad()
    def _track(self, x: torch.Tensor) -> None:
        samples, feature_major = self._samples(x.detach())
        self._moments.update(samples, feature_major=feature_major)

    @torch.no_grad()
    def _end_epoch(self) -> None:
        count, mean, m2 = self._moments.compute()
        covariance = m2.to(self.mean.device) / count
        self.mean.copy_(mean)
        if not self._centering:
            covariance = covariance + torch.outer(self.mean, self.mean)
        self._fit_centered = self._centering
        self._decompose(covariance)
        self._moments.reset()
        self.epoch += 1

    @torch.no_grad()
    def _decompose(self, matrix: torch.Tensor) -> None:
        values, vectors = torch.linalg.eigh(matrix)
        # eigh sorts ascending; rounding can leave tiny negative eigenvalues of a PSD matrix.
        self.eigenvalues.copy_(values.flip(0).clamp(min=0.0))
        self.eigenvectors.copy_(vectors.flip(1))
        self._select_eigenspace()

    @torch.no_grad()
    def _select_eigenspace(self) -> None:
        self.in_dim = _kept_dimension(self.eigenvalues, self._threshold)
        self._basis.copy_(self.eigenvectors)
        if self.verbose:
            log.info(
                "%s: epoch %d keeps %d of %d dimensions (saturation %s%%)",
                type(self).__name__,
                self.epoch,
                self.in_dim,
                self.fs_dim,
                self.sat,
            )

    @torch.no_grad()
    def _inject_random_basis(self, generator: torch.Generator | None = None) -> None:
        """Replace the kept eigenvectors by a random orthonormal basis of the same dimension."""
        if self.in_dim is None:
            raise RuntimeError(f"{type(self).__name__} has no eigenspace yet: finish an epoch first")
        random = _random_orthonormal(self.fs_dim, self.in_dim, generator)
        self._basis.zero_()
        self._basis[:, : self.in_dim] = random.to(self._basis.device)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        assert self.in_dim is not None
        basis = self._basis[:, : self.in_dim].to(x.dtype)
        z = x.movedim(self._feature_dim, -1)
        mean = self.mean.to(x.dtype)
        if self._centering:
            z = z - mean
        out = z @ basis
        if self.keepdim:
            out = out @ basis.T
            if self._centering:
                out = out + mean
        return out.movedim(-1, self._feature_dim)


class Conv2DPCALayer(LinearPCALayer):
    """Project every pixel's channel vector of an ``(N, C, H, W)`` feature map onto its eigenspace.

    Each of the ``N * H * W`` channel vectors of a batch is one sample of the ``C``-dimensional
    covariance (after the optional nearest-neighbour ``downsampling`` of the map, which only
    affects what is tracked). The projection is a 1x1 convolution with the projector.

    Parameters
    ----------
    in_filters : int
        Number of channels ``C``.
    threshold, verbose, gradient_epoch_start, centering
        As for :class:`LinearPCALayer` (note the defaults: ``verbose=True``,
        ``centering=False``, as in delve). ``keepdim`` is ``True``; it may be set to
        ``False`` afterwards to get ``(N, k, H, W)`` eigen-coordinates.
    downsampling : int or (int, int), optional
        Largest spatial size ``(H, W)`` of the map whose pixels are tracked; larger maps are
        resized with nearest-neighbour interpolation, smaller ones are used as they are.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> layer = Conv2DPCALayer(4, threshold=0.95, verbose=False, gradient_epoch_start=0)
    >>> mix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # 2-D channel subspace
    >>> x = torch.einsum("cr,nrhw->nchw", mix, torch.randn(8, 2, 5, 5))
    >>> _ = layer(x)
    >>> _ = layer.eval()
    >>> layer.in_dim, layer.sat
    (2, 50.0)
    >>> bool(torch.allclose(layer(x), x, atol=1e-5))  # x lies in the kept space
    True
    """

    _feature_dim = 1

    def __init__(
        self,
        in_filters: int,
        threshold: float = 0.99,
        verbose: bool = True,
        gradient_epoch_start: int = 20,
        centering: bool = False,
        downsampling: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            in_filters,
            threshold=threshold,
            keepdim=True,
            verbose=verbose,
            gradient_epoch_start=gradient_epoch_start,
            centering=centering,
        )
        self.downsampling = downsampling

    @property
    def in_filters(self) -> int:
        """Number of channels."""
        return self.in_features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, downsampling={self.downsampling}"

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsampling is None:
            return x
        if isinstance(self.downsampling, int):
            target = (self.downsampling, self.downsampling)
        else:
            target = tuple(self.downsampling)
        height, width = x.shape[-2:]
        size = (min(target[0], height), min(target[1], width))
        if size == (height, width):
            return x
        return interpolate(x, size=size, mode="nearest")

    def _samples(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"expected inputs of shape (N, {self.in_features}, H, W), got {tuple(x.shape)}")
        x = self._downsample(x)
        return x.transpose(0, 1).reshape(self.in_features, -1), True


def _pca_layers(network: nn.Module, linear_label: str) -> Iterator[tuple[str, LinearPCALayer]]:
    """The PCA layers of ``network`` in module order, labelled ``{linear_label}-i`` / ``Conv-i``."""
    counts = {"conv": 0, "linear": 0}
    for module in network.modules():
        if isinstance(module, Conv2DPCALayer):
            yield f"Conv-{counts['conv']}", module
            counts["conv"] += 1
        elif isinstance(module, LinearPCALayer):
            yield f"{linear_label}-{counts['linear']}", module
            counts["linear"] += 1


def change_all_pca_layer_thresholds(
    threshold: float, network: nn.Module, verbose: bool = False
) -> tuple[list[float | None], list[int | None], list[int], list[str]]:
    """Set the threshold of every PCA layer in ``network`` and report the kept dimensions.

    Parameters
    ----------
    threshold : float
        New threshold, in ``(0, 1]``.
    network : torch.nn.Module
        Network whose :class:`LinearPCALayer` and :class:`Conv2DPCALayer` modules change.
    verbose : bool
        Log every change.

    Returns
    -------
    sat : list of float or None
        Saturation (percent) of each layer; ``None`` for a layer without an eigenspace yet.
    in_dims : list of int or None
        Kept dimension of each layer.
    fs_dims : list of int
        Full dimension of each layer.
    names : list of str
        ``"Lin-i"`` or ``"Conv-i"``, numbered per kind in module order.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), LinearPCALayer(4, gradient_epoch_start=0))
    >>> _ = net(torch.randn(64, 4))
    >>> _ = net.eval()
    >>> sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds(1.0, net)
    >>> sat, in_dims, fs_dims, names
    ([100.0], [4], [4], ['Lin-0'])
    >>> net[1].threshold
    1.0
    """
    sat: list[float | None] = []
    in_dims: list[int | None] = []
    fs_dims: list[int] = []
    names: list[str] = []
    for name, layer in _pca_layers(network, "Lin"):
        layer.threshold = threshold
        sat.append(layer.sat)
        in_dims.append(layer.in_dim)
        fs_dims.append(layer.fs_dim)
        names.append(name)
        if verbose:
            log.info("Changed threshold for layer %s (%s) to %s", name, layer, threshold)
    return sat, in_dims, fs_dims, names


def change_all_pca_layer_thresholds_and_inject_random_directions(
    threshold: float,
    network: nn.Module,
    verbose: bool = False,
    device: str | torch.device = "cpu",
    include_names: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[list[float], list[int], list[int]] | tuple[list[float], list[int], list[int], list[str]]:
    """Set every PCA layer's threshold, then swap its kept eigenspace for a random one.

    Each layer keeps the dimension ``k`` that ``threshold`` selects, but projects onto a
    uniformly random ``k``-dimensional subspace instead of the top eigenvectors: the control
    experiment for "is it the eigenspace or only its size that matters". Setting a threshold
    again restores the eigenspace.

    Parameters
    ----------
    threshold : float
        New threshold, in ``(0, 1]``.
    network : torch.nn.Module
        Network whose PCA layers change; each must have completed an epoch.
    verbose : bool
        Log every change.
    device : str or torch.device
        Accepted for compatibility with delve and ignored (the random basis goes to the
        device of the layer's buffers).
    include_names : bool
        Also return the layer labels (``"Linear-i"`` or ``"Conv-i"``).
    generator : torch.Generator, optional
        Source of the random bases (CPU generator), for reproducibility.

    Returns
    -------
    tuple
        ``(sat, in_dims, fs_dims)``, plus ``names`` with ``include_names``; see
        :func:`change_all_pca_layer_thresholds`.

    Raises
    ------
    RuntimeError
        If a PCA layer has no eigenspace yet.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), LinearPCALayer(6, gradient_epoch_start=0))
    >>> _ = net(torch.randn(64, 4))  # rank-4 input in 6 dimensions
    >>> _ = net.eval()
    >>> g = torch.Generator().manual_seed(1)
    >>> change_all_pca_layer_thresholds_and_inject_random_directions(0.999, net, generator=g)
    ([66.6667], [4], [6])
    """
    del device  # the basis is written into the layer's buffers, on their device
    sat: list[float] = []
    in_dims: list[int] = []
    fs_dims: list[int] = []
    names: list[str] = []
    for name, layer in _pca_layers(network, "Linear"):
        layer.threshold = threshold
        layer._inject_random_basis(generator)
        assert layer.in_dim is not None and layer.sat is not None
        sat.append(layer.sat)
        in_dims.append(layer.in_dim)
        fs_dims.append(layer.fs_dim)
        names.append(name)
        if verbose:
            log.info("Changed threshold for layer %s (%s) to %s, random directions", name, layer, threshold)
    if include_names:
        return sat, in_dims, fs_dims, names
    return sat, in_dims, fs_dims
