"""The store on disk is what docs/store-format.md says it is, and xarray can read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from capture import FORMAT_NAME, FORMAT_VERSION, Recorder, StoreFormatError, open_run
from capture.checksum import has_checksum
from capture.format import ATTRS_KEY, BLOCK_COLUMNS, CALL_COLUMNS, FORMAT_MINOR

DOC = (Path(__file__).resolve().parents[1] / "docs" / "store-format.md").read_text()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[torch.Tensor]]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6))
    seen: dict[str, list[torch.Tensor]] = {"0": [], "3": []}
    net[0].register_forward_hook(lambda m, i, o: seen["0"].append(o.detach().clone()))
    net[3].register_forward_hook(lambda m, i, o: seen["3"].append(o.detach().clone()))
    path = tmp_path_factory.mktemp("fmt") / "run.zarr"
    with Recorder(net, path, mode="both") as rec:
        for epoch in range(2):
            net(torch.randn(10, 1, 4, 4))
            rec.add_scalar("epoch", epoch)
            rec.end_epoch()
    return path, seen


def test_root_and_rank_attributes_are_the_documented_ones(store: tuple[Path, dict]) -> None:
    path, _ = store
    root = json.loads((path / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    assert root["format"] == FORMAT_NAME and root["format_version"] == FORMAT_VERSION == 1
    assert root["format_minor"] == FORMAT_MINOR == 2
    assert "model" not in root  # the root is written once, at creation (minor 1)
    for key in root:
        assert f"`{key}`" in DOC, f"root attribute {key!r} is not documented"
    rank = json.loads((path / "rank-00000" / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    for key in rank:
        assert f"`{key}`" in DOC, f"rank attribute {key!r} is not documented"
    for column in (*CALL_COLUMNS, *BLOCK_COLUMNS):
        assert f"`{column}`" in DOC, f"column {column!r} is not documented"
    assert rank["committed"]["raw_rows"] == {"0": 20, "3": 20}
    assert rank["epochs_complete"] == [0, 1] and rank["epoch_open"] is None


def test_layout_paths_are_the_documented_ones(store: tuple[Path, dict]) -> None:
    path, _ = store
    assert (path / "rank-00000" / "calls" / "zarr.json").exists()
    assert (path / "rank-00000" / "layers" / "0" / "raw" / "zarr.json").exists()
    for part in ("count", "mean", "m2", "info"):
        assert (path / "rank-00000" / "layers" / "0" / "gram" / "channelwise" / part / "zarr.json").exists()
    assert (path / "rank-00000" / "layers" / "3" / "gram" / "none" / "m2" / "zarr.json").exists()


def test_xarray_reads_raw_outputs_with_dimension_names(store: tuple[Path, dict]) -> None:
    xr = pytest.importorskip("xarray")
    path, seen = store
    conv = xr.open_zarr(path, group="rank-00000/layers/0", consolidated=False)
    assert conv.raw.dims == ("sample", "channel", "height", "width")
    np.testing.assert_array_equal(conv.raw.values, torch.cat(seen["0"]).numpy())
    linear = xr.open_zarr(path, group="rank-00000/layers/3", consolidated=False)
    assert linear.raw.dims == ("sample", "feature")
    np.testing.assert_array_equal(linear.raw.values, torch.cat(seen["3"]).numpy())


def copy_with_root(path: Path, copy: Path, **changes: object) -> dict:
    """A copy of the store whose root attributes get ``changes``; returns the root document."""
    import shutil

    shutil.copytree(path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"][ATTRS_KEY].update(changes)
    (copy / "zarr.json").write_text(json.dumps(meta))
    return meta


def test_newer_version_and_foreign_stores_are_refused(store: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = store
    copy = tmp_path / "newer.zarr"
    meta = copy_with_root(path, copy, format_version=FORMAT_VERSION + 1)
    with pytest.raises(StoreFormatError, match="newer"):
        open_run(copy)
    meta["attributes"][ATTRS_KEY]["format"] = "something-else"
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="not a delve-pipeline run store"):
        open_run(copy)


def test_the_model_comes_from_the_rank_groups(store: tuple[Path, dict]) -> None:
    path, _ = store
    run = open_run(path)
    assert run.format_minor == FORMAT_MINOR
    assert run.model == [
        {
            "name": "0",
            "type": "Conv2d",
            "kind": "conv",
            "layout": "conv",
            "sample_shape": [4, 4, 4],
            "source_dtype": "float32",
        },
        {
            "name": "3",
            "type": "Linear",
            "kind": "dense",
            "layout": "flat",
            "sample_shape": [6],
            "source_dtype": "float32",
        },
    ]


def test_every_array_ends_with_a_checksum(store: tuple[Path, dict]) -> None:
    path, _ = store
    arrays = 0
    for meta_path in path.rglob("zarr.json"):
        doc = json.loads(meta_path.read_text())
        if doc["node_type"] == "array":
            arrays += 1
            assert has_checksum(doc["codecs"]), meta_path
            assert [c["name"] for c in doc["codecs"]] == ["bytes", "crc32c"], meta_path
    assert arrays == 1 + 2 + 4 * 2  # calls, two raw arrays, two layers' count / mean / m2 / info


def test_a_newer_minor_version_reads(store: tuple[Path, dict], tmp_path: Path) -> None:
    path, seen = store
    copy = tmp_path / "newer-minor.zarr"
    copy_with_root(path, copy, format_minor=FORMAT_MINOR + 7, something_new={"ignored": True})
    run = open_run(copy)
    assert run.format_minor == FORMAT_MINOR + 7
    np.testing.assert_array_equal(run.ranks[0].raw("0")[:], torch.cat(seen["0"]).numpy())


def test_a_version_1_0_store_without_checksums_reads(store: tuple[Path, dict], tmp_path: Path) -> None:
    """What the format 1.0 writer left: no crc32c codec and trailer, no ``format_minor``, a root ``model``."""
    import shutil

    path, seen = store
    old = tmp_path / "v1.0.zarr"
    shutil.copytree(path, old)
    for meta_path in old.rglob("zarr.json"):
        doc = json.loads(meta_path.read_text())
        if doc["node_type"] == "array":
            doc["codecs"] = [c for c in doc["codecs"] if c["name"] != "crc32c"]
            for chunk in (meta_path.parent / "c").rglob("*"):
                if chunk.is_file():
                    chunk.write_bytes(chunk.read_bytes()[:-4])
        elif "format" in doc.get("attributes", {}).get(ATTRS_KEY, {}):
            root = doc["attributes"][ATTRS_KEY]
            del root["format_minor"]
            root["model"] = [{"name": "0"}, {"name": "3"}]
        meta_path.write_text(json.dumps(doc))
    run = open_run(old)
    assert run.format_minor == 0 and run.epochs == [0, 1]
    assert [m["name"] for m in run.model] == ["0", "3"]
    for layer in ("0", "3"):
        np.testing.assert_array_equal(run.ranks[0].raw(layer)[:], torch.cat(seen[layer]).numpy())
    count, mean, m2 = run.ranks[0].gram("3", "none").read(0)
    x = torch.cat(seen["3"][:1]).double().numpy()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m2, (x - x.mean(0)).T @ (x - x.mean(0)), rtol=1e-10, atol=1e-12)
    assert count == len(x)


@pytest.mark.parametrize("module", ["capture.checksum", "capture.storage", "capture.write_behind"])
def test_doctests_of_the_storage_modules(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
