"""The digits demo: files, value ranges, the too-wide layer, determinism (one shared pair of runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyze.result import TABLE_COLUMNS
from pipelines.demo import DEMO_MARKER, DemoResult, load_digits_split, run_demo

pytest.importorskip("sklearn")

EPOCHS = 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, bytes, tuple]:
    """Two demos with the same seed into the same folder (the second overwrites the first).

    Returns the second run, the first run's ``stats.csv`` bytes and the torch settings
    before the runs.
    """
    out = tmp_path_factory.mktemp("demo") / "out"
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    first = run_demo(out, seed=0, epochs=EPOCHS, progress=False, print_report=False)
    first_bytes = (first.analysis_dir / "stats.csv").read_bytes()
    second = run_demo(out, seed=0, epochs=EPOCHS, progress=False, print_report=False)
    return second, first_bytes, before


def _stats(demo: DemoResult) -> pd.DataFrame:
    return pd.read_csv(demo.analysis_dir / "stats.csv", keep_default_na=False, na_values=[""])


def test_files_exist(demo: tuple[DemoResult, bytes, tuple]) -> None:
    result, _, _ = demo
    assert set(result.runs) == {"cnn", "mlp"}
    for path in result.runs.values():
        assert (path / "zarr.json").is_file()
    analysis = result.analysis_dir
    assert (analysis / "stats.csv").is_file() and (analysis / "provenance.json").is_file()
    assert sorted(p.name for p in result.files["delve_csv"]) == [
        "cnn_channelwise_last_timestep_t0.99.csv",
        "mlp_channelwise_last_timestep_t0.99.csv",
    ]
    assert all(p.is_file() for p in result.files["delve_csv"])
    plots = result.files["plots"]
    assert plots and all(p.is_file() and p.read_bytes()[:4] == b"\x89PNG" for p in plots)
    marker = json.loads((result.out / DEMO_MARKER).read_text())
    assert marker["complete"] is True and marker["seed"] == 0 and marker["epochs"] == EPOCHS


def test_similarity_matrices_of_both_models(demo: tuple[DemoResult, bytes, tuple]) -> None:
    from analyze import similarity
    from analyze.outputs import table_csv

    result, _, _ = demo
    assert [p.name for p in result.files["similarity"]] == ["similarity_layers.csv", "similarity_epochs.csv"]
    runs = [str(result.runs[m]) for m in ("cnn", "mlp")]
    for path in result.files["similarity"]:
        pairs = path.stem.split("_")[1]
        expected = similarity(runs, "cka", pairs=pairs, phases="eval", progress=False)
        assert path.read_bytes() == table_csv(expected)
        table = pd.read_csv(path)
        assert set(table["run_a"]) == {"cnn", "mlp"} and set(table["measure"]) == {"cka"}
        assert table["value"].between(0, 1 + 1e-12).all()
    names = {p.name for p in result.files["plots"]}
    for model, layers in (("cnn", ("conv1", "conv2", "fc1", "fc2")), ("mlp", ("fc1", "fc2", "fc3"))):
        for epoch in range(EPOCHS):
            assert f"{model}_mean_last_timestep_eval_cka_layers_epoch{epoch}.png" in names
        for layer in layers:
            assert f"{model}_mean_last_timestep_eval_cka_epochs_{layer}.png" in names
    provenance = json.loads((result.analysis_dir / "provenance.json").read_text())
    assert {"similarity_layers.csv", "similarity_epochs.csv"} <= set(provenance["files"])


def test_table_values(demo: tuple[DemoResult, bytes, tuple]) -> None:
    result, _, _ = demo
    table = _stats(result)
    assert tuple(table.columns) == TABLE_COLUMNS
    assert sorted(set(table["epoch"])) == list(range(EPOCHS))
    lsat = table[table["stat"] == "lsat"]
    assert set(lsat["phase"]) == {"train", "eval"}
    assert len(lsat) == 2 * EPOCHS * (4 + 3)  # phases x epochs x (cnn + mlp layers)
    assert lsat["value"].between(0.0, 1.0).all()
    accuracy = table[table["stat"].isin(["train_accuracy", "test_accuracy"])]
    assert len(accuracy) == 2 * 2 * EPOCHS and accuracy["value"].between(0.0, 1.0).all()
    # the models learn something even in two epochs
    assert (result.accuracy[["train_accuracy", "test_accuracy"]] > 0.5).all().all()


def test_too_wide_layer_is_least_saturated(demo: tuple[DemoResult, bytes, tuple]) -> None:
    result, _, _ = demo
    s = result.summary.set_index(["model", "layer"])
    assert s.loc[("mlp", "fc1"), "width"] == 512
    for phase in ("lsat_train", "lsat_eval"):
        wide = s.loc[("mlp", "fc1"), phase]
        # an affine map of 64 pixels: at most 64 of 512 dimensions vary
        assert 0.0 < wide <= 64 / 512
        for narrow in [("mlp", "fc3"), ("cnn", "conv1"), ("cnn", "fc2")]:
            assert wide < s.loc[narrow, phase], (phase, narrow)


def test_deterministic(demo: tuple[DemoResult, bytes, tuple]) -> None:
    result, first_bytes, _ = demo
    assert (result.analysis_dir / "stats.csv").read_bytes() == first_bytes


def test_torch_settings_restored(demo: tuple[DemoResult, bytes, tuple]) -> None:
    _, _, before = demo
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_report(demo: tuple[DemoResult, bytes, tuple]) -> None:
    result, _, _ = demo
    text = result.report()
    assert str(result.analysis_dir / "stats.csv") in text
    assert str(result.analysis_dir / "plots") in text
    lines = text.splitlines()
    assert any(line.split()[:3] == ["mlp", "fc1", "512"] for line in lines)
    assert sum(line.split()[1:2] == ["accuracy"] for line in lines) == 2


def test_provenance_covers_every_file(demo: tuple[DemoResult, bytes, tuple]) -> None:
    import hashlib

    result, _, _ = demo
    marker = json.loads((result.out / DEMO_MARKER).read_text())
    files = {str(p.relative_to(result.out)) for p in result.out.rglob("*") if p.is_file()} - {DEMO_MARKER}
    assert set(marker["files"]) == files  # the run stores' files included
    for name in ("analysis/stats.csv", "runs/mlp.zarr/zarr.json"):
        assert marker["files"][name] == hashlib.sha256((result.out / name).read_bytes()).hexdigest()
    analysis = json.loads((result.analysis_dir / "provenance.json").read_text())
    assert {i["path"] for i in analysis["inputs"].values()} == {str(p.absolute()) for p in result.runs.values()}


def test_a_failure_while_writing_leaves_the_earlier_output(
    demo: tuple[DemoResult, bytes, tuple], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from analyze import plots

    out = tmp_path / "out"
    shutil.copytree(demo[0].out, out)
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "heatmap_png", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_demo(out, seed=1, epochs=1, progress=False, print_report=False)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # the earlier run stores and analysis, every byte
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo output"):
        run_demo(tmp_path, epochs=1, progress=False, print_report=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"epochs": 1.5}, {"seed": -1}, {"seed": True}])
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="epochs|seed"):
        run_demo(tmp_path / "out", progress=False, print_report=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_split_is_seeded() -> None:
    a, b = load_digits_split(3), load_digits_split(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(a[1]) + len(a[3]) == 1797
    assert not torch.equal(load_digits_split(4)[1], a[1])
