"""Statistics during training: a Recorder's gram moments turned into values for a logger.

:class:`EpochMoments` is a :class:`capture.Recorder` ``on_block`` callback that keeps the
moments of the epoch's blocks per (phase, layer, method); :func:`gather_moments` merges those
of every process of a ``torch.distributed`` run (in rank order, so every process gets the same
numbers); :func:`live_values` computes the chosen statistics from them with :mod:`analyze.stats`.
The statistics are those of the epoch's covariance (the default semantics), the numbers the
analysis of the store gives for the same epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

from analyze.stats import (
    SCALAR_STATS,
    check_stats,
    check_thresholds,
    compute_stats,
    spectrum_needs,
    spectrum_of,
)
from capture.format import BLOCK_KIND_EPOCH, PHASES
from capture.moments import Moments
from capture.recorder import GramBlock

__all__ = ["EpochMoments", "LiveValue", "check_live_stats", "gather_moments", "labelled", "live_values"]

#: (phase, layer, method)
MomentKey = tuple[str, str, str]


class LiveValue(NamedTuple):
    """One statistic of one epoch: what a framework logger receives (``value``) and what it is."""

    stat: str
    threshold: float | None
    phase: str
    layer: str
    method: str
    value: float


class EpochMoments:
    """Collect the moments of an epoch from a Recorder's ``on_block`` callback.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from capture import Recorder
    >>> net = nn.Linear(3, 2)
    >>> moments = EpochMoments()
    >>> with Recorder(net, None, mode="gram", on_block=moments) as rec:
    ...     _ = net(torch.randn(5, 3)), net(torch.randn(4, 3))
    ...     _ = rec.end_epoch()
    >>> [(key, m.count) for key, m in moments.pop().items()]
    [(('train', 'Linear', 'none'), 9)]
    """

    def __init__(self) -> None:
        self._moments: dict[MomentKey, Moments] = {}

    def __call__(self, block: GramBlock) -> None:
        if block.kind != BLOCK_KIND_EPOCH:
            return
        key = (block.phase, block.layer, block.method)
        self._moments.setdefault(key, Moments()).merge(Moments(block.count, block.mean, block.m2))

    def pop(self) -> dict[MomentKey, Moments]:
        """The moments collected since the last call, and start afresh."""
        out, self._moments = self._moments, {}
        return out


def gather_moments(moments: Mapping[MomentKey, Moments]) -> dict[MomentKey, Moments]:
    """Merge the moments of every process of a ``torch.distributed`` run (a collective call).

    Every process must call it; each gets the same merge, done in rank order. Without an
    initialised process group (or with one process) the moments are returned as they are.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(moments)
    local = {key: (m.count, m.mean, m.m2) for key, m in moments.items()}
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[MomentKey, Moments] = {}
    for part in parts:
        for key, (count, mean, m2) in part.items():
            merged.setdefault(key, Moments()).merge(Moments(count, mean, m2))
    return merged


def check_live_stats(stats: str | Iterable[str], argument: str = "log_stats") -> tuple[str, ...]:
    """Validate statistics that can be logged during training (scalars: lsat, idim, trc, ...)."""
    names = check_stats(stats, argument)
    bad = [n for n in names if n not in SCALAR_STATS]
    if bad:
        raise ValueError(
            f"{argument}: {', '.join(map(repr, bad))} is not a number a logger can show; "
            f"valid: {', '.join(SCALAR_STATS)}"
        )
    return names


def live_values(
    moments: Mapping[MomentKey, Moments], stats: Iterable[str], thresholds: Any = (0.99,)
) -> list[LiveValue]:
    """The statistics of each (phase, layer, method) covariance, train first, in recording order.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.diag([3.0, 1.0]) @ np.random.default_rng(0).normal(size=(2, 500))
    >>> values = live_values({("eval", "fc", "none"): Moments().update(x.T)}, ["lsat", "trc"], [0.5])
    >>> [(v.stat, v.threshold, v.phase, v.layer) for v in values]
    [('lsat', 0.5, 'eval', 'fc'), ('trc', None, 'eval', 'fc')]
    """
    names = check_live_stats(stats, "stats")
    ts = check_thresholds(thresholds)
    need = spectrum_needs(names)  # lsat, idim, trc, ...: the eigenvalues alone
    order = sorted(moments, key=lambda key: PHASES.index(key[0]))
    out = []
    for key in order:
        m = moments[key]
        if m.count == 0:
            continue
        spectrum = spectrum_of(m.covariance(), need=need)
        for value in compute_stats(spectrum, names, ts):
            out.append(LiveValue(value.stat, value.threshold, *key, float(value.value)))
    return out


def labelled(values: list[LiveValue]) -> list[tuple[str, str, LiveValue]]:
    """Each value with a statistic label and a layer label for a logger's key.

    The statistic label is the statistic, with its threshold (``lsat_0.9``) when several thresholds
    were computed; the layer label is the layer, with the method (``conv-mean``) when the layer has
    several.

    Examples
    --------
    >>> vs = [LiveValue("lsat", t, "train", "fc", "none", 1.0) for t in (0.9, 0.99)]
    >>> [(stat, layer) for stat, layer, _ in labelled(vs)]
    [('lsat_0.9', 'fc'), ('lsat_0.99', 'fc')]
    """
    thresholds = {v.threshold for v in values if v.threshold is not None}
    methods: dict[tuple[str, str], set[str]] = {}
    for v in values:
        methods.setdefault((v.phase, v.layer), set()).add(v.method)
    out = []
    for v in values:
        stat = v.stat if v.threshold is None or len(thresholds) == 1 else f"{v.stat}_{v.threshold:g}"
        layer = v.layer if len(methods[(v.phase, v.layer)]) == 1 else f"{v.layer}-{v.method}"
        out.append((stat, layer, v))
    return out
