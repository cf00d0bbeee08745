"""analyze.output_folder: staged folders, hashes of every file, provenance last, the cache rule."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from analyze import OutputFolder, atomic_write_bytes, resolve_cache_dir
from analyze.output_folder import PROVENANCE_DISTRIBUTIONS, atomic_open, check_output_dir, default_cache_dir
from capture.format import STORE_DISTRIBUTIONS, package_versions


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def publish(target: Path, files: dict[str, bytes], **fields: Any) -> Path:
    with OutputFolder(target, format="test.folder") as folder:
        for name, data in files.items():
            folder.write(name, data)
        return folder.publish(fields)


def test_publish_writes_files_hashes_and_provenance_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = {"a.csv": b"x,y\n1,2\n", "plots/b.png": b"\x89PNG fake", "deep/er/c.txt": b""}
    provenance = publish(out, files, rows=1)
    assert provenance == out.absolute() / "provenance.json"
    assert tree(out) | {"provenance.json": b""} == files | {"provenance.json": b""}
    doc = json.loads(provenance.read_text())
    assert doc["format"] == "test.folder" and doc["format_version"] == 1 and doc["rows"] == 1
    assert doc["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert set(doc["versions"]) == set(PROVENANCE_DISTRIBUTIONS)
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_files_written_by_others_are_hashed_too(tmp_path: Path) -> None:
    """A run store written straight into the staging folder is covered by the provenance."""
    with OutputFolder(tmp_path / "out", format="x") as folder:
        (folder.path / "runs" / "r.zarr").mkdir(parents=True)
        (folder.path / "runs" / "r.zarr" / "zarr.json").write_bytes(b"{}")
        folder.write("table.csv", b"1\n")
        folder.publish({})
    doc = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert doc["files"] == {
        "runs/r.zarr/zarr.json": hashlib.sha256(b"{}").hexdigest(),
        "table.csv": hashlib.sha256(b"1\n").hexdigest(),
    }


def test_an_earlier_output_is_replaced_as_a_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publish(out, {"old.csv": b"old", "keep.csv": b"1"})
    publish(out, {"keep.csv": b"2"})
    assert sorted(tree(out)) == ["keep.csv", "provenance.json"] and (out / "keep.csv").read_bytes() == b"2"
    assert leftovers(tmp_path) == []


def test_a_failure_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publish(out, {"a.csv": b"first"})
    before = tree(out)
    with pytest.raises(RuntimeError, match="plot failed"), OutputFolder(out, format="x") as folder:
        folder.write("a.csv", b"second")
        raise RuntimeError("plot failed")
    assert tree(out) == before and leftovers(tmp_path) == []
    # leaving the block without publishing changes nothing either
    with OutputFolder(tmp_path / "new", format="x") as folder:
        folder.write("a.csv", b"never published")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_a_failed_rename_leaves_the_target_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    publish(out, {"a.csv": b"first"})
    before = tree(out)
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if ".partial-" in os.path.basename(str(src)):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        publish(out, {"a.csv": b"second"})
    monkeypatch.undo()
    assert tree(out) == before and leftovers(tmp_path) == []


def test_foreign_folders_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(FileExistsError, match="not an analysis output .no provenance.json."):
        OutputFolder(tmp_path / "mine", format="x")
    with pytest.raises(FileExistsError, match="not a demo output .no demo.json."):
        OutputFolder(tmp_path / "mine", format="x", provenance_name="demo.json", kind="a demo output")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        OutputFolder(tmp_path / "file", format="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    assert check_output_dir(tmp_path / "absent") == tmp_path / "absent"
    (tmp_path / "empty").mkdir()
    publish(tmp_path / "empty", {"a": b"1"})  # an empty folder may receive an output


def test_in_place_writing_leaves_other_files_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    folder = OutputFolder(tmp_path, format="x", staged=False)
    folder.write("a.csv", b"1")
    folder.publish({})
    doc = json.loads((tmp_path / "provenance.json").read_text())
    assert sorted(doc["files"]) == ["a.csv"]  # only what this writer wrote
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_final_path(tmp_path: Path) -> None:
    with OutputFolder(tmp_path / "o", format="x") as folder:
        assert folder.final_path(folder.write("p/q.csv", b"")) == (tmp_path / "o" / "p" / "q.csv").absolute()


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.csv"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_open(target) as handle:
        handle.write(b"new, half written")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.csv"]
    with atomic_open(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == "0o644"


# --------------------------------------------------------------------------- the cache rule


def test_cache_rule(tmp_path: Path) -> None:
    out = tmp_path / "results" / "run1"
    assert default_cache_dir(out) == tmp_path / "results" / "run1.cache"
    assert resolve_cache_dir(out) == resolve_cache_dir(out, True) == default_cache_dir(out)
    assert resolve_cache_dir(out, False) is None and resolve_cache_dir(out, None) is None
    assert resolve_cache_dir(out, tmp_path / "c") == tmp_path / "c"
    for inside in (out, out / "cache", out / "a" / "b"):
        with pytest.raises(
            ValueError, match="cache_dir: .* is inside the output folder .*replaced as a whole"
        ):
            resolve_cache_dir(out, inside)


# --------------------------------------------------------------------------- versions


def test_one_version_collector() -> None:
    from importlib import metadata

    versions = package_versions(["python", "numpy", "zarr", "surely-not-installed-dist"])
    assert versions["numpy"] == metadata.version("numpy") and versions["zarr"] == metadata.version("zarr")
    assert versions["surely-not-installed-dist"] == "not installed"
    assert versions["python"].count(".") == 2
    assert set(STORE_DISTRIBUTIONS) <= set(PROVENANCE_DISTRIBUTIONS)


def test_doctests() -> None:
    import doctest

    import analyze.output_folder

    failed, attempted = doctest.testmod(analyze.output_folder)
    assert attempted > 0 and failed == 0
