"""A drop-in replacement for delve 0.1.50's ``SaturationTracker`` (alias ``CheckLayerSat``).

The tracker is a thin shell: the forward hooks, the reshaping rules and the float64 gram
moments are :class:`capture.Recorder`'s (``mode="gram"``), the statistics are
:mod:`analyze.stats`' and the files are written by the delve-compatible writers of
:mod:`pipelines.dropin.writers`. Without ``store=`` the recorder keeps no store (``path=None``) and
hands every block of moments to the tracker through its ``on_block`` callback; with
``store=`` the same recorder also streams the run to a Zarr store (raw outputs too with
``store_mode="both"``) that ``delve-analyze`` can re-analyse later.

:meth:`SaturationTracker.add_saturations` closes an epoch: it turns the moments of every
(phase, layer) into the statistics asked for and hands them to the writer exactly as delve
does (one ``add_scalars(prefix='', value_dict=..., sample_value_dict=...)`` per layer, the
train block then the eval block, values named ``{train|eval}-{statname}_{layer}``), so the
CSV has the same columns in the same order: values given with ``add_scalar`` first, then the
train block, then the eval block.

Two semantics (see ``docs/migrating-from-delve.md``):

``"default"``
    The covariance of all samples recorded in the epoch, and the documented intrinsic
    dimensionality (the smallest ``k`` whose top-``k`` eigenvalues explain ``sat_threshold``
    of the variance). ``embed`` projects the last recorded batch onto the two leading
    eigenvectors of the epoch's covariance, centred on the epoch's mean.
``"delve-0.1.50"``
    delve 0.1.50's numbers: the covariance of the last recorded batch of the epoch, delve's
    ``idim`` (the count of cumulative fractions below the threshold) and delve's ``embed``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import nn

from analyze.stats import (
    DEFAULT_SEMANTICS,
    DELVE_SEMANTICS,
    check_semantics,
    check_threshold,
    compute_stat,
    delve_embed,
    pca_embed,
    spectrum_needs,
    spectrum_of,
)
from capture.format import BLOCK_KIND_EPOCH, BLOCK_KIND_LAST_CALL, PHASES
from capture.moments import Moments
from capture.recorder import GramBlock, Recorder
from capture.reshape import check_delve_methods
from pipelines.dropin.formats import STATMAP
from pipelines.dropin.writers import AbstractWriter, CompositWriter, NPYWriter, get_writer

__all__ = ["DELVE_LAYER_TYPES", "TRACKER_STATS", "CheckLayerSat", "SaturationTracker"]

#: The statistics a tracker computes (delve's ``stats`` names), in delve's order.
TRACKER_STATS: tuple[str, ...] = ("lsat", "idim", "cov", "det", "trc", "dtrc", "embed")
#: The layers delve 0.1.50 tracks (subclasses included); ``layer_types`` widens the choice.
DELVE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.LSTM)
_CONV_TYPES = (nn.modules.conv._ConvNd,)
_STORE_MODES = ("both", "gram")
_blas: Any = None


def _one_blas_thread() -> Any:
    """numpy's BLAS on one thread (a controller found once: a new one costs 0.2 ms per call)."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas")
    return _blas.limit(limits=1)


def _parse_stats(stats: str | Iterable[str]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The stats as given, and per phase the statistics to compute, in order, without repeats.

    ``'<stat>'`` applies to every phase, ``'<stat>_<phase>'`` (delve's ``'lsat_eval'``) to one.
    """
    items = [stats] if isinstance(stats, str) else list(stats)
    if not items:
        raise ValueError(f"stats: name at least one statistic; valid: {', '.join(TRACKER_STATS)}")
    per_phase: dict[str, list[str]] = {phase: [] for phase in PHASES}
    for item in items:
        base, sep, phase = str(item).partition("_")
        if base not in TRACKER_STATS or (sep and phase not in PHASES):
            raise ValueError(
                f"stats: unknown statistic {item!r}; valid: {', '.join(TRACKER_STATS)}, each optionally "
                f"restricted to one phase as '<stat>_train' or '<stat>_eval'"
            )
        for p in (phase,) if sep else PHASES:
            if base not in per_phase[p]:
                per_phase[p].append(base)
    return tuple(items), {p: tuple(v) for p, v in per_phase.items()}


_WRITER_METHODS = ("add_scalar", "add_scalars", "save", "close")


def _make_writer(save_to: Any, args: Mapping[str, Any]) -> AbstractWriter:
    """:func:`get_writer`, also taking any object with a writer's four methods (a delve writer)."""
    if not isinstance(save_to, (str, AbstractWriter)) and all(hasattr(save_to, m) for m in _WRITER_METHODS):
        return save_to
    if isinstance(save_to, (list, tuple)):
        return CompositWriter([_make_writer(item, args) for item in save_to])
    return get_writer(save_to, args)


def _has_npy_writer(writer: AbstractWriter) -> bool:
    if isinstance(writer, NPYWriter):
        return True
    return isinstance(writer, CompositWriter) and any(_has_npy_writer(w) for w in writer.writers)


class SaturationTracker:
    """Record layer saturation, intrinsic dimensionality and other statistics during training.

    Arguments and their meanings are delve 0.1.50's; ``semantics``, ``store``, ``store_mode``
    and ``layer_types`` are new (keyword only).

    Parameters
    ----------
    savefile : str
        Destination of the writers (their ``savepath``): the CSV is ``savefile + '.csv'``, the
        npy writer's folder is ``savefile/``. The folder is created, as in delve.
    save_to : str, AbstractWriter or list of these
        Writer names (``csv``, ``npy``, ``plot`` / ``csvplot`` / ``plotcsv`` / ``csvplotting``,
        ``tensorboard`` / ``tb``, ``print``) or writer instances; see :func:`pipelines.get_writer`.
        Any object with ``add_scalar``, ``add_scalars``, ``save`` and ``close`` (a writer written
        for delve) is used as is.
    modules : Module, list of Modules or dict of name -> Module
        What to track. Its ``Conv2d``, ``Linear`` and ``LSTM`` leaves (subclasses too; see
        ``layer_types``) are recorded, named as in delve (``features-3-conv1``; ``Module-0-Linear``
        for a list).
    layer_filter : callable, optional
        Called with the ``name -> module`` dict of the found layers; returns the dict to keep.
    writer_args : dict, optional
        Extra keyword arguments for the writers created from names (``savepath`` is set to
        ``savefile``). The caller's dict is not modified.
    log_interval : int
        Record a layer's call when its call counter (one per layer, shared by train and eval) is
        a multiple of this.
    max_samples : int, optional
        Per epoch, phase and layer, record at most this many samples (rows of dim 0 of the
        output: images for a conv, sequences for an LSTM).
    stats : list of str
        In the order of the columns: ``lsat`` (saturation), ``idim`` (intrinsic dimensionality),
        ``cov`` (the covariance matrix, saved by the npy writer only), ``det``, ``trc`` (trace),
        ``dtrc`` (sum of the eigenvalues, negatives set to 0), ``embed`` (2-D coordinates of the
        last recorded batch, drawn by the plot writer). ``'<stat>_train'`` / ``'<stat>_eval'``
        restrict a statistic to one phase.
    layerwise_sat : bool
        Write the per-layer values.
    reset_covariance : bool
        Start every epoch from an empty covariance (default). False: keep accumulating across
        epochs (``"delve-0.1.50"``: keep the last recorded batch of a layer that was not
        recorded in the epoch).
    average_sat : bool
        Also write ``average-train-sat`` and ``average-eval-sat``, the mean saturation of the
        layers of each phase (NaN where none was recorded), after the layer values.
    ignore_layer_names : list of str
        Layers not to track.
    include_conv : bool
        False drops convolutional layers.
    conv_method : {"channelwise", "mean", "max", "median", "flatten"}
        How a conv output ``(B, C, H, W)`` becomes a sample matrix.
    timeseries_method : {"last_timestep", "timestepwise", "tokenwise"}
        How a sequence output ``(B, T, U)`` becomes a sample matrix. ``tokenwise`` (every position
        of every sequence a row; not in delve 0.1.50, so the ``"delve-0.1.50"`` semantics refuse it)
        leaves padding out, and ``last_timestep`` takes each sequence's last token, when the model
        is called with an ``attention_mask`` (the ``"delve-0.1.50"`` semantics ignore masks, as
        delve does).
    sat_threshold : float
        Share of the variance the intrinsic dimensionality explains, in (0, 1].
    nosave : bool
        Write nothing (no folder, no files); :meth:`add_saturations` still returns the values.
    verbose : bool
        Print every value that :meth:`add_saturations` computes.
    device : str or torch.device, optional
        Where the moments are computed; default: where each layer's output is (the model's
        device). delve's default was ``'cuda:0'``.
    initial_epoch : int
        Not 0: continue a run; the writers resume their saved state (the CSV keeps its rows) and
        ``store`` is resumed after its last complete epoch. 0: existing output is overwritten.
    interpolation_strategy : str, optional
        A ``torch.nn.functional.interpolate`` mode: conv maps larger than
        ``interpolation_downsampling`` (in height or width) are first resized to that size.
    interpolation_downsampling : int
        Target size of the interpolation.
    semantics : {"default", "delve-0.1.50"}
        See the module docstring.
    store : str or PathLike, optional
        Also stream the run to this Zarr run store (see :class:`capture.Recorder`).
    store_mode : {"both", "gram"}
        What the store keeps: raw outputs and moments, or moments only.
    layer_types : tuple of Module types, optional
        The layer types to track; default :data:`DELVE_LAYER_TYPES`.

    Examples
    --------
    >>> import os, tempfile
    >>> torch.manual_seed(0) is not None
    True
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> run = os.path.join(tempfile.mkdtemp(), "run")
    >>> tracker = SaturationTracker(run, "csv", net, stats=["lsat", "idim"])
    >>> for epoch in range(2):
    ...     _ = net(torch.randn(32, 4))
    ...     tracker.add_scalar("epoch", epoch)
    ...     _ = tracker.add_saturations()
    >>> tracker.close()
    >>> with open(run + ".csv") as csv:
    ...     print(csv.readline().strip())
    ;epoch;train-saturation_0;train-intrinsic-dimensionality_0;train-saturation_2;train-intrinsic-dimensionality_2
    """

    def __init__(
        self,
        savefile: str,
        save_to: str | AbstractWriter | Iterable[str | AbstractWriter],
        modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
        layer_filter: Callable[[dict[str, nn.Module]], dict[str, nn.Module]] | None = None,
        writer_args: Mapping[str, Any] | None = None,
        log_interval: int = 1,
        max_samples: int | None = None,
        stats: str | Iterable[str] = ("lsat",),
        layerwise_sat: bool = True,
        reset_covariance: bool = True,
        average_sat: bool = False,
        ignore_layer_names: Iterable[str] = (),
        include_conv: bool = True,
        conv_method: str = "channelwise",
        timeseries_method: str = "last_timestep",
        sat_threshold: float = 0.99,
        nosave: bool = False,
        verbose: bool = False,
        device: str | torch.device | None = None,
        initial_epoch: int = 0,
        interpolation_strategy: str | None = None,
        interpolation_downsampling: int = 32,
        *,
        semantics: str = DEFAULT_SEMANTICS,
        store: str | os.PathLike[str] | None = None,
        store_mode: str = "both",
        layer_types: tuple[type[nn.Module], ...] | None = None,
    ) -> None:
        self.semantics = check_semantics(semantics)
        if self.semantics == DELVE_SEMANTICS:
            check_delve_methods([timeseries_method], "timeseries_method")
        self.threshold = check_threshold(sat_threshold, "sat_threshold")
        self.stats, self._phase_stats = _parse_stats(stats)
        if store_mode not in _STORE_MODES:
            raise ValueError(f"store_mode: must be one of {', '.join(_STORE_MODES)}, got {store_mode!r}")
        if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, int) or initial_epoch < 0:
            raise ValueError(f"initial_epoch: must be an integer >= 0, got {initial_epoch!r}")
        self.savefile = os.fspath(savefile)
        self.nosave = bool(nosave)
        self.verbose = bool(verbose)
        self.layerwise_sat = bool(layerwise_sat)
        self.average_sat = bool(average_sat)
        self.reset_covariance = bool(reset_covariance)
        self.include_conv = bool(include_conv)
        self.ignore_layer_names = (
            [ignore_layer_names] if isinstance(ignore_layer_names, str) else list(ignore_layer_names)
        )
        self.conv_method = conv_method
        self.timeseries_method = timeseries_method
        self.log_interval = log_interval
        self.max_samples = max_samples
        self.initial_epoch = initial_epoch
        self.interpolation_strategy = interpolation_strategy
        self.interpolation_downsampling = interpolation_downsampling
        self.device = device
        self.store = None if store is None else os.fspath(store)
        self._embed = any("embed" in s for s in self._phase_stats.values())
        # per phase, what the spectra must hold for the statistics asked (lsat alone: eigenvalues)
        self._needs = {
            phase: spectrum_needs(stats, self.semantics) for phase, stats in self._phase_stats.items()
        }
        types = DELVE_LAYER_TYPES if layer_types is None else tuple(layer_types)

        if self.nosave:
            self.writer: AbstractWriter = CompositWriter([])
        else:
            args = dict(writer_args or {})
            args["savepath"] = self.savefile
            os.makedirs(self.savefile, exist_ok=True)
            self.writer = _make_writer(save_to, args)
            if "cov" in {s for v in self._phase_stats.values() for s in v} and not _has_npy_writer(
                self.writer
            ):
                warnings.warn(
                    "'cov' was selected as stat, but 'npy' (NPYWriter) is not used as a save strategy, which is "
                    "the only writer able to save the covariance matrix; add 'npy' to save_to",
                    stacklevel=2,
                )

        ignored = set(self.ignore_layer_names)

        def select(found: dict[str, nn.Module]) -> dict[str, nn.Module]:
            kept = {
                name: m
                for name, m in found.items()
                if isinstance(m, types) and (self.include_conv or not isinstance(m, _CONV_TYPES))
            }
            if layer_filter is not None:
                kept = dict(layer_filter(kept))
            return {name: m for name, m in kept.items() if name not in ignored}

        # per (phase, layer): this epoch's moments, the last recorded call's moments
        self._epoch: dict[tuple[str, str], Moments] = {}
        self._last: dict[tuple[str, str], Moments] = {}
        # reset_covariance=False: moments kept across epochs (default) / last call ever (delve)
        self._kept: dict[tuple[str, str], Moments] = {}
        self._samples: dict[tuple[str, str], torch.Tensor] = {}
        self._order: dict[str, dict[str, int]] = {phase: {} for phase in PHASES}  # layer -> width
        interpolate = interpolation_strategy is not None
        resume = initial_epoch != 0 and self.store is not None and os.path.exists(self.store)
        self._recorder = Recorder(
            modules,
            self.store,
            mode=store_mode if self.store is not None else "gram",
            layer_filter=select,
            interpolation=interpolation_strategy,
            downsample=interpolation_downsampling if interpolate else None,
            conv_methods=(conv_method,),
            timeseries_methods=(timeseries_method,),
            log_interval=log_interval,
            max_samples=max_samples,
            resume=resume,
            overwrite=self.store is not None and not resume,
            device=device,
            # the samples are kept for 'embed' alone (a callback per call costs the hook its
            # fastest conv path); the layers' order and widths come with their blocks
            on_batch=self._on_batch if self._embed else None,
            on_block=self._on_block,
            token_mask=False if self.semantics == DELVE_SEMANTICS else None,
        )
        self.layers: dict[str, nn.Module] = dict(self._recorder.layers)
        if initial_epoch != 0 and hasattr(self.writer, "resume_from_saved_state"):
            self.writer.resume_from_saved_state(initial_epoch)

    # -- delve's public methods ------------------------------------------------------------------
    def __repr__(self) -> str:
        return repr(self.layers.keys())

    def __getattr__(self, name: str) -> Any:
        # delve redirects unknown attributes (add_sample_scalar, savepath, ...) to its writer
        writer = self.__dict__.get("writer")
        if writer is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(writer, name)

    def __enter__(self) -> SaturationTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def is_recording(self) -> bool:
        """Whether forward calls are being recorded (False after :meth:`stop` or :meth:`close`)."""
        return self._recorder.is_recording

    def stop(self) -> None:
        """Pause recording; forward calls are not counted towards ``log_interval`` either."""
        self._recorder.stop()

    def resume(self) -> None:
        """Continue recording after :meth:`stop`."""
        self._recorder.resume()

    def add_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """Write one value (an accuracy, a loss) with the current epoch's row.

        It also goes to ``store`` when the store can hold it (a number or a string).
        """
        if not self.nosave:
            self.writer.add_scalar(name, value, **kwargs)
        if self.store is not None:
            try:
                self._recorder.add_scalar(name, value)
            except (TypeError, ValueError):
                pass  # the writers have it; the store keeps numbers and strings only

    def add_scalars(self, prefix: str, value_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Write several values (the writers' ``add_scalars``)."""
        if not self.nosave:
            self.writer.add_scalars(prefix, value_dict, **kwargs)

    def save(self) -> None:
        """Let the writers persist what they have."""
        if not self.nosave:
            self.writer.save()

    def close(self) -> None:
        """Remove the hooks, finish the store and close the writers."""
        self._recorder.close()
        if not self.nosave:
            self.writer.close()

    def add_saturations(self, save: bool = True) -> dict[str, Any]:
        """Close the epoch: compute the statistics of every recorded layer and write them.

        Per phase (train, then eval) and layer (in order of first recording) the statistics
        asked for go to the writer in one ``add_scalars`` call. A layer recorded in an earlier
        epoch but not in this one (after :meth:`stop`, with ``max_samples`` spent, ...) gets NaN
        values. The recorded moments are then reset (unless ``reset_covariance=False``).

        Parameters
        ----------
        save : bool
            Call :meth:`save` afterwards.

        Returns
        -------
        dict
            Every value written, by name (the covariance matrices included, the embeddings not).
        """
        self._recorder.end_epoch()  # flushes the epoch's moments through _on_block
        written: dict[str, Any] = {}
        averages: dict[str, float] = {}
        # Spinning BLAS threads left behind by the eigensolver slowed the next training steps
        # (a 1.7 ms forward and backward took 18-30 ms next to them; bench/tracker_overhead.py).
        with _one_blas_thread():
            values = {
                (phase, layer): self._layer_values(phase, layer, width)
                for phase in PHASES
                for layer, width in self._order[phase].items()
            }
        for phase in PHASES:
            saturations: list[float] = []
            for layer in self._order[phase]:
                log_values, sample_values, lsat = values[(phase, layer)]
                saturations.append(lsat)
                if self.verbose:
                    for name, value in log_values.items():
                        print(f"{name}: {value}")
                if self.layerwise_sat and not self.nosave:
                    self.writer.add_scalars(prefix="", value_dict=log_values, sample_value_dict=sample_values)
                written.update(log_values)
            finite = [s for s in saturations if math.isfinite(s)]
            averages[f"average-{phase}-sat"] = float(np.mean(finite)) if finite else math.nan
        if self.average_sat:
            for name, value in averages.items():
                if self.verbose:
                    print(f"{name}: {value}")
                if not self.nosave:
                    self.writer.add_scalar(name, value)
                written[name] = value
        self._epoch.clear()
        self._last.clear()
        if self.reset_covariance:
            self._samples.clear()
        if save:
            self.save()
        return written

    # -- internals ------------------------------------------------------------------------------
    def _on_batch(self, phase: str, layer: str, method: str, matrix: torch.Tensor) -> None:
        self._samples[(phase, layer)] = matrix.detach().to(torch.float64, copy=True)

    def _on_block(self, block: GramBlock) -> None:
        key = (block.phase, block.layer)
        part = Moments(block.count, block.mean, block.m2)
        if block.kind == BLOCK_KIND_EPOCH:
            self._epoch.setdefault(key, Moments()).merge(part)
        elif block.kind == BLOCK_KIND_LAST_CALL:
            # Every layer recorded in the epoch sends one at end_epoch, in the order of its first
            # recording in the epoch (blocks of the epoch's moments may come earlier, in any order).
            self._last[key] = part
            self._order[block.phase].setdefault(block.layer, int(block.mean.shape[0]))

    def _moments(self, key: tuple[str, str]) -> Moments | None:
        """The moments this epoch's statistics come from, by semantics and ``reset_covariance``."""
        current = (self._last if self.semantics == DELVE_SEMANTICS else self._epoch).get(key)
        if self.reset_covariance:
            return current
        if self.semantics == DELVE_SEMANTICS:
            if current is not None:
                self._kept[key] = current
        elif current is not None:
            self._kept.setdefault(key, Moments()).merge(current)
        return self._kept.get(key)

    def _layer_values(
        self, phase: str, layer: str, width: int
    ) -> tuple[dict[str, Any], dict[str, Any], float]:
        """The values of one (phase, layer) in the order asked, its embedding, and its saturation."""
        stats = self._phase_stats[phase]
        moments = self._moments((phase, layer))
        spectrum = None
        if moments is not None and moments.count > 0:
            spectrum = spectrum_of(moments.covariance(), need=self._needs[phase])
        values: dict[str, Any] = {}
        samples: dict[str, Any] = {}
        for stat in stats:
            name = f"{phase}-{STATMAP[stat]}_{layer}"
            if stat == "embed":
                samples["embed"] = self._embedding(phase, layer, moments, spectrum)
                continue
            values[name] = self._value(stat, spectrum, width)
        lsat = math.nan  # for the phase's mean saturation (average_sat)
        if spectrum is not None and self.average_sat:
            lsat = values.get(f"{phase}-{STATMAP['lsat']}_{layer}")
            lsat = self._value("lsat", spectrum, width) if lsat is None else lsat
        return values, samples, lsat

    def _value(self, stat: str, spectrum: Any, width: int) -> Any:
        if spectrum is None:
            return np.full((width, width), np.nan) if stat == "cov" else math.nan
        threshold = self.threshold if stat in ("lsat", "idim") else None
        value = compute_stat(stat, spectrum, threshold, self.semantics)
        if stat == "idim" and math.isfinite(value):
            return int(value)  # delve writes idim as an integer
        return value

    def _embedding(
        self, phase: str, layer: str, moments: Moments | None, spectrum: Any
    ) -> list[tuple[float, float]]:
        samples = self._samples.get((phase, layer))
        if samples is None or spectrum is None:
            return []
        x = samples.to("cpu").numpy()
        if self.semantics == DELVE_SEMANTICS:
            coords = delve_embed(spectrum.cov, x)
        else:
            assert moments is not None
            coords = pca_embed(x, spectrum.vectors, mean=np.asarray(moments.mean, dtype=np.float64))
        return [(float(a), float(b)) for a, b in coords]


CheckLayerSat = SaturationTracker
"""delve's former name of :class:`SaturationTracker` (an alias)."""
