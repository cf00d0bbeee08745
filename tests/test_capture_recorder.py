"""capture.Recorder end to end: what it stores, checked against plain forward hooks, numpy float64
references written here, and delve 0.1.50 run side by side on the same model and data."""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import covariance64, rel_err
from torch import nn

import capture.recorder as recorder_module
from capture import CaptureError, Recorder, StoreFormatError, open_run, tree_merge
from capture.format import BLOCK_KIND_EPOCH, BLOCK_KIND_LAST_CALL, PHASES
from capture.reshape import CONV_METHODS, INTERPOLATION_MODES, TIMESERIES_METHODS
from capture.store_writer import RunStoreWriter
from capture.writer import BackgroundWriter

#: How each layer of MixedNet (tests/conftest.py) becomes a matrix: conv maps (2-D and 1-D),
#: sequences (LSTM, GRU, Linear on a 3-D input) and a plain Linear.
MIXED_LAYOUTS = {
    "conv2d": "conv",
    "conv1d": "conv",
    "bilstm": "sequence",
    "gru": "sequence",
    "seq_fc": "sequence",
    "out": "flat",
}
ORACLE_LAYOUTS = {"conv": "conv", "fc": "flat", "lstm": "sequence", "head": "sequence"}

# -- references -----------------------------------------------------------------------------------


def samples_first(seen) -> np.ndarray:
    """A hooked output with samples first: an RNN that is not batch first returns (T, B, H)."""
    out = seen.output if seen.batch_first else seen.output.transpose(0, 1)
    return out.numpy()


def resized(x: np.ndarray, interpolation: str | None, size: int | None) -> np.ndarray:
    """delve's rule: resize conv maps to size^k when an extent is > size (and the mode fits the rank)."""
    spatial = x.shape[2:]
    if (
        interpolation is None
        or len(spatial) not in INTERPOLATION_MODES[interpolation]
        or max(spatial) <= size
    ):
        return x
    return F.interpolate(torch.from_numpy(x), size=size, mode=interpolation).numpy()


def matrix(x: np.ndarray, layout: str, method: str, reference_matrix) -> np.ndarray:
    # ``mean`` averages each map in float64 (the reference's float64 mean, to 1e-12)
    return reference_matrix(x, layout, method)


def train_epoch(net, sizes, generator, opt, eval_sizes=(), on_batch=None):
    net.train()
    for i, b in enumerate(sizes):
        if on_batch is not None:
            on_batch(i)
        loss = net(torch.randn(b, 1, 8, 8, generator=generator)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        for b in eval_sizes:
            net(torch.randn(b, 1, 8, 8, generator=generator))


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# -- raw outputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_raw_equals_what_a_forward_hook_sees(tmp_path, mixed_net, hook_tape, dtype):
    net = mixed_net(0)
    tape = hook_tape(dict(net.named_children()))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "run.zarr"
    # tiny chunks: batches straddle chunk boundaries and epochs end inside a chunk
    with Recorder(net, path, dtype=dtype, chunk_bytes=300) as rec:
        for _ in range(2):
            train_epoch(net, (5, 3, 4), g, opt, eval_sizes=(6,))
            rec.add_scalar("lr", 0.1)
            rec.end_epoch()
    run = open_run(path)
    assert run.layers == list(MIXED_LAYOUTS) and run.epochs == [0, 1] and run.incomplete_epoch is None
    assert run.scalars == {0: {"lr": 0.1}, 1: {"lr": 0.1}}
    calls = run.calls()
    for li, name in enumerate(run.layers):
        seen = tape.calls(name)
        expected = np.concatenate([samples_first(s) for s in seen])
        got = run.ranks[0].raw(name)[:]
        assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
        assert got.shape == expected.shape
        got = got.astype(np.float32)
        if dtype == "float32":
            np.testing.assert_array_equal(got, expected)
        elif dtype == "float16":
            np.testing.assert_array_equal(got, expected.astype(np.float16).astype(np.float32))
            assert np.all(np.abs(got - expected) <= 2.0**-11 * np.abs(expected) + 2.0**-25)
        else:  # bfloat16: 8 significant bits, float32's range
            assert np.all(np.abs(got - expected) <= 2.0**-8 * np.abs(expected))
        # the calls table: one row per forward call, in order, pointing at its rows
        mine = calls["layer"] == li
        sizes = [len(samples_first(s)) for s in seen]
        np.testing.assert_array_equal(calls["row_count"][mine], sizes)
        np.testing.assert_array_equal(calls["first_row"][mine], np.cumsum([0, *sizes[:-1]]))
        np.testing.assert_array_equal(calls["call_index"][mine], np.arange(1, len(seen) + 1))
        np.testing.assert_array_equal(calls["phase"][mine], [0 if s.training else 1 for s in seen])
        np.testing.assert_array_equal(calls["epoch"][mine], [0] * 4 + [1] * 4)
        np.testing.assert_array_equal(calls["rank"][mine], 0)


def test_raw_is_copied_before_an_inplace_activation(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(9, 4)
    with torch.no_grad():
        expected = net[0](x).numpy()  # pre-activation, with negative values
    assert (expected < 0).any()
    with Recorder(net, tmp_path / "run.zarr", mode="both") as rec:
        net(x)  # ReLU(inplace=True) overwrites the Linear's output after the hook
        rec.end_epoch()
    run = open_run(tmp_path / "run.zarr")
    np.testing.assert_array_equal(run.ranks[0].raw("0")[:], expected)
    n, mean, _ = run.ranks[0].gram("0", "none").read(0)
    assert n == 9 and rel_err(mean, expected.astype(np.float64).mean(0)) <= 1e-12


def test_an_exactly_named_module_of_any_type_is_recorded(tmp_path, hook_tape):
    net = small_net()
    tape = hook_tape({"1": net[1]})
    with Recorder(net, tmp_path / "run.zarr", layers=["1"]) as rec:
        net(torch.randn(7, 4))
        rec.end_epoch()
    run = open_run(tmp_path / "run.zarr")
    assert run.layers == ["1"] and run.layer("1").type == "ReLU"
    np.testing.assert_array_equal(run.ranks[0].raw("1")[:], tape.calls("1")[0].output.numpy())
    with pytest.raises(KeyError, match="no layer 'nope'.*layers are: 1"):
        run.layer("nope")


# -- gram moments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", [None, "bilinear", "nearest"])
def test_gram_moments_equal_numpy(tmp_path, mixed_net, hook_tape, reference_matrix, interpolation):
    size = 3 if interpolation else None
    net = mixed_net(1)
    tape = hook_tape(dict(net.named_children()))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "run.zarr"
    marks = [0]
    with Recorder(
        net,
        path,
        mode="both",
        conv_methods=list(CONV_METHODS),
        timeseries_methods=list(TIMESERIES_METHODS),
        interpolation=interpolation,
        downsample=size,
        gram_block_rows=9,  # several blocks per epoch, flushed mid-epoch
    ) as rec:
        for _ in range(2):
            train_epoch(net, (5, 3, 4), g, opt, eval_sizes=(6, 2))
            rec.end_epoch()
            marks.append(len(tape.seen))
    run = open_run(path)
    part = run.ranks[0]
    checked = 0
    for name, layout in MIXED_LAYOUTS.items():
        interp = interpolation if layout == "conv" else None  # only conv maps are resized
        outputs = [resized(samples_first(s), interp, size) for s in tape.calls(name)]
        # raw is stored after the resize (the recorder's rule for maps)
        np.testing.assert_array_equal(part.raw(name)[:], np.concatenate(outputs))
        # (position in the tape, delve's 1-based call index) of every call of this layer
        mine = [(i, k + 1) for k, i in enumerate(i for i, s in enumerate(tape.seen) if s.name == name)]
        methods = {"conv": CONV_METHODS, "sequence": TIMESERIES_METHODS, "flat": ["none"]}[layout]
        assert sorted(run.layer(name).gram) == sorted(methods)
        for method in methods:
            blocks = part.gram(name, method)
            kind, epoch_col, phase_col = (blocks.info_column(c) for c in ("kind", "epoch", "phase"))
            for epoch in (0, 1):
                for phase in PHASES:
                    calls = [
                        (i, c)
                        for i, c in mine
                        if marks[epoch] <= i < marks[epoch + 1]
                        and tape.seen[i].training == (phase == "train")
                    ]
                    xs = [resized(samples_first(tape.seen[i]), interp, size) for i, _ in calls]
                    mats = [matrix(x, layout, method, reference_matrix) for x in xs]
                    sel = (epoch_col == epoch) & (phase_col == PHASES.index(phase))
                    epoch_blocks = np.flatnonzero(sel & (kind == BLOCK_KIND_EPOCH))
                    assert len(epoch_blocks) >= 1
                    n, mean, m2 = tree_merge([blocks.read(int(b)) for b in epoch_blocks])
                    ref_n, ref_mean, ref_m2 = covariance64(np.concatenate(mats))
                    assert n == ref_n
                    assert rel_err(mean, ref_mean) <= 1e-12
                    assert rel_err(m2, ref_m2) <= 1e-12
                    assert blocks.info_column("sample_rows")[epoch_blocks].sum() == sum(len(x) for x in xs)
                    assert blocks.info_column("first_call")[epoch_blocks[0]] == calls[0][1]
                    assert blocks.info_column("last_call")[epoch_blocks[-1]] == calls[-1][1]
                    # the last-call block: the moments of the last recorded call alone
                    (last,) = np.flatnonzero(sel & (kind == BLOCK_KIND_LAST_CALL))
                    n, mean, m2 = blocks.read(int(last))
                    ref_n, ref_mean, ref_m2 = covariance64(mats[-1])
                    assert n == ref_n and rel_err(mean, ref_mean) <= 1e-12 and rel_err(m2, ref_m2) <= 1e-12
                    assert blocks.info_column("first_call")[last] == blocks.info_column("last_call")[last]
                    assert blocks.info_column("last_call")[last] == calls[-1][1]
                    checked += 1
    assert checked == 2 * 2 * (2 * len(CONV_METHODS) + 3 * len(TIMESERIES_METHODS) + 1)


def test_gram_accepts_outputs_whose_shape_varies_when_the_width_does_not(tmp_path, reference_matrix):
    torch.manual_seed(0)
    conv, lstm = nn.Conv2d(2, 3, 3), nn.LSTM(3, 4, batch_first=True)
    inputs = [
        (torch.randn(2, 2, 6, 6), torch.randn(2, 5, 3)),
        (torch.randn(3, 2, 9, 7), torch.randn(3, 8, 3)),
    ]
    path = tmp_path / "run.zarr"
    with Recorder(
        {"conv": conv, "lstm": lstm}, path, mode="gram", conv_methods=["channelwise", "max"]
    ) as rec:
        with torch.no_grad():
            outs = [(conv(a).numpy(), lstm(b)[0].numpy()) for a, b in inputs]
        rec.end_epoch()
    part = open_run(path).ranks[0]
    for name, layout, method, k in [
        ("conv", "conv", "channelwise", 0),
        ("conv", "conv", "max", 0),
        ("lstm", "sequence", "last_timestep", 1),
    ]:
        blocks = part.gram(name, method)
        (epoch_block,) = np.flatnonzero(blocks.info_column("kind") == BLOCK_KIND_EPOCH)
        n, mean, m2 = blocks.read(int(epoch_block))
        ref = covariance64(np.concatenate([reference_matrix(o[k], layout, method) for o in outs]))
        assert n == ref[0] and rel_err(mean, ref[1]) <= 1e-12 and rel_err(m2, ref[2]) <= 1e-12
    # what cannot be kept: raw rows of a longer sequence (a shorter one is stored padded and masked,
    # tests/test_token_masks.py), or a reduction whose width changes
    longer = r"layer 'lstm': a call of 8 positions is longer than the 5 its raw rows hold; pass max_positions="
    changed = r"layer 'lstm': output shape per sample changed from \(5, 4\) to \(8, 4\)"
    for mode, kwargs, match in [
        ("raw", {}, longer),
        ("gram", {"timeseries_methods": ["timestepwise"]}, changed),
    ]:
        with Recorder({"lstm": lstm}, tmp_path / f"{mode}.zarr", mode=mode, **kwargs) as rec:
            lstm(inputs[0][1])
            with pytest.raises(CaptureError, match=match):
                lstm(inputs[1][1])


def test_nonfinite_rows_are_counted(tmp_path):
    net = nn.Linear(3, 2)
    x = torch.randn(6, 3)
    x[1, 0], x[4, 2] = float("inf"), float("nan")
    with Recorder({"lin": net}, tmp_path / "run.zarr", mode="gram") as rec:
        net(x)
        net(torch.randn(2, 3))
        rec.end_epoch()
    run = open_run(tmp_path / "run.zarr")
    np.testing.assert_array_equal(run.calls()["nonfinite_rows"], [2, 0])
    blocks = run.ranks[0].gram("lin", "none")
    np.testing.assert_array_equal(blocks.info_column("nonfinite_rows"), [2, 0])  # epoch block, last call


# -- row selection: log_interval, max_samples, phases, stop/resume, against delve 0.1.50 ----------


def test_row_selection_matches_delve(tmp_path, oracle_net, hook_tape, delve_tracker, reference_matrix):
    net = oracle_net(3)
    tape = hook_tape({n: getattr(net, n) for n in ORACLE_LAYOUTS})
    tracker = delve_tracker(net, stats=["lsat", "cov"], log_interval=2, max_samples=30)
    path = tmp_path / "run.zarr"
    rec = Recorder(net, path, mode="both", log_interval=2, max_samples=30)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    marks = [0]

    def batch_hook(epoch):
        def on_batch(i):
            net.fc.eval()  # a frozen layer: its training-loop calls are in the eval phase
            if epoch == 1 and i == 1:  # a forward while paused is neither recorded nor counted
                tracker.stop()
                rec.stop()
                start = len(tape.seen)
                with torch.no_grad():
                    net(torch.randn(4, 1, 8, 8, generator=g))
                del tape.seen[start:]
                tracker.resume()
                rec.resume()

        return on_batch

    for epoch in range(2):
        train_epoch(net, (16, 16, 16, 16, 10), g, opt, eval_sizes=(12, 7, 12), on_batch=batch_hook(epoch))
        tracker.add_saturations()
        rec.end_epoch()
        marks.append(len(tape.seen))
    tracker.close()
    rec.close()
    run = open_run(path)

    # an independent account of delve's rules: one counter per layer over train and eval, a call is
    # recorded when counter % log_interval == 0, and a budget of max_samples rows per epoch and phase
    expected = []
    counter: dict[str, int] = defaultdict(int)
    for epoch in range(2):
        budget: dict[tuple[str, str], int] = defaultdict(int)
        for s in tape.seen[marks[epoch] : marks[epoch + 1]]:
            counter[s.name] += 1
            phase = "train" if s.training else "eval"
            take = min(len(s.output), 30 - budget[phase, s.name])
            if counter[s.name] % 2 or take <= 0:
                continue
            budget[phase, s.name] += take
            expected.append((epoch, phase, s.name, counter[s.name], take))
    calls = run.calls()
    got = [
        (int(e), PHASES[p], run.layers[li], int(c), int(n))
        for e, p, li, c, n in zip(
            calls["epoch"],
            calls["phase"],
            calls["layer"],
            calls["call_index"],
            calls["row_count"],
            strict=True,
        )
    ]
    assert got == expected
    assert {n: m.forward_iter for n, m in tracker.layers.items()} == run.ranks[0].state["call_counters"]
    assert ("train", "fc") not in {(p, n) for _, p, n, _, _ in expected}  # fc ran in eval mode only

    # delve's covariance is that of its last recorded call: the same rows as the recorder's last call
    part = run.ranks[0]
    compared = 0
    for epoch in range(2):
        for phase in PHASES:
            for name, layout in ORACLE_LAYOUTS.items():
                key = f"_{phase}-covariance-matrix_{name}"
                npy = Path(tracker.savefile) / key / f"{key}_epoch{epoch}.npy"
                mine = [r for r in expected if r[:3] == (epoch, phase, name)]
                assert npy.exists() == bool(mine)
                if not mine:
                    continue
                delve_cov = np.load(npy)
                sel = np.flatnonzero(
                    (calls["epoch"] == epoch)
                    & (calls["phase"] == PHASES.index(phase))
                    & (calls["layer"] == run.layers.index(name))
                )
                first, rows = calls["first_row"][sel[-1]], calls["row_count"][sel[-1]]
                method = {"conv": "channelwise", "sequence": "last_timestep", "flat": "none"}[layout]
                n, _, m2 = covariance64(
                    reference_matrix(part.raw(name)[first : first + rows], layout, method)
                )
                assert rel_err(m2 / n, delve_cov) <= 1e-10
                blocks = part.gram(name, method)
                (last,) = np.flatnonzero(
                    (blocks.info_column("epoch") == epoch)
                    & (blocks.info_column("phase") == PHASES.index(phase))
                    & (blocks.info_column("kind") == BLOCK_KIND_LAST_CALL)
                )
                count, _, m2 = blocks.read(int(last))
                assert count == n and rel_err(m2 / count, delve_cov) <= 1e-10
                compared += 1
    assert compared == 2 * 7


# -- bad arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"conv_methods": ["avg"]},
            "conv_methods: unknown conv method 'avg'; valid values are: channelwise, mean",
        ),
        ({"timeseries_methods": "first"}, "timeseries_methods: unknown time-series method 'first'"),
        (
            {"interpolation": "bilinear", "downsample": -2},
            "downsample: the target size must be a positive integer, got -2",
        ),
        (
            {"interpolation": "bilinear", "downsample": 0},
            "downsample: the target size must be a positive integer",
        ),
        ({"downsample": 4}, "downsample: set interpolation"),
        (
            {"interpolation": "cubic", "downsample": 4},
            "interpolation: unknown mode 'cubic'; valid values are: nearest",
        ),
        ({"layers": ["decoder"]}, "layers: 'decoder' matches no layer; recordable layers are: 0, 2"),
        ({"ignore": ["9"]}, "ignore: '9' matches no layer"),
        (
            {"dtype": "float64"},
            "dtype: unknown storage dtype 'float64'; valid values are: float32, float16, bfloat16",
        ),
        ({"mode": "full"}, "mode: unknown mode 'full'; valid values are: raw, gram, both"),
        ({"log_interval": 0}, "log_interval: must be a positive integer, got 0"),
        ({"max_samples": -5}, "max_samples: must be a positive integer, got -5"),
        ({"on_error": "ignore"}, "on_error: must be 'raise' or 'warn'"),
        ({"compression": "gzip"}, "compression: unknown compression 'gzip'"),
        ({"resume": True, "overwrite": True}, "resume and overwrite: choose one"),
        ({"rank": 2, "world_size": 2}, "rank, world_size: need 0 <= rank < world_size, got rank=2"),
    ],
)
def test_bad_arguments_raise_before_training(tmp_path, kwargs, match):
    net = small_net()
    path = tmp_path / "run.zarr"
    with pytest.raises(ValueError, match=match):
        Recorder(net, path, **kwargs)
    assert not path.exists()
    assert not any(m._forward_hooks for m in net.modules())


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    net = small_net()
    path = tmp_path / "run.zarr"
    with Recorder(net, path) as rec:
        net(torch.randn(3, 4))
        rec.end_epoch()
    with pytest.raises(
        FileExistsError, match=r"run store already exists here; pass resume=True .* overwrite=True"
    ):
        Recorder(net, path)
    assert not any(m._forward_hooks for m in net.modules())
    assert open_run(path).epochs == [0]
    x = torch.randn(2, 4)
    with Recorder(net, path, overwrite=True) as rec:
        out = net[0](x)
        with pytest.warns(RuntimeWarning, match="never called in this epoch: '2'"):
            rec.end_epoch()
    run = open_run(path)
    assert run.epochs == [0] and run.samples() == {(0, "train", "0"): 2}
    np.testing.assert_array_equal(run.ranks[0].raw("0")[:], out.detach().numpy())


def test_overwrite_refuses_to_delete_what_is_not_a_run_store(tmp_path):
    net = small_net()
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zarr store; refusing to overwrite it"):
        Recorder(net, folder, overwrite=True)
    with pytest.raises(FileExistsError, match="already exists"):
        Recorder(net, folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    file = tmp_path / "model.pt"
    file.write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="not a directory"):
        Recorder(net, file, overwrite=True)
    assert file.read_bytes() == b"weights"
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").attrs["owner"] = "someone else"
    with pytest.raises(StoreFormatError, match="not a delve-pipeline run store"):
        Recorder(net, other, overwrite=True)
    assert zarr.open_group(other, mode="r").attrs["owner"] == "someone else"
    assert not any(m._forward_hooks for m in net.modules())


# -- writer failures ---------------------------------------------------------------------------------


@pytest.fixture
def disk_full(monkeypatch):
    """Make RunStoreWriter.write_raw fail with ENOSPC once the returned event is set."""
    full = threading.Event()
    original = RunStoreWriter.write_raw

    def write_raw(self, layer, rows):
        if full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(self, layer, rows)

    monkeypatch.setattr(RunStoreWriter, "write_raw", write_raw)
    return full


def keep_training(net, rec, steps=2000):
    """Forward calls until the recorder reports the background failure (or gives up)."""
    for _ in range(steps):
        net(torch.randn(5, 4))
        if not rec.is_recording:
            return
        time.sleep(0.002)


def test_writer_error_reaches_the_training_thread(tmp_path, disk_full):
    net = small_net()
    path = tmp_path / "run.zarr"
    rec = Recorder(net, path)
    x0 = torch.randn(5, 4)
    net(x0)
    rec.end_epoch()
    disk_full.set()
    with pytest.raises(CaptureError) as info:
        keep_training(net, rec)
    message = str(info.value)
    assert message.startswith(f"{path}: background write failed (layer '0': raw write)")
    assert os.strerror(errno.ENOSPC) in message
    assert isinstance(info.value.__cause__.__cause__, OSError)
    assert info.value.__cause__.__cause__.errno == errno.ENOSPC
    with pytest.raises(CaptureError, match="No space left"):
        rec.end_epoch()
    with pytest.raises(CaptureError, match="No space left"):
        rec.close()
    run = open_run(path)
    assert run.epochs == [0] and run.incomplete_epoch == 1
    np.testing.assert_array_equal(run.ranks[0].raw("0")[:], net[0](x0).detach().numpy())


def test_writer_error_with_on_error_warn_keeps_training(tmp_path, disk_full):
    net = small_net()
    path = tmp_path / "run.zarr"
    rec = Recorder(net, path, on_error="warn")
    x0 = torch.randn(5, 4)
    net(x0)
    rec.end_epoch()
    disk_full.set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep_training(net, rec)
        for _ in range(3):  # training goes on; the warning is given once
            net(torch.randn(5, 4))
        assert rec.end_epoch() == 1
        rec.close()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert str(runtime[0].message).startswith(
        f"{path}: capture switched off: background write failed (layer '0'"
    )
    assert not rec.is_recording
    run = open_run(path)
    assert run.epochs == [0] and run.incomplete_epoch == 1
    np.testing.assert_array_equal(run.ranks[0].raw("0")[:], net[0](x0).detach().numpy())


# -- several processes ----------------------------------------------------------------------------------


def test_two_ranks_write_separate_groups(tmp_path):
    net = small_net()
    path = tmp_path / "run.zarr"
    data = {rank: [torch.randn(3 + rank, 4) for _ in range(2)] for rank in (0, 1)}
    # rank 0 records layer "0", rank 1 layer "2": the run has both
    with Recorder(net, path, mode="both", rank=0, world_size=2, layers=["0"]) as rec:
        for x in data[0]:
            net(x)
            rec.end_epoch()
    run = open_run(path)
    assert [p.rank for p in run.ranks] == [0]
    assert run.epochs == [] and run.incomplete_epoch == 0  # rank 1 has committed nothing yet
    with Recorder(net, path, mode="both", rank=1, world_size=2, layers=["2"]) as rec:
        net(data[1][0])
        rec.end_epoch()
        run = open_run(path)
        assert run.epochs == [0] and run.incomplete_epoch == 1
        net(data[1][1])
        rec.end_epoch()
    run = open_run(path)
    assert sorted(zarr.open_group(path, mode="r").group_keys()) == ["rank-00000", "rank-00001"]
    assert [p.rank for p in run.ranks] == [0, 1]
    assert run.layers == ["0", "2"] and run.epochs == [0, 1] and run.incomplete_epoch is None
    calls = run.calls()
    np.testing.assert_array_equal(calls["rank"], [0, 0, 1, 1])
    np.testing.assert_array_equal(calls["layer"], [0, 0, 1, 1])
    np.testing.assert_array_equal(calls["row_count"], [3, 3, 4, 4])
    assert run.samples() == {
        (0, "train", "0"): 3,
        (1, "train", "0"): 3,
        (0, "train", "2"): 4,
        (1, "train", "2"): 4,
    }
    with torch.no_grad():
        first = torch.cat([net[0](x) for x in data[0]]).numpy()
        last = torch.cat([net(x) for x in data[1]]).numpy()
    np.testing.assert_array_equal(run.ranks[0].raw("0")[:], first)
    np.testing.assert_array_equal(run.ranks[1].raw("2")[:], last)
    with pytest.raises(KeyError):
        run.ranks[0].raw("2")


# -- bounded memory ---------------------------------------------------------------------------------------


def test_tiny_queue_still_records_everything(tmp_path, monkeypatch, mixed_net, hook_tape):
    writers: list[BackgroundWriter] = []
    sizes: list[int] = []

    class SpyWriter(BackgroundWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

        def submit(self, task, nbytes=0, context=""):
            sizes.append(nbytes)
            super().submit(task, nbytes, context)

    original = RunStoreWriter.write_raw

    def slow_write_raw(self, layer, rows):
        time.sleep(0.002)  # a slow disk: the training thread must wait for the writer
        original(self, layer, rows)

    monkeypatch.setattr(recorder_module, "BackgroundWriter", SpyWriter)
    monkeypatch.setattr(RunStoreWriter, "write_raw", slow_write_raw)
    net = mixed_net(2)
    tape = hook_tape(dict(net.named_children()))
    path = tmp_path / "run.zarr"
    with Recorder(net, path, mode="both", max_queue_bytes=100, gram_block_rows=4) as rec:
        with torch.no_grad():
            for b in (3, 1, 4, 1, 5):
                net(torch.randn(b, 1, 8, 8))
        rec.end_epoch()
    (writer,) = writers
    assert max(sizes) > 100 and len(sizes) > 30
    assert writer.peak_bytes <= max(100, max(sizes))
    run = open_run(path)
    for name in MIXED_LAYOUTS:
        expected = np.concatenate([samples_first(s) for s in tape.calls(name)])
        np.testing.assert_array_equal(run.ranks[0].raw(name)[:], expected)


def test_background_writer_blocks_when_full_and_keeps_order():
    writer = BackgroundWriter(max_queue_bytes=10)
    release = threading.Event()
    done: list[int] = []
    writer.submit(lambda: (release.wait(5), done.append(0)), 6)
    returned = threading.Event()

    def producer():
        writer.submit(lambda: done.append(1), 6)  # 6 + 6 > 10: waits for the first task
        writer.submit(lambda: done.append(2), 50)  # larger than the bound: accepted alone
        returned.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not returned.wait(0.2)  # back-pressure: the producer is blocked
    release.set()
    thread.join(5)
    writer.flush()
    writer.close()
    assert done == [0, 1, 2]
    assert writer.peak_bytes == 50 and writer.in_flight_bytes == 0
