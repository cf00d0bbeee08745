"""Shared parts of the framework tests (test_lightning.py, test_huggingface.py, test_transformer_layers.py,
test_token_masks.py).

Not a test module (the leading underscore keeps pytest away): the independent numpy reference
of the statistics (token masks applied, from a tape that keeps each call's mask), the comparison of a
store's analysed statistics with it, and a switch that silences the frameworks. It imports no framework.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

#: Compared statistics (not det / logdet: rank-deficient layers make them round-off).
STATS = ("lsat", "idim", "trc", "dtrc", "pr", "erank")
THRESHOLD = 0.99


# -- the numpy reference ----------------------------------------------------------------------------
def reference_stats(x: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """Statistics of the population covariance of the rows of ``x`` (n, d), in float64 numpy.

    Written from the definitions (docs/concepts.md), independently of ``analyze.stats``.
    """
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / len(x)
    eig = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0.0, None)
    total = eig.sum()
    d = len(eig)
    if total > 0:
        fractions = np.cumsum(eig) / total
        idim = float(np.argmax(fractions >= threshold - 1e-12) + 1)
        p = eig[eig > 0] / total
        erank = math.exp(-np.sum(p * np.log(p)))
        pr = total**2 / np.sum(eig**2)
    else:
        idim = erank = pr = 0.0
    return {
        "lsat": idim / d,
        "idim": idim,
        "trc": float(np.trace(cov)),
        "dtrc": float(total),
        "pr": float(pr),
        "erank": float(erank),
    }


def reference_matrix(output: torch.Tensor, method: str = "none") -> np.ndarray:
    """The sample matrix of one recorded output: ``(n, d)`` as is, ``(n, T, d)`` by a time-series method."""
    x = output.detach().to(torch.float64).numpy()
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return {"last_timestep": x[:, -1, :], "timestepwise": x.reshape(len(x), -1)}[method]
    raise AssertionError(f"no reference reshaping for a {x.ndim}-D output")


def table_of(store: Any, **kwargs: Any) -> dict[tuple[int, str, str, str], float]:
    """``(epoch, phase, layer, stat) -> value`` of a store, by :func:`analyze.run_stats`."""
    from analyze import run_stats

    kwargs.setdefault("stats", STATS)
    table = run_stats(store, thresholds=(THRESHOLD,), scheduler="synchronous", progress=False, **kwargs)
    return {
        (int(r.epoch), str(r.phase), str(r.layer), str(r.stat)): float(r.value) for r in table.itertuples()
    }


def assert_close(got: dict[Any, float], want: dict[Any, float], rtol: float = 1e-10) -> None:
    """Same keys, and every value equal to ``rtol`` relative (infinities equal)."""
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for key, value in want.items():
        assert got[key] == value or math.isclose(got[key], value, rel_tol=rtol, abs_tol=0.0), (
            key,
            got[key],
            value,
        )


def expected_table(
    epochs: Sequence[Iterable[Any]],
    layers: Iterable[str],
    method: str = "none",
    matrix: Callable[[Any, str], np.ndarray] | None = None,
) -> dict[tuple[int, str, str, str], float]:
    """The reference statistics of hook-tape calls, ``epochs[e]`` being the calls seen in epoch ``e``.

    ``matrix(call, method)``: the sample matrix of one tape entry (default: :func:`reference_matrix`
    of its output).
    """
    out: dict[tuple[int, str, str, str], float] = {}
    for epoch, seen in enumerate(epochs):
        seen = list(seen)
        for name in layers:
            for phase, training in (("train", True), ("eval", False)):
                calls = [s for s in seen if s.name == name and s.training == training]
                if not calls:
                    continue
                if matrix is None:
                    outputs = [c.output for c in calls]
                    if any(o.dim() == 3 for o in outputs) and any(o.shape[1] != outputs[0].shape[1] for o in outputs):
                        assert method == "last_timestep", "varying lengths need a length-free method"
                x = np.concatenate(
                    [reference_matrix(c.output, method) if matrix is None else matrix(c, method) for c in calls]
                )
                for stat, value in reference_stats(x).items():
                    out[(epoch, phase, name, stat)] = value
    return out


# -- token masks --------------------------------------------------------------------------------------
@dataclass
class MaskedCall:
    """One output seen by a :class:`MaskTape`, with the token mask of the model call it belongs to."""

    name: str
    training: bool
    output: torch.Tensor
    mask: torch.Tensor | None


class MaskTape:
    """Every output of ``layers`` (plain forward hooks), with the mask of the current model call.

    The mask is the model's ``attention_mask`` keyword (a plain pre-hook on ``root``) or, for a model
    that does not receive it, what :meth:`set` was given last.
    """

    def __init__(self, root: nn.Module | None, layers: dict[str, nn.Module]) -> None:
        self.seen: list[MaskedCall] = []
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        if root is not None:
            self.handles.append(root.register_forward_pre_hook(self._take, with_kwargs=True))

    def _take(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.mask = kwargs.get("attention_mask")

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            mask = None if self.mask is None else self.mask.detach().clone()
            self.seen.append(MaskedCall(name, module.training, out.detach().clone(), mask))

        return hook

    def clear(self) -> None:
        self.seen.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def masked_matrix(call: MaskedCall, method: str) -> np.ndarray:
    """The numpy sample matrix of one output, its mask applied: the tokens' rows (``tokenwise``), or
    each sequence's last token (``last_timestep``). An output whose (batch, positions) are not the
    mask's (GPT-2's position embedding, ``(1, T, d)``) has every position a token."""
    x = call.output.to(torch.float64).numpy()
    if x.ndim == 2:
        return x
    mask = call.mask
    tokens = np.ones(x.shape[:2], dtype=bool)
    if mask is not None and tuple(mask.shape) == x.shape[:2]:
        tokens = mask.numpy() != 0
    if method == "tokenwise":
        return x[tokens]
    last = [np.flatnonzero(row)[-1] for row in tokens]
    return x[np.arange(len(x)), last]


def masked_table(
    epochs: Sequence[Iterable[MaskedCall]], layers: Iterable[str], method: str
) -> dict[tuple[int, str, str, str], float]:
    """The reference statistics, ``epochs[e]`` the outputs seen in epoch ``e``, their masks applied."""
    return expected_table(epochs, layers, method, matrix=masked_matrix)


# -- quiet frameworks --------------------------------------------------------------------------------
def quiet_lightning() -> None:
    """Silence Lightning's info logs and its warnings about the tests' deliberately tiny setups."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|LeafSpec|log_every_n_steps).*")


def quiet_transformers() -> None:
    """Silence the Hugging Face libraries' info logs and progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
