"""Where a run store lives: a local folder or a URL, opened as a zarr store.

A run store is a local folder (``runs/exp1.zarr``) or any fsspec URL (``s3://bucket/runs/exp1.zarr``,
``gs://...``, ``memory://...`` for tests). :func:`open_store` turns a location and its
``storage_options`` into the zarr store that both the writer and the readers use:

- a local path (or a ``file://`` URL) gives zarr's ``LocalStore``, exactly what zarr opens for a
  path string, so local stores are written and read as before;
- a URL gives zarr's ``FsspecStore`` (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, ...).
  ``storage_options`` go to the fsspec filesystem as they are (``s3fs``: ``key``, ``secret``,
  ``endpoint_url``, ``client_kwargs``, ...); without them the library's own configuration applies
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``, ...). The directory listing cache is
  off unless ``use_listings_cache`` says otherwise, so a reader sees ranks and epochs that other
  processes add while it polls.

Nothing here keeps a client between calls, so a process that forks (a dask worker) opens its own.

Examples
--------
>>> import uuid, zarr
>>> url = f"memory://doc-{uuid.uuid4().hex}/run.zarr"  # memory:// is one namespace per process
>>> _ = zarr.create_group(open_store(url), attributes={"x": 1})
>>> StoreLocation(url).has("zarr.json"), StoreLocation(url).child("rank-00000").location == f"{url}/rank-00000"
(True, True)
>>> StoreLocation(url).remove()
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from capture.read_store import object_store

__all__ = [
    "StoreLocation",
    "open_store",
    "is_url",
    "group_document",
    "located",
    "options_for",
    "recorded_location",
    "redact_options",
    "REDACTED",
]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) other than a local ``file://`` one."""
    text = os.fspath(location)
    return isinstance(text, str) and bool(_SCHEME.match(text)) and not text.startswith("file://")


def options_for(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The storage options that apply to ``location``: ``storage_options`` for a URL, None for a path.

    One set of options serves every URL of an analysis; a local path among them takes none.

    Examples
    --------
    >>> options_for("s3://b/run.zarr", {"anon": True}), options_for("runs/a.zarr", {"anon": True})
    ({'anon': True}, None)
    """
    return dict(storage_options) if storage_options and is_url(location) else None


def recorded_location(location: str | os.PathLike[str]) -> str:
    """How a store is named in records (``provenance.json``): an absolute path, or the URL.

    A password written into a URL (``scheme://user:password@host/...``) is replaced by
    :data:`REDACTED`.

    Examples
    --------
    >>> recorded_location("s3://bucket/runs/a.zarr/"), recorded_location("ftp://me:pw@host/a.zarr")
    ('s3://bucket/runs/a.zarr', 'ftp://me:<redacted>@host/a.zarr')
    >>> recorded_location("a.zarr") == os.path.abspath("a.zarr")
    True
    """
    text = os.fspath(location)
    if not is_url(text):
        return os.path.abspath(text[len("file://") :] if text.startswith("file://") else text)
    parts = urlsplit(text.rstrip("/"))
    if parts.password is None:
        return text.rstrip("/")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))


#: What :func:`redact_options` puts in place of a secret.
REDACTED = "<redacted>"
#: Parts of an option's name that mark its value as a secret (keys, secrets, tokens, passwords, ...).
_SECRET_NAMES = re.compile(r"key|secret|token|passw|credential|auth|session|signature|sas|connection", re.I)


def redact_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` fit for a record: every value whose name looks like a secret redacted.

    Names holding ``key``, ``secret``, ``token``, ``passw``, ``credential``, ``auth``,
    ``session``, ``signature``, ``sas`` or ``connection`` (any case) are secrets, at any depth of
    nested options (``client_kwargs``); the other values (``endpoint_url``, ``anon``, a region)
    are kept, so that a record says where the data was.

    Examples
    --------
    >>> redact_options({"endpoint_url": "http://minio:9000", "key": "AKIA", "secret": "s",
    ...                 "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "t"}})
    {'endpoint_url': 'http://minio:9000', 'key': '<redacted>', 'secret': '<redacted>', 'client_kwargs': {'region_name': 'eu-west-1', 'aws_session_token': '<redacted>'}}
    """
    out: dict[str, Any] = {}
    for name, value in (storage_options or {}).items():
        if _SECRET_NAMES.search(str(name)):
            out[name] = REDACTED
        elif isinstance(value, Mapping):
            out[name] = redact_options(value)
        else:
            out[name] = value
    return out


def group_document(attributes: dict[str, Any]) -> bytes:
    """The ``zarr.json`` of a zarr v3 group with these attributes (what zarr writes for one)."""
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(meta, indent=2, allow_nan=False).encode()


class StoreLocation:
    """A run store's location (a local path or a URL) with its storage options.

    Parameters
    ----------
    location : str or PathLike
        A folder, a ``file://`` URL, or any fsspec URL.
    storage_options : dict, optional
        Options for the fsspec filesystem of a URL (refused for a local path).
    """

    def __init__(
        self, location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> None:
        text = os.fspath(location)
        if not isinstance(text, str):
            raise TypeError(f"path: expected a path or URL string, got {location!r}")
        self.is_url = is_url(text)
        self.location = (
            text if self.is_url else (text[len("file://") :] if text.startswith("file://") else text)
        )
        self.storage_options = dict(storage_options or {})
        if self.storage_options and not self.is_url:
            raise ValueError(
                f"storage_options: {self.location} is a local path; storage options apply to URLs "
                "(s3://, gs://, memory://, ...)"
            )
        self._store: Store | None = None

    def __repr__(self) -> str:
        return f"StoreLocation({self.location!r})"

    @property
    def path(self) -> Path:
        """The local folder (only for a local location)."""
        if self.is_url:
            raise ValueError(f"{self.location}: a URL has no local path")
        return Path(self.location)

    def child(self, name: str) -> StoreLocation:
        """The location of ``name`` inside this one (a separate store rooted there)."""
        if self.is_url:
            return StoreLocation(f"{self.location.rstrip('/')}/{name}", self.storage_options)
        return StoreLocation(os.path.join(self.location, name))

    def store(self, read_only: bool = False) -> Store:
        """The zarr store rooted at this location (a new one per call; see :func:`open_store`)."""
        if not self.is_url:
            return LocalStore(self.location, read_only=read_only)
        options = {"use_listings_cache": False, **self.storage_options}
        return FsspecStore.from_url(self.location, storage_options=options, read_only=read_only)

    def _shared_store(self) -> Store:
        if self._store is None:
            self._store = self.store()
        return self._store

    # -- what is there -------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether the object (or file) ``key`` exists under this location."""
        if not self.is_url:
            return (self.path / key).exists()
        with _reaching(self.location):
            return bool(sync(self._shared_store().exists(key)))

    def is_empty(self) -> bool:
        """Whether nothing at all is stored here (a missing folder or prefix counts as empty)."""
        if not self.is_url:
            if self.path.is_dir():
                return not any(self.path.iterdir())
            return not self.path.exists()

        store = self._shared_store()
        if isinstance(store, FsspecStore):  # one listing request (one level), not a walk of the store
            try:
                with _reaching(self.location):
                    return not sync(store.fs._ls(store.path, detail=False))
            except FileNotFoundError:
                return True

        async def first() -> bool:  # pragma: no cover - other zarr stores
            async for _ in store.list_prefix(""):
                return False
            return True

        return bool(sync(first()))

    def names(self) -> list[str]:
        """Names one level below this location (files, folders, prefixes), sorted."""
        if not self.is_url:
            return sorted(os.listdir(self.location)) if self.path.is_dir() else []
        store = self._shared_store()

        async def listing() -> list[str]:
            return [name async for name in store.list_dir("")]

        with _reaching(self.location):
            return sorted({name.rstrip("/") for name in sync(listing())})

    def is_file(self) -> bool:
        """Whether a local location is a file (never for a URL)."""
        return not self.is_url and self.path.exists() and not self.path.is_dir()

    def nbytes(self) -> int:
        """Bytes stored under this location."""
        if not self.is_url:
            return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        store = self._shared_store()
        if isinstance(store, FsspecStore):
            found = sync(store.fs._find(store.path, detail=True, withdirs=False))
            return int(sum(int(info.get("size") or 0) for info in found.values()))

        async def total() -> int:  # pragma: no cover - other zarr stores
            return sum([await store.getsize(key) async for key in store.list_prefix("")])

        return int(sync(total()))

    # -- changes -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Delete everything stored here."""
        if not self.is_url:
            if self.path.is_dir():
                shutil.rmtree(self.path)
            elif self.path.exists():
                self.path.unlink()
            return
        sync(self._shared_store().delete_dir(""))

    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``key`` unless it exists; True when this call wrote it.

        Atomic where the storage offers it: a local file is linked into place only if absent,
        and an S3 object is put with ``If-None-Match: *`` (AWS S3 and moto honour it). Other
        stores check, then write: two writers racing may both write, the last one wins.
        """
        store = self._shared_store()
        if isinstance(store, FsspecStore) and "s3" in _protocols(store.fs):
            try:
                sync(store.fs._pipe_file(f"{store.path}/{key}", data, mode="create"))
            except FileExistsError:
                return False
            return True
        if not self.is_url:  # zarr's LocalStore: os.link of a complete temporary file, refused if present
            existed = self.has(key)
            sync(store.set_if_not_exists(key, default_buffer_prototype().buffer.from_bytes(data)))
            return not existed
        if sync(store.exists(key)):
            return False
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))
        return True

    def open_group(self, mode: str = "r") -> zarr.Group:
        """The zarr group at this location's root (``mode`` as for :func:`zarr.open_group`)."""
        store = self.store(read_only=mode == "r")
        return zarr.open_group(store, mode=mode)


#: Packages of the storage clients behind fsspec and obstore, whose errors are not ``OSError``.
_STORAGE_CLIENT_PACKAGES = frozenset({"botocore", "aiobotocore", "aiohttp", "obstore", "google", "azure"})


@contextmanager
def _reaching(where: str) -> Iterator[None]:
    """Report a storage client's own failure (botocore's connection errors, ...) as ``ConnectionError``.

    Errors that are already ``OSError`` (a missing bucket, denied credentials as s3fs maps them)
    pass unchanged; the others of the clients in :data:`_STORAGE_CLIENT_PACKAGES` become a
    ``ConnectionError`` whose message starts with the store's URL, so callers need only catch
    ``OSError``.
    """
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in _STORAGE_CLIENT_PACKAGES:
            raise
        raise ConnectionError(f"{where}: cannot reach the store ({type(exc).__name__}: {exc})") from exc


def located(exc: OSError, where: str) -> OSError:
    """``exc`` with the store's path or URL in front of its message (same type), unless it has it."""
    if where in str(exc):
        return exc
    try:
        return type(exc)(f"{where}: {exc}")
    except TypeError:  # pragma: no cover - an OSError subclass with another signature
        return OSError(f"{where}: {exc}")


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = getattr(fs, "protocol", ())
    return (proto,) if isinstance(proto, str) else tuple(proto)


def open_store(
    location: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    read_only: bool = False,
) -> Store:
    """The zarr store of a run store's location: ``LocalStore`` for a path, ``FsspecStore`` for a URL.

    This is the one place that turns a path or URL into a store; the writer
    (:class:`capture.store_writer.RunStoreWriter`) and the readers (:func:`capture.open_run`, the
    analysis) all use it, so a location and its options mean the same everywhere. A read-only
    ``s3://`` store is obstore's ``ObjectStore`` where it reads as s3fs would (same objects, same
    identity; :func:`capture.read_store.object_store`): the chunk reader's GETs are 2.5-3x as fast.

    Parameters
    ----------
    location : str or PathLike
        A folder, a ``file://`` URL, or any fsspec URL (``s3://bucket/prefix/run.zarr``).
    storage_options : dict, optional
        Options for the URL's fsspec filesystem (for ``s3fs``: ``endpoint_url``, ``key``,
        ``secret``, ``anon``, ``client_kwargs``, ...). Refused for a local path.
    read_only : bool
        Open the store read-only.

    Returns
    -------
    zarr.abc.store.Store
        A new store object (no client is shared across a fork); a read-only ``ObjectStore`` is
        shared by the calls of one process with the same configuration.
    """
    if read_only and is_url(location):
        fast = object_store(os.fspath(location), storage_options)
        if fast is not None:
            return fast
    return StoreLocation(location, storage_options).store(read_only=read_only)
