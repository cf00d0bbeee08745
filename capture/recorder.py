"""The capture hook: record layer outputs (raw) or partial moments (gram) during training."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from capture.format import (
    BLOCK_KIND_EPOCH,
    BLOCK_KIND_LAST_CALL,
    CALL_COLUMNS,
    MODES,
    PHASES,
    STORAGE_DTYPES,
    CaptureOptions,
)
from capture.layers import LayerType, discover_layers, module_kind, primary_output
from capture.moments import Moments, helper_thread, one_blas_thread, to_numpy
from capture.reshape import (
    check_conv_method,
    check_interpolation,
    check_timeseries_method,
    interpolate_maps,
    layout_of,
    matrix_source,
    matrix_width,
    methods_for_layout,
    resizes,
    to_matrix,
    token_mask_of,
)
from capture.store_writer import LayerRecord, RunStoreWriter, make_compressors
from capture.writer import BackgroundWriter, WriterError

__all__ = ["Recorder", "CaptureError", "GramBlock"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Refuse gram moments wider than this (a d x d float64 matrix per block): 8192**2 * 8 B = 512 MiB.
MAX_GRAM_WIDTH = 8192


class CaptureError(RuntimeError):
    """Capture cannot go on (the background writer failed, or the recorder was misused)."""


def _epochs(epochs: list[int], verb: str = "") -> str:
    """``epoch 3 was`` / ``epochs 3, 4 were`` (``verb`` "was" or nothing)."""
    text = ("epoch " if len(epochs) == 1 else "epochs ") + ", ".join(str(e) for e in epochs)
    return f"{text} {verb if len(epochs) == 1 else 'were'}" if verb else text


def _too_wide(path: str, name: str, method: str, width: int, layout: str, shape: tuple[int, ...]) -> str:
    """The message refusing a gram matrix wider than :data:`MAX_GRAM_WIDTH`, with what to use instead."""
    what = f"the {method!r} matrix is {width} wide"
    if layout == "sequence" and method == "timestepwise":
        what = (
            f"'timestepwise' makes one column per position and feature, {shape[0]} x {shape[-1]} = {width} "
            "columns"
        )
        hint = (
            "use timeseries_methods=('tokenwise',) (one row per token) or ('last_timestep',) (one row per "
            "sequence), or leave the layer out with layers= / ignore="
        )
    elif layout == "conv":
        hint = "use mode='raw', another conv method, or interpolation with a smaller downsample"
    else:
        hint = "use mode='raw', or leave the layer out with layers= / ignore="
    return (
        f"{path}: layer {name!r}: {what}; a {width}x{width} float64 moment per block is too large "
        f"(limit {MAX_GRAM_WIDTH}); {hint}"
    )


def _check_positive_int(value: Any, argument: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument}: must be a positive integer, got {value!r}")


def _mask_position(root: nn.Module) -> int | None:
    """Position of the ``attention_mask`` parameter among the positional arguments of ``root.forward``."""
    try:
        parameters = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(parameters):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == "attention_mask":
            return i
    return None


@dataclass(frozen=True, eq=False)
class GramBlock:
    """A block of gram moments as the recorder flushes it; what ``Recorder(on_block=...)`` receives.

    ``kind`` is :data:`~capture.format.BLOCK_KIND_EPOCH` (moments of the calls ``first_call`` to
    ``last_call`` of the epoch; an epoch may have several such blocks, to be merged) or
    :data:`~capture.format.BLOCK_KIND_LAST_CALL` (the last recorded call of the epoch alone, sent
    once per epoch at :meth:`Recorder.end_epoch`). ``count``, ``mean`` and ``m2`` are the partial
    moments (:func:`capture.moments.batch_moments`), float64 numpy arrays.
    """

    epoch: int
    phase: str
    layer: str
    method: str
    kind: int
    first_call: int
    last_call: int
    sample_rows: int
    nonfinite_rows: int
    count: int
    mean: np.ndarray
    m2: np.ndarray


class _Accumulator:
    """Moments of one (phase, layer, method) since the last flushed block, and its last call."""

    __slots__ = ("moments", "first_call", "last_call", "sample_rows", "nonfinite_rows", "last")

    def __init__(self) -> None:
        self.moments = Moments(keep_last=True)
        self.first_call = -1
        self.last_call = -1
        self.sample_rows = 0
        self.nonfinite_rows = 0
        # call index, rows and non-finite rows of the last recorded call of the epoch (its
        # moments: ``moments.last()``)
        self.last: tuple[int, int, int] | None = None


def _check_arguments(
    *,
    mode: str,
    dtype: str,
    interpolation: str | None,
    downsample: int | None,
    compression: Any,
    conv_methods: Iterable[str],
    timeseries_methods: Iterable[str],
    log_interval: int,
    max_samples: int | None,
    gram_block_rows: int,
    chunk_bytes: int,
    max_queue_bytes: int,
    resume: bool,
    overwrite: bool,
    resume_epoch: int | None,
    call_counters: Mapping[str, int] | None,
    on_error: str,
    path: Any,
    token_mask: Any = None,
    max_positions: int | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Refuse a bad :class:`Recorder` argument with a message naming it; the methods as tuples."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; valid values are: {', '.join(MODES)}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"dtype: unknown storage dtype {dtype!r}; valid values are: {', '.join(STORAGE_DTYPES)}"
        )
    conv_methods = (conv_methods,) if isinstance(conv_methods, str) else tuple(conv_methods)
    timeseries_methods = (
        (timeseries_methods,) if isinstance(timeseries_methods, str) else tuple(timeseries_methods)
    )
    if not conv_methods or not timeseries_methods:
        raise ValueError("conv_methods / timeseries_methods: name at least one method")
    for m in conv_methods:
        check_conv_method(m, "conv_methods")
    for m in timeseries_methods:
        check_timeseries_method(m, "timeseries_methods")
    if downsample is not None and interpolation is None:
        raise ValueError("downsample: set interpolation (e.g. 'bilinear') to resize maps")
    check_interpolation(interpolation, downsample)
    _check_positive_int(log_interval, "log_interval")
    _check_positive_int(max_samples, "max_samples", allow_none=True)
    _check_positive_int(gram_block_rows, "gram_block_rows")
    _check_positive_int(chunk_bytes, "chunk_bytes")
    _check_positive_int(max_queue_bytes, "max_queue_bytes")
    _check_positive_int(max_positions, "max_positions", allow_none=True)
    if token_mask is not None and token_mask is not False and not callable(token_mask):
        raise ValueError(
            f"token_mask: must be a callable returning the current call's mask, False or None, got {token_mask!r}"
        )
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error: must be 'raise' or 'warn', got {on_error!r}")
    make_compressors(compression, 4)  # validates the name
    if resume and overwrite:
        raise ValueError("resume and overwrite: choose one")
    if (resume_epoch is not None or call_counters is not None) and not resume:
        raise ValueError("resume_epoch / call_counters: only with resume=True")
    if resume_epoch is not None and (
        isinstance(resume_epoch, bool)
        or not isinstance(resume_epoch, (int, np.integer))
        or resume_epoch < 0
    ):
        raise ValueError(f"resume_epoch: must be an integer >= 0, got {resume_epoch!r}")
    if path is None and mode != "gram":
        raise ValueError("path: a recorder without a store (path=None) needs mode='gram'")
    return conv_methods, timeseries_methods


class Recorder:
    """Stream layer outputs or their moments to a Zarr v3 run store during training.

    Parameters
    ----------
    modules : Module, list of Modules or dict of name -> Module
        The model (its supported leaf layers are discovered) or explicit modules.
    path : str, PathLike or None
        The run store to create: a directory (conventionally ``*.zarr``) or a URL
        (``s3://bucket/prefix/run.zarr``, ``gs://...``, any fsspec URL). None keeps nothing on
        disk (``mode="gram"`` only): the moments reach the caller through ``on_block``.
    mode : {"raw", "gram", "both"}
        ``raw`` keeps the outputs themselves (any reduction can be chosen later); ``gram`` keeps
        float64 partial moments of each reduction in ``conv_methods`` / ``timeseries_methods``.
    layer_filter, layers, ignore, layer_types :
        Choose the recorded layers (see :func:`capture.layers.discover_layers`): ``layers`` names or
        globs any module (a block, a ``LayerNorm``), ``layer_types`` replaces the default types with
        classes or class names (``"Conv1D"``, ``nn.Embedding``), which need not be imported.
    dtype : {"float32", "float16", "bfloat16"}
        Storage type of raw outputs.
    interpolation, downsample :
        Resize conv maps larger than ``downsample`` to ``downsample`` with this
        ``torch.nn.functional.interpolate`` mode before anything is recorded (delve's rule).
    compression : {"none", "lz4", "zstd"} or codec
        Compression of raw outputs; ``lz4`` and ``zstd`` are Blosc level 1 with byte shuffle. None
        by default: layer outputs barely compress (lz4 ratio 1.0-1.16) and lz4 cost 2-3x the write
        time (bench/README.md).
    conv_methods, timeseries_methods : sequence of str
        The reductions whose moments ``gram`` mode keeps.
    log_interval : int
        Record a layer's call when its call counter (shared by train and eval, never reset, as in
        delve) is a multiple of this.
    max_samples : int, optional
        Per epoch, phase and layer, record at most this many samples (dim 0 rows).
    gram_block_rows : int
        Flush the moments of a (phase, layer) as a block after this many samples.
    chunk_bytes : int
        Target size of a raw chunk (one file each; 16 MiB by default: fewer, larger files write
        faster, and the analysis reads chunks of up to 16 MiB at full speed).
    max_queue_bytes : int
        Memory that may wait for the writer; the training loop waits beyond it.
    resume, overwrite : bool
        Continue an existing store after its last complete epoch / replace it.
    resume_epoch : int, optional
        With ``resume``: continue the store at this epoch, as a training resumed from a checkpoint
        does. Epochs from this one on that the store holds (recorded after the checkpoint by a run
        that stopped later) are dropped with a warning, so the store matches the resumed training.
    call_counters : mapping of str to int, optional
        With ``resume``: each layer's forward-call counter (``log_interval``, the ``call_index``
        column) to continue from, as :attr:`call_counters` gave it when the checkpoint was written;
        default: the counters of the store's last commit.
    rank, world_size : int, optional
        This process's part of a multi-process run (defaults from ``torch.distributed``).
    on_error : {"raise", "warn"}
        On a writer failure raise at the next recorder call, or warn once and stop capturing.
    device : str or torch.device, optional
        Compute the gram moments on this device (default: where each layer's output is).
    on_batch : callable, optional
        ``on_batch(phase, layer, method, matrix)`` for every recorded call and gram method, with
        the call's ``(n, d)`` sample matrix (a torch tensor, possibly a view of the layer output:
        copy it to keep it). Called from the forward hook.
    on_block : callable, optional
        ``on_block(block)`` with a :class:`GramBlock` for every block of moments flushed (the
        epoch's moments and the last call's, at :meth:`end_epoch` or every ``gram_block_rows``).
    storage_options : dict, optional
        Options of a URL's filesystem (for ``s3://``, s3fs's ``endpoint_url``, ``key``, ``secret``,
        ...; without them the usual ``AWS_*`` environment variables and files apply). See
        :func:`capture.storage.open_store`.
    token_mask : callable, False or None
        Where the token mask of a forward call comes from: ``(batch, positions)``, 1 (true) for a
        token and 0 (false) for padding, the Hugging Face ``attention_mask``. None (default): the
        ``attention_mask`` argument of each call of the model (``modules`` given as one module), else
        the mask :meth:`set_token_mask` set. A callable: ``token_mask()`` returns the mask of the
        current forward call, or None (a model whose root does not receive it). False: no masks.
        A mask applies to every sequence layer whose output has its (batch, positions) shape:
        ``tokenwise`` leaves the padding out and ``last_timestep`` takes each sample's last token, in
        the hook (gram) and in the analysis (raw stores keep the mask with the rows). A sequence
        layer of another shape gets no mask, with one warning.
    max_positions : int, optional
        Store raw sequence outputs with this many positions, for batches padded to varying lengths:
        a shorter call is padded with zeros that its stored mask marks as padding. Default: the
        length of the layer's first call (a longer call later is refused).

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with Recorder(net, f"{tmp}/run.zarr", mode="both") as rec:
    ...         for epoch in range(2):
    ...             _ = net(torch.randn(8, 4))
    ...             _ = rec.end_epoch()
    ...     rec.layer_names
    ['0', '2']
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
        path: str | os.PathLike[str] | None,
        mode: str = "raw",
        *,
        layer_filter: Callable[[dict[str, nn.Module]], dict[str, nn.Module]] | None = None,
        layers: Iterable[str] | None = None,
        ignore: Iterable[str] | None = None,
        layer_types: Iterable[LayerType] | None = None,
        dtype: str = "float32",
        interpolation: str | None = None,
        downsample: int | None = None,
        compression: Any = "none",
        conv_methods: Iterable[str] = ("channelwise",),
        timeseries_methods: Iterable[str] = ("last_timestep",),
        log_interval: int = 1,
        max_samples: int | None = None,
        gram_block_rows: int = 65536,
        chunk_bytes: int = 16 * 2**20,
        max_queue_bytes: int = 256 * 2**20,
        resume: bool = False,
        overwrite: bool = False,
        resume_epoch: int | None = None,
        call_counters: Mapping[str, int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
        device: str | torch.device | None = None,
        on_batch: Callable[[str, str, str, torch.Tensor], None] | None = None,
        on_block: Callable[[GramBlock], None] | None = None,
        storage_options: dict[str, Any] | None = None,
        token_mask: Callable[[], Any] | bool | None = None,
        max_positions: int | None = None,
    ) -> None:
        conv_methods, timeseries_methods = _check_arguments(
            mode=mode,
            dtype=dtype,
            interpolation=interpolation,
            downsample=downsample,
            compression=compression,
            conv_methods=conv_methods,
            timeseries_methods=timeseries_methods,
            log_interval=log_interval,
            max_samples=max_samples,
            gram_block_rows=gram_block_rows,
            chunk_bytes=chunk_bytes,
            max_queue_bytes=max_queue_bytes,
            resume=resume,
            overwrite=overwrite,
            resume_epoch=resume_epoch,
            call_counters=call_counters,
            on_error=on_error,
            path=path,
            token_mask=token_mask,
            max_positions=max_positions,
        )
        self.layers = discover_layers(
            modules, layer_filter=layer_filter, layers=layers, ignore=ignore, layer_types=layer_types
        )
        if rank is None or world_size is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist_on else 0) if rank is None else rank
            world_size = (
                (torch.distributed.get_world_size() if dist_on else 1) if world_size is None else world_size
            )
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank, world_size: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}"
            )
        self.path = "<no store>" if path is None else os.fspath(path)
        self.options = CaptureOptions(
            mode=mode,
            dtype=dtype,
            interpolation=interpolation,
            downsample=downsample,
            compression=compression if isinstance(compression, str) else repr(compression),
            conv_methods=conv_methods,
            timeseries_methods=timeseries_methods,
            log_interval=int(log_interval),
            max_samples=None if max_samples is None else int(max_samples),
            gram_block_rows=int(gram_block_rows),
            chunk_bytes=int(chunk_bytes),
            layers=tuple(self.layers),
        )
        self._compression = compression
        self.on_error = on_error
        self._device = None if device is None else torch.device(device)
        self._on_batch = on_batch
        self._on_block = on_block
        self._token_mask = token_mask
        self._max_positions = None if max_positions is None else int(max_positions)
        # While the hook runs the training waits: its other core can take half of a long product.
        self._helper = helper_thread() if torch.get_num_threads() > 1 else None
        self._store: RunStoreWriter | None = None
        self._writer: BackgroundWriter | None = None
        if path is not None:
            self._store = RunStoreWriter(
                self.path,
                self.options,
                rank=self.rank,
                world_size=self.world_size,
                resume=resume,
                overwrite=overwrite,
                compression=compression,
                resume_epoch=None if resume_epoch is None else int(resume_epoch),
                storage_options=storage_options,
            )
            self._writer = BackgroundWriter(max_queue_bytes)
        self._raw = mode in ("raw", "both")
        self._gram = mode in ("gram", "both")

        self._start_state(resume_epoch, call_counters)
        self._handles = [
            module.register_forward_hook(self._make_hook(name)) for name, module in self.layers.items()
        ]
        if isinstance(modules, nn.Module) and token_mask is None:
            self._hook_root(modules)

    def _start_state(self, resume_epoch: int | None, call_counters: Mapping[str, int] | None) -> None:
        """Where recording starts: the epoch, delve's call counters, the layers a resumed store has."""
        state = self._store.state if self._store is not None else {"epochs_complete": []}
        done = state["epochs_complete"]
        self.epoch = (max(done) + 1) if done else 0
        if resume_epoch is not None:
            self._warn_resume(int(resume_epoch), self._store.dropped_epochs if self._store else [])
            self.epoch = int(resume_epoch)
        counters = state.get("call_counters", {}) if call_counters is None else call_counters
        self._counters: dict[str, int] = {n: int(c) for n, c in counters.items()}
        self._records: dict[str, LayerRecord] = dict(self._store.layers) if self._store is not None else {}
        self._gram_methods: dict[str, tuple[str, ...]] = {n: tuple(r.gram) for n, r in self._records.items()}
        self._next_raw_row = (
            {n: self._store.raw_next_row(n) for n in self._store._raw} if self._store is not None else {}
        )
        self._seen: dict[tuple[str, str], int] = {}
        self._calls: list[tuple[int, ...]] = []
        self._acc: dict[tuple[str, str, str], _Accumulator] = {}
        self._raw_pools: dict[str, list[torch.Tensor]] = {}  # cast buffers the writer is done with
        self._scalars: dict[str, Any] = {}
        self._epoch_open = False
        self._recording = True
        self._closed = False
        self._disabled = False
        self._called: set[tuple[str, bool]] = set()  # (layer, training) called while recording, this epoch
        self._warned_uncalled: set[str] = set()
        # token masks: of the root's current call, set by set_token_mask; raw layers keeping masks
        self._call_mask: Any = None
        self._set_mask: Any = None
        self._mask_layers = {n for n, r in self._records.items() if r.mask_array}
        self._mask_cache: tuple[Any, Any] = (None, None)  # the last mask given, as a bool tensor
        self._warned_mask: set[str] = set()

    # -- public API ----------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Names of the layers that will be (or are) recorded, in model order."""
        return list(self.layers)

    @property
    def call_counters(self) -> dict[str, int]:
        """Each layer's forward-call counter (what a checkpoint keeps to resume with ``call_counters``)."""
        return dict(self._counters)

    @property
    def is_recording(self) -> bool:
        return self._recording and not self._closed and not self._disabled

    def stop(self) -> None:
        """Pause recording (forward calls are not counted either, as in delve)."""
        self._recording = False

    def resume(self) -> None:
        """Continue recording after :meth:`stop`."""
        self._recording = True

    def set_token_mask(self, mask: Any) -> None:
        """The token mask of the forward calls that follow, until another one (None: no mask).

        ``(batch, positions)``, 1 / true for a token, 0 / false for padding. For a model whose root
        module does not receive the mask (the Lightning callback sets each batch's); an
        ``attention_mask`` argument of the model's call takes precedence while that call runs.
        """
        self._set_mask = mask

    def flush(self) -> None:
        """Wait until everything recorded so far has been written to the store.

        Written is not committed: readers see an epoch only once :meth:`end_epoch` has committed it.
        Useful before a checkpoint or a deliberate stop; raises :class:`CaptureError` if a write failed.
        """
        self._check()
        self._flush_writer()

    def add_scalar(self, name: str, value: Any) -> None:
        """Keep a per-epoch value (an accuracy, a loss) with the current epoch."""
        self._check()
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise TypeError(
                f"add_scalar: value of {name!r} must be a number or string, got {type(value).__name__}"
            )
        self._scalars[str(name)] = value

    def end_epoch(self) -> int:
        """Close the epoch: flush and commit everything of it. Returns the epoch number closed."""
        self._check()
        epoch = self.epoch
        self._warn_uncalled(epoch)
        if self._gram:
            for key in list(self._acc):
                self._flush_block(key, final=True)
            self._acc.clear()
        self._raw_pools.clear()
        calls = np.asarray(self._calls, dtype=np.int64).reshape(-1, len(CALL_COLUMNS))
        scalars = dict(self._scalars)
        counters = dict(self._counters)
        if not self._epoch_open:
            self._submit(lambda: self._store.open_epoch(epoch), 0, "opening the epoch")
        self._submit(
            lambda: self._store.commit_epoch(epoch, calls, scalars, counters),
            calls.nbytes,
            f"epoch {epoch} commit",
        )
        self._flush_writer()
        self._calls = []
        self._scalars = {}
        self._seen.clear()
        self._epoch_open = False
        self.epoch += 1
        return epoch

    def close(self) -> None:
        """Remove the hooks and finish writing. An epoch not closed by :meth:`end_epoch` stays incomplete."""
        if self._closed:
            return
        self._closed = True
        self._raw_pools.clear()
        for h in self._handles:
            h.remove()
        if self._writer is None:
            return
        try:
            self._writer.close()
        except WriterError as exc:
            if self.on_error == "raise" and not self._disabled:
                raise CaptureError(f"{self.path}: {exc}") from exc

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original error behind a writer error
            try:
                self.close()
            except CaptureError:
                pass

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            for h in getattr(self, "_handles", []):
                h.remove()
        except Exception:  # noqa: BLE001
            pass

    # -- internals -----------------------------------------------------------------------------
    def _warn_resume(self, epoch: int, dropped: list[int]) -> None:
        if dropped:
            warnings.warn(
                f"{self.path}: {_epochs(dropped, 'was')} recorded after the checkpoint the training resumes "
                f"from (at epoch {epoch}): dropped, so that the store matches the resumed training",
                RuntimeWarning,
                stacklevel=3,
            )
        done = set(self._store.state["epochs_complete"]) if self._store is not None else set()
        missing = [e for e in range(epoch) if e not in done]
        if missing and self._store is not None:
            warnings.warn(
                f"{self.path}: the training resumes at epoch {epoch} but the store lacks {_epochs(missing)} "
                "(not committed before the run stopped, or the store is new)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_uncalled(self, epoch: int) -> None:
        """Warn once per layer about a recorded layer that was not called at all in an epoch.

        A layer called in one phase only (a frozen layer kept in eval mode, a training-only head)
        is not warned about: that is a choice of the model, and its phase's calls are stored.
        """
        if not self._called:  # a paused or empty epoch: nothing ran, nothing to say
            return
        called = {name for name, _ in self._called}
        uncalled = [name for name in self.layers if name not in called and name not in self._warned_uncalled]
        self._called = set()
        if not uncalled:
            return
        self._warned_uncalled.update(uncalled)
        names = ", ".join(repr(name) for name in uncalled)
        warnings.warn(
            f"{self.path}: epoch {epoch}: recorded layers never called in this epoch: {names}; nothing of "
            "them is stored. This usually means that the parent module uses the layer's weights directly "
            "instead of calling it (a fused or hand-written forward), or that the layer is not on the "
            "forward path (an unused head or branch)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check(self) -> None:
        if self._closed:
            raise CaptureError(f"{self.path}: the recorder is closed")
        if self._disabled or self._writer is None:
            return
        try:
            self._writer.check()
        except WriterError as exc:
            self._fail(exc)

    def _fail(self, exc: WriterError) -> None:
        if self.on_error == "warn":
            if not self._disabled:
                warnings.warn(f"{self.path}: capture switched off: {exc}", RuntimeWarning, stacklevel=3)
            self._disabled = True
            return
        raise CaptureError(f"{self.path}: {exc}") from exc

    def _submit(self, task: Callable[[], Any], nbytes: int, context: str) -> None:
        if self._disabled or self._writer is None:
            return
        try:
            self._writer.submit(task, nbytes, context)
        except WriterError as exc:
            self._fail(exc)

    def _flush_writer(self) -> None:
        if self._disabled or self._writer is None:
            return
        try:
            self._writer.flush()
        except WriterError as exc:
            self._fail(exc)

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self._recording or self._closed or self._disabled:
                return
            self._called.add((name, module.training))
            self._record(name, module, output)

        return hook

    def _register(self, name: str, module: nn.Module, out: torch.Tensor) -> LayerRecord:
        kind = module_kind(module)
        sample_shape = tuple(int(s) for s in out.shape[1:])
        layout = layout_of(kind, out.dim())
        opts = self.options
        stored_shape = sample_shape
        if layout == "conv" and resizes(sample_shape[1:], opts.interpolation, opts.downsample):
            stored_shape = (sample_shape[0], *([opts.downsample] * (len(sample_shape) - 1)))
        if layout == "sequence" and self._raw and self._max_positions is not None:
            if sample_shape[0] > self._max_positions:
                raise CaptureError(
                    f"{self.path}: layer {name!r}: a call of {sample_shape[0]} positions is longer than "
                    f"max_positions={self._max_positions}"
                )
            stored_shape = (self._max_positions, *sample_shape[1:])
        rec = LayerRecord(
            name=name,
            index=len(self._records),
            type=type(module).__name__,
            kind=kind,
            layout=layout,
            sample_shape=stored_shape,
            source_dtype=str(out.dtype).replace("torch.", ""),
        )
        widths: dict[str, int] = {}
        if self._gram:
            for method in methods_for_layout(layout, opts.conv_methods, opts.timeseries_methods):
                width = matrix_width(stored_shape, layout, method)
                if width > MAX_GRAM_WIDTH:
                    raise CaptureError(_too_wide(self.path, name, method, width, layout, stored_shape))
                widths[method] = width
        raw_dtype = opts.dtype if self._raw else None
        self._records[name] = rec
        self._gram_methods[name] = tuple(widths)
        self._submit(
            lambda: self._store.add_layer(rec, raw_dtype, widths), 0, f"layer {name!r}: creating arrays"
        )
        self._next_raw_row[name] = 0
        return rec

    def _record(self, name: str, module: nn.Module, output: Any) -> None:
        self._check()
        if self._disabled:
            return
        count = self._counters.get(name, 0) + 1
        self._counters[name] = count
        opts = self.options
        if count % opts.log_interval:
            return
        out = primary_output(module, output)
        if out is None or not out.is_floating_point():
            return
        phase = "train" if module.training else "eval"
        rows = int(out.shape[0]) if out.dim() > 0 else 0
        if opts.max_samples is not None:
            seen = self._seen.get((phase, name), 0)
            rows = min(rows, opts.max_samples - seen)
            if rows <= 0:
                return
            self._seen[(phase, name)] = seen + rows
        if rows == 0:
            return
        x = out.detach()[:rows]
        if x.dim() == 1:
            x = x[:, None]
        rec = self._records.get(name)
        if rec is None:
            rec = self._register(name, module, x)
        if x.dim() >= 3 and rec.layout == "conv":
            x = interpolate_maps(x, opts.interpolation, opts.downsample)
        mask = self._mask_of(name, out, rows) if rec.layout == "sequence" else None
        shape = tuple(x.shape[1:])
        if shape != rec.sample_shape:
            self._check_shape(name, rec, shape)
        if not self._epoch_open:
            epoch = self.epoch
            self._submit(lambda: self._store.open_epoch(epoch), 0, "opening the epoch")
            self._epoch_open = True
        first_row = -1
        if self._raw:
            first_row = self._next_raw_row[name]
            self._next_raw_row[name] = first_row + rows
            stored_mask = self._stored_mask(name, rec, x, mask)
            if stored_mask is not None and x.shape[1] < rec.sample_shape[0]:  # a shorter padded batch
                x_raw = F.pad(x, (0, 0, 0, rec.sample_shape[0] - x.shape[1]))
            else:
                x_raw = x
            self._queue_raw(name, x_raw, stored_mask)
        nonfinite = -1
        if self._gram:
            nonfinite = self._accumulate(name, rec, phase, count, x, mask)
        self._calls.append((self.epoch, PHASES.index(phase), rec.index, count, first_row, rows, nonfinite))

    def _check_shape(self, name: str, rec: LayerRecord, shape: tuple[int, ...]) -> None:
        """Refuse an output whose shape per sample differs from the layer's first, unless it fits.

        Raw rows need one shape, except a shorter sequence (stored padded, its padding masked);
        moments only need the matrix widths (channelwise maps of any size, last_timestep and
        tokenwise of sequences of any length).
        """
        stored = rec.sample_shape
        sequence = rec.layout == "sequence" and len(shape) == len(stored) == 2 and shape[1] == stored[1]
        raw_fits = not self._raw or (sequence and shape[0] < stored[0])
        widths_fit = all(
            matrix_width(shape, rec.layout, m) == matrix_width(stored, rec.layout, m)
            for m in self._gram_methods[name]
        )
        if raw_fits and widths_fit:
            return
        if self._raw and sequence and shape[0] > stored[0]:
            raise CaptureError(
                f"{self.path}: layer {name!r}: a call of {shape[0]} positions is longer than the {stored[0]} its "
                "raw rows hold; pass max_positions= the longest sequence length (shorter calls are stored "
                "padded, their padding masked), or pad every batch to one length"
            )
        raise CaptureError(
            f"{self.path}: layer {name!r}: output shape per sample changed from {stored} to "
            f"{shape}; record such a layer with a separate Recorder, or in mode='gram' with a reduction "
            "whose width does not depend on it (channelwise, mean, max, median, last_timestep, tokenwise)"
        )

    def _mask_of(self, name: str, out: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The token mask of this call for a sequence layer's output ``out`` (its first ``rows`` samples).

        None without a mask, or (with one warning per layer) when the output's (batch, positions)
        are not the mask's shape.
        """
        given = self._current_mask()
        if given is None:
            return None
        if self._mask_cache[0] is not given:
            self._mask_cache = (given, token_mask_of(given))
        mask = self._mask_cache[1]
        if out.dim() == 3 and tuple(mask.shape) == tuple(out.shape[:2]):
            return mask[:rows]
        if name not in self._warned_mask:
            self._warned_mask.add(name)
            warnings.warn(
                f"{self.path}: layer {name!r}: its output {tuple(out.shape)} does not have the token mask's "
                f"(batch, positions) shape {tuple(mask.shape)}: no mask is applied to it (every position of "
                "it counts as a token)",
                RuntimeWarning,
                stacklevel=4,
            )
        return None

    def _current_mask(self) -> Any:
        """The token mask of the current forward call, as given (None: none)."""
        source = self._token_mask
        if source is False:
            return None
        if source is not None:
            return source()
        return self._call_mask if self._call_mask is not None else self._set_mask

    def _stored_mask(
        self, name: str, rec: LayerRecord, x: torch.Tensor, mask: torch.Tensor | None
    ) -> np.ndarray | None:
        """The uint8 mask rows that go with a raw call of a sequence layer, None if it keeps no masks.

        A layer keeps masks from its first call with a mask, or shorter than its stored positions
        (the positions added are padding); its array is created then (its earlier rows: all tokens).
        """
        if rec.layout != "sequence":
            return None
        positions = rec.sample_shape[0]
        if mask is None and x.shape[1] == positions and name not in self._mask_layers:
            return None
        if name not in self._mask_layers:
            self._mask_layers.add(name)
            store = self._store
            self._submit(lambda: store.add_mask(name), 0, f"layer {name!r}: creating its mask array")
        rows = np.zeros((x.shape[0], positions), dtype=np.uint8)
        rows[:, : x.shape[1]] = 1 if mask is None else mask.cpu().numpy()
        return rows

    def _hook_root(self, root: nn.Module) -> None:
        """Take the ``attention_mask`` argument of each call of the model (hooks on its root module)."""
        position = _mask_position(root)

        def take(module: nn.Module, args: Any, kwargs: Any) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and position is not None and len(args) > position:
                mask = args[position]
            self._call_mask = mask if isinstance(mask, (torch.Tensor, np.ndarray)) else None

        def drop(module: nn.Module, args: Any, output: Any) -> None:
            self._call_mask = None

        # after the layers' hooks: the root's own recording hook, if any, still sees the mask
        self._handles.append(root.register_forward_pre_hook(take, with_kwargs=True))
        self._handles.append(root.register_forward_hook(drop, always_call=True))

    def _queue_raw(self, name: str, x: torch.Tensor, mask: np.ndarray | None = None) -> None:
        target = _TORCH_DTYPES[self.options.dtype]
        pool: list[torch.Tensor] | None = None
        if x.is_cuda:
            converted = x.to(target)
            host = torch.empty(converted.shape, dtype=target, pin_memory=True)
            host.copy_(converted, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            # Cast into a buffer the writer has finished with: a fresh one page-faults on every
            # call (a copy into a reused buffer took a third of the time, bench/README.md).
            pool = self._raw_pools.setdefault(name, [])
            host = pool.pop() if pool else None
            if host is None or host.shape != x.shape or host.dtype != target:
                host = torch.empty(x.shape, dtype=target)
            # On this thread alone: a parallel copy leaves torch's OpenMP workers spinning on the
            # core the background writer needs (twice the write speed with hooks back to back).
            threads = torch.get_num_threads()
            if threads > 1:
                torch.set_num_threads(1)
            try:
                host.copy_(x)
            finally:
                if threads > 1:
                    torch.set_num_threads(threads)
            event = None
        nbytes = host.numel() * host.element_size() + (0 if mask is None else mask.nbytes)
        store = self._store

        def task() -> None:
            if event is not None:
                event.synchronize()
            if target is torch.bfloat16:
                arr = host.view(torch.int16).numpy().view(np.uint16)
            else:
                arr = host.numpy()
            store.write_raw(name, arr)  # the store keeps no reference to ``arr`` once it returns
            if mask is not None:
                store.write_mask(name, mask)
            if pool is not None and len(pool) < 2:
                pool.append(host)

        self._submit(task, nbytes, f"layer {name!r}: raw write")

    def _accumulate(
        self, name: str, rec: LayerRecord, phase: str, call: int, x: torch.Tensor, mask: torch.Tensor | None
    ) -> int:
        """Add the call's matrices (``mask``: its token mask) to the blocks of its methods; its non-finite rows."""
        nonfinite = 0
        # One BLAS thread: a threaded BLAS pool next to torch's own pool steals the training's
        # cores (its threads spin after each product); see bench/README.md.
        with one_blas_thread():
            for method in self._gram_methods[name]:
                nonfinite = max(nonfinite, self._add_call(name, rec.layout, method, phase, call, x, mask))
        for method in self._gram_methods[name]:
            if self._acc[(phase, name, method)].sample_rows >= self.options.gram_block_rows:
                self._flush_block((phase, name, method), final=False)
        return nonfinite

    def _add_call(
        self,
        name: str,
        layout: str,
        method: str,
        phase: str,
        call: int,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> int:
        # The method's matrix in its preferred layout, a view of the output where it can be
        # (channelwise: (C, N, positions)); the kernels cast it to float64 slab by slab.
        mat, feature_major = matrix_source(x, layout, method, mask=mask)
        if mask is not None and mat.shape[0] == 0:  # last_timestep of sequences without a token
            return 0
        if self._on_batch is not None:
            self._on_batch(phase, name, method, to_matrix(x, layout, method, mask=mask))
        if self._device is not None and mat.device != self._device:
            mat = mat.to(self._device)
        key = (phase, name, method)
        acc = self._acc.get(key)
        if acc is None:
            acc = self._acc[key] = _Accumulator()
        if acc.first_call < 0:
            acc.first_call = call
        acc.moments.update(mat, feature_major=feature_major, helper=self._helper)
        finite = acc.moments.last_finite
        if finite is None:  # the block already holds a NaN / Inf: look at this call's matrix itself
            finite = bool(torch.isfinite(mat).all())
        nonfinite = 0
        if not finite:
            flat = x.reshape(x.shape[0], -1)
            nonfinite = int((~torch.isfinite(flat)).any(dim=1).sum())
        rows = int(x.shape[0])
        acc.last_call = call
        acc.sample_rows += rows
        acc.nonfinite_rows += nonfinite
        acc.last = (call, rows, nonfinite)
        return nonfinite

    def _flush_block(self, key: tuple[str, str, str], final: bool) -> None:
        phase, name, method = key
        acc = self._acc[key]
        epoch = self.epoch
        p = PHASES.index(phase)
        blocks = []
        if acc.sample_rows > 0:
            n, mean, m2 = acc.moments.compute()
            info = (
                epoch,
                p,
                BLOCK_KIND_EPOCH,
                acc.first_call,
                acc.last_call,
                acc.sample_rows,
                acc.nonfinite_rows,
            )
            blocks.append((info, n, to_numpy(mean), to_numpy(m2)))
        if final and acc.last is not None:
            call, rows, nonfinite = acc.last
            last = acc.moments.last()
            if last is not None:
                n, mean, m2 = last
                info = (epoch, p, BLOCK_KIND_LAST_CALL, call, call, rows, nonfinite)
                blocks.append((info, n, to_numpy(mean), to_numpy(m2)))
        if self._on_block is not None:
            for (_, _, kind, first, last_call, rows, bad), n, mean, m2 in blocks:
                block = GramBlock(epoch, phase, name, method, kind, first, last_call, rows, bad, n, mean, m2)
                self._on_block(block)
        store = self._store
        nbytes = sum(b[3].nbytes for b in blocks)

        def task() -> None:
            for info, n, mean, m2 in blocks:
                store.write_gram_block(name, method, info, n, mean, m2)
            if not final:
                store.commit_blocks()

        self._submit(task, nbytes, f"layer {name!r}: gram block ({method})")
        # the next block starts empty; the last call's moments stay until the epoch ends
        acc.moments.reset(keep_last=True)
        acc.sample_rows, acc.nonfinite_rows, acc.first_call = 0, 0, -1
