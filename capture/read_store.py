"""The zarr store that the chunk reader gets whole chunk objects from: ObjectStore for ``s3://`` where it can.

Reading a raw array at a URL is one GET per chunk object (:mod:`capture.chunk_objects`). zarr
offers two stores for S3: ``FsspecStore`` (s3fs, what :func:`capture.storage.open_store` opens
for every URL, and what the writer uses) and ``ObjectStore`` (obstore, Rust). Fetching the
chunk objects of a run from the test S3 server, ``ObjectStore`` moved 2.5-3x the bytes per second
of ``FsspecStore``, whose client spends about 70 ms of CPU per 8 MiB object in Python (aiohttp,
a copy, botocore's response checksum) where obstore spends little, and without the GIL
(``bench/object_store.py``, ``analysis_read``). So :func:`open_read_store` gives an
``ObjectStore`` for an ``s3://`` URL when all of these hold, and ``open_store``'s ``FsspecStore``
otherwise (same bytes, slower):

- obstore is installed;
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
  ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``), and no ``AWS_CA_BUNDLE``.

Should an ``ObjectStore`` fail where s3fs might not (its first request raises anything but "not
found"), :func:`fallback_store` gives ``FsspecStore`` and this process does not try obstore for
that configuration again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from zarr.abc.store import Store

from capture.storage import is_url, open_store

__all__ = ["S3FS_TO_OBSTORE", "fallback_store", "obstore_config", "open_read_store"]

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
    if env.get("AWS_CA_BUNDLE") or not (endpoint or region):
        return None  # a custom CA, or a bucket whose region s3fs would look up
    if endpoint:
        config["endpoint"] = str(endpoint)
    config["region"] = region or "us-east-1"
    if str(endpoint or "").startswith("http://") or options.get("use_ssl") is False:
        config["client_options"] = {"allow_http": True}
    return config


def open_read_store(location: str, storage_options: Mapping[str, Any] | None = None) -> Store:
    """A read-only zarr store of ``location`` for fetching chunk objects (see the module docstring).

    ``ObjectStore`` for an ``s3://`` URL where the rules allow it (one per configuration and
    process, reused by the tasks of the process), else :func:`capture.storage.open_store`'s store.
    """
    config = obstore_config(location, storage_options) if is_url(location) else None
    if config is None or _state["inherited"]:
        return open_store(location, storage_options or None, read_only=True)
    key = json.dumps(config, sort_keys=True, default=str)
    with _lock:
        if key in _failed:
            return open_store(location, storage_options or None, read_only=True)
        store = _stores.get(key)
        if store is None:
            try:
                from obstore.store import S3Store
                from zarr.storage import ObjectStore
            except ImportError:
                return open_store(location, storage_options or None, read_only=True)
            settings = dict(config)
            bucket, client = settings.pop("bucket"), settings.pop("client_options", None)
            _state["used"] = True
            store = _stores[key] = ObjectStore(
                S3Store(bucket, client_options=client, **settings), read_only=True
            )
        return store


def fallback_store(
    store: Store, location: str, storage_options: Mapping[str, Any] | None, error: BaseException
) -> Store:
    """After ``store``'s first request raised ``error``: s3fs's store, if ``store`` was an ObjectStore.

    Raises ``error`` again for any other store (or for "not found", which s3fs would say too).
    """
    from zarr.storage import ObjectStore

    if not isinstance(store, ObjectStore) or isinstance(error, FileNotFoundError):
        raise error
    config = obstore_config(location, storage_options)
    with _lock:
        _failed.add(json.dumps(config, sort_keys=True, default=str))
        _stores.pop(json.dumps(config, sort_keys=True, default=str), None)
    return open_store(location, storage_options or None, read_only=True)
