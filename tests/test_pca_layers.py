"""The drop-in PCA layers against float64 numpy references and delve 0.1.50."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipelines import (
    Conv2DPCALayer,
    LinearPCALayer,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
)

# -- independent references (numpy, float64) ---------------------------------------------------


def spectrum_data(
    rng: np.random.Generator,
    n: int,
    d: int,
    variances: tuple[float, ...],
    noise: float = 1e-3,
    mean: np.ndarray | float = 0.0,
) -> np.ndarray:
    """``n`` samples in ``d`` dims whose sample covariance has exactly ``variances`` (plus noise)."""
    m = len(variances)
    z = rng.standard_normal((n, m))
    z -= z.mean(0)
    z = np.linalg.qr(z)[0] * np.sqrt(n)  # centred, population covariance exactly the identity
    directions = np.linalg.qr(rng.standard_normal((d, m)))[0]
    x = (z * np.sqrt(variances)) @ directions.T + noise * rng.standard_normal((n, d))
    return (x + mean).astype(np.float32)


def kept_dimension(eigenvalues: np.ndarray, threshold: float) -> int:
    share = np.cumsum(eigenvalues) / eigenvalues.sum()
    return min(int(np.count_nonzero(share < threshold)) + 1, eigenvalues.size)


def reference_fit(x: np.ndarray, threshold: float, centering: bool) -> dict[str, np.ndarray | int]:
    """Mean, eigen-decomposition, kept dimension and projector of the samples ``x`` (rows)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    matrix = np.cov(x.T, bias=True) if centering else x.T @ x / len(x)
    values, vectors = np.linalg.eigh(matrix)
    values, vectors = values[::-1], vectors[:, ::-1]
    k = kept_dimension(np.clip(values, 0, None), threshold)
    basis = vectors[:, :k]
    return {"mean": mean, "values": values, "k": k, "basis": basis, "projector": basis @ basis.T}


def reference_project(x: np.ndarray, ref: dict, centering: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    shift = ref["mean"] if centering else 0.0
    return (x - shift) @ ref["projector"].T + shift


def assert_close_rel(actual: torch.Tensor | np.ndarray, expected: np.ndarray, rel: float = 1e-6) -> None:
    """Elementwise agreement within ``rel`` of the largest expected magnitude."""
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


def fit(layer: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """One training epoch over ``batches``, then eval mode (which ends the epoch)."""
    layer.train()
    for batch in batches:
        layer(batch)
    return layer.eval()


def as_batches(x: np.ndarray, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.from_numpy(part) for part in np.split(x, np.cumsum(sizes)[:-1])]


# -- linear layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("centering", [True, False])
@pytest.mark.parametrize("threshold", [0.95, 0.999])
def test_linear_projection_matches_numpy(centering: bool, threshold: float) -> None:
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 3, size=8)
    x = spectrum_data(rng, 600, 8, (100.0, 10.0, 1.0), mean=mean)
    layer = fit(LinearPCALayer(8, threshold=threshold, centering=centering), as_batches(x, (7, 193, 400)))
    ref = reference_fit(x, threshold, centering)

    assert layer.epoch == 1
    assert layer.in_dim == ref["k"]
    np.testing.assert_allclose(layer.mean.numpy(), ref["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        layer.eigenvalues.numpy(), np.clip(ref["values"], 0, None), rtol=1e-9, atol=1e-9
    )
    np.testing.assert_allclose(layer.transformation_matrix.numpy(), ref["projector"], atol=1e-6)

    probe = spectrum_data(rng, 50, 8, (50.0, 5.0, 5.0, 1.0), noise=0.5, mean=mean)
    with torch.no_grad():
        out = layer(torch.from_numpy(probe))
    assert out.dtype == torch.float32
    assert_close_rel(out, reference_project(probe, ref, centering))


def test_kept_dimension_follows_threshold() -> None:
    rng = np.random.default_rng(1)
    x = spectrum_data(rng, 2000, 6, (100.0, 10.0, 1.0), noise=1e-4, mean=2.0)
    layer = fit(LinearPCALayer(6, threshold=0.85), as_batches(x, (1000, 1000)))
    for threshold, k in [(0.85, 1), (0.95, 2), (0.999, 3), (1.0, 6), (0.5, 1)]:
        layer.threshold = threshold
        assert layer.threshold == threshold
        assert layer.in_dim == k
        assert layer.sat == round(100 * k / 6, 4)
        projector = layer.transformation_matrix.double()
        assert torch.trace(projector).item() == pytest.approx(k, abs=1e-5)
        np.testing.assert_allclose(
            projector.numpy(), reference_fit(x, threshold, True)["projector"], atol=1e-5
        )


def test_kept_dimension_versus_delve() -> None:
    delve_pca = pytest.importorskip("delve.pca_layers")
    rng = np.random.default_rng(2)
    x = spectrum_data(rng, 2000, 6, (100.0, 10.0, 1.0), noise=1e-4)
    batches = as_batches(x, (500, 1500))
    ours = fit(LinearPCALayer(6), batches)
    theirs = delve_pca.LinearPCALayer(6)
    fit(theirs, batches)
    with torch.no_grad():
        theirs(batches[0])  # delve fits lazily, on the first eval-mode call
    for threshold in (0.85, 0.95):
        ours.threshold = theirs.threshold = threshold
        assert ours.in_dim == theirs.in_dim
        assert ours.sat == theirs.sat
        # The data are centred, so delve's never-filled mean does not matter here.
        with torch.no_grad():
            assert_close_rel(ours(batches[0]), theirs(batches[0]).numpy(), rel=1e-5)
    # Documented difference: delve stops one dimension short of 0.999 (cumulative 0.991).
    ours.threshold = theirs.threshold = 0.999
    assert (ours.in_dim, theirs.in_dim) == (3, 2)


def test_centering_on_off_and_toggle() -> None:
    rng = np.random.default_rng(3)
    offset = 10.0 * np.linalg.qr(rng.standard_normal((5, 5)))[0][:, 0]
    x = spectrum_data(rng, 800, 5, (4.0, 1.0), noise=1e-3, mean=offset)
    batches = as_batches(x, (400, 400))
    centred = fit(LinearPCALayer(5, threshold=0.999, centering=True), batches)
    uncentred = fit(LinearPCALayer(5, threshold=0.999, centering=False), batches)
    ref_c, ref_u = reference_fit(x, 0.999, True), reference_fit(x, 0.999, False)
    assert (centred.in_dim, uncentred.in_dim) == (ref_c["k"], ref_u["k"]) == (2, 3)
    xt = torch.from_numpy(x[:64])
    with torch.no_grad():
        assert_close_rel(centred(xt), reference_project(x[:64], ref_c, True))
        assert_close_rel(uncentred(xt), reference_project(x[:64], ref_u, False))
        # The mean lies in neither eigenspace of the covariance: centring keeps it.
        assert_close_rel(centred(xt), x[:64], rel=1e-3)
        # Toggling re-decomposes the other matrix: same as fitting that way from the start.
        centred.centering = False
        assert centred.in_dim == 3
        assert_close_rel(centred(xt), uncentred(xt).numpy(), rel=1e-5)
        centred.centering = True
        assert centred.in_dim == 2
        assert_close_rel(centred(xt), reference_project(x[:64], ref_c, True), rel=1e-5)


def test_keepdim_false_returns_eigen_coordinates() -> None:
    rng = np.random.default_rng(4)
    x = spectrum_data(rng, 500, 6, (9.0, 4.0, 1e-3), mean=1.5)
    layer = fit(LinearPCALayer(6, threshold=0.99, keepdim=False), as_batches(x, (500,)))
    ref = reference_fit(x, 0.99, True)
    basis = layer.reduced_transformation_matrix.double().numpy()
    assert basis.shape == (6, 2)
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(basis @ basis.T, ref["projector"], atol=1e-6)
    with torch.no_grad():
        out = layer(torch.from_numpy(x[:10]))
    assert out.shape == (10, 2)
    assert_close_rel(out, (x[:10] - ref["mean"]) @ basis)


def test_leading_dimensions_are_samples() -> None:
    rng = np.random.default_rng(5)
    x = spectrum_data(rng, 240, 4, (3.0, 1.0, 0.5))
    layer = fit(LinearPCALayer(4, threshold=0.9), [torch.from_numpy(x.reshape(6, 40, 4))])
    ref = reference_fit(x, 0.9, True)
    assert layer.in_dim == ref["k"]
    with torch.no_grad():
        out = layer(torch.from_numpy(x.reshape(6, 40, 4)))
    assert_close_rel(out.reshape(240, 4), reference_project(x, ref, True))


def test_gradient_epoch_start_projects_training_inputs_and_gradients() -> None:
    rng = np.random.default_rng(6)
    x = torch.from_numpy(spectrum_data(rng, 300, 5, (5.0, 2.0, 1e-2), mean=1.0))
    layer = LinearPCALayer(5, threshold=0.99, gradient_epoch_start=2)
    for epoch in range(2):
        layer.train()
        assert torch.equal(layer(x), x), f"epoch {epoch} should pass through"
        layer.eval()
    assert layer.epoch == 2 and layer.in_dim == 2
    layer.train()
    projector = layer.transformation_matrix
    mean = layer.mean.float()
    xin = x.clone().requires_grad_(True)
    out = layer(xin)
    assert_close_rel(out, ((x - mean) @ projector + mean).numpy(), rel=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert_close_rel(xin.grad, (grad_out @ projector).numpy(), rel=1e-5)
    # Training mode keeps tracking; the eigenspace only changes when the epoch ends.
    assert layer.epoch == 2
    layer.eval()
    assert layer.epoch == 3


def test_unfitted_layer_passes_through_and_validates() -> None:
    layer = LinearPCALayer(3).eval()
    x = torch.randn(4, 3)
    assert torch.equal(layer(x), x)
    assert layer.in_dim is None and layer.sat is None and layer.transformation_matrix is None
    layer.threshold = 0.5  # only stored before the first epoch
    assert layer.threshold == 0.5 and layer.in_dim is None
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            LinearPCALayer(3, threshold=bad)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        layer.train()(torch.randn(4, 2))


def test_state_dict_round_trip() -> None:
    rng = np.random.default_rng(7)
    x = torch.from_numpy(spectrum_data(rng, 200, 4, (3.0, 1.0), mean=0.5))
    layer = fit(LinearPCALayer(4, threshold=0.9, gradient_epoch_start=0), [x])
    copy = LinearPCALayer(4)
    copy.load_state_dict(layer.state_dict())
    copy.eval()
    assert (copy.in_dim, copy.epoch, copy.threshold) == (layer.in_dim, layer.epoch, layer.threshold)
    with torch.no_grad():
        assert torch.equal(copy(x), layer(x))


# -- convolutional layer -----------------------------------------------------------------------


def conv_data(rng: np.random.Generator, n: int, c: int, h: int, w: int, mean: float = 0.0) -> np.ndarray:
    """Feature maps whose pixel channel-vectors have spectrum 100, 10, 1 (plus noise)."""
    pixels = spectrum_data(rng, n * h * w, c, (100.0, 10.0, 1.0), noise=1e-3, mean=mean)
    return np.ascontiguousarray(pixels.reshape(n, h, w, c).transpose(0, 3, 1, 2))


def pixel_samples(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


@pytest.mark.parametrize("centering", [False, True])
def test_conv_projection_matches_numpy(centering: bool) -> None:
    rng = np.random.default_rng(8)
    x = conv_data(rng, 12, 6, 5, 7, mean=1.0)
    layer = fit(Conv2DPCALayer(6, threshold=0.95, verbose=False, centering=centering), as_batches(x, (5, 7)))
    ref = reference_fit(pixel_samples(x), 0.95, centering)
    assert layer.epoch == 1 and layer.in_dim == ref["k"]
    with torch.no_grad():
        out = layer(torch.from_numpy(x))
    assert out.shape == x.shape
    expected = reference_project(pixel_samples(x), ref, centering).reshape(12, 5, 7, 6).transpose(0, 3, 1, 2)
    assert_close_rel(out, expected)


def test_conv_downsampling_tracks_resized_map() -> None:
    delve_pca = pytest.importorskip("delve.pca_layers")
    rng = np.random.default_rng(9)
    x = conv_data(rng, 6, 5, 9, 9)
    layer = fit(Conv2DPCALayer(5, verbose=False, downsampling=4), as_batches(x, (6,)))
    rows = np.floor(np.arange(4) * 9 / 4).astype(int)  # nearest-neighbour source pixels
    ref = reference_fit(pixel_samples(x[:, :, rows][:, :, :, rows]), 0.99, False)
    np.testing.assert_allclose(
        layer.eigenvalues.numpy(), np.clip(ref["values"], 0, None), rtol=1e-9, atol=1e-9
    )
    theirs = delve_pca.Conv2DPCALayer(5, verbose=False, downsampling=4)
    fit(theirs, as_batches(x, (6,)))
    with torch.no_grad():
        theirs(torch.from_numpy(x[:1]))
    np.testing.assert_allclose(layer.eigenvalues.numpy(), theirs.eigenvalues.numpy(), rtol=1e-9, atol=1e-9)
    # Maps already smaller than the target are tracked as they are (delve would upsample them).
    small = fit(Conv2DPCALayer(5, verbose=False, downsampling=16), as_batches(x, (6,)))
    ref_full = reference_fit(pixel_samples(x), 0.99, False)
    np.testing.assert_allclose(
        small.eigenvalues.numpy(), np.clip(ref_full["values"], 0, None), rtol=1e-9, atol=1e-9
    )


def test_conv_matches_delve() -> None:
    delve_pca = pytest.importorskip("delve.pca_layers")
    rng = np.random.default_rng(10)
    x = conv_data(rng, 8, 6, 6, 6)
    batches = as_batches(x, (3, 5))
    ours = fit(Conv2DPCALayer(6, threshold=0.95, verbose=False), batches)
    theirs = delve_pca.Conv2DPCALayer(6, threshold=0.95, verbose=False)
    fit(theirs, batches)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
        assert ours.in_dim == theirs.in_dim == 2
        assert_close_rel(ours(torch.from_numpy(x)), expected, rel=1e-5)


def test_conv_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        Conv2DPCALayer(3, verbose=False)(torch.randn(2, 4, 5, 5))


# -- training ----------------------------------------------------------------------------------


def _train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, epochs: int
) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for xb, yb in zip(x.split(64), y.split(64), strict=True):
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
        losses.append(total / len(x))
        model.eval()  # ends the PCA layers' epoch
    return losses


def _record(layer: nn.Module) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training:  # keep the eigenspace used now: eval() will refit it
            seen["input"], seen["output"] = args[0].detach(), output.detach()
            seen["basis"], seen["mean"] = module.reduced_transformation_matrix, module.mean.float()

    layer.register_forward_hook(hook)
    return seen


def test_linear_network_trains_and_projects() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = torch.sin(x @ torch.randn(10, 1) / 2)
    pca = LinearPCALayer(16, threshold=0.9, gradient_epoch_start=2)
    model = nn.Sequential(nn.Linear(10, 16), pca, nn.ReLU(), nn.Linear(16, 1))
    seen = _record(pca)
    losses = _train(model, x, y, nn.MSELoss(), epochs=6)
    assert losses[-1] < 0.5 * losses[0], losses
    assert pca.epoch == 6
    assert pca.in_dim is not None and pca.in_dim < 10  # the input has rank 10 (affine image of R^10)
    # Last training batch (epoch 5 >= gradient_epoch_start): the output lies in mean + kept space.
    basis, mean = seen["basis"], seen["mean"]
    centred = seen["output"] - mean
    np.testing.assert_allclose((centred - centred @ basis @ basis.T).numpy(), 0, atol=1e-4)
    assert not torch.allclose(seen["output"], seen["input"], atol=1e-3)


def test_conv_network_trains_and_projects() -> None:
    torch.manual_seed(1)
    y = torch.randint(0, 2, (256,))
    x = torch.randn(256, 3, 4, 4)
    x[:, 0] += 2.0 * y[:, None, None] - 1.0  # the class shifts channel 0
    pca = Conv2DPCALayer(8, threshold=0.95, verbose=False, gradient_epoch_start=1, centering=True)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), pca, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )
    seen = _record(pca)
    losses = _train(model, x, y, nn.CrossEntropyLoss(), epochs=5)
    assert losses[-1] < 0.5 * losses[0], losses
    assert pca.epoch == 5 and pca.in_dim is not None and pca.in_dim < 8
    basis, mean = seen["basis"], seen["mean"]
    pixels = seen["output"].movedim(1, -1) - mean
    np.testing.assert_allclose((pixels - pixels @ basis @ basis.T).numpy(), 0, atol=1e-4)


# -- network-wide threshold changes --------------------------------------------------------------


def _network() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        Conv2DPCALayer(6, verbose=False, gradient_epoch_start=0),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        LinearPCALayer(12, gradient_epoch_start=0),
        nn.ReLU(),
        nn.Linear(12, 8),
        LinearPCALayer(8, gradient_epoch_start=0),
    )


def _fitted_network() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(2)
    net = _network()
    x = torch.randn(64, 2, 4, 4)
    with torch.no_grad():
        fit(net, [x])
    return net, x


def test_change_all_pca_layer_thresholds() -> None:
    net, _ = _fitted_network()
    layers = [net[1], net[4], net[7]]
    sat, in_dims, fs_dims, names = change_all_pca_layer_thresholds(0.8, net)
    assert names == ["Conv-0", "Lin-0", "Lin-1"]
    assert fs_dims == [6, 12, 8]
    for layer, k, s in zip(layers, in_dims, sat, strict=True):
        assert layer.threshold == 0.8
        assert k == kept_dimension(layer.eigenvalues.numpy(), 0.8)
        assert s == round(100 * k / layer.fs_dim, 4)
    _, in_dims_all, _, _ = change_all_pca_layer_thresholds(1.0, net)
    assert all(a >= b for a, b in zip(in_dims_all, in_dims, strict=True))
    # Layers without an eigenspace report None.
    assert change_all_pca_layer_thresholds(0.9, _network())[:2] == ([None] * 3, [None] * 3)


def test_inject_random_directions() -> None:
    net, x = _fitted_network()
    layers = [net[1], net[4], net[7]]
    eigen_projectors = [layer.transformation_matrix for layer in layers]
    result = change_all_pca_layer_thresholds_and_inject_random_directions(
        0.99, net, include_names=True, generator=torch.Generator().manual_seed(0)
    )
    sat, in_dims, fs_dims, names = result
    assert names == ["Conv-0", "Linear-0", "Linear-1"]
    assert fs_dims == [6, 12, 8]
    for layer, k, eigen in zip(layers, in_dims, eigen_projectors, strict=True):
        assert layer.threshold == 0.99 and layer.in_dim == k
        assert k == kept_dimension(layer.eigenvalues.numpy(), 0.99)
        p = layer.transformation_matrix.double()
        np.testing.assert_allclose((p @ p).numpy(), p.numpy(), atol=1e-5)  # orthogonal projector ...
        np.testing.assert_allclose(p.T.numpy(), p.numpy(), atol=1e-6)
        assert torch.trace(p).item() == pytest.approx(k, abs=1e-5)  # ... of rank k
        if k < layer.fs_dim:
            assert not torch.allclose(p.float(), eigen, atol=1e-2)  # ... onto another subspace
    # The convolutional layer projects with its random basis too (delve leaves it untouched).
    conv = layers[0]
    with torch.no_grad():
        out = conv(net[0](x))
        expected = reference_project(
            pixel_samples(net[0](x).numpy()),
            {"mean": conv.mean.numpy(), "projector": conv.transformation_matrix.double().numpy()},
            centering=False,
        )
    assert_close_rel(out, expected.reshape(64, 4, 4, 6).transpose(0, 3, 1, 2), rel=1e-5)
    # Reproducible with a seeded generator; setting a threshold restores the eigenspace.
    again, _ = _fitted_network()
    change_all_pca_layer_thresholds_and_inject_random_directions(
        0.99, again, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again[4].transformation_matrix, layers[1].transformation_matrix)
    change_all_pca_layer_thresholds(0.99, net)
    for layer in layers:
        ref = layer.eigenvectors[:, : layer.in_dim]
        np.testing.assert_allclose(
            layer.transformation_matrix.numpy(), (ref @ ref.T).float().numpy(), atol=1e-6
        )
    assert len(change_all_pca_layer_thresholds_and_inject_random_directions(0.9, net)) == 3
    with pytest.raises(RuntimeError, match="no eigenspace"):
        change_all_pca_layer_thresholds_and_inject_random_directions(0.9, _network())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    rng = np.random.default_rng(11)
    x = spectrum_data(rng, 400, 8, (100.0, 10.0, 1.0), mean=3.0)
    cpu = fit(LinearPCALayer(8, threshold=0.95), as_batches(x, (150, 250)))
    gpu = fit(LinearPCALayer(8, threshold=0.95).cuda(), [b.cuda() for b in as_batches(x, (150, 250))])
    assert gpu.in_dim == cpu.in_dim
    with torch.no_grad():
        assert_close_rel(gpu(torch.from_numpy(x).cuda()).cpu(), cpu(torch.from_numpy(x)).numpy(), rel=1e-5)
    conv = fit(
        Conv2DPCALayer(6, verbose=False, downsampling=3).cuda(), [torch.randn(4, 6, 7, 7, device="cuda")]
    )
    assert conv.in_dim is not None and conv.eigenvalues.is_cuda
    change_all_pca_layer_thresholds_and_inject_random_directions(0.9, nn.Sequential(gpu, nn.Identity()))
    assert gpu.transformation_matrix.is_cuda
