"""A results store of reduced covariances: one ``.npz`` file per covariance, written atomically.

A cache entry is keyed by the source run's fingerprint (its committed state, which
changes with every commit, and its creation time) and by every option that changes
the covariance (layer, epoch, phase, reduction method, sample selection, interpolation,
the source kind). Statistics, thresholds and semantics of idim are not part of the
key: asking again with other thresholds or other statistics reads no activation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from analyze.output_folder import atomic_open
from capture.store import RunInfo

__all__ = ["CovarianceCache", "run_fingerprint", "CACHE_VERSION"]

#: Bump when what is cached, or how it is computed, changes. 2: eigenvalues from ``eigvalsh`` (were
#: ``eigh``'s, which differ in the last bits), eigenvectors only for the default ``embed``.
CACHE_VERSION = 2


def run_fingerprint(run: RunInfo) -> str:
    """A content hash of a run store's committed state (cheap: metadata only).

    Stores are append-only and every commit rewrites the committed lengths, so the
    committed state together with the creation time identifies the content.
    """
    h = hashlib.sha256()
    h.update(json.dumps(run.meta.get("created"), sort_keys=True).encode())
    for part in run.ranks:
        state = {k: v for k, v in part.state.items() if k != "updated"}
        h.update(json.dumps(state, sort_keys=True, default=str).encode())
    return h.hexdigest()


class CovarianceCache:
    """Reduced covariances on disk, safe under concurrent analyses.

    Parameters
    ----------
    root : str or PathLike or None
        The cache folder (created on first write). ``None`` disables caching.
    """

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = None if root is None else Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**parts: Any) -> str:
        payload = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str, need: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
        """The entry, or None when missing, unreadable, or lacking a field of ``need``."""
        if self.root is None:
            return None
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                entry = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError):
            self.misses += 1
            return None
        if any(n not in entry for n in need):
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Write an entry atomically (temp file in the same folder, then rename)."""
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in entry.items()})
