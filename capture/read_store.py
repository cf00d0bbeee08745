"""ObjectStore (obstore) for reading chunk objects at ``s3://`` URLs, where it reads as s3fs would.

Reading a raw array at a URL is one GET per chunk object (:mod:`capture.chunk_objects`). zarr
offers two stores for S3: ``FsspecStore`` (s3fs: what the writer uses, and every other URL) and
``ObjectStore`` (obstore, Rust). On the test S3 server, the chunk reader's loop moved 2.5-3x the
bytes per second through ``ObjectStore`` that it moved through ``FsspecStore`` (whose client
spends tens of ms of Python CPU per 16 MiB object: aiohttp, copies, botocore's checksum), and a
whole analysis of a raw run ran 1.3-2x as fast (``bench/object_store.py``, ``analysis_read``).
So :func:`capture.storage.open_store` opens a *read-only* ``s3://`` store with
:func:`object_store` when all of these hold, and ``FsspecStore`` otherwise (same bytes, slower):

- obstore is installed, and ``DELVE_CHUNK_READER`` (:data:`READER_VARIABLE`) is not ``fsspec``;
- this process did not inherit a used obstore from its parent by a ``fork``: obstore's runtime
  does not survive a fork (a child that uses it hangs), so a process forked after this module
  made an ``ObjectStore`` reads with ``FsspecStore``; a store is never shared between processes
  (each process makes its own, and a spawned dask worker is a fresh process);
- every storage option has an obstore equivalent (:data:`S3FS_TO_OBSTORE`; options that only
  tune s3fs's caches are ignored) so that both read the same objects with the same identity:
  credentials given as options (``key`` / ``secret`` / ``token``, or ``anon=True``) or in the
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables (a profile or an instance role is
  left to s3fs, whose credential chain reads them), and a region (``client_kwargs.region_name``,
  ``AWS_REGION``, ``AWS_DEFAULT_REGION``) or an endpoint (``endpoint_url``,
  ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``); over https, no ``AWS_CA_BUNDLE`` (a custom
  certificate authority is left to s3fs).

Should an ``ObjectStore`` fail where s3fs might not (its first request raises anything but "not
found"), the reader calls :func:`forget` and opens the store again: ``FsspecStore``, as this
process does not try obstore for that configuration again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from zarr.abc.store import Store

__all__ = ["READER_VARIABLE", "S3FS_TO_OBSTORE", "forget", "object_store", "obstore_config"]

#: The environment variable that chooses the store of reads at ``s3://``: ``auto`` (default:
#: ObjectStore where it serves) or ``fsspec`` (always FsspecStore).
READER_VARIABLE = "DELVE_CHUNK_READER"

#: s3fs option -> obstore ``S3Store`` setting; ``client_kwargs`` entries are mapped by
#: :data:`_CLIENT_KWARGS`. Options that only tune s3fs itself are in :data:`_IGNORED`.
S3FS_TO_OBSTORE = {
    "key": "access_key_id",
    "username": "access_key_id",
    "secret": "secret_access_key",
    "password": "secret_access_key",
    "token": "session_token",
    "endpoint_url": "endpoint",
}
_CLIENT_KWARGS = {
    "endpoint_url": "endpoint",
    "region_name": "region",
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
}
_IGNORED = frozenset(
    {
        "anon",  # handled: skip_signature
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "skip_instance_cache",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
        "max_concurrency",
        "fixed_upload_size",
        "asynchronous",
        "use_ssl",  # handled: an http:// endpoint
    }
)

_lock = threading.Lock()
_stores: dict[str, Store] = {}
_failed: set[str] = set()
_state = {"used": False, "inherited": False}


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    _stores.clear()
    if _state["used"]:
        _state["inherited"] = True  # the parent's obstore runtime is dead here: never use obstore


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def obstore_config(
    url: str, storage_options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """The ``obstore.store.S3Store`` arguments that read ``url`` as s3fs would, or None (see the module).

    Examples
    --------
    >>> obstore_config("s3://b/runs/a.zarr", {"endpoint_url": "http://127.0.0.1:9000", "key": "k",
    ...                                       "secret": "s"}, environ={})  # doctest: +NORMALIZE_WHITESPACE
    {'bucket': 'b', 'prefix': 'runs/a.zarr', 'endpoint': 'http://127.0.0.1:9000', 'access_key_id': 'k',
     'secret_access_key': 's', 'region': 'us-east-1', 'client_options': {'allow_http': True}}
    >>> obstore_config("s3://b/a.zarr", {"profile": "dev"}, environ={}) is None  # s3fs reads profiles
    True
    """
    env = os.environ if environ is None else environ
    scheme, _, rest = url.partition("://")
    if scheme not in ("s3", "s3a") or not rest.strip("/"):
        return None
    bucket, _, prefix = rest.strip("/").partition("/")
    config: dict[str, Any] = {"bucket": bucket, "prefix": prefix}
    options = dict(storage_options or {})
    client = options.pop("client_kwargs", None) or {}
    if not isinstance(client, Mapping) or any(k not in _CLIENT_KWARGS for k in client):
        return None
    for name, value in options.items():
        if name in S3FS_TO_OBSTORE:
            config[S3FS_TO_OBSTORE[name]] = value
        elif name not in _IGNORED:
            return None
    config.update({_CLIENT_KWARGS[k]: v for k, v in client.items()})
    if options.get("anon"):
        config["skip_signature"] = True
    elif "access_key_id" not in config and not (
        env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")
    ):
        return None  # a profile, an instance role, ...: s3fs's credential chain finds them
    endpoint = config.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = config.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    plain_http = str(endpoint or "").startswith("http://") or options.get("use_ssl") is False
    if (env.get("AWS_CA_BUNDLE") and not plain_http) or not (endpoint or region):
        return None  # a custom CA over https, or a bucket whose region s3fs would look up
    if endpoint:
        config["endpoint"] = str(endpoint)
    config["region"] = region or "us-east-1"
    if plain_http:
        config["client_options"] = {"allow_http": True}
    return config


def _key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def object_store(location: str, storage_options: Mapping[str, Any] | None = None) -> Store | None:
    """A read-only ``ObjectStore`` of ``location`` where the rules allow it (see the module), else None.

    One per configuration and process, reused by the tasks of the process.
    """
    choice = os.environ.get(READER_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in ("auto", "fsspec"):
        raise ValueError(f"{READER_VARIABLE}={choice!r}: expected 'auto' or 'fsspec'")
    config = obstore_config(location, storage_options) if choice == "auto" else None
    if config is None or _state["inherited"]:
        return None
    key = _key(config)
    with _lock:
        if key in _failed:
            return None
        store = _stores.get(key)
        if store is None:
            try:
                from obstore.store import S3Store
                from zarr.storage import ObjectStore
            except ImportError:
                return None
            settings = dict(config)
            bucket, client = settings.pop("bucket"), settings.pop("client_options", None)
            _state["used"] = True
            store = _stores[key] = ObjectStore(
                S3Store(bucket, client_options=client, **settings), read_only=True
            )
        return store


def forget(location: str, storage_options: Mapping[str, Any] | None, error: BaseException) -> None:
    """After an ``ObjectStore``'s first request raised ``error``: never use obstore for it again here.

    Raises ``error`` again for "not found" (which s3fs would say too), and when no ObjectStore
    serves ``location`` (nothing to forget: the error is s3fs's own).
    """
    config = obstore_config(location, storage_options)
    key = None if config is None else _key(config)
    if isinstance(error, FileNotFoundError) or key is None or key not in _stores:
        raise error
    with _lock:
        _failed.add(key)
        _stores.pop(key, None)
