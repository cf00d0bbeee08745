"""The run store format, version 1 (minor 2): names, columns, options and version checks.

This module is the contract between capture and analysis; ``docs/store-format.md``
documents it. Anything that changes how an existing store must be read raises
:data:`FORMAT_VERSION` (the major version); readers refuse stores of a newer one. Additions
that readers of the same major version can use or ignore raise :data:`FORMAT_MINOR`; readers
accept every minor version of their major version.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FORMAT_MINOR",
    "MINOR_FEATURES",
    "ATTRS_KEY",
    "PHASES",
    "CALL_COLUMNS",
    "BLOCK_COLUMNS",
    "BLOCK_KIND_EPOCH",
    "BLOCK_KIND_LAST_CALL",
    "MODES",
    "STORAGE_DTYPES",
    "StoreFormatError",
    "CaptureOptions",
    "rank_group_name",
    "check_format",
    "format_minor",
    "LayerRecord",
    "STORE_DISTRIBUTIONS",
    "package_versions",
]

FORMAT_NAME = "delve-pipeline.run"
FORMAT_VERSION = 1
#: Minor version written by this package; a store without ``format_minor`` is minor 0.
FORMAT_MINOR = 2
#: What each minor version of major version 1 added (``docs/store-format.md``, *Versioning*).
MINOR_FEATURES = {
    0: "the first format",
    1: "a crc32c checksum behind every chunk of every array; the root group is written once, "
    "at creation (no 'model' attribute: it is derived from the rank groups)",
    2: "token masks: a sequence layer whose calls had a token mask (padding) keeps it in a 'mask' "
    "array next to its raw outputs, one row per raw row (its record's 'mask_array')",
}
#: Key under which this package keeps its attributes in every group it writes.
ATTRS_KEY = "delve_pipeline"

PHASES = ("train", "eval")
MODES = ("raw", "gram", "both")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")

#: Columns of the ``calls`` array: one row per recorded forward call.
CALL_COLUMNS = ("epoch", "phase", "layer", "call_index", "first_row", "row_count", "nonfinite_rows")
#: Columns of a gram ``info`` array: one row per stored block of moments.
BLOCK_COLUMNS = ("epoch", "phase", "kind", "first_call", "last_call", "sample_rows", "nonfinite_rows")
#: ``kind`` of a block: a block of the epoch's moments, or the moments of the last recorded call alone.
BLOCK_KIND_EPOCH = 0
BLOCK_KIND_LAST_CALL = 1


#: Distributions whose versions a run store records (``versions`` attribute): they shape its numbers.
STORE_DISTRIBUTIONS = ("delve-pipeline", "torch", "zarr", "numcodecs", "numpy")


def package_versions(distributions: Iterable[str]) -> dict[str, str]:
    """Installed versions of ``distributions`` (``"python"`` names the interpreter).

    A distribution that is not installed maps to ``"not installed"``. This is the one version
    collector of the project: run stores and every ``provenance.json`` use it.

    Examples
    --------
    >>> versions = package_versions(["python", "numpy", "no-such-distribution"])
    >>> sorted(versions), versions["no-such-distribution"]
    (['no-such-distribution', 'numpy', 'python'], 'not installed')
    """
    out = {}
    for dist in distributions:
        if dist == "python":
            out[dist] = platform.python_version()
            continue
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class StoreFormatError(ValueError):
    """A path is not a run store of a format and version this package can read."""


def rank_group_name(rank: int) -> str:
    """Name of the group that process ``rank`` writes (``rank-00000``)."""
    return f"rank-{rank:05d}"


@dataclass(frozen=True)
class CaptureOptions:
    """What a :class:`capture.Recorder` records; stored in the run's attributes.

    Parameters mirror :class:`capture.Recorder`; see its docstring.
    """

    mode: str = "raw"
    dtype: str = "float32"
    interpolation: str | None = None
    downsample: int | None = None
    compression: str = "none"
    conv_methods: tuple[str, ...] = ("channelwise",)
    timeseries_methods: tuple[str, ...] = ("last_timestep",)
    log_interval: int = 1
    max_samples: int | None = None
    gram_block_rows: int = 65536
    chunk_bytes: int = 16 * 2**20
    layers: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptureOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def check_format(attrs: dict[str, Any], where: str) -> dict[str, Any]:
    """Return this package's root attributes, or raise :class:`StoreFormatError`.

    Every minor version of this package's major version is accepted; a newer major version is
    refused.

    Parameters
    ----------
    attrs : dict
        The root group's attributes.
    where : str
        The store path or URL, for the message.

    Examples
    --------
    >>> meta = {"format": FORMAT_NAME, "format_version": 1, "format_minor": 7}
    >>> check_format({ATTRS_KEY: meta}, "run.zarr")["format_minor"]
    7
    >>> check_format({ATTRS_KEY: {**meta, "format_version": 2}}, "run.zarr")
    Traceback (most recent call last):
    ...
    capture.format.StoreFormatError: run.zarr: store format version 2 is newer than this package reads (version 1); upgrade delve-pipeline
    """
    meta = attrs.get(ATTRS_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{where}: not a delve-pipeline run store (no {ATTRS_KEY!r} format attribute)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreFormatError(f"{where}: the store's format version {version!r} is not a number")
    minor = meta.get("format_minor", 0)
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
        raise StoreFormatError(f"{where}: the store's format minor version {minor!r} is not a number")
    if version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{where}: store format version {version} is newer than this package reads "
            f"(version {FORMAT_VERSION}); upgrade delve-pipeline"
        )
    return meta


def format_minor(meta: dict[str, Any]) -> int:
    """The minor format version of a store's root attributes (0 when the store predates minors)."""
    return int(meta.get("format_minor", 0))


@dataclass
class LayerRecord:
    """What the store says about one recorded layer (an entry of the ``layers`` attribute)."""

    name: str
    index: int
    type: str
    kind: str
    layout: str
    sample_shape: tuple[int, ...]
    source_dtype: str
    stored_dtype: str | None = None
    raw_array: str | None = None
    chunk_rows: int | None = None
    gram: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Path of the token-mask array ``(rows, positions)`` uint8 aligned with the raw rows (format 1.2;
    #: None: every stored position is a token).
    mask_array: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "index": self.index,
            "type": self.type,
            "kind": self.kind,
            "layout": self.layout,
            "sample_shape": list(self.sample_shape),
            "source_dtype": self.source_dtype,
            "stored_dtype": self.stored_dtype,
            "raw_array": self.raw_array,
            "chunk_rows": self.chunk_rows,
            "gram": self.gram,
        }
        if self.mask_array is not None:  # absent without masks: such a record reads as in format 1.1
            out["mask_array"] = self.mask_array
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        return cls(
            name=d["name"],
            index=int(d["index"]),
            type=d["type"],
            kind=d["kind"],
            layout=d["layout"],
            sample_shape=tuple(d["sample_shape"]),
            source_dtype=d["source_dtype"],
            stored_dtype=d.get("stored_dtype"),
            raw_array=d.get("raw_array"),
            chunk_rows=d.get("chunk_rows"),
            gram=dict(d.get("gram") or {}),
            mask_array=d.get("mask_array"),
        )
