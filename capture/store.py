"""Reading a run store (format version 1, any minor version): layers, epochs, calls and lazy arrays.

:func:`open_run` only reads metadata; array values are read when indexed. Only
what the rank groups' ``committed`` attributes declare is visible, so a store
that is still being written (or whose writer was killed) reads consistently.
A store is a local folder or a URL (``capture/storage.py``); a chunk whose
checksum fails is reported with its array and index (``capture/checksum.py``).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from capture.buffers import thread_buffer
from capture.checksum import CHECKSUM_BYTES, ChunkChecksumError, has_checksum, read_checked, strip, verify
from capture.chunk_objects import fetch, fetch_ahead
from capture.format import (
    ATTRS_KEY,
    BLOCK_COLUMNS,
    CALL_COLUMNS,
    PHASES,
    CaptureOptions,
    LayerRecord,
    StoreFormatError,
    check_format,
    format_minor,
)
from capture.read_store import forget
from capture.storage import StoreLocation, located, open_store

__all__ = [
    "open_run",
    "RunInfo",
    "RankPart",
    "RawArray",
    "RawChunks",
    "ChunkFiles",
    "GramBlocks",
    "decode_stored",
]

_RANK_GROUP = re.compile(r"rank-\d{5}")  # capture.format.rank_group_name


def decode_stored(values: np.ndarray, stored_dtype: str | None, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values as numpy floats (``bfloat16`` is kept as the upper 16 bits of a float32).

    ``out``: a float32 array of ``values``' shape for the decoded ``bfloat16`` values.
    """
    if stored_dtype == "bfloat16":
        if out is None:
            return (values.astype(np.uint32) << 16).view(np.float32)
        np.left_shift(values, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    return values


@dataclass(frozen=True)
class ChunkFiles:
    """Where the chunk files of a local raw array are and how they are encoded.

    Covers what :class:`capture.Recorder` writes: a zarr v3 array on a local disk, a regular grid
    with one chunk across every axis but the first, the default chunk key encoding, little-endian
    ``bytes``, at most a Blosc compressor, and (format 1.1) a crc32c checksum last (no sharding, no
    other codec). A chunk whose checksum does not match raises
    :class:`capture.checksum.ChunkChecksumError` naming the array and the chunk.
    """

    folder: str
    prefix: str
    suffix: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    blosc: bool
    fill: float
    checksum: bool = False
    array: str = ""
    store: str = ""

    @classmethod
    def of(cls, store: str, array_path: str, chunk_rows: int) -> ChunkFiles | None:
        """The layout of the array ``array_path`` of ``store``; None when zarr must read it."""
        if "://" in store:
            return None
        folder = os.path.join(store, *array_path.split("/"))
        try:
            with open(os.path.join(folder, "zarr.json"), "rb") as f:
                meta = json.load(f)
        except Exception:  # noqa: BLE001 - anything unexpected: let zarr read it
            return None
        return cls.from_metadata(meta, chunk_rows, folder=folder, array=array_path, store=store)

    @classmethod
    def from_metadata(
        cls, meta: Any, chunk_rows: int, *, folder: str, array: str, store: str
    ) -> ChunkFiles | None:
        """The layout an array's ``zarr.json`` (parsed) describes; None when zarr must read the array.

        ``folder`` is where the chunks are (a local folder, or the array's key prefix in an object
        store), ``array`` the array's path and ``store`` the store's path or URL (for messages).
        """
        try:
            shape = [int(s) for s in meta["shape"]]
            grid = meta["chunk_grid"]
            chunks = [int(s) for s in grid["configuration"]["chunk_shape"]]
            keys = meta["chunk_key_encoding"]
            codecs = meta["codecs"]
            dtype = np.dtype(meta["data_type"])
            fill = meta.get("fill_value", 0)
        except Exception:  # noqa: BLE001 - anything unexpected: let zarr read it
            return None
        if (
            meta.get("zarr_format") != 3
            or meta.get("storage_transformers")
            or grid.get("name") != "regular"
            or keys.get("name") != "default"
            or len(shape) < 1
            or len(chunks) != len(shape)
            or chunks[0] != chunk_rows
            or chunks[1:] != shape[1:]
            or dtype.kind not in "fiub"
            or not codecs
            or codecs[0].get("name") != "bytes"
            or (codecs[0].get("configuration") or {}).get("endian", "little") != "little"
            or not isinstance(fill, (int, float))
        ):
            return None
        checksum = has_checksum(codecs)
        compressors = codecs[1 : len(codecs) - checksum]
        if len(compressors) > 1 or any(c.get("name") != "blosc" for c in compressors):
            return None
        sep = (keys.get("configuration") or {}).get("separator", "/")
        return cls(
            folder=folder,
            prefix="c" + sep,
            suffix="".join(sep + "0" for _ in shape[1:]),
            dtype=dtype.newbyteorder("<"),
            row_shape=tuple(shape[1:]),
            blosc=bool(compressors),
            fill=fill,
            checksum=checksum,
            array=array,
            store=store,
        )

    def key(self, chunk: int) -> str:
        """The name of chunk ``chunk`` in the array's folder (``c/3/0/0`` with the default encoding)."""
        return f"{self.prefix}{chunk}{self.suffix}"

    def path(self, chunk: int) -> str:
        """The file of chunk ``chunk`` (it may not exist: a chunk never written)."""
        return os.path.join(self.folder, self.key(chunk))

    def map(self, chunk: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """Chunk ``chunk`` of an uncompressed array, mapped read-only from its file (no copy).

        None for a chunk never written (:meth:`read` gives its fill value). zarr writes a chunk file
        as a new file renamed over the old one, so a mapped file does not shrink under the reader.
        """
        path = self.path(chunk)
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        try:
            f = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if not self.checksum and (size != nbytes or size == 0):
                raise ValueError(f"chunk file {path} holds {size} bytes, not {nbytes}")
            if size == 0:
                raise ChunkChecksumError(
                    f"{self.store}: array {self.array!r}, chunk {chunk}: its file {path} is empty",
                    self.array,
                    chunk,
                )
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapped = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)
        values = self._payload(mapped, chunk, nbytes) if self.checksum else mapped
        return np.frombuffer(values, dtype=self.dtype).reshape(shape)

    def _payload(self, stored: Any, chunk: int, size: int | None = None) -> memoryview:
        """A chunk's stored bytes without their checksum trailer, once the checksum matches."""
        return strip(stored, array=self.array, chunk=chunk, size=size, where=self.store)

    def read(self, chunk: int, out: np.ndarray) -> None:
        """Decode chunk ``chunk`` into ``out`` (the whole chunk, C-contiguous), as zarr would.

        A missing file reads as the fill value, as in zarr. A file of the wrong size, or a Blosc
        frame that does not match the chunk, raises ValueError (zarr read a truncated lz4 chunk
        without an error).
        """
        path = self.path(chunk)
        try:
            f = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:  # never written: zarr reads the fill value
            out[...] = self.fill
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            trailer = CHECKSUM_BYTES if self.checksum else 0
            if not self.blosc:
                if self.checksum and size != out.nbytes + trailer:
                    self._payload(f.read(), chunk, out.nbytes)  # raises: the chunk is truncated or overlong
                if size != out.nbytes + trailer or f.readinto(memoryview(out).cast("B")) != out.nbytes:
                    raise ValueError(f"chunk file {path} holds {size} bytes, not {out.nbytes + trailer}")
                if self.checksum:
                    verify(out, f.read(trailer), array=self.array, chunk=chunk, where=self.store)
                return
            frame = thread_buffer("store.frame", (size,), np.uint8)
            with memoryview(frame) as raw:
                if f.readinto(raw) != size:
                    raise ValueError(f"chunk file {path}: short read")
                _decode_blosc(f"chunk file {path}", self._payload(raw, chunk) if self.checksum else raw, out)

    def decode(self, stored: Any, chunk: int, shape: tuple[int, ...]) -> np.ndarray:
        """Chunk ``chunk`` from its whole stored bytes (an object's content), decoded as zarr would.

        ``None`` (no such object: a chunk never written) gives the fill value. Uncompressed values
        are a read-only view of ``stored`` (no copy); a Blosc frame is decoded into this thread's
        reused chunk buffer. A damaged or truncated chunk raises
        :class:`capture.checksum.ChunkChecksumError` (with a checksum) or ValueError, naming it.
        """
        if stored is None:
            rows = thread_buffer("store.chunk", shape, self.dtype)
            rows[...] = self.fill
            return rows
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        name = f"{self.store}: chunk object {self.array}/{self.key(chunk)}"
        payload = memoryview(stored).cast("B")
        if self.checksum:
            payload = self._payload(payload, chunk, None if self.blosc else nbytes)
        if not self.blosc:
            if len(payload) != nbytes:
                raise ValueError(f"{name} holds {len(payload)} bytes, not {nbytes}")
            return np.frombuffer(payload, dtype=self.dtype).reshape(shape)
        rows = thread_buffer("store.chunk", shape, self.dtype)
        _decode_blosc(name, payload, rows)
        return rows


def _decode_blosc(name: str, raw: memoryview, out: np.ndarray) -> None:
    """Decode a chunk's Blosc frame into ``out``; ``name`` says which chunk (file or object) in errors."""
    from numcodecs import blosc

    # The Blosc header (16 bytes): decoded size at bytes 4-8, frame size at 12-16 (little endian).
    nbytes = int.from_bytes(raw[4:8], "little") if len(raw) >= 16 else -1
    cbytes = int.from_bytes(raw[12:16], "little") if len(raw) >= 16 else -1
    if nbytes != out.nbytes or cbytes != len(raw):
        raise ValueError(
            f"{name}: a Blosc frame of {cbytes} bytes decoding to {nbytes} in a file of {len(raw)} "
            f"bytes, for a chunk of {out.nbytes}"
        )
    blosc.decompress(raw, out)


@dataclass(frozen=True)
class RawChunks:
    """The read side of one raw array, chunk by chunk: what the reduction reads.

    Small and picklable (the store's path or URL, its storage options and sizes), so that a task
    of any scheduler can carry it; the process that reads opens the store itself. Chunk files of a
    local array written by the Recorder (:class:`ChunkFiles`) are read with plain file reads into a
    reused buffer; chunk objects of such an array at a URL are fetched whole, a few ahead
    (:func:`capture.chunk_objects.fetch_ahead`), and decoded by the same decoder
    (:meth:`ChunkFiles.decode`); any other array is read through zarr. The values are the same.
    """

    store: str
    array_path: str
    rows: int
    chunk_rows: int
    stored_dtype: str = "float32"
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows) if self.rows else 0

    def files(self) -> ChunkFiles | None:
        """The chunk files, when they can be read as plain files (None: zarr reads them)."""
        return ChunkFiles.of(self.store, self.array_path, self.chunk_rows)

    def chunks(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(chunk, first row, rows)`` of each chunk in ``[lo, hi)`` holding committed rows, decoded.

        The rows of a chunk are read-only and valid until the next chunk is read (they live in this
        thread's reused buffer, in the chunk's mapped file, or in the fetched object), so that a
        pass over a large local array touches no fresh memory.

        Examples
        --------
        >>> import tempfile, zarr
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     z = zarr.create_array(f"{tmp}/a.zarr", shape=(5, 2), chunks=(2, 2), dtype="float32")
        ...     z[:] = np.arange(10).reshape(5, 2)
        ...     got = [(c, r, x.tolist()) for c, r, x in RawChunks(f"{tmp}/a.zarr", "", 5, 2).chunks()]
        >>> got[-1]
        (2, 4, [[8.0, 9.0]])
        """
        hi = self.n_chunks if hi is None else min(hi, self.n_chunks)
        location = StoreLocation(self.store, self.storage_options)
        if location.is_url:
            yield from self._object_chunks(lo, hi)
            return
        files = self.files()
        if files is None:
            yield from self._zarr_chunks(self.store, lo, hi)
            return
        shape = (self.chunk_rows, *files.row_shape)
        mapped = not files.blosc and self.stored_dtype != "bfloat16"
        for chunk in range(lo, hi):
            rows = files.map(chunk, shape) if mapped else None
            if rows is None:
                rows = thread_buffer("store.chunk", shape, files.dtype)
                files.read(chunk, rows)
                rows.flags.writeable = False
            yield self._committed(chunk, rows)
            del rows

    def _committed(self, chunk: int, rows: np.ndarray) -> tuple[int, int, np.ndarray]:
        """``(chunk, first row, its committed rows decoded)`` of a whole chunk's stored rows."""
        c0 = chunk * self.chunk_rows
        n = min(self.chunk_rows, self.rows - c0)
        decoded = None
        if self.stored_dtype == "bfloat16":
            decoded = thread_buffer("store.decoded", rows.shape, np.float32)[:n]
        return chunk, c0, decode_stored(rows[:n], self.stored_dtype, out=decoded)

    def _object_chunks(self, lo: int, hi: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """The chunks of an array at a URL: whole objects fetched ahead, decoded without zarr.

        The store is opened here, in the process that reads (:func:`capture.storage.open_store`).
        """
        if hi <= lo:
            return
        prefix = f"{self.array_path}/" if self.array_path else ""
        store = open_store(self.store, self.storage_options or None, read_only=True)
        try:
            meta = fetch(store, f"{prefix}zarr.json")
        except Exception as exc:  # noqa: BLE001 - an ObjectStore that fails: s3fs's store instead
            forget(self.store, self.storage_options, exc)
            store = open_store(self.store, self.storage_options or None, read_only=True)
            meta = fetch(store, f"{prefix}zarr.json")
        try:
            parsed = None if meta is None else json.loads(meta.tobytes())
        except ValueError:
            parsed = None
        layout = (
            None
            if parsed is None
            else ChunkFiles.from_metadata(
                parsed, self.chunk_rows, folder=self.array_path, array=self.array_path, store=self.store
            )
        )
        if layout is None:
            yield from self._zarr_chunks(store, lo, hi)
            return
        shape = (self.chunk_rows, *layout.row_shape)
        keys = [f"{prefix}{layout.key(chunk)}" for chunk in range(lo, hi)]
        for chunk, stored in zip(range(lo, hi), fetch_ahead(store, keys), strict=True):
            rows = layout.decode(stored, chunk, shape)
            rows.flags.writeable = False
            yield self._committed(chunk, rows)
            del rows, stored

    def _zarr_chunks(self, store: Any, lo: int, hi: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """The chunks of any other array, read through zarr (one read of ``[lo, hi)``)."""
        r = self.chunk_rows
        start, stop = lo * r, min(hi * r, self.rows)
        if stop <= start:
            return
        array = zarr.open_array(store, path=self.array_path, mode="r")
        data = decode_stored(read_checked(array, slice(start, stop), self.store), self.stored_dtype)
        for chunk in range(lo, hi):
            c0, c1 = chunk * r, min((chunk + 1) * r, self.rows)
            yield chunk, c0, data[c0 - start : c1 - start]


@dataclass
class RawArray:
    """A lazy view of one layer's raw outputs in one rank group: rows ``[0, rows)`` are valid."""

    array: zarr.Array
    rows: int
    stored_dtype: str
    #: The run store's path or URL and its storage options (what :meth:`reader` needs to reopen it).
    store: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.stored_dtype == "bfloat16" else self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def chunk_rows(self) -> int:
        return int(self.array.chunks[0])

    def reader(self) -> RawChunks:
        """Its chunk-by-chunk reader (:class:`RawChunks`)."""
        where = self.store
        if not where:
            store = self.array.store_path.store
            root = getattr(store, "root", None)
            where = os.fspath(root) if root is not None else str(store)
        return RawChunks(
            where, self.array.path, self.rows, self.chunk_rows, self.stored_dtype, dict(self.storage_options)
        )

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as numpy (decoded)."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) outside the committed [0, {self.rows})")
        return decode_stored(read_checked(self.array, slice(start, stop)), self.stored_dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.rows)
            return self.read(start, stop)[::step]
        if isinstance(key, tuple) and key and isinstance(key[0], slice):
            start, stop, step = key[0].indices(self.rows)
            return self.read(start, stop)[(slice(None, None, step), *key[1:])]
        raise TypeError("RawArray supports slicing along the sample axis only")


@dataclass
class GramBlocks:
    """The committed moment blocks of one (layer, reduction method) in one rank group."""

    count: zarr.Array
    mean: zarr.Array
    m2: zarr.Array
    info: np.ndarray  # (blocks, len(BLOCK_COLUMNS)) int64
    width: int

    @property
    def blocks(self) -> int:
        return int(self.info.shape[0])

    def info_column(self, name: str) -> np.ndarray:
        return self.info[:, BLOCK_COLUMNS.index(name)]

    def read(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Block ``index`` as ``(count, mean, m2)``."""
        count, mean, m2 = (read_checked(a, index) for a in (self.count, self.mean, self.m2))
        return int(count), mean, m2


@dataclass
class RankPart:
    """One process's group of a run."""

    rank: int
    group: zarr.Group
    state: dict[str, Any]
    layers: dict[str, LayerRecord]
    calls: np.ndarray  # committed calls, (n, len(CALL_COLUMNS)) int64, layer column rank-local
    #: The run store's path or URL and its storage options (as :class:`RunInfo` has them).
    store: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def epochs_complete(self) -> list[int]:
        return [int(e) for e in self.state["epochs_complete"]]

    @property
    def epoch_open(self) -> int | None:
        e = self.state.get("epoch_open")
        return None if e is None else int(e)

    def raw(self, layer: str) -> RawArray:
        rec = self.layers[layer]
        if not rec.raw_array:
            raise KeyError(layer)
        rows = int(self.state["committed"]["raw_rows"].get(layer, 0))
        return RawArray(
            self.group[rec.raw_array], rows, rec.stored_dtype or "float32", self.store, self.storage_options
        )

    def mask(self, layer: str) -> RawArray | None:
        """The layer's token masks (format 1.2): ``(rows, positions)`` uint8 row for row with :meth:`raw`.

        1 marks a token, 0 padding. None when none of the layer's calls had a mask (every position
        is a token).
        """
        rec = self.layers[layer]
        if not rec.mask_array:
            return None
        rows = int(self.state["committed"]["raw_rows"].get(layer, 0))
        return RawArray(self.group[rec.mask_array], rows, "uint8")

    def gram(self, layer: str, method: str) -> GramBlocks:
        rec = self.layers[layer]
        if method not in rec.gram:
            raise KeyError(f"{layer}/{method}")
        blocks = int(self.state["committed"]["gram_blocks"].get(f"{layer}/{method}", 0))
        base = rec.gram[method]["path"]
        info = read_checked(self.group[f"{base}/info"], slice(0, blocks)).reshape(blocks, len(BLOCK_COLUMNS))
        return GramBlocks(
            self.group[f"{base}/count"],
            self.group[f"{base}/mean"],
            self.group[f"{base}/m2"],
            info,
            int(rec.gram[method]["width"]),
        )


@dataclass
class RunInfo:
    """What a run store holds. Returned by :func:`open_run`.

    Attributes
    ----------
    path : str
        The store: a local path or a URL.
    meta : dict
        The root attributes of this package (format, version, minor version, creation time, versions,
        options; ``model`` in minor-0 stores, see :attr:`model`).
    options : CaptureOptions
        How the run was captured.
    ranks : list of RankPart
        One part per process that wrote the run.
    layers : list of str
        Layer names in first-seen order.
    epochs : list of int
        Epochs complete in every rank.
    incomplete_epoch : int or None
        An epoch that was started but not committed (a crash, or capture still running).
    scalars : dict
        ``epoch -> {name: value}`` from ``Recorder.add_scalar`` (rank 0's).
    storage_options : dict
        The options the store was opened with (a URL's filesystem options; empty for a path).
    """

    path: str
    meta: dict[str, Any]
    options: CaptureOptions
    ranks: list[RankPart]
    layers: list[str]
    epochs: list[int]
    incomplete_epoch: int | None
    scalars: dict[int, dict[str, Any]] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def format_minor(self) -> int:
        """The store's minor format version (0 for stores written before minor versions existed)."""
        return format_minor(self.meta)

    @property
    def model(self) -> list[dict[str, Any]]:
        """The recorded layers in first-seen order, as the minor-0 root attribute ``model`` listed them.

        Each: ``name``, ``type``, ``kind``, ``layout``, ``sample_shape``, ``source_dtype``. Read from
        the rank groups (every minor version has them); the root is written once, before any layer
        is seen, so from minor 1 it has no ``model``.
        """
        fields = ("name", "type", "kind", "layout", "sample_shape", "source_dtype")
        return [{k: self.layer(name).to_dict()[k] for k in fields} for name in self.layers]

    def store(self) -> Any:
        """A read-only zarr store of this run (a new one per call; :func:`capture.storage.open_store`)."""
        return StoreLocation(self.path, self.storage_options).store(read_only=True)

    @property
    def modes(self) -> tuple[str, ...]:
        mode = self.options.mode
        return ("raw", "gram") if mode == "both" else (mode,)

    def layer(self, name: str) -> LayerRecord:
        """The layer's record (from the first rank that saw it)."""
        for part in self.ranks:
            if name in part.layers:
                return part.layers[name]
        raise KeyError(
            f"{self.path}: no layer {name!r} in this run; layers are: {', '.join(self.layers) or '(none)'}"
        )

    def calls(self) -> dict[str, np.ndarray]:
        """Every committed call of every rank as columns (``CALL_COLUMNS`` plus ``rank``).

        The ``layer`` column holds the run-wide index into :attr:`layers`.
        """
        parts = []
        for part in self.ranks:
            if len(part.calls) == 0:
                continue
            local = {rec.index: self.layers.index(name) for name, rec in part.layers.items()}
            calls = part.calls.copy()
            calls[:, CALL_COLUMNS.index("layer")] = [
                local[int(i)] for i in calls[:, CALL_COLUMNS.index("layer")]
            ]
            parts.append(np.column_stack([calls, np.full(len(calls), part.rank, dtype=np.int64)]))
        table = np.concatenate(parts) if parts else np.zeros((0, len(CALL_COLUMNS) + 1), dtype=np.int64)
        names = (*CALL_COLUMNS, "rank")
        return {name: table[:, i] for i, name in enumerate(names)}

    def samples(self) -> dict[tuple[int, str, str], int]:
        """Recorded samples (dim-0 rows) per ``(epoch, phase, layer)`` over all ranks."""
        calls = self.calls()
        out: dict[tuple[int, str, str], int] = {}
        for e, p, li, n in zip(
            calls["epoch"], calls["phase"], calls["layer"], calls["row_count"], strict=True
        ):
            key = (int(e), PHASES[int(p)], self.layers[int(li)])
            out[key] = out.get(key, 0) + int(n)
        return out

    def phases(self) -> list[str]:
        present = {PHASES[int(p)] for p in self.calls()["phase"]}
        return [p for p in PHASES if p in present]

    def nbytes(self) -> int:
        """Bytes stored under the run (on disk, or in the object store)."""
        return StoreLocation(self.path, self.storage_options).nbytes()


def open_run(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> RunInfo:
    """Open a run store written by :class:`capture.Recorder` (metadata only).

    Parameters
    ----------
    path : str or PathLike
        The store: a directory, or a URL (``s3://bucket/prefix/run.zarr``, any fsspec URL).
    storage_options : dict, optional
        Options of a URL's filesystem (see :func:`capture.storage.open_store`).

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    StoreFormatError
        ``path`` holds something else, or a newer major format version.
    """
    location = StoreLocation(path, storage_options)
    where = location.location
    try:
        absent = not location.has("zarr.json") and (
            location.is_empty() if location.is_url else not Path(where).exists()
        )
    except FileNotFoundError as exc:  # a missing bucket
        raise FileNotFoundError(f"{where}: no run store here ({exc})") from exc
    except OSError as exc:  # credentials, network: say which store
        raise located(exc, where) from exc
    if absent:
        raise FileNotFoundError(f"{where}: no run store here")
    try:
        root = zarr.open_group(location.store(read_only=True), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several kinds
        raise StoreFormatError(f"{where}: not a zarr v3 group ({exc})") from exc
    meta = check_format(root.attrs.asdict(), where)
    ranks = []
    # The rank groups are looked up by name, not by listing the root's members: a killed write leaves
    # zarr's temporary file (``zarr.<id>.partial``) or a rank folder without its metadata, which zarr's
    # member listing reports with a warning (an error under a strict warnings filter).
    names = [name for name in location.names() if _RANK_GROUP.fullmatch(name)]
    for name in names:
        try:
            group = root[name]
        except KeyError:  # its folder, but not yet its metadata: the rank died before its first write
            continue
        except Exception as exc:  # noqa: BLE001 - a damaged member's metadata: say where, in one line
            raise StoreFormatError(
                f"{where}: unreadable group metadata ({type(exc).__name__}: {exc})"
            ) from exc
        state = group.attrs.get(ATTRS_KEY)
        if not isinstance(state, dict):
            raise StoreFormatError(f"{where}/{name}: a rank group without its {ATTRS_KEY!r} attribute")
        try:
            layers = {d["name"]: LayerRecord.from_dict(d) for d in state["layers"]}
            n_calls = int(state["committed"]["calls"])
            calls = (
                read_checked(group["calls"], slice(0, n_calls)).reshape(n_calls, len(CALL_COLUMNS))
                if n_calls
                else np.zeros((0, len(CALL_COLUMNS)), dtype=np.int64)
            )
        except Exception as exc:  # noqa: BLE001 - a missing or damaged calls array, a mangled state
            raise StoreFormatError(
                f"{where}/{name}: its state or its calls array cannot be read ({type(exc).__name__}: {exc})"
            ) from exc
        ranks.append(
            RankPart(int(state["rank"]), group, state, layers, calls, where, dict(location.storage_options))
        )
    layer_names: list[str] = []
    for part in ranks:
        for rec in sorted(part.layers.values(), key=lambda r: r.index):
            if rec.name not in layer_names:
                layer_names.append(rec.name)
    # An epoch is complete when every rank of the run committed it: a rank that has not written its
    # group yet (it starts later, or died before its first commit) has completed nothing.
    world_size = max([int(meta.get("world_size", 1))] + [int(p.state.get("world_size", 1)) for p in ranks])
    present = {p.rank for p in ranks}
    complete_sets = [set(p.epochs_complete) for p in ranks]
    complete_sets += [set() for r in range(world_size) if r not in present]
    epochs = sorted(set.intersection(*complete_sets)) if complete_sets else []
    partial = sorted(set.union(*complete_sets) - set(epochs)) if complete_sets else []
    opened = [p.epoch_open for p in ranks if p.epoch_open is not None]
    incomplete = min(partial + opened) if (partial or opened) else None
    scalars: dict[int, dict[str, Any]] = {}
    for part in reversed(ranks):  # rank 0 wins
        for e, values in part.state.get("scalars", {}).items():
            if int(e) in epochs:
                scalars.setdefault(int(e), {}).update(values)
    options = CaptureOptions.from_dict(meta.get("options", {}))
    return RunInfo(
        where,
        meta,
        options,
        ranks,
        layer_names,
        epochs,
        incomplete,
        dict(sorted(scalars.items())),
        dict(location.storage_options),
    )
