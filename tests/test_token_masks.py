"""Token masks (padding) with real frameworks on the CPU: the Hugging Face ``Trainer`` and Lightning.

A tiny GPT-2 and a tiny BERT (built from their configs, no download) are trained by
``transformers.Trainer`` on batches padded to the longest sequence of each batch (3 to 11 tokens),
with the ``attention_mask`` the model is called with; a LightningModule on token ids takes the mask
from its batches. The reference is a plain forward-hook tape on the same layers during the same
training, each output with the mask of the model call it belongs to (a plain pre-hook on the model),
reduced with numpy: ``tokenwise`` rows are the outputs at the positions the mask marks as tokens,
``last_timestep`` rows each sequence's output at its last token. Raw stores (the mask kept with the
rows, the analysis applying it) and gram stores (the hook applying it) must give the same statistics
to 1e-10 relative.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
L = pytest.importorskip("lightning.pytorch")

from _frameworks import (  # noqa: E402
    MaskedCall,
    MaskTape,
    assert_close,
    masked_table,
    quiet_lightning,
    quiet_transformers,
    table_of,
)
from _lightning_worker import trainer as lightning_trainer  # noqa: E402
from test_huggingface import EpochSplit, Tokens, make_trainer, pad, tiny_bert, tiny_gpt2  # noqa: E402
from test_lightning import EpochSplit as LightningEpochSplit  # noqa: E402

from capture import CaptureError, Recorder, discover_layers, open_run  # noqa: E402
from pipelines.huggingface import ActivationCapture as HFCapture  # noqa: E402
from pipelines.lightning import ActivationCapture as LightningCapture  # noqa: E402

METHODS = ("tokenwise", "last_timestep")
LONGEST = 11  # Tokens: 3 to 11 tokens a sequence


@pytest.fixture(autouse=True)
def _quiet() -> None:
    quiet_transformers()
    quiet_lightning()


def assert_same_as_hooks(
    stores: list[tuple[Path, dict[str, Any]]], epochs: Any, layers: Iterable[str]
) -> None:
    """Every store, analysed with each method (and its options), equals the masked numpy reference."""
    for method in METHODS:
        want = masked_table(epochs, layers, method)
        for store, options in stores:
            assert_close(table_of(store, timeseries_methods=(method,), **options), want)


def without_masks(epochs: Sequence[Iterable[MaskedCall]]) -> list[list[MaskedCall]]:
    """The same outputs as if the model had been called without masks."""
    return [[MaskedCall(s.name, s.training, s.output, None) for s in epoch] for epoch in epochs]


def assert_raw_rows_and_masks(store: Path, seen: Iterable[MaskedCall], layers: Iterable[str]) -> None:
    """The raw rows are the outputs padded to the stored positions; the stored masks the calls' masks."""
    part = open_run(store).ranks[0]
    seen = list(seen)
    for name in layers:
        calls = [s for s in seen if s.name == name]
        rows, masks = part.raw(name)[:], part.mask(name)[:]
        at = 0
        for s in calls:
            n, t = s.output.shape[:2]
            np.testing.assert_array_equal(rows[at : at + n, :t], s.output.numpy())
            np.testing.assert_array_equal(rows[at : at + n, t:], 0.0)
            np.testing.assert_array_equal(masks[at : at + n, :t], s.mask.numpy())
            np.testing.assert_array_equal(masks[at : at + n, t:], 0)
            at += n
        assert at == len(rows) == len(masks)


# -- Hugging Face ----------------------------------------------------------------------------------------
def test_gpt2_padded_batches_raw_and_gram_stores_apply_the_attention_mask(tmp_path):
    model = tiny_gpt2()
    layers = discover_layers(model)
    tape = MaskTape(model, layers)
    split = EpochSplit(tape)
    trainer = make_trainer(model, tmp_path / "out", 2, callbacks=[split])
    raw, gram = tmp_path / "raw.zarr", tmp_path / "gram.zarr"
    trainer.add_callback(HFCapture(raw, mode="raw", max_positions=LONGEST))
    trainer.add_callback(HFCapture(gram, mode="gram", timeseries_methods=METHODS))
    trainer.train()
    tape.remove()

    lengths = {s.output.shape[1] for s in tape.seen}
    assert len(lengths) > 3 and max(lengths) <= LONGEST  # batches padded to different lengths
    assert any((s.mask == 0).any() for s in tape.seen)  # with padding
    run = open_run(raw)
    assert run.format_minor == 2 and run.epochs == [0, 1]
    assert all(run.layer(n).sample_shape[0] == LONGEST and run.layer(n).mask_array for n in layers)
    assert_raw_rows_and_masks(raw, tape.seen, layers)
    assert sorted(open_run(gram).layer("lm_head").gram) == sorted(METHODS)
    assert_same_as_hooks([(raw, {}), (gram, {})], split.epochs(), layers)
    # the reference is sensitive to the mask: without it, the numbers differ
    for method in METHODS:
        masked = masked_table(split.epochs(), ["lm_head"], method)
        plain = masked_table(without_masks(split.epochs()), ["lm_head"], method)
        assert all(plain[k] != pytest.approx(masked[k], rel=1e-3) for k in masked if k[3] == "trc")


def test_bert_raw_and_gram_stores_apply_the_attention_mask(tmp_path):
    model = tiny_bert()
    layers = discover_layers(model)
    tape = MaskTape(model, layers)
    split = EpochSplit(tape)
    trainer = make_trainer(model, tmp_path / "out", 2, lm=False, callbacks=[split])
    store = tmp_path / "both.zarr"
    trainer.add_callback(HFCapture(store, mode="both", timeseries_methods=METHODS, max_positions=LONGEST))
    trainer.train()
    tape.remove()

    sequence = [n for n in layers if tape.seen[[s.name for s in tape.seen].index(n)].output.dim() == 3]
    assert "bert-encoder-layer-1-output-dense" in sequence and "classifier" not in sequence
    run = open_run(store)
    assert [n for n in layers if run.layer(n).mask_array] == sequence  # flat layers have no positions
    assert_raw_rows_and_masks(store, tape.seen, sequence)
    assert_same_as_hooks([(store, {"source": "raw"}), (store, {"source": "gram"})], split.epochs(), layers)


# -- Lightning ----------------------------------------------------------------------------------------
class TokenModule(L.LightningModule):
    """Token ids -> embedding -> two position-wise layers -> the mean over real tokens -> 3 classes.

    Its steps call ``self.net`` themselves: the LightningModule's ``forward`` never sees the mask.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.tanh(self.fc1(self.embed(ids))))
        weights = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(1) / weights.sum(1))

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        return nn.functional.cross_entropy(
            self.logits(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )

    def validation_step(self, batch: Any, index: int) -> None:
        self.log(
            "val",
            nn.functional.cross_entropy(
                self.logits(batch["input_ids"], batch["attention_mask"]), batch["labels"]
            ),
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TapeMask(LightningEpochSplit):
    """Splits the tape by training epoch, and hands it each batch's mask."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.tape.set(batch["attention_mask"])

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self.tape.set(batch["attention_mask"])


def test_lightning_takes_the_mask_from_the_batch(tmp_path):
    module = TokenModule()
    layers = {"embed": module.embed, "fc1": module.fc1, "fc2": module.fc2, "head": module.head}
    tape = MaskTape(None, layers)
    split = TapeMask(tape)
    store, unmasked = tmp_path / "run.zarr", tmp_path / "unmasked.zarr"
    names = list(layers)  # the embedding is not among the default layer types
    capture = LightningCapture(
        store, mode="both", layers=names, timeseries_methods=METHODS, max_positions=LONGEST
    )
    ignored = LightningCapture(
        unmasked, mode="gram", layers=names, timeseries_methods=METHODS, batch_mask=None
    )
    loader = torch.utils.data.DataLoader
    train = loader(Tokens(16, 1), batch_size=4, collate_fn=lambda b: pad(b, lm=False))
    val = loader(Tokens(8, 2), batch_size=4, collate_fn=lambda b: pad(b, lm=False))
    lightning_trainer(str(tmp_path), 2, [split, capture, ignored], num_sanity_val_steps=1).fit(
        module, train, val
    )
    tape.remove()

    assert capture.recorder is None and open_run(store).epochs == [0, 1]
    sequence = ("embed", "fc1", "fc2")
    assert_raw_rows_and_masks(store, [s for epoch in split.epochs for s in epoch], sequence)
    assert_same_as_hooks([(store, {"source": "raw"}), (store, {"source": "gram"})], split.epochs, layers)
    # batch_mask=None: no mask from the batches (and the module's forward, never called, gave none)
    assert_same_as_hooks([(unmasked, {})], without_masks(split.epochs), layers)


# -- the Recorder's own rules -------------------------------------------------------------------------
class Seq(nn.Module):
    """``forward(ids, attention_mask=None)``: an embedding, a position-wise layer, a layer on the first
    two positions only (another sequence length) and a 2-D head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 4)
        self.fc = nn.Linear(4, 3)
        self.first = nn.Linear(3, 2)
        self.pool = nn.Linear(2, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.first(self.fc(self.embed(ids))[:, :2]).mean(1))


def hook_matrices(net: nn.Module, call: Any, **options: Any) -> dict[str, np.ndarray]:
    """The matrices the gram hook of ``net.fc`` reduces in one call, by method (``on_batch``)."""
    got: dict[str, np.ndarray] = {}

    def keep(phase: str, layer: str, method: str, m: torch.Tensor) -> None:
        got[method] = m.double().numpy()

    with Recorder(net, None, mode="gram", layers=["fc"], timeseries_methods=METHODS, on_batch=keep, **options):
        call()
    return got


def test_the_mask_comes_from_a_positional_argument_a_callable_or_nowhere(tmp_path):
    net = Seq()
    ids = torch.randint(0, 16, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])  # holes and left padding too
    out = net.fc(net.embed(ids)).detach().double().numpy()
    expect = {"tokenwise": out[mask.numpy() != 0], "last_timestep": out[[0, 1, 2], [2, 4, 2]]}
    for options, call in [
        ({}, lambda: net(ids, mask)),  # positional
        ({}, lambda: net(ids, attention_mask=mask)),
        ({"token_mask": lambda: mask}, lambda: net(ids)),
    ]:
        got = hook_matrices(net, call, **options)
        for method in METHODS:
            np.testing.assert_array_equal(got[method], expect[method])
    got = hook_matrices(net, lambda: net(ids, mask), token_mask=False)
    np.testing.assert_array_equal(got["tokenwise"], out.reshape(-1, 3))
    np.testing.assert_array_equal(got["last_timestep"], out[:, -1])


def test_a_layer_of_another_shape_gets_no_mask_with_one_warning(tmp_path):
    net = Seq()
    ids, mask = torch.randint(0, 16, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    with Recorder(net, tmp_path / "run.zarr", mode="raw", layers=["embed", "fc", "first", "pool"]) as rec:
        with pytest.warns(
            RuntimeWarning, match=r"layer 'first': its output \(3, 2, 2\) does not have .* \(3, 5\)"
        ):
            net(ids, mask)
        net(ids, mask)  # warned once
        rec.end_epoch()
    run = open_run(tmp_path / "run.zarr")
    assert run.layer("fc").mask_array and run.layer("embed").mask_array
    assert not run.layer("first").mask_array and not run.layer("pool").mask_array
    np.testing.assert_array_equal(run.ranks[0].mask("fc")[:], np.concatenate([mask.numpy()] * 2))


def test_longer_calls_need_max_positions_and_masks_start_late(tmp_path):
    net = Seq()
    short, long = torch.randint(0, 16, (2, 4)), torch.randint(0, 16, (2, 6))
    with Recorder(net, tmp_path / "a.zarr", mode="raw", layers=["fc"]) as rec:
        net(long)  # no mask: no mask array
        net(short)  # shorter: stored padded, and from now on the layer keeps masks
        with pytest.raises(
            CaptureError, match=r"layer 'fc': a call of 7 positions is longer than the 6 .*max_positions="
        ):
            net(torch.randint(0, 16, (2, 7)))
        rec.end_epoch()
    part = open_run(tmp_path / "a.zarr").ranks[0]
    np.testing.assert_array_equal(
        part.mask("fc")[:], [[1] * 6, [1] * 6, [1] * 4 + [0] * 2, [1] * 4 + [0] * 2]
    )
    with pytest.raises(ValueError, match="max_positions: must be a positive integer"):
        Recorder(net, tmp_path / "b.zarr", max_positions=0)
    with pytest.raises(ValueError, match="token_mask: must be a callable"):
        Recorder(net, tmp_path / "b.zarr", token_mask="attention_mask")
    with Recorder(net, tmp_path / "c.zarr", mode="raw", layers=["fc"], max_positions=5) as rec:
        with pytest.raises(CaptureError, match=r"a call of 6 positions is longer than max_positions=5"):
            net(long)


def test_a_format_1_1_store_reads_and_its_sequences_have_no_mask(tmp_path):
    """A store of minor version 1 (no mask arrays, no ``mask_array`` in its records) reads as before."""
    import json
    import shutil

    from capture.format import ATTRS_KEY

    net = Seq()
    tape = MaskTape(None, {"fc": net.fc})
    path, old = tmp_path / "run.zarr", tmp_path / "v1.1.zarr"
    epochs = []
    with Recorder(net, path, mode="raw", layers=["fc"]) as rec:
        for _ in range(2):
            tape.clear()
            net(torch.randint(0, 16, (4, 5)))
            net(torch.randint(0, 16, (4, 5)))
            net.eval()
            net(torch.randint(0, 16, (3, 5)))
            net.train()
            rec.end_epoch()
            epochs.append(list(tape.seen))
    tape.remove()
    shutil.copytree(path, old)
    root = json.loads((old / "zarr.json").read_text())
    root["attributes"][ATTRS_KEY]["format_minor"] = 1
    (old / "zarr.json").write_text(json.dumps(root))
    rank = json.loads((old / "rank-00000" / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    assert rank["layers"] and all("mask_array" not in r for r in rank["layers"])  # records as 1.1 wrote them
    run = open_run(old)
    assert run.format_minor == 1 and run.layer("fc").mask_array is None and run.ranks[0].mask("fc") is None
    assert_same_as_hooks([(old, {})], epochs, ["fc"])


class MeanHead(nn.Module):
    """``forward(ids, attention_mask)``: embedding, a position-wise layer, the mean over tokens, a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 6)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.head((self.fc(self.embed(ids)) * weights).sum(1) / weights.sum(1))


def padded_batch(g: torch.Generator, n: int, width: int = 6) -> dict[str, torch.Tensor]:
    """Token ids and their right-padding ``attention_mask``: 1 to ``width`` tokens per sequence."""
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    ids = torch.randint(0, 16, (n, width), generator=g)
    return {"ids": ids, "attention_mask": (torch.arange(width) < lengths[:, None]).long()}


def test_tokenwise_with_masks_in_the_tracker_the_cli_and_a_sweep(tmp_path):
    """The drop-in tracker (default semantics), ``delve-analyze stats`` on its store and a sweep agree
    with the masked numpy reference; delve's semantics refuse tokenwise."""
    import pandas as pd
    from conftest import invoke
    from test_tracker import LONG

    from analyze import AnalysisError, run_stats
    from pipelines import SaturationTracker
    from pipelines.sweep import sweep

    net, g = MeanHead(), torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    layers = ("fc", "head")
    tape = MaskTape(net, {n: getattr(net, n) for n in layers})
    store, savefile = tmp_path / "run.zarr", tmp_path / "run"
    stats = ["lsat", "trc"]
    tracker = SaturationTracker(str(savefile), "csv", net, stats=stats, timeseries_method="tokenwise", store=store)
    epochs = []
    for epoch in range(2):
        tape.clear()
        for _ in range(3):
            opt.zero_grad()
            net(**padded_batch(g, 5)).square().mean().backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            net(**padded_batch(g, 4))
        net.train()
        tracker.add_scalar("epoch", epoch)
        tracker.add_saturations()
        epochs.append(list(tape.seen))
    tracker.close()
    tape.remove()
    want = {k: v for k, v in masked_table(epochs, layers, "tokenwise").items() if k[3] in stats}
    assert len(want) == 2 * 2 * 2 * 2

    csv = pd.read_csv(str(savefile) + ".csv", sep=";", index_col=0)
    assert_close({k: float(csv.loc[k[0], f"{k[1]}-{LONG[k[3]]}_{k[2]}"]) for k in want}, want, rtol=1e-9)
    assert open_run(store).layer("fc").mask_array  # the tracker's store keeps the masks of its raw rows

    out = tmp_path / "cli"
    args = ["--timeseries-method", "tokenwise", "--stats", ",".join(stats), "--no-plots", "--no-progress"]
    for source in ("raw", "gram"):
        result = invoke("stats", store, "-o", out / source, "--source", source, *args)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        table = pd.read_csv(out / source / "stats.csv").query("stat in @stats")  # not the scalar 'epoch'
        assert set(table["timeseries_method"].dropna()) == {"tokenwise"}
        assert_close({(r.epoch, r.phase, r.layer, r.stat): r.value for r in table.itertuples()}, want)
    table = sweep(
        {"runs": [str(store)], "output": str(tmp_path / "sweep"), "timeseries_methods": ["tokenwise"],
         "stats": stats, "thresholds": [0.99], "source": "raw", "plots": False},
        progress=False,
    ).query("stat in @stats")  # fmt: skip
    assert_close({(r.epoch, r.phase, r.layer, r.stat): r.value for r in table.itertuples()}, want)

    with pytest.raises(ValueError, match="timeseries_method: delve 0.1.50 has no 'tokenwise' method"):
        SaturationTracker(str(tmp_path / "delve"), "csv", net, timeseries_method="tokenwise", semantics="delve-0.1.50")
    with pytest.raises(AnalysisError, match="timeseries_methods.*delve 0.1.50 has no 'tokenwise'"):
        run_stats(store, timeseries_methods=("tokenwise",), compat="delve-0.1.50", progress=False)


def test_similarity_compares_tokenwise_rows_and_refuses_masked_ones(tmp_path):
    """Linear CKA of two position-wise layers' tokenwise rows equals numpy's; with stored masks
    (padding in the raw rows) similarity refuses tokenwise rather than compare padding."""
    from analyze import AnalysisError
    from analyze.similarity_api import similarity

    net = MeanHead()
    tape = MaskTape(None, {"embed": net.embed, "fc": net.fc})
    g = torch.Generator().manual_seed(5)
    batches = [padded_batch(g, 4) for _ in range(3)]
    for name, token_mask in (("plain", False), ("masked", None)):
        with Recorder(net, tmp_path / f"{name}.zarr", mode="raw", layers=["embed", "fc"], token_mask=token_mask) as rec:
            tape.clear()
            with torch.no_grad():
                for b in batches:
                    net(**b)
            rec.end_epoch()
    tape.remove()
    table = similarity(tmp_path / "plain.zarr", "cka", timeseries_methods=("tokenwise",), progress=False)
    x, y = (
        np.concatenate([c.output.double().numpy().reshape(-1, c.output.shape[-1]) for c in tape.seen if c.name == n])
        for n in ("embed", "fc")
    )
    x, y = x - x.mean(0), y - y.mean(0)
    cka = np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    pair = table[(table["layer_a"] == "embed") & (table["layer_b"] == "fc")]
    assert len(pair) == 1 and float(pair["value"].iloc[0]) == pytest.approx(cka, rel=1e-10)
    with pytest.raises(AnalysisError, match=r"layer 'embed': its raw rows come with token masks"):
        similarity(tmp_path / "masked.zarr", "cka", timeseries_methods=("tokenwise",), progress=False)
