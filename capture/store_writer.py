"""Writing one process's part of a run store (format version 1.2), on a local disk or object storage.

Only the background writer thread calls these methods once a run is open. Data
arrays are preallocated and grown geometrically; what is valid is what the
rank group's ``committed`` attribute says, and that attribute is written last, in
one write of the rank group's ``zarr.json`` (a rename on a local disk, one PUT on
object storage), so a killed process leaves a store in which every committed epoch
reads back exactly.

Each process writes only below its own ``rank-NNNNN`` prefix, through a zarr store
rooted there (zarr then never writes the run's root metadata for it); the root
group is written once, by whichever process creates the store, and never again.
Every chunk of every array ends with a crc32c checksum (``capture/checksum.py``). A sequence
layer whose calls had a token mask keeps it in a ``mask`` array aligned with its raw rows
(format 1.2).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from capture.format import (
    ATTRS_KEY,
    BLOCK_COLUMNS,
    CALL_COLUMNS,
    FORMAT_MINOR,
    FORMAT_NAME,
    FORMAT_VERSION,
    STORE_DISTRIBUTIONS,
    CaptureOptions,
    LayerRecord,
    check_format,
    package_versions,
    rank_group_name,
)
from capture.storage import StoreLocation, group_document, located
from capture.write_behind import WriteBehindStore

__all__ = ["RunStoreWriter", "LayerRecord", "package_versions", "make_compressors", "chunk_compressors"]

_ARRAY_CONFIG = {"write_empty_chunks": True}
try:  # runs a coroutine on zarr's event loop (what zarr.Array's own methods use)
    from zarr.core.sync import sync as _sync
except ImportError:  # pragma: no cover - another zarr 3 layout: write the chunks one by one
    _sync = None
_CALL_CHUNK_ROWS = 8192
#: Writes in flight at once on object storage (each holds its encoded chunk).
_PUTS_IN_FLIGHT = 4
_DIMS = {
    "flat": ("sample", "feature"),
    "sequence": ("sample", "time", "feature"),
}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_compressors(compression: Any, typesize: int) -> Any:
    """zarr ``compressors`` for a compression name (``lz4``, ``zstd``, ``none``) or a codec object."""
    if compression is None or compression == "none":
        return None
    if isinstance(compression, str):
        if compression not in ("lz4", "zstd"):
            raise ValueError(
                f"compression: unknown compression {compression!r}; valid values are: lz4, zstd, none, "
                "or a zarr / numcodecs codec"
            )
        return zarr.codecs.BloscCodec(cname=compression, clevel=1, shuffle="shuffle", typesize=typesize)
    return compression


def chunk_compressors(compression: Any = None, typesize: int = 1) -> list[Any]:
    """The bytes-to-bytes codecs of an array this package writes: the compressor, then the checksum.

    The crc32c codec comes last, so it covers the stored bytes (a compressed frame, or the raw
    values) and a reader checks it before decoding anything.
    """
    compressor = make_compressors(compression, typesize)
    codecs = (
        []
        if compressor is None
        else list(compressor)
        if isinstance(compressor, (list, tuple))
        else [compressor]
    )
    if not (codecs and isinstance(codecs[-1], zarr.codecs.Crc32cCodec)):
        codecs.append(zarr.codecs.Crc32cCodec())
    return codecs


def _compressed(array: zarr.Array) -> bool:
    """Whether the array has a compressor (the checksum alone does not count)."""
    return any(not isinstance(c, zarr.codecs.Crc32cCodec) for c in array.compressors)


def conv_dims(ndim: int) -> tuple[str, ...]:
    spatial = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}.get(
        ndim - 2, tuple(f"axis{i}" for i in range(ndim - 2))
    )
    return ("sample", "channel", *spatial)


def _writable(array: zarr.Array) -> zarr.Array:
    """The array with this format's write settings: every chunk is written, even an all-zero one.

    A chunk that holds committed rows then always has a file, so a missing file is damage,
    not a run of zeros (readers check this).
    """
    return array.with_config(_ARRAY_CONFIG)


def _safe(name: str) -> str:
    return name.replace("/", "%2F")


def _refuse_foreign(location: StoreLocation) -> None:
    """Refuse to delete a folder that is not a run store (``overwrite`` must never eat other data)."""
    where = location.location
    if location.is_file():
        raise FileExistsError(f"{where}: exists and is not a directory; refusing to overwrite it")
    if not location.has("zarr.json"):
        raise FileExistsError(f"{where}: exists and is not a zarr store; refusing to overwrite it")
    check_format(location.open_group("r").attrs.asdict(), where)


class _GrowingArray:
    """A zarr array whose first axis grows geometrically; ``length`` is what holds data."""

    def __init__(self, array: zarr.Array, length: int) -> None:
        self.array = array
        self.length = length

    def reserve(self, rows: int) -> None:
        cap = self.array.shape[0]
        if rows > cap:
            new = max(rows, int(cap * 1.5) + 1, 16)
            self.array.resize((new, *self.array.shape[1:]))

    def trim(self, delete_outside: bool = False) -> None:
        """Shrink the array to ``length`` (one metadata write).

        Nothing is ever written beyond ``length``, so the chunks outside are not deleted (on object
        storage a delete request per chunk key): except with ``delete_outside``, which a resumed
        writer uses once to drop what a killed process wrote after its last commit.
        """
        if self.array.shape[0] == self.length:
            return
        shape = (self.length, *self.array.shape[1:])
        if _sync is None or delete_outside:  # zarr's resize deletes the chunks outside
            self.array.resize(shape)
        else:
            _sync(self.array.async_array.resize(shape, delete_outside_chunks=False))


class _RawSink:
    """Writes one layer's rows chunk by chunk; buffers only the rows of a chunk not yet full.

    Whole chunks of an appended batch are written straight from the caller's array, each chunk
    its own zarr write (issued together when uncompressed): zarr then encodes the caller's memory
    as is, while a write of several chunks (or of part of one) costs it a fresh chunk buffer,
    filled, per chunk, and the buffer here a copy (2-4x the write speed; bench/README.md).
    """

    def __init__(self, array: zarr.Array, committed_rows: int) -> None:
        self.grow = _GrowingArray(array, committed_rows)
        self.chunk_rows = int(array.chunks[0])
        self.concurrent = not _compressed(array)
        self.row_shape = tuple(array.shape[1:])
        self.buffer = np.empty((self.chunk_rows, *self.row_shape), dtype=array.dtype)
        # The buffer always starts on a chunk boundary; ``filled`` rows of it hold data.
        self.start = (committed_rows // self.chunk_rows) * self.chunk_rows
        self.filled = committed_rows - self.start
        if self.filled:
            self.buffer[: self.filled] = array[self.start : committed_rows]

    @property
    def next_row(self) -> int:
        return self.start + self.filled

    def append(self, rows: np.ndarray) -> None:
        offset, total, chunk = 0, len(rows), self.chunk_rows
        while offset < total:
            if self.filled == 0 and total - offset >= chunk:
                whole = (total - offset) // chunk * chunk
                self._write(whole, rows[offset : offset + whole])
                self.start += whole
                offset += whole
                continue
            take = min(total - offset, chunk - self.filled)
            self.buffer[self.filled : self.filled + take] = rows[offset : offset + take]
            self.filled += take
            offset += take
            if self.filled == chunk:
                self._write(chunk)
                self.start += chunk
                self.filled = 0

    def _write(self, rows: int, data: np.ndarray | None = None) -> None:
        """Write ``rows`` rows at ``start``: ``data``, or the buffer's first rows."""
        end = self.start + rows
        self.grow.reserve(end)
        src = self.buffer[:rows] if data is None else data
        array, chunk = self.grow.array, self.chunk_rows
        if rows > chunk and rows % chunk == 0:
            parts = [(self.start + o, src[o : o + chunk]) for o in range(0, rows, chunk)]
            if _sync is not None and self.concurrent:
                # Uncompressed: the chunks' file writes overlap (measured +10-40% write speed);
                # compressed chunks are written one after the other (Blosc has its own threads).
                aarray = array.async_array

                async def write_all() -> None:
                    await asyncio.gather(*(aarray.setitem(slice(at, at + chunk), part) for at, part in parts))

                _sync(write_all())
            else:
                for at, part in parts:
                    array[at : at + chunk] = part
        else:
            array[self.start : end] = src
        self.grow.length = max(self.grow.length, end)

    def flush(self) -> None:
        """Write the buffered rows as their whole chunk; keep them in memory for the next epoch.

        The chunk is written whole (zeros after the buffered rows, beyond the committed length):
        zarr then writes it without reading the stored chunk back to merge rows into it (a GET of
        up to a chunk on object storage). Only this rank writes the chunk; the next commit
        rewrites it with more rows, atomically (a rename locally, one PUT on object storage).
        """
        if self.filled == 0:
            return
        self.buffer[self.filled :] = 0
        end = self.start + self.chunk_rows
        self.grow.reserve(end)
        self.grow.array[self.start : end] = self.buffer
        self.grow.length = max(self.grow.length, self.start + self.filled)


class RunStoreWriter:
    """The zarr side of a :class:`capture.Recorder`: arrays, blocks, commits.

    Parameters
    ----------
    path : str or PathLike
        The run store: a local folder or a URL (``s3://bucket/prefix/run.zarr``, any fsspec URL).
    options : CaptureOptions
        Stored in the attributes.
    rank, world_size : int
        This process's part of a multi-process run.
    resume, overwrite : bool
        Continue an existing store / replace it. Without either, an existing store is refused.
    compression : str or codec, optional
        Compression of raw outputs (default ``options.compression``; a codec object, which the
        options only hold as its ``repr``, must be passed here).
    storage_options : dict, optional
        Options of a URL's filesystem (see :func:`capture.storage.open_store`).
    resume_epoch : int, optional
        With ``resume``: drop this group's epochs from ``resume_epoch`` on (see :meth:`_roll_back_to`);
        the epochs dropped are in :attr:`dropped_epochs`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        options: CaptureOptions,
        *,
        rank: int = 0,
        world_size: int = 1,
        resume: bool = False,
        overwrite: bool = False,
        compression: Any = None,
        storage_options: dict[str, Any] | None = None,
        resume_epoch: int | None = None,
    ) -> None:
        self.dropped_epochs: list[int] = []
        self.location = StoreLocation(path, storage_options)
        self.path = self.location.location
        self.options = options
        self.compression = options.compression if compression is None else compression
        self.rank = rank
        self.world_size = world_size
        self.rank_location = self.location.child(rank_group_name(rank))
        try:
            self._prepare(resume, overwrite)
            self.root_meta = self._open_root()
            self._open_rank(resume, resume_epoch)
        except OSError as exc:  # e.g. a missing bucket: say which store
            error = located(exc, self.path)
            if error is exc:
                raise
            raise error from exc
        self.layers: dict[str, LayerRecord] = {
            d["name"]: LayerRecord.from_dict(d) for d in self.state["layers"]
        }
        committed = self.state["committed"]
        self._calls = self._open_calls(int(committed["calls"]))
        self._raw: dict[str, _RawSink] = {}
        self._masks: dict[str, _RawSink] = {}  # token masks, row for row with the raw sinks
        self._gram: dict[str, dict[str, _GrowingArray]] = {}
        for rec in self.layers.values():
            if rec.raw_array:
                rows = int(committed["raw_rows"][rec.name])
                self._raw[rec.name] = self._sink(self.group[rec.raw_array], rows)
                if rec.mask_array:
                    self._masks[rec.name] = self._sink(self.group[rec.mask_array], rows)
            for method, info in rec.gram.items():
                key = f"{rec.name}/{method}"
                blocks = int(committed["gram_blocks"].get(key, 0))
                self._gram[key] = {
                    part: _GrowingArray(_writable(self.group[f"{info['path']}/{part}"]), blocks)
                    for part in ("count", "mean", "m2", "info")
                }
        if self.resumed:  # drop the tail a killed process left: chunks beyond the committed lengths
            for grow in self._growing():
                grow.trim(delete_outside=True)

    def _growing(self) -> list[_GrowingArray]:
        """Every array of this rank that grows."""
        out = [self._calls, *(sink.grow for sink in (*self._raw.values(), *self._masks.values()))]
        return out + [g for arrays in self._gram.values() for g in arrays.values()]

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse an existing store unless resuming or overwriting; delete what ``overwrite`` replaces."""
        # The ranks of a multi-process run share the store: what one rank must not clobber is its own
        # group (another rank may have created the store already). Anything that is not a run store
        # counts as existing.
        shared = self.world_size > 1
        exists = not self.location.is_empty() and (
            not shared or not self.location.has("zarr.json") or not self.rank_location.is_empty()
        )
        if exists and not (resume or overwrite):
            raise FileExistsError(
                f"{self.path}: a run store already exists here; pass resume=True to continue it "
                "or overwrite=True to replace it"
            )
        if exists and overwrite and not resume:
            _refuse_foreign(self.location)
            if not shared:  # a shared store loses only this rank's group (in _open_rank)
                self.location.remove()

    def _open_root(self) -> dict[str, Any]:
        """Create the root group if no process has (its one and only write), and check its format."""
        if not self.location.has("zarr.json"):
            meta = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "format_minor": FORMAT_MINOR,
                "created": _now(),
                "versions": package_versions(STORE_DISTRIBUTIONS),
                "options": self.options.to_dict(),
                "world_size": self.world_size,
            }
            # The group and its attributes in one write, only if it is absent: a process killed here
            # never leaves a zarr group that is not recognisably a run store, and of several ranks
            # creating the store at once one root stays (an equivalent one: only `created` and
            # `versions` can differ).
            self.location.create_if_absent("zarr.json", group_document({ATTRS_KEY: meta}))
        return check_format(self.location.open_group("r").attrs.asdict(), self.path)

    def _open_rank(self, resume: bool, resume_epoch: int | None = None) -> None:
        """Open this rank's group to resume it, or create it afresh (with its state, in one write)."""
        rank_loc = self.rank_location
        group, state = None, None
        if resume and rank_loc.has("zarr.json"):
            group = zarr.open_group(self._rank_store(), mode="r+")
            state = group.attrs.get(ATTRS_KEY)
        # A rank group without its state was being created when its process died: nothing to resume.
        self.resumed = group is not None and isinstance(state, dict)
        if self.resumed:
            self.group = group
            self.state = dict(state)
            self._roll_back()
            if resume_epoch is not None:
                self._roll_back_to(int(resume_epoch))
            return
        if not rank_loc.is_empty():
            rank_loc.remove()
        self.state = {
            "rank": self.rank,
            "world_size": self.world_size,
            "options": self.options.to_dict(),
            "layers": [],
            "epochs_complete": [],
            "epoch_open": None,
            "scalars": {},
            "committed": {"calls": 0, "raw_rows": {}, "gram_blocks": {}},
            "call_counters": {},
            "updated": _now(),
        }
        # The rank group is the root of a store of its own (``<run>/rank-NNNNN``): zarr then writes
        # nothing above it when it creates arrays (no shared object is ever written by a rank).
        self.group = zarr.create_group(self._rank_store(), attributes={ATTRS_KEY: self.state})

    def _sink(self, array: zarr.Array, committed_rows: int) -> _RawSink:
        return _RawSink(_writable(array), committed_rows)

    def _rank_store(self) -> Any:
        """This rank's zarr store, rooted at ``rank-NNNNN/``; on object storage, writes finish behind.

        Several chunk PUTs are then in flight while the next rows arrive; the rank group's
        ``zarr.json`` (every state write, the commit) waits for all of them first.
        """
        store = self.rank_location.store()
        return WriteBehindStore(store, _PUTS_IN_FLIGHT) if self.location.is_url else store

    def _roll_back(self) -> None:
        """Forget what a killed process wrote after its last epoch commit (before resuming).

        Layers first seen in the unfinished epoch and the gram blocks of that epoch (mid-epoch
        flushes are visible to readers) would otherwise be counted twice when it is recorded again.
        """
        committed = self.state["committed"]
        n_layers = committed.get("layers")
        if n_layers is None:  # a store written before ``committed.layers`` existed
            n_calls = int(committed["calls"])
            seen = (
                np.asarray(self.group["calls"][:n_calls])[:, CALL_COLUMNS.index("layer")] if n_calls else []
            )
            n_layers = int(max(seen, default=-1)) + 1
        self.state["layers"] = [d for d in self.state["layers"] if int(d["index"]) < int(n_layers)]
        records = {d["name"]: d for d in self.state["layers"]}
        complete = {int(e) for e in self.state["epochs_complete"]}
        gram_blocks = {}
        for key, blocks in committed["gram_blocks"].items():
            layer, method = key.rsplit("/", 1)
            if layer not in records:
                continue
            keep = int(blocks)
            if keep:
                path = records[layer]["gram"][method]["path"]
                epochs = np.asarray(self.group[f"{path}/info"][:keep])[:, BLOCK_COLUMNS.index("epoch")]
                while keep and int(epochs[keep - 1]) not in complete:
                    keep -= 1
            gram_blocks[key] = keep
        committed["gram_blocks"] = gram_blocks

    def _roll_back_to(self, epoch: int) -> None:
        """Drop the committed epochs from ``epoch`` on (a training resumed from an older checkpoint).

        Epochs are committed in order, so what is kept is a prefix of every array: the calls of the
        epochs before ``epoch``, their raw rows, their gram blocks, the layers first seen in them.
        The new state is written at once, before any data of the resumed epochs overwrites the
        dropped rows: a process killed after this never shows a dropped epoch again.
        """
        self.dropped_epochs = sorted(int(e) for e in self.state["epochs_complete"] if int(e) >= epoch)
        if not self.dropped_epochs:
            return
        committed = self.state["committed"]
        n_calls = int(committed["calls"])
        calls = np.asarray(self.group["calls"][:n_calls]).reshape(n_calls, len(CALL_COLUMNS))
        col = {name: CALL_COLUMNS.index(name) for name in ("epoch", "layer", "first_row", "row_count")}
        kept = calls[calls[:, col["epoch"]] < epoch]
        n_layers = int(kept[:, col["layer"]].max()) + 1 if len(kept) else 0
        layers = [d for d in self.state["layers"] if int(d["index"]) < n_layers]
        index = {d["name"]: int(d["index"]) for d in layers}
        raw_rows = {}
        for name in committed["raw_rows"]:
            mine = kept[(kept[:, col["layer"]] == index.get(name, -1)) & (kept[:, col["first_row"]] >= 0)]
            raw_rows[name] = (
                int((mine[:, col["first_row"]] + mine[:, col["row_count"]]).max()) if len(mine) else 0
            )
        gram_blocks = {}
        for key, blocks in committed["gram_blocks"].items():
            layer, method = key.rsplit("/", 1)
            if layer not in index:
                continue
            path = next(d for d in layers if d["name"] == layer)["gram"][method]["path"]
            epochs = np.asarray(self.group[f"{path}/info"][: int(blocks)])[:, BLOCK_COLUMNS.index("epoch")]
            gram_blocks[key] = int(np.count_nonzero(epochs < epoch))
        self.state["layers"] = layers
        self.state["committed"] = {
            "layers": n_layers,
            "calls": len(kept),
            "raw_rows": {k: v for k, v in raw_rows.items() if k in index},
            "gram_blocks": gram_blocks,
        }
        self.state["epochs_complete"] = [e for e in self.state["epochs_complete"] if int(e) < epoch]
        self.state["epoch_open"] = None
        self.state["scalars"] = {k: v for k, v in self.state["scalars"].items() if int(k) < epoch}
        self.state["updated"] = _now()
        self.group.attrs[ATTRS_KEY] = self.state

    # -- creation ------------------------------------------------------------------------------
    def _open_calls(self, committed: int) -> _GrowingArray:
        if "calls" in self.group:
            return _GrowingArray(_writable(self.group["calls"]), committed)
        arr = self.group.create_array(
            "calls",
            shape=(0, len(CALL_COLUMNS)),
            chunks=(_CALL_CHUNK_ROWS, len(CALL_COLUMNS)),
            dtype="int64",
            fill_value=-1,
            dimension_names=("call", "column"),
            compressors=chunk_compressors(),
            attributes={"columns": list(CALL_COLUMNS)},
            config=_ARRAY_CONFIG,
        )
        return _GrowingArray(arr, committed)

    def add_layer(self, rec: LayerRecord, raw_dtype: str | None, gram_widths: dict[str, int]) -> None:
        """Create the arrays of a newly seen layer."""
        base = f"layers/{_safe(rec.name)}"
        if raw_dtype is not None:
            np_dtype = np.dtype("uint16" if raw_dtype == "bfloat16" else raw_dtype)
            row_bytes = max(1, int(np.prod(rec.sample_shape, dtype=np.int64)) * np_dtype.itemsize)
            chunk_rows = max(1, min(self.options.chunk_bytes // row_bytes, 1 << 20))
            dims = (
                conv_dims(len(rec.sample_shape) + 1)
                if rec.layout == "conv"
                else _DIMS.get(rec.layout, tuple(f"axis{i}" for i in range(len(rec.sample_shape) + 1)))
            )
            path = f"{base}/raw"
            array = self.group.create_array(
                path,
                shape=(0, *rec.sample_shape),
                chunks=(chunk_rows, *rec.sample_shape),
                dtype=np_dtype,
                fill_value=0,
                compressors=chunk_compressors(self.compression, np_dtype.itemsize),
                dimension_names=dims,
                attributes={"stored_dtype": raw_dtype, "layer": rec.name},
                config=_ARRAY_CONFIG,
                overwrite=True,  # arrays a killed process created after its last commit
            )
            rec.raw_array = path
            rec.stored_dtype = raw_dtype
            rec.chunk_rows = chunk_rows
            self._raw[rec.name] = self._sink(array, 0)
        for method, width in gram_widths.items():
            gpath = f"{base}/gram/{method}"
            arrays = {
                "count": ((0,), (1024,), "int64", ("block",)),
                "mean": ((0, width), (1, width), "float64", ("block", "feature")),
                "m2": (
                    (0, width, width),
                    (1, max(1, min(width, (4 * 2**20) // (8 * width))), width),
                    "float64",
                    ("block", "feature", "feature_t"),
                ),
                "info": ((0, len(BLOCK_COLUMNS)), (1024, len(BLOCK_COLUMNS)), "int64", ("block", "column")),
            }
            made = {}
            for part, (shape, chunks, dtype, dims) in arrays.items():
                made[part] = _GrowingArray(
                    self.group.create_array(
                        f"{gpath}/{part}",
                        shape=shape,
                        chunks=chunks,
                        dtype=dtype,
                        fill_value=0,
                        compressors=chunk_compressors(),
                        dimension_names=dims,
                        attributes={"columns": list(BLOCK_COLUMNS)} if part == "info" else None,
                        config=_ARRAY_CONFIG,
                        overwrite=True,
                    ),
                    0,
                )
            self._gram[f"{rec.name}/{method}"] = made
            rec.gram[method] = {"path": gpath, "width": int(width)}
        self.layers[rec.name] = rec

    def add_mask(self, layer: str) -> None:
        """Create the token-mask array of a raw sequence layer (format 1.2), aligned with its raw rows.

        ``(rows, positions)`` uint8, 1 for a token and 0 for padding, chunked as the raw array (mask
        chunk ``k`` holds the rows of raw chunk ``k``). The rows recorded before (calls without a
        mask) are written at once as all tokens, the last partial chunk too: whatever state names
        the array later, it holds every row before its creation.
        """
        rec, raw = self.layers[layer], self._raw[layer]
        positions = int(rec.sample_shape[0])
        path = f"layers/{_safe(layer)}/mask"
        array = self.group.create_array(
            path,
            shape=(0, positions),
            chunks=(raw.chunk_rows, positions),
            dtype="uint8",
            fill_value=1,
            compressors=chunk_compressors(),
            dimension_names=("sample", "time"),
            attributes={"layer": layer},
            config=_ARRAY_CONFIG,
            overwrite=True,  # an array a killed process created after its last commit
        )
        sink = self._sink(array, 0)
        ones = np.ones((raw.chunk_rows, positions), dtype=np.uint8)
        for start in range(0, raw.next_row, raw.chunk_rows):
            sink.append(ones[: min(raw.chunk_rows, raw.next_row - start)])
        sink.flush()
        rec.mask_array = path
        self._masks[layer] = sink

    # -- data ----------------------------------------------------------------------------------
    def raw_next_row(self, layer: str) -> int:
        return self._raw[layer].next_row

    def write_raw(self, layer: str, rows: np.ndarray) -> None:
        self._raw[layer].append(rows)

    def write_mask(self, layer: str, rows: np.ndarray) -> None:
        """Append the token-mask rows (uint8) of the raw rows just written (a layer with :meth:`add_mask`)."""
        self._masks[layer].append(rows)

    def write_gram_block(
        self, layer: str, method: str, info: tuple[int, ...], count: int, mean: np.ndarray, m2: np.ndarray
    ) -> None:
        arrays = self._gram[f"{layer}/{method}"]
        b = arrays["count"].length
        for part, value in (
            ("count", np.asarray([count], dtype=np.int64)),
            ("mean", mean[None]),
            ("m2", m2[None]),
            ("info", np.asarray([info], dtype=np.int64)),
        ):
            g = arrays[part]
            g.reserve(b + 1)
            g.array[b : b + 1] = value
            g.length = b + 1

    def write_calls(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        start = self._calls.length
        self._calls.reserve(start + len(rows))
        self._calls.array[start : start + len(rows)] = rows
        self._calls.length = start + len(rows)

    # -- commits -------------------------------------------------------------------------------
    def _committed(self) -> dict[str, Any]:
        return {
            "layers": len(self.layers),
            "calls": self._calls.length,
            "raw_rows": {name: sink.grow.length for name, sink in self._raw.items()},
            "gram_blocks": {key: arrays["count"].length for key, arrays in self._gram.items()},
        }

    def commit_blocks(self) -> None:
        """Record the gram blocks written so far (mid-epoch progress)."""
        self.state["committed"]["gram_blocks"] = self._committed()["gram_blocks"]
        self._write_state()

    def open_epoch(self, epoch: int) -> None:
        self.state["epoch_open"] = int(epoch)
        self._write_state()

    def commit_epoch(
        self, epoch: int, calls: np.ndarray, scalars: dict[str, Any], call_counters: dict[str, int]
    ) -> None:
        """Flush an epoch's data, write its calls, and mark it complete (the commit point)."""
        for sink in (*self._raw.values(), *self._masks.values()):
            sink.flush()
        self.write_calls(calls)
        for grow in self._growing():
            grow.trim()
        self.state["committed"] = self._committed()
        complete = [e for e in self.state["epochs_complete"] if e != epoch]
        self.state["epochs_complete"] = sorted([*complete, int(epoch)])
        self.state["epoch_open"] = None
        if scalars:
            self.state["scalars"][str(epoch)] = scalars
        self.state["call_counters"] = dict(call_counters)
        self._write_state()

    def _write_state(self) -> None:
        """Write the rank group's state: one write of its ``zarr.json``, the commit point.

        On object storage the rank's store holds this write back until every earlier write is
        stored (``capture/write_behind.py``): what the state names is stored before it.
        """
        self.state["layers"] = [rec.to_dict() for rec in sorted(self.layers.values(), key=lambda r: r.index)]
        self.state["updated"] = _now()
        self.group.attrs[ATTRS_KEY] = self.state
