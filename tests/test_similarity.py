"""Representational similarity from run stores, end to end, against in-memory references.

Models with conv, linear, LSTM and GRU layers are trained and recorded with ``capture.Recorder``
(raw, small chunks, so that every layer has a chunk grid of its own); a plain forward hook keeps
every output in memory as well. ``analyze.similarity`` reads the stores; the references compute
each measure from the papers' formulas (``_similarity_refs``) on the hooked outputs reshaped by
``capture.reshape.to_matrix``. They must agree to 1e-10 relative, for every pairing (layers,
epochs, runs), several ranks and every reshaping method; the pass must read each stored chunk
once, bit-identically under every scheduler and task size; bad input must fail before any read,
on one line.
"""

from __future__ import annotations

import doctest
import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _similarity_refs import REFERENCES, ref_minibatch_cka
from click.testing import CliRunner
from torch import nn

import analyze.plots
import analyze.similarity_api
import analyze.similarity_outputs
from analyze import (
    MEASURE_NAMES,
    SIMILARITY_COLUMNS,
    AnalysisError,
    AnalysisOptions,
    analyze_similarity,
    publish_similarity,
    similarity,
    similarity_matrices,
)
from analyze.outputs import table_csv
from analyze.similarity_api import SimilarityResult, split_pairs
from analyze.similarity_io import chunk_reads
from analyze.similarity_outputs import similarity_files
from capture import Recorder
from capture.reshape import to_matrix
from capture.store import open_run
from pipelines.cli import cli
from pipelines.sweep import SweepConfig, SweepConfigError

RTOL = 1e-10
#: Below this magnitude a value is compared to RTOL * FLOOR (debiased CKA of unrelated layers is ~0).
FLOOR = 1e-3
LAYOUTS = {
    "conv": "conv",
    "conv2": "conv",
    "fc": "flat",
    "lstm": "sequence",
    "gru": "sequence",
    "head": "flat",
}


class SimNet(nn.Module):
    """Conv2d -> Conv2d (same 5x5 maps) -> Linear, and an LSTM then a GRU over the maps as 25 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 12)
        self.lstm = nn.LSTM(6, 10, batch_first=True)
        self.gru = nn.GRU(10, 7, batch_first=True)
        self.head = nn.Linear(7 + 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv(x))
        flat = torch.relu(self.fc(torch.relu(self.conv2(maps)).flatten(1)))
        seq, _ = self.lstm(maps.flatten(2).transpose(1, 2))  # (B, 25, 10)
        seq2, _ = self.gru(seq)  # (B, 25, 7)
        return self.head(torch.cat([seq2[:, -1], flat], dim=1))


Tape = dict[tuple[int, str], dict[str, list[np.ndarray]]]


def _hook(net: nn.Module, tape: Tape, state: dict[str, Any]) -> list[Any]:
    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            phase = "train" if module.training else "eval"
            tape.setdefault((state["epoch"], phase), {}).setdefault(name, []).append(
                out.detach().numpy().copy()
            )

        return hook

    return [getattr(net, n).register_forward_hook(make(n)) for n in LAYOUTS if hasattr(net, n)]


def record(
    path: Path,
    seed: int = 0,
    epochs: int = 2,
    eval_batches: tuple[int, ...] = (40, 40, 40),
    eval_seed: int = 100,
    rank: int | None = None,
    world_size: int | None = None,
    chunk_bytes: int = 2000,
    **recorder: Any,
) -> Tape:
    """Train a SimNet for ``epochs`` epochs, recording it (raw) to ``path``; every hooked output."""
    torch.manual_seed(seed)
    net = SimNet()
    x_train = torch.randn(160, 2, 5, 5)
    y_train = torch.randint(0, 3, (160,))
    x_eval = torch.randn(sum(eval_batches), 2, 5, 5, generator=torch.Generator().manual_seed(eval_seed))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    tape: Tape = {}
    state = {"epoch": 0}
    handles = _hook(net, tape, state)
    ranks = {} if rank is None else {"rank": rank, "world_size": world_size}
    with Recorder(net, path, mode="raw", chunk_bytes=chunk_bytes, **ranks, **recorder) as rec:
        for epoch in range(epochs):
            state["epoch"] = epoch
            net.train()
            for idx in torch.randperm(160, generator=torch.Generator().manual_seed(epoch)).split(32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
                optimizer.step()
            net.eval()
            with torch.no_grad():
                for batch in x_eval.split(list(eval_batches)):
                    net(batch)
            rec.end_epoch()
    for h in handles:
        h.remove()
    return tape


def method_of(layer: str, conv_method: str, timeseries_method: str) -> str:
    layout = LAYOUTS[layer]
    return conv_method if layout == "conv" else timeseries_method if layout == "sequence" else "none"


def ref_matrix(tapes: list[Tape], epoch: int, phase: str, layer: str, conv: str, ts: str) -> np.ndarray:
    """The layer's matrix from the hooked outputs (several tapes: ranks, concatenated in order)."""
    outputs = np.concatenate([o for tape in tapes for o in tape[(epoch, phase)][layer]])
    return np.asarray(to_matrix(outputs, LAYOUTS[layer], method_of(layer, conv, ts)), dtype=np.float64)


def reference(
    measure: str, x: np.ndarray, y: np.ndarray, minibatch_size: int, svcca_threshold: float
) -> float:
    if measure == "minibatch_cka":
        return ref_minibatch_cka(x, y, minibatch_size)
    if measure == "svcca":
        return REFERENCES["svcca"](x, y, svcca_threshold)
    return REFERENCES[measure](x, y)


def assert_matches(
    table: pd.DataFrame,
    matrix: Callable[[Any], np.ndarray],
    minibatch_size: int = 16,
    svcca_threshold: float = 0.99,
) -> float:
    """Every row of ``table`` equals its reference (``matrix(row_side)`` gives a side's matrix)."""
    assert list(table.columns) == list(SIMILARITY_COLUMNS) and len(table)
    worst, cache = 0.0, {}
    for row in table.itertuples(index=False):
        sides = []
        for side in ("a", "b"):
            key = (getattr(row, f"run_{side}"), getattr(row, f"epoch_{side}"), getattr(row, f"layer_{side}"))
            key += (row.phase, row.conv_method, row.timeseries_method)
            if key not in cache:
                cache[key] = matrix(key)
            sides.append(cache[key])
        ref = reference(row.measure, *sides, minibatch_size, svcca_threshold)
        error = abs(row.value - ref) / max(abs(ref), FLOOR)
        assert error <= RTOL, (row, ref)
        worst = max(worst, error)
    return worst


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tape]:
    path = tmp_path_factory.mktemp("sim") / "a.zarr"
    return path, record(path, seed=0)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Tape]:
    path = tmp_path_factory.mktemp("sim") / "b.zarr"
    return path, record(path, seed=1)


def single(tape: Tape) -> Callable[[Any], np.ndarray]:
    return lambda key: ref_matrix([tape], key[1], key[3], key[2], key[4], key[5])


# --------------------------------------------------------------------------- against the references


def test_every_measure_matches_the_references_for_conv_linear_lstm_and_gru_layers(run_a) -> None:
    path, tape = run_a
    table = similarity(path, list(MEASURE_NAMES), minibatch_size=16, progress=False)
    assert set(table["measure"]) == set(MEASURE_NAMES) and set(table["phase"]) == {"train", "eval"}
    assert set(table["layer_a"]) == set(LAYOUTS) and set(table["epoch_a"]) == {0, 1}
    assert (table["conv_method"] == "mean").all() and (table["timeseries_method"] == "last_timestep").all()
    assert len(table) == 2 * 2 * len(MEASURE_NAMES) * len(LAYOUTS) ** 2
    assert_matches(table, single(tape))
    diagonal = table[table["layer_a"] == table["layer_b"]]
    np.testing.assert_allclose(diagonal["value"], 1.0, rtol=1e-12)  # a layer with itself


def test_other_reshaping_methods_match_the_references(run_a) -> None:
    path, tape = run_a
    table = similarity(
        path,
        ["cka", "cka_debiased", "svcca", "minibatch_cka"],
        conv_methods=("max", "median", "flatten"),
        timeseries_methods=("last_timestep", "timestepwise"),
        epochs="last",
        phases="eval",
        minibatch_size=32,
        svcca_threshold=0.95,
        progress=False,
    )
    assert set(table["conv_method"]) == {"max", "median", "flatten"}
    assert set(table["timeseries_method"]) == {"last_timestep", "timestepwise"}
    assert_matches(table, single(tape), minibatch_size=32, svcca_threshold=0.95)


def test_channelwise_compares_conv_maps_of_one_size_position_by_position(run_a) -> None:
    path, tape = run_a
    table = similarity(
        path,
        ["cka", "minibatch_cka"],
        layers=["conv", "conv2"],
        conv_methods="channelwise",
        phases="eval",
        minibatch_size=100,
        progress=False,
    )
    assert len(ref_matrix([tape], 0, "eval", "conv", "channelwise", "last_timestep")) == 120 * 25
    assert_matches(table, single(tape), minibatch_size=100)
    with pytest.raises(
        AnalysisError,
        match=r"^conv_methods: 'channelwise' gives layer 'conv' .* 25 rows per sample and 'none' gives layer 'fc' .* 1;",
    ) as info:
        similarity(path, layers=["conv", "fc"], conv_methods="channelwise", progress=False)
    assert info.value.argument == "conv_methods" and "\n" not in str(info.value)


def test_epoch_pairs_compare_each_layer_with_itself_at_every_epoch(tmp_path: Path) -> None:
    path = tmp_path / "e.zarr"
    tape = record(path, epochs=3)
    table = similarity(
        path,
        ["cka", "pwcca", "minibatch_cka"],
        pairs="epochs",
        phases="eval",
        minibatch_size=16,
        progress=False,
    )
    assert len(table) == len(LAYOUTS) * 3 * 9
    assert (table["layer_a"] == table["layer_b"]).all()
    assert_matches(table, single(tape))
    # the matrix of one layer: 1 on the diagonal, < 1 off it (the weights changed), in epoch order
    (matrix,) = [
        m
        for m in similarity_matrices(table, "epochs")
        if m.fixed["layer"] == "fc" and m.fixed["measure"] == "cka"
    ]
    assert matrix.labels == [0, 1, 2]
    np.testing.assert_allclose(np.diagonal(matrix.values), 1.0, rtol=1e-12)
    assert (matrix.values[~np.eye(3, dtype=bool)] < 1 - 1e-6).all()


def test_run_pairs_compare_each_layer_across_runs_on_the_same_eval_data(run_a, run_b) -> None:
    (path_a, tape_a), (path_b, tape_b) = run_a, run_b
    table = similarity([path_a, path_b], ["cka", "svcca"], pairs="runs", phases="eval", progress=False)
    assert set(table["run_a"]) == {"a", "b"} and (table["layer_a"] == table["layer_b"]).all()
    assert (table["epoch_a"] == table["epoch_b"]).all()
    tapes = {"a": tape_a, "b": tape_b}
    assert_matches(table, lambda k: ref_matrix([tapes[k[0]]], k[1], k[3], k[2], k[4], k[5]))
    off = table[table["run_a"] != table["run_b"]]
    assert (off["value"] < 1 - 1e-6).all()  # two seeds: related, not identical


def test_ranks_are_compared_rank_by_rank_and_merged_in_rank_order(tmp_path: Path) -> None:
    path = tmp_path / "ranks.zarr"
    tapes = [
        record(path, seed=3, eval_batches=(24, 24), eval_seed=7, rank=0, world_size=2, epochs=1),
        record(path, seed=3, eval_batches=(20, 13), eval_seed=8, rank=1, world_size=2, epochs=1),
    ]
    assert [p.rank for p in open_run(path).ranks] == [0, 1]
    table = similarity(path, list(MEASURE_NAMES), phases="eval", minibatch_size=16, progress=False)
    assert_matches(table, lambda k: ref_matrix(tapes, k[1], k[3], k[2], k[4], k[5]))


# --------------------------------------------------------------------------- invariances through the pipeline


class Transforms(nn.Module):
    """``x`` and its images under an exact signed permutation (x4), a rotation (x2.5), and another layer."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Linear(8, 6)
        self.permuted = nn.Linear(6, 6, bias=False)
        self.rotated = nn.Linear(6, 6, bias=False)
        self.other = nn.Linear(6, 5)
        rng = np.random.default_rng(0)
        perm = np.eye(6)[rng.permutation(6)] * rng.choice([-1.0, 1.0], size=6)
        q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
        with torch.no_grad():
            self.permuted.weight.copy_(torch.from_numpy(4.0 * perm))
            self.rotated.weight.copy_(torch.from_numpy(2.5 * q))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.x(x)
        return self.permuted(h) + self.rotated(h) + self.other(torch.tanh(h)).sum(1, keepdim=True)


@pytest.mark.parametrize("measure", ["cka", "cka_debiased", "minibatch_cka", "svcca"])
def test_orthogonal_transforms_and_isotropic_scaling_leave_the_measures_unchanged(
    tmp_path: Path, measure: str
) -> None:
    torch.manual_seed(0)
    net = Transforms()
    path = tmp_path / "t.zarr"
    with Recorder(net, path, chunk_bytes=256) as rec, torch.no_grad():
        for batch in torch.randn(300, 8).split(50):
            net(batch)
        rec.end_epoch()
    table = similarity(path, measure, minibatch_size=32, progress=False)
    (m,) = similarity_matrices(table, "layers")
    v = pd.DataFrame(m.values, index=m.labels, columns=m.labels)
    np.testing.assert_allclose(np.diagonal(m.values), 1.0, rtol=1e-12)
    # an exact transform of the stored float32 values: equal to round-off
    assert v.loc["permuted", "x"] == pytest.approx(1.0, rel=1e-12)
    assert v.loc["permuted", "other"] == pytest.approx(v.loc["x", "other"], rel=1e-12)
    # a rotation computed in float32 by the model: equal to float32's precision
    assert v.loc["rotated", "x"] == pytest.approx(1.0, rel=1e-5)
    assert v.loc["rotated", "other"] == pytest.approx(v.loc["x", "other"], rel=1e-5)
    assert v.loc["x", "other"] < 0.99


# --------------------------------------------------------------------------- one pass, determinism, cache


def _chunks_holding(
    path: Path, phases: tuple[str, ...], layers: tuple[str, ...] | None = None
) -> set[tuple[str, str, int]]:
    """Every (store, array, chunk) that holds a recorded row of ``phases`` (from the calls table)."""
    run = open_run(path)
    out = set()
    for part in run.ranks:
        for name, rec in part.layers.items():
            if layers is not None and name not in layers:
                continue
            chunk_rows = part.raw(name).chunk_rows
            calls = part.calls[part.calls[:, 2] == rec.index]
            for _, phase, _, _, first, count, _ in calls.tolist():
                if ("train", "eval")[phase] in phases:
                    for c in range(first // chunk_rows, (first + count - 1) // chunk_rows + 1):
                        out.add((str(path), f"{part.group.path}/{rec.raw_array}", c))
    return out


def test_one_pass_reads_each_chunk_of_each_layer_once(run_a) -> None:
    path, _ = run_a
    grids = {open_run(path).ranks[0].raw(n).chunk_rows for n in LAYOUTS}
    assert len(grids) == 5  # the layers have chunk grids of 2, 3, 5, 41 and 166 rows
    chunk_reads.clear()
    table = similarity(path, ["cka", "minibatch_cka"], task_bytes=4096, progress=False)
    assert len(table) == 2 * 2 * 2 * len(LAYOUTS) ** 2
    assert set(chunk_reads) == _chunks_holding(path, ("train", "eval"))
    assert set(chunk_reads.values()) == {1}
    chunk_reads.clear()
    similarity(path, pairs="epochs", phases="eval", layers=["conv", "gru"], progress=False)
    assert set(chunk_reads) == _chunks_holding(path, ("eval",), ("conv", "gru"))
    assert set(chunk_reads.values()) == {1}


@pytest.mark.parametrize("measures", [["cka", "cka_debiased", "svcca", "pwcca"], ["minibatch_cka"]])
def test_results_are_bit_identical_across_schedulers_and_task_sizes(run_a, measures: list[str]) -> None:
    path, _ = run_a
    tables = [
        similarity(
            path, measures, scheduler=scheduler, task_bytes=task_bytes, minibatch_size=24, progress=False
        )
        for scheduler in ("synchronous", "threads", "processes")
        for task_bytes in (2**24, 3000)
    ]
    for other in tables[1:]:
        assert table_csv(other) == table_csv(tables[0])
        assert other["value"].to_numpy().tobytes() == tables[0]["value"].to_numpy().tobytes()


def test_another_measure_from_the_same_accumulator_reads_no_activation(run_a, tmp_path: Path) -> None:
    path, _ = run_a
    cache = tmp_path / "cache"
    chunk_reads.clear()
    first = similarity(path, "cka", cache_dir=cache, progress=False)
    assert chunk_reads.total() > 0
    chunk_reads.clear()
    again = similarity(path, ["svcca", "pwcca", "cka_debiased"], cache_dir=cache, progress=False)
    assert chunk_reads.total() == 0  # the joint moments come from the cache
    uncached = similarity(path, ["svcca", "pwcca", "cka_debiased"], progress=False)
    assert table_csv(again) == table_csv(uncached)
    assert table_csv(similarity(path, "cka", cache_dir=cache, progress=False)) == table_csv(first)
    similarity(path, "minibatch_cka", cache_dir=cache, minibatch_size=32, progress=False)
    assert chunk_reads.total() > 0  # another accumulator: read once
    chunk_reads.clear()
    similarity(path, ["minibatch_cka", "cka"], cache_dir=cache, minibatch_size=32, progress=False)
    assert chunk_reads.total() == 0
    similarity(path, "minibatch_cka", cache_dir=cache, minibatch_size=64, progress=False)
    assert chunk_reads.total() > 0  # another minibatch size is another accumulator


# --------------------------------------------------------------------------- rows that are not the same samples


class Uneven(nn.Module):
    """``head`` sees half of each batch (``split``: all of it, in two calls of half a batch)."""

    def __init__(self, split: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)
        self.split = split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        half = len(h) // 2
        if self.split:
            return torch.cat([self.head(h[:half]), self.head(h[half:])])
        return self.head(h[:half])


def _uneven(path: Path, split: bool) -> Path:
    torch.manual_seed(0)
    net = Uneven(split)
    with Recorder(net, path) as rec, torch.no_grad():
        for batch in torch.randn(64, 4).split(32):
            net(batch)
        rec.end_epoch()
    return path


def test_different_sample_counts_are_an_error_naming_both_layers(tmp_path: Path) -> None:
    path = _uneven(tmp_path / "u.zarr", split=False)
    chunk_reads.clear()
    with pytest.raises(AnalysisError) as info:
        similarity(path, progress=False)
    message = str(info.value)
    assert message.startswith(
        "pairs='layers': layer 'head' (run 'u', epoch 0, train, rank 0) has 32 samples and "
    )
    assert "layer 'fc' (run 'u', epoch 0, train, rank 0) 64" in message and "\n" not in message
    assert chunk_reads.total() == 0  # found before any read


def test_different_call_sizes_or_calls_are_an_error(tmp_path: Path) -> None:
    path = _uneven(tmp_path / "s.zarr", split=True)
    with pytest.raises(
        AnalysisError, match=r"recorded in calls of different sizes \(\[16, 16, 16, 16\] and \[32, 32\]\)"
    ):
        similarity(path, progress=False)


def test_runs_with_other_samples_are_an_error(run_a, tmp_path: Path) -> None:
    path_a, _ = run_a
    other = tmp_path / "c.zarr"
    record(other, seed=2, eval_batches=(40, 40))
    with pytest.raises(
        AnalysisError,
        match=r"^pairs='runs': layer 'conv' \(run 'c', epoch 0, eval, rank 0\) has 80 samples and layer 'conv' \(run 'a', epoch 0, eval, rank 0\) 120",
    ):
        similarity([path_a, other], pairs="runs", phases="eval", progress=False)
    shuffled = tmp_path / "d.zarr"
    record(shuffled, seed=2, eval_batches=(60, 60))
    with pytest.raises(AnalysisError, match="calls of different sizes"):
        similarity([path_a, shuffled], pairs="runs", phases="eval", progress=False)


def test_train_rows_across_epochs_are_warned_about(run_a) -> None:
    path, _ = run_a
    with pytest.warns(
        UserWarning, match="pairs='epochs' compares the train phase's rows of different epochs"
    ):
        similarity(path, pairs="epochs", layers="fc", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        similarity(path, pairs="epochs", layers="fc", phases="eval", progress=False)
        similarity(path, layers="fc", progress=False)  # layers of one forward pass: the same samples


def test_gram_only_stores_and_unsupported_options_are_refused(run_a, tmp_path: Path) -> None:
    path, _ = run_a
    gram = tmp_path / "g.zarr"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    with Recorder(net, gram, mode="gram") as rec:
        net(torch.randn(16, 4))
        rec.end_epoch()
    with pytest.raises(
        AnalysisError,
        match=r"layer '0': similarity needs raw activations, and this store holds gram moments only",
    ):
        similarity(gram, progress=False)
    with pytest.raises(AnalysisError, match="^source: similarity reads raw activations"):
        similarity(path, source="gram", progress=False)
    with pytest.raises(AnalysisError, match="^compat: delve 0.1.50 computes no similarity"):
        similarity(path, compat="delve-0.1.50", progress=False)
    with pytest.raises(AnalysisError, match="^device: 'cuda:7' asked for but torch sees no CUDA device"):
        if torch.cuda.device_count() > 7:
            pytest.skip("a machine with 8 GPUs")
        similarity(path, device="cuda:7", progress=False)
    with pytest.raises(TypeError, match="measure= or measures="):
        similarity(path, "cka", measures="svcca", progress=False)
    with pytest.warns(RuntimeWarning, match="skipped g layer '0'"):
        with pytest.raises(AnalysisError, match="no recorded samples"):
            similarity(gram, on_error="skip", progress=False)


def test_nan_activations_are_an_error_naming_the_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = tmp_path / "n.zarr"
    with Recorder(net, path) as rec, torch.no_grad():
        x = torch.randn(20, 4)
        x[5, 0] = float("nan")
        net(x)
        rec.end_epoch()
    with pytest.raises(
        AnalysisError,
        match=r"^train, rank 0, samples 0-19: layer '0' \(run 'n', epoch 0\) has NaN or infinite activations; similarity needs finite activations$",
    ):
        similarity(path, progress=False)


# --------------------------------------------------------------------------- options everywhere


EVERYWHERE = [
    ("measures", ["cca"], ["--measure", "cca"]),
    ("measures", ["cka", "cka"], ["--measure", "cka", "--measure", "cka"]),
    ("svcca_threshold", 1.5, ["--svcca-threshold", "1.5"]),
    ("minibatch_size", 3, ["--minibatch-size", "3"]),
    ("pairs", "samples", ["--pairs", "samples"]),
    ("conv_methods", ["avg"], ["--conv-method", "avg"]),
]


@pytest.mark.parametrize(("field", "value", "args"), EVERYWHERE, ids=[" ".join(a) for _, _, a in EVERYWHERE])
def test_api_cli_and_sweep_refuse_alike(field: str, value: Any, args: list[str], tmp_path: Path) -> None:
    with pytest.raises(AnalysisError) as api:
        similarity(tmp_path / "missing.zarr", **{field: value}, progress=False)
    assert api.value.argument == field
    reason = api.value.reason
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["similarity", "missing.zarr", "-o", str(out), *args], prog_name="delve-analyze"
    )
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"Error: Invalid value for '{args[0]}': {reason} (see 'delve-analyze similarity --help')\n"
    )
    assert not out.exists()
    with pytest.raises(SweepConfigError) as swept:
        SweepConfig.from_dict({"runs": ["a.zarr"], field: value})
    assert str(swept.value) == f"sweep config: {field!r}: {reason}"


def test_options_objects_mappings_and_keywords_agree(run_a) -> None:
    path, _ = run_a
    keywords = similarity(path, "svcca", phases="eval", epochs="last", svcca_threshold=0.9, progress=False)
    options = AnalysisOptions(
        measures="svcca", conv_methods="mean", phases="eval", epochs="last", svcca_threshold=0.9
    )
    for other in (
        similarity(path, options=options, progress=False),
        similarity(path, options=options.to_dict(), progress=False),
        similarity(
            path,
            options={"phases": "eval", "epochs": "last"},
            measure="svcca",
            svcca_threshold=0.9,
            progress=False,
        ),
    ):
        pd.testing.assert_frame_equal(other, keywords)


# --------------------------------------------------------------------------- the command line and its folder


def _run_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["similarity", *args, "--no-progress"], prog_name="delve-analyze")


def test_command_writes_the_table_heatmaps_and_provenance(run_a, run_b, tmp_path: Path) -> None:
    (path_a, _), (path_b, _) = run_a, run_b
    out = tmp_path / "out"
    result = _run_cli(
        str(path_a), "-o", str(out), "--measure", "cka", "--measure", "svcca", "--phase", "eval"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out.absolute()}: similarity.csv (144 rows), 4 plot(s), provenance.json\n"
    expected = similarity(path_a, ["cka", "svcca"], phases="eval", progress=False)
    assert (out / "similarity.csv").read_bytes() == table_csv(expected)
    assert pd.read_csv(out / "similarity.csv").shape == (144, len(SIMILARITY_COLUMNS))
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == [
        f"a_mean_last_timestep_eval_{m}_layers_epoch{e}.png" for m in ("cka", "svcca") for e in (0, 1)
    ]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["format"] == "delve-pipeline.similarity" and provenance["rows"] == 144
    assert (
        provenance["options"]["measures"] == ["cka", "svcca"] and provenance["options"]["pairs"] == "layers"
    )
    assert provenance["inputs"]["a"]["path"] == str(path_a.absolute())
    for name, digest in provenance["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    # epochs and runs: one heatmap per layer, per layer and epoch
    result = _run_cli(str(path_a), "-o", str(out), "--pairs", "epochs", "--phase", "eval", "--layers", "fc")
    assert result.exit_code == 0 and sorted(p.name for p in (out / "plots").iterdir()) == [
        "a_mean_last_timestep_eval_cka_epochs_fc.png"
    ]
    result = _run_cli(
        str(path_a),
        str(path_b),
        "-o",
        str(out),
        "--pairs",
        "runs",
        "--phase",
        "eval",
        "--epochs",
        "last",
        "--layers",
        "gru",
    )
    assert result.exit_code == 0 and sorted(p.name for p in (out / "plots").iterdir()) == [
        "mean_last_timestep_eval_cka_runs_gru_epoch1.png"
    ]
    assert (out.parent / "out.cache").is_dir()  # the one cache rule


def test_heatmaps_are_the_same_bytes_each_time(run_a, tmp_path: Path) -> None:
    path, _ = run_a
    result = analyze_similarity(path, "cka_debiased", phases="eval", progress=False)
    first = publish_similarity(result, tmp_path / "one")
    second = publish_similarity(result, tmp_path / "two")
    assert [p.read_bytes() for p in first["plots"]] == [p.read_bytes() for p in second["plots"]]


def test_heatmaps_draw_the_tables_values(run_a) -> None:
    path, _ = run_a
    result = analyze_similarity(path, "cka_debiased", phases="eval", epochs="last", progress=False)
    ((kind, name, png),) = [f for f in similarity_files(result) if f[0] == "plots"]
    assert name == "plots/a_mean_last_timestep_eval_cka_debiased_layers_epoch1.png"
    table = result.table
    layers = list(dict.fromkeys(table["layer_a"]))
    expected = np.full((len(layers), len(layers)), np.nan)
    for row in table.itertuples():
        expected[layers.index(row.layer_a), layers.index(row.layer_b)] = row.value
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(np.diag(expected), 1.0, rtol=1e-10)  # a layer with itself
    title = "cka_debiased, layer x layer\na, epoch 1, eval | mean | last_timestep"
    assert png == analyze.plots.matrix_png(
        expected,
        layers,
        layers,
        "cka_debiased",
        title,
        xlabel="layer",
        ylabel="layer",
        vlim=(min(0.0, expected.min()), 1.0),
    )


def test_heatmaps_draw_names_as_text() -> None:
    """A '$' in a run or layer name is a character, not the start of mathtext (which would fail)."""
    names = ["$\\frac$ a", "b$"]
    rows = [
        ("r$", 0, a, "r$", 0, b, "eval", "mean", "last_timestep", "cka", 1.0 if a == b else 0.5)
        for a in names
        for b in names
    ]
    table = pd.DataFrame(rows, columns=list(SIMILARITY_COLUMNS))
    result = SimilarityResult(table=table, options={"pairs": "layers"})
    plots = [(name, png) for kind, name, png in similarity_files(result) if kind == "plots"]
    assert [name for name, _ in plots] == ["plots/r-_mean_last_timestep_eval_cka_layers_epoch0.png"]
    assert plots[0][1][:4] == b"\x89PNG"


def test_tables_of_several_kinds_of_pairs_split_into_their_matrices(run_a, run_b) -> None:
    (path_a, _), (path_b, _) = run_a, run_b
    tables = {
        pairs: similarity([path_a, path_b], ["cka", "svcca"], pairs, phases="eval", progress=False)
        for pairs in ("layers", "epochs", "runs")
    }
    last = similarity(path_a, "cka", "epochs", phases="eval", epochs="last", progress=False)  # 1 x 1 each
    split = split_pairs(pd.concat([*tables.values()], ignore_index=True))
    assert list(split) == ["layers", "epochs", "runs"]
    for pairs, table in [*tables.items(), ("epochs", last)]:
        got = similarity_matrices(split_pairs(table)[pairs] if table is last else split[pairs], pairs)
        want = similarity_matrices(table, pairs)
        assert [(m.fixed, m.labels) for m in got] == [(m.fixed, m.labels) for m in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.values, w.values)
    assert list(split_pairs(last)) == ["epochs"]
    across = tables["layers"].assign(run_b="b")
    with pytest.raises(ValueError, match="row 1 compares run 'a' epoch 0 layer 'conv' with run 'b' epoch 0"):
        split_pairs(across)


def test_command_errors_are_one_line_and_write_nothing(run_a, tmp_path: Path) -> None:
    path, _ = run_a
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "missing.zarr")], "no run store here"),
        ([str(path), "--layers", "nope*"], "layers: 'nope*' matches no layer"),
        ([str(path), "--conv-method", "channelwise"], "conv_methods: 'channelwise' gives layer 'conv'"),
        ([str(path), "--pairs", "runs", "--epochs", "5"], "epochs: epoch(s) [5] out of range"),
    ]
    for args, fragment in cases:
        result = _run_cli(*args, "-o", str(out))
        assert result.exit_code == 2, (args, result.output)
        assert (
            result.stderr.startswith("Error: ")
            and fragment in result.stderr
            and result.stderr.count("\n") == 1
        )
        assert not out.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    result = _run_cli(str(path), "-o", str(foreign))
    assert result.exit_code == 2 and "not an analysis output" in result.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_the_installed_command_runs(run_a, tmp_path: Path) -> None:
    path, _ = run_a
    exe = Path(sys.executable).parent / "delve-analyze"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ok = subprocess.run(
        [str(exe), "similarity", str(path), "-o", str(tmp_path / "o"), "--epochs", "last", "--no-plots"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("wrote ") and ok.stderr == ""
    bad = subprocess.run(
        [str(exe), "similarity", str(path), "-o", str(tmp_path / "p"), "--minibatch-size", "2"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr == (
        "Error: Invalid value for '--minibatch-size': invalid minibatch_size 2: must be an integer >= 4 "
        "(see 'delve-analyze similarity --help')\n"
    )


def test_a_failure_while_writing_leaves_the_earlier_output_as_it_was(
    run_a, tmp_path: Path, monkeypatch
) -> None:
    path, _ = run_a
    out = tmp_path / "out"
    result = analyze_similarity(path, "cka", progress=False)
    publish_similarity(result, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = analyze.plots.matrix_png

    def failing(*args: Any, **kwargs: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(analyze.plots, "matrix_png", failing)
    with pytest.raises(OSError, match="No space left"):
        publish_similarity(analyze_similarity(path, "svcca", progress=False), out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_a_killed_writer_leaves_the_earlier_output_as_it_was(run_a, tmp_path: Path) -> None:
    path, _ = run_a
    out = tmp_path / "out"
    publish_similarity(analyze_similarity(path, "cka", progress=False), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    script = (
        "import os, signal, sys\n"
        "from analyze import output_folder, analyze_similarity, publish_similarity\n"
        "real = output_folder.OutputFolder.write\n"
        "def write(self, relative, data):\n"
        "    path = real(self, relative, data)\n"
        "    if relative.startswith('plots/'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return path\n"
        "output_folder.OutputFolder.write = write\n"
        "publish_similarity(analyze_similarity(sys.argv[1], 'svcca', progress=False), sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(out)], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    publish_similarity(analyze_similarity(path, "svcca", progress=False), out)  # and the next one works
    assert json.loads((out / "provenance.json").read_text())["options"]["measures"] == ["svcca"]


def test_docs_examples_of_the_modules_run() -> None:
    for module in (analyze.similarity_api, analyze.similarity_outputs, analyze.plots):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0, module.__name__
