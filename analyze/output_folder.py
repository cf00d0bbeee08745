"""Output folders: every file atomic and hashed, provenance last, the folder published by one rename.

Every command that writes a folder (``stats``, ``sweep``, ``compare``, the demo) writes it through
an :class:`OutputFolder`:

1. the target is checked: absent, empty, or an earlier output of this package (it holds the
   provenance file); any other folder is refused;
2. files are written, each atomically (:func:`atomic_write_bytes`), into a staging folder next
   to the target, and their SHA-256 recorded;
3. the provenance file is written last: the caller's fields plus the creation time, the package
   versions and the SHA-256 of every other file in the folder;
4. the staging folder is renamed to the target, replacing an earlier output as a whole (no stale
   file survives). On any failure before that, the staging folder is removed and the target is
   as it was.

The same module holds the one cache rule of the commands (:func:`resolve_cache_dir`): reduced
covariances are kept in ``OUT.cache`` next to the output folder ``OUT`` (not inside it: ``OUT`` is
replaced as a whole).

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     with OutputFolder(Path(tmp) / "out", format="example") as folder:
...         _ = folder.write("table.csv", b"a,b\\n1,2\\n")
...         provenance = folder.publish({"rows": 1})
...     doc = json.loads(provenance.read_text())
...     sorted(p.name for p in (Path(tmp) / "out").iterdir()), doc["format"], sorted(doc["files"])
(['provenance.json', 'table.csv'], 'example', ['table.csv'])
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from capture.format import package_versions

__all__ = [
    "PROVENANCE_NAME",
    "PROVENANCE_DISTRIBUTIONS",
    "OutputFolder",
    "atomic_open",
    "atomic_write_bytes",
    "check_output_dir",
    "default_cache_dir",
    "resolve_cache_dir",
    "to_jsonable",
]

PROVENANCE_NAME = "provenance.json"
#: Versions recorded in every provenance file.
PROVENANCE_DISTRIBUTIONS = (
    "python",
    "delve-pipeline",
    "numpy",
    "pandas",
    "torch",
    "zarr",
    "numcodecs",
    "dask",
    "distributed",
    "matplotlib",
    "click",
)
_ANALYSIS_OUTPUT = "an analysis output"


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` atomically when the block ends.

    The data goes to a temporary file in the same folder, which is flushed to disk and renamed
    to ``path`` on a normal exit; on an exception it is removed and ``path`` is untouched. Use it
    to stream large data (``np.savez(handle, ...)``); :func:`atomic_write_bytes` for bytes.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with atomic_open(Path(tmp) / "a.bin") as handle:
    ...         _ = handle.write(b"streamed")
    ...     (Path(tmp) / "a.bin").read_bytes(), sorted(os.listdir(tmp))
    (b'streamed', ['a.bin'])
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see either the old file or the new one, never a part of it; a failure leaves
    no temporary file behind. This is the project's one atomic writer (with :func:`atomic_open`).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = atomic_write_bytes(Path(tmp) / "a.txt", b"hello")
    ...     p.read_bytes(), sorted(os.listdir(tmp))
    (b'hello', ['a.txt'])
    """
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy: tuples as lists, numpy scalars as Python values, non-finite floats as text.

    Examples
    --------
    >>> to_jsonable({("a", 1): (np.float64(1.5), float("inf"), {3}, Path("/x"))})
    {'a/1': [1.5, 'inf', [3], '/x']}
    """
    if isinstance(value, dict):
        return {_json_key(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def _json_key(key: Any) -> str:
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)


def check_output_dir(
    out_dir: str | os.PathLike[str], marker: str = PROVENANCE_NAME, kind: str = _ANALYSIS_OUTPUT
) -> Path:
    """Check that ``out_dir`` may receive an output: absent, empty, or an earlier output folder.

    Parameters
    ----------
    out_dir : path
    marker : str
        The file that marks an earlier output (its provenance file).
    kind : str
        What such a folder is called in the message.

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file, or a non-empty folder without ``marker`` (this package does not
        overwrite other folders).
    """
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise FileExistsError(
            f"{out}: a non-empty folder that is not {kind} (no {marker}); choose another output folder"
        )
    return out


class OutputFolder:
    """A folder of files with their hashes and a provenance file, published when complete.

    Parameters
    ----------
    target : path
        The output folder: absent, empty, or an earlier output (checked on creation, see
        :func:`check_output_dir`).
    format : str
        The provenance file's ``format`` field (e.g. ``"delve-pipeline.analysis"``).
    provenance_name : str, default ``"provenance.json"``
        The provenance file, written last; it also marks the folder as an output of this package.
    kind : str
        What such a folder is called in the refusal message.
    staged : bool, default True
        Write into a staging folder and publish it by a rename. ``False`` writes into ``target``
        itself (files atomically, provenance last), leaving other files there alone, and
        checks nothing: the writer for a folder that is itself staged (the demo's ``analysis/``).

    Use it as a context manager: leaving the block without :meth:`publish` (an exception, say)
    removes the staging folder, so the target stays as it was.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        format: str,
        provenance_name: str = PROVENANCE_NAME,
        kind: str = _ANALYSIS_OUTPUT,
        staged: bool = True,
    ) -> None:
        self.target = Path(target).absolute()
        self.format = format
        self.provenance_name = provenance_name
        self.kind = kind
        self.files: dict[str, str] = {}
        self.published = False
        if staged:
            check_output_dir(self.target, provenance_name, kind)
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        else:
            self.path = self.target
            self.path.mkdir(parents=True, exist_ok=True)
        self.staged = staged

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()

    def discard(self) -> None:
        """Remove the staging folder unless it was published (the target is left as it was)."""
        if self.staged and not self.published:
            shutil.rmtree(self.path, ignore_errors=True)

    def write(self, relative: str, data: bytes) -> Path:
        """Write one file (atomically) under the folder and record its SHA-256; its current path."""
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        self.files[Path(relative).as_posix()] = hashlib.sha256(data).hexdigest()
        return path

    def final_path(self, path: str | os.PathLike[str]) -> Path:
        """Where a path under the working folder will be once published.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, OutputFolder(Path(tmp) / "o", format="x") as f:
        ...     f.final_path(f.path / "a" / "b.csv") == Path(tmp).absolute() / "o" / "a" / "b.csv"
        True
        """
        return self.target / Path(path).absolute().relative_to(self.path)

    def _hash_the_rest(self) -> None:
        """Record the SHA-256 of files others wrote into the staging folder (e.g. run stores)."""
        for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
            relative = path.relative_to(self.path).as_posix()
            if relative not in self.files and relative != self.provenance_name:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                self.files[relative] = digest.hexdigest()

    def publish(self, fields: Mapping[str, Any]) -> Path:
        """Write the provenance file (last), then put the folder in place; the provenance's final path.

        The provenance holds ``format``, ``format_version``, ``created``, ``versions``, the
        caller's ``fields`` and ``files`` (relative path -> SHA-256 of every other file).

        Raises
        ------
        FileExistsError
            Another writer published to the target between the check and the rename; the
            target then holds that writer's complete output.
        """
        if self.staged:
            self._hash_the_rest()
        document = {
            "format": self.format,
            "format_version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(PROVENANCE_DISTRIBUTIONS),
            **fields,
            "files": dict(sorted(self.files.items())),
        }
        text = json.dumps(to_jsonable(document), indent=2, sort_keys=True, allow_nan=False) + "\n"
        atomic_write_bytes(self.path / self.provenance_name, text.encode("utf-8"))
        if self.staged:
            self._swap_in()
        self.published = True
        return self.target / self.provenance_name

    def _swap_in(self) -> None:
        """Rename the staging folder to the target, replacing an earlier output as a whole."""
        out = self.target
        os.chmod(self.path, 0o755)
        old: Path | None = None
        try:
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "out")
                try:
                    os.replace(self.path, out)
                except BaseException:
                    os.replace(old / "out", out)
                    raise
            else:
                os.replace(self.path, out)
        except OSError as exc:  # another writer swapped its folder in between
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
            raise FileExistsError(
                f"{out}: another analysis published to this folder at the same time; the folder holds that "
                "analysis's complete output, this one's was not written"
            ) from exc
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the cache rule


def default_cache_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The covariance cache of an output folder ``OUT``: ``OUT.cache`` next to it.

    Examples
    --------
    >>> default_cache_dir("results/run1").as_posix()
    'results/run1.cache'
    """
    out = Path(out_dir)
    return out.parent / f"{out.name}.cache"


def resolve_cache_dir(
    out_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | bool | None = True
) -> Path | None:
    """The cache folder of a command writing ``out_dir``: the one rule of every command.

    Parameters
    ----------
    out_dir : path
        The output folder.
    cache_dir : path, True, False or None
        ``True`` (the default): :func:`default_cache_dir`; ``False`` or ``None``: no cache; a
        path: that folder.

    Raises
    ------
    ValueError
        ``cache_dir`` lies inside ``out_dir`` (which is replaced as a whole when published).

    Examples
    --------
    >>> resolve_cache_dir("out").as_posix(), resolve_cache_dir("out", False), resolve_cache_dir("o", "c").name
    ('out.cache', None, 'c')
    """
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir is True:
        return default_cache_dir(out_dir)
    cache = Path(cache_dir)
    out = Path(out_dir).resolve()
    if cache.resolve() == out or out in cache.resolve().parents:
        raise ValueError(
            f"cache_dir: {cache} is inside the output folder {Path(out_dir)}, which is replaced as a whole; "
            f"choose a folder outside it (default: {default_cache_dir(out_dir)})"
        )
    return cache
