"""The crc32c checksum behind every stored chunk (format 1.1): verify it, strip it, name a damaged chunk.

Stores of format minor 1 and later end every array's codec chain with zarr v3's ``crc32c``
codec: a chunk's stored bytes are its encoded bytes (raw, or a Blosc frame) followed by the
4-byte little-endian crc32c (Castagnoli) of those bytes. zarr checks it on every read, but says
neither which array nor which chunk failed; this module does.

- A reader that decodes chunk bytes itself (without zarr) calls :func:`strip` (or
  :func:`verify`) on each chunk's stored bytes before decoding them.
- A reader that reads through zarr calls :func:`read_checked` (or :func:`locate_damage` after a
  failed read) to turn zarr's anonymous error into a :class:`ChunkChecksumError`.

Examples
--------
>>> import numpy as np
>>> payload = np.arange(4, dtype="<f4").tobytes()
>>> stored = payload + checksum_trailer(payload)
>>> bytes(strip(stored, array="rank-00000/layers/fc/raw", chunk=0, size=16)) == payload
True
>>> damaged = b"\\x01" + stored[1:]
>>> strip(damaged, array="rank-00000/layers/fc/raw", chunk=2)
Traceback (most recent call last):
...
capture.checksum.ChunkChecksumError: array 'rank-00000/layers/fc/raw', chunk 2: stored checksum 0x... does not match the chunk's bytes (crc32c 0x...): the chunk is damaged
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import google_crc32c
import numpy as np
import zarr

__all__ = [
    "CHECKSUM_BYTES",
    "CODEC_NAME",
    "ChunkChecksumError",
    "crc32c",
    "checksum_trailer",
    "has_checksum",
    "verify",
    "strip",
    "locate_damage",
    "read_checked",
]

#: Bytes of the trailer that zarr's ``crc32c`` codec appends to a chunk.
CHECKSUM_BYTES = 4
#: The codec's name in an array's ``zarr.json`` (``{"name": "crc32c"}``).
CODEC_NAME = "crc32c"

Chunk = int | tuple[int, ...]


class ChunkChecksumError(ValueError):
    """A stored chunk is damaged or truncated; ``array`` and ``chunk`` say which one.

    Attributes
    ----------
    array : str
        The array's path in the store (``rank-00000/layers/conv/raw``).
    chunk : int or tuple of int
        The chunk's index (an int for a chunk along the first axis of a raw array, else its grid
        coordinates).
    """

    def __init__(self, message: str, array: str, chunk: Chunk) -> None:
        super().__init__(message)
        self.array = array
        self.chunk = chunk


def _describe(chunk: Chunk) -> str:
    if isinstance(chunk, tuple):
        return str(chunk[0]) if len(chunk) == 1 else str(tuple(int(c) for c in chunk))
    return str(int(chunk))


def crc32c(data: Any) -> int:
    """The crc32c (Castagnoli) of a bytes-like object, as zarr's ``crc32c`` codec computes it."""
    # google_crc32c takes bytes or a numpy array (not a memoryview): view the bytes, no copy.
    if not isinstance(data, (bytes, np.ndarray)):
        data = np.frombuffer(data, dtype=np.uint8)
    elif isinstance(data, np.ndarray) and (data.dtype != np.uint8 or data.ndim != 1):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return int(google_crc32c.value(data))


def checksum_trailer(data: Any) -> bytes:
    """The 4 bytes zarr's ``crc32c`` codec appends to ``data`` (its crc32c, little endian)."""
    return crc32c(data).to_bytes(CHECKSUM_BYTES, "little")


def has_checksum(codecs: Sequence[dict[str, Any]]) -> bool:
    """Whether an array's codec list (``zarr.json``'s ``codecs``) ends with the crc32c codec.

    Only a checksum that is the last codec covers the stored bytes as a whole; that is where
    this package puts it (behind the compressor, when there is one).
    """
    return bool(codecs) and codecs[-1].get("name") == CODEC_NAME


def verify(payload: Any, trailer: Any, *, array: str, chunk: Chunk, where: str = "") -> None:
    """Check a chunk's bytes against the 4-byte crc32c trailer stored behind them.

    Parameters
    ----------
    payload : bytes-like
        The stored bytes before the trailer (raw values, or a compressor's frame).
    trailer : bytes-like
        The last 4 stored bytes.
    array, chunk :
        The array's path in the store and the chunk's index, for the message.
    where : str
        The store's path or URL, for the message.

    Raises
    ------
    ChunkChecksumError
        When the trailer is short or does not match.
    """
    prefix = f"{where}: " if where else ""
    stored = bytes(trailer)
    if len(stored) != CHECKSUM_BYTES:
        raise ChunkChecksumError(
            f"{prefix}array {array!r}, chunk {_describe(chunk)}: the chunk is truncated "
            f"(its {CHECKSUM_BYTES}-byte checksum is missing)",
            array,
            chunk,
        )
    computed = crc32c(payload)
    if int.from_bytes(stored, "little") != computed:
        raise ChunkChecksumError(
            f"{prefix}array {array!r}, chunk {_describe(chunk)}: stored checksum "
            f"0x{int.from_bytes(stored, 'little'):08x} does not match the chunk's bytes "
            f"(crc32c 0x{computed:08x}): the chunk is damaged",
            array,
            chunk,
        )


def strip(data: Any, *, array: str, chunk: Chunk, size: int | None = None, where: str = "") -> memoryview:
    """Verify a chunk's stored bytes and return them without the checksum trailer (no copy).

    Parameters
    ----------
    data : bytes-like
        The chunk's stored bytes (a file's or an object's whole content).
    array, chunk :
        The array's path in the store and the chunk's index, for the message.
    size : int, optional
        The bytes expected before the trailer (an uncompressed chunk's decoded size); a chunk of
        another length is reported as truncated (or overlong) without computing its checksum.
    where : str
        The store's path or URL, for the message.

    Raises
    ------
    ChunkChecksumError
        When the chunk has the wrong length or its checksum does not match.
    """
    view = memoryview(data).cast("B")
    if size is not None and len(view) != size + CHECKSUM_BYTES:
        prefix = f"{where}: " if where else ""
        raise ChunkChecksumError(
            f"{prefix}array {array!r}, chunk {_describe(chunk)}: the chunk holds {len(view)} bytes, "
            f"not {size + CHECKSUM_BYTES} ({size} of data and a {CHECKSUM_BYTES}-byte checksum): "
            "it is truncated or damaged",
            array,
            chunk,
        )
    if len(view) < CHECKSUM_BYTES:
        verify(b"", view, array=array, chunk=chunk, where=where)
    payload = view[: len(view) - CHECKSUM_BYTES]
    verify(payload, view[len(view) - CHECKSUM_BYTES :], array=array, chunk=chunk, where=where)
    return payload


def _chunk_range(array: zarr.Array, axis0: tuple[int, int] | None) -> list[tuple[int, ...]]:
    grid = tuple(int(n) for n in array.cdata_shape)
    if not grid or any(n == 0 for n in grid):
        return []
    lo, hi = 0, grid[0]
    if axis0 is not None:
        rows = int(array.chunks[0])
        lo = max(0, axis0[0] // rows)
        hi = min(grid[0], -(-axis0[1] // rows))
    return [(i, *rest) for i in range(lo, hi) for rest in np.ndindex(*grid[1:])]


def locate_damage(
    array: zarr.Array, rows: tuple[int, int] | None = None, where: str = ""
) -> ChunkChecksumError | None:
    """Find the first chunk of ``array`` that zarr cannot decode (after a failed read).

    Each chunk in the range is read alone through zarr, so the error names its array and index.

    Parameters
    ----------
    array : zarr.Array
        The array whose read failed.
    rows : (start, stop), optional
        The rows (first axis) of the failed read; the whole array when omitted.
    where : str
        The store's path or URL, for the message.

    Returns
    -------
    ChunkChecksumError or None
        The error naming the first damaged chunk (its ``__cause__`` is zarr's error), or None when
        every chunk decodes.
    """
    prefix = f"{where}: " if where else ""
    for coords in _chunk_range(array, rows):
        try:
            array.blocks[coords]
        except Exception as exc:  # noqa: BLE001 - any decoding failure of this one chunk is damage
            chunk: Chunk = coords[0] if not any(coords[1:]) else coords
            key = (
                array.metadata.encode_chunk_key(coords) if hasattr(array.metadata, "encode_chunk_key") else ""
            )
            error = ChunkChecksumError(
                f"{prefix}array {array.path!r}, chunk {_describe(chunk)}"
                + (f" (object {array.path}/{key})" if key else "")
                + f" is damaged: {type(exc).__name__}: {exc}",
                array.path,
                chunk,
            )
            error.__cause__ = exc
            return error
    return None


def read_checked(array: zarr.Array, selection: Any = slice(None), where: str = "") -> np.ndarray:
    """``array[selection]``; a chunk that fails to decode is reported by array path and chunk index.

    Parameters
    ----------
    array : zarr.Array
        The array to read.
    selection :
        A basic zarr selection; its first element (a slice or an int) bounds the chunks searched
        when the read fails.
    where : str
        The store's path or URL, for the message.

    Raises
    ------
    ChunkChecksumError
        When a chunk in the selection is damaged or truncated.
    """
    try:
        return np.asarray(array[selection])
    except Exception as exc:
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        rows = None
        n = int(array.shape[0]) if array.ndim else 0
        if isinstance(first, slice):
            start, stop, _ = first.indices(n)
            rows = (start, stop)
        elif isinstance(first, (int, np.integer)):
            rows = (int(first) % max(n, 1), int(first) % max(n, 1) + 1)
        error = locate_damage(array, rows, where)
        if error is None:
            raise
        raise error from exc
