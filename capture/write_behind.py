"""A zarr store wrapper whose writes finish in the background, with the commit as a barrier.

On object storage one PUT of a 16 MiB chunk waits mostly on the network (or the server), so a
writer that waits for each one reaches a fraction of the store's throughput. :class:`WriteBehindStore`
returns from ``set`` as soon as the write is started (zarr has encoded the chunk into a buffer of
its own by then), keeps at most ``limit`` writes in flight, and keeps the order that matters:

- a write of a *barrier key* (the rank group's ``zarr.json``: the commit) first waits for every
  write in flight, so what a commit names is stored before it;
- a write or read of a key waits for the write of that key in flight (no overtaking);
- anything else (existence checks, listings, deletes) waits for every write in flight.

A write that fails is raised by the next call on the store (``set``, ``get``, ``drain``, ...).
Every call runs on zarr's event loop, as zarr's own store calls do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import numpy as np
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

__all__ = ["WriteBehindStore"]


def _owned(value: Buffer) -> Buffer:
    """``value``, or a copy of it when its memory may belong to the caller (a view of its array)."""
    data = value.as_numpy_array()
    if isinstance(data, np.ndarray) and data.flags.owndata:
        return value
    return type(value).from_bytes(value.to_bytes())


class WriteBehindStore(WrapperStore[Store]):
    """Wrap ``store``: writes finish in the background, at most ``limit`` at once.

    Parameters
    ----------
    store : zarr.abc.store.Store
        The store written to (zarr's ``FsspecStore`` for a URL).
    limit : int
        Writes in flight at most (each holds its encoded chunk in memory).
    barriers : iterable of str
        Keys whose write waits for every write in flight first (default: the root ``zarr.json``).

    Examples
    --------
    >>> from zarr.core.buffer import default_buffer_prototype
    >>> from zarr.core.sync import sync
    >>> from zarr.storage import MemoryStore
    >>> store = WriteBehindStore(MemoryStore(), limit=2)
    >>> data = default_buffer_prototype().buffer.from_bytes
    >>> sync(store.set("c/0", data(b"chunk")))  # started, not awaited
    >>> sync(store.set("zarr.json", data(b"{}")))  # the commit: waits for c/0 first
    >>> store.in_flight
    0
    """

    def __init__(self, store: Store, limit: int = 4, barriers: Iterable[str] = ("zarr.json",)) -> None:
        super().__init__(store)
        self.limit = int(limit)
        self.barriers = frozenset(barriers)
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._error: BaseException | None = None

    def _with_store(self, store: Store) -> WriteBehindStore:
        return type(self)(store, self.limit, self.barriers)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _done(self, key: str, task: asyncio.Future[None]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def _wait_for(self, key: str) -> None:
        task = self._pending.get(key)
        if task is not None:
            await asyncio.wait([task])
        self._raise()

    async def drain(self) -> None:
        """Wait for every write in flight; raise the first that failed."""
        while self._pending:
            await asyncio.wait(list(self._pending.values()))
        self._raise()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- writes --------------------------------------------------------------------------------
    async def set(self, key: str, value: Buffer) -> None:
        if key in self.barriers:
            await self.drain()
            await self._store.set(key, value)
            return
        await self._wait_for(key)
        while len(self._pending) >= self.limit:
            await asyncio.wait(list(self._pending.values()), return_when=asyncio.FIRST_COMPLETED)
            self._raise()
        task = asyncio.ensure_future(self._store.set(key, _owned(value)))
        self._pending[key] = task
        task.add_done_callback(lambda t, key=key: self._done(key, t))

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await self.drain()
        await self._store.set_if_not_exists(key, value)

    async def delete(self, key: str) -> None:
        await self.drain()
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        await self.drain()
        await self._store.delete_dir(prefix)

    async def clear(self) -> None:
        await self.drain()
        await self._store.clear()

    # -- reads ---------------------------------------------------------------------------------
    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        await self._wait_for(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            await self._wait_for(key)
        return await self._store.get_partial_values(prototype, key_ranges)

    async def exists(self, key: str) -> bool:
        await self.drain()
        return await self._store.exists(key)

    async def is_empty(self, prefix: str) -> bool:
        await self.drain()
        return await self._store.is_empty(prefix)

    async def list(self) -> AsyncIterator[str]:  # type: ignore[override]
        await self.drain()
        async for key in self._store.list():
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        await self.drain()
        async for key in self._store.list_prefix(prefix):
            yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        await self.drain()
        async for key in self._store.list_dir(prefix):
            yield key

    def __repr__(self) -> str:
        return f"WriteBehindStore({self._store!r}, limit={self.limit})"
