"""pipelines.huggingface.ActivationCapture under a real ``transformers.Trainer`` on the CPU.

Tiny GPT-2 and BERT models built from their configs (no download), trained two epochs on padded
batches of varying length. The reference is a plain forward-hook tape on the same modules during
the same training, its calls split by epoch, reduced with numpy (tests/_frameworks.py), with the
attention mask of each call applied where the callback applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from _frameworks import MaskTape, assert_close, masked_table, quiet_transformers, table_of  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from capture import discover_layers, open_run  # noqa: E402
from pipelines.huggingface import ActivationCapture  # noqa: E402

LOGGED = ("lsat", "trc")


@pytest.fixture(autouse=True)
def _quiet() -> None:
    quiet_transformers()


class Tokens(torch.utils.data.Dataset):
    """``n`` token sequences of 3 to 11 tokens (ids 1..63) with a class label, fixed by ``seed``."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 12, (n,), generator=g)
        self.items = [torch.randint(1, 64, (int(t),), generator=g) for t in lengths]
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.items[i], "label": int(self.labels[i])}


def pad(batch: list[dict[str, Any]], lm: bool) -> dict[str, torch.Tensor]:
    """Right padding to the longest sequence of the batch, with the attention mask (1 = token)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = b["input_ids"]
        mask[i, : len(b["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100) if lm else torch.tensor([b["label"] for b in batch])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_gpt2(dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def make_trainer(
    model: nn.Module, out: Path, epochs: int, lm: bool = True, callbacks: Any = None, **kwargs: Any
) -> Trainer:
    """A quiet CPU Trainer on 16 training and 8 evaluation sequences, batches of 4."""
    kwargs.setdefault("eval_strategy", "epoch")
    kwargs.setdefault("save_strategy", "no")
    args = TrainingArguments(
        str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,
        seed=0,
        **kwargs,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(16, 1),
        eval_dataset=Tokens(8, 2),
        data_collator=lambda batch: pad(batch, lm),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class EpochSplit(TrainerCallback):
    """Where each epoch starts in the tape: an epoch's calls run up to the next epoch's start."""

    def __init__(self, tape: Any) -> None:
        self.tape = tape
        self.starts: list[int] = []

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.starts.append(len(self.tape.seen))

    def epochs(self) -> list[list[Any]]:
        ends = [*self.starts[1:], len(self.tape.seen)]
        return [self.tape.seen[a:b] for a, b in zip(self.starts, ends, strict=True)]


def logged(trainer: Trainer) -> dict[tuple[int, str, str, str], float]:
    """``(epoch, phase, layer, stat) -> value`` of the ``lsat/{layer}``, ``eval_lsat/{layer}`` log entries."""
    out = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if "/" in key:
                stat, layer = key.split("/", 1)
                phase = "eval" if stat.startswith("eval_") else "train"
                out[(round(entry["epoch"]) - 1, phase, layer, stat.removeprefix("eval_"))] = value
    return out


def test_gpt2_two_epochs_of_padded_batches(tmp_path):
    """``last_timestep`` is each sequence's last token: the reference applies the attention mask."""
    model = tiny_gpt2()
    types = ("GPT2Block", nn.LayerNorm, nn.Embedding)  # a block matched by name, transformers not imported
    default, blocks = discover_layers(model), discover_layers(model, layer_types=types)
    tape = MaskTape(model, default | blocks)
    split = EpochSplit(tape)
    trainer = make_trainer(model, tmp_path / "out", 2, eval_on_start=True, callbacks=[split])
    ActivationCapture(
        tmp_path / "run.zarr", mode="gram", log_stats=LOGGED, timeseries_methods=("last_timestep",)
    ).attach(trainer)
    trainer.add_callback(ActivationCapture(tmp_path / "blocks.zarr", mode="gram", layer_types=types))
    # the position embedding's output is (1, positions, features), one for the whole batch
    with pytest.warns(RuntimeWarning, match=r"layer 'transformer-wpe': its output \(1, \d+, 32\) does not"):
        trainer.train()
    tape.remove()

    run = open_run(tmp_path / "run.zarr")
    assert run.epochs == [0, 1] and run.layers == list(default)
    assert "transformer-h-0-mlp-c_fc" in default and run.layer("transformer-h-0-mlp-c_fc").kind == "dense"
    # 16 training and 8 evaluation sequences per epoch: the evaluation before training is not recorded
    assert set(run.samples().values()) == {16, 8} and len(run.samples()) == 2 * 2 * len(default)
    lengths = {s.output.shape[1] for s in tape.seen if s.output.dim() == 3 and s.output.shape[0] > 1}
    assert len(lengths) > 3  # the batches were padded to different lengths
    epochs = split.epochs()
    want = masked_table(epochs, default, "last_timestep")
    assert_close(table_of(tmp_path / "run.zarr"), want)
    assert_close(logged(trainer), {k: v for k, v in want.items() if k[3] in LOGGED})

    run = open_run(tmp_path / "blocks.zarr")
    # in the order of their first output: a block's hook fires after those of its LayerNorms
    assert (
        sorted(run.layers) == sorted(blocks) and "transformer-h-1" in blocks and "transformer-wte" in blocks
    )
    assert_close(table_of(tmp_path / "blocks.zarr"), masked_table(epochs, blocks, "last_timestep"))


def test_bert_with_evaluations_during_the_epochs(tmp_path):
    """eval_strategy="steps": each epoch's evaluation runs in the middle of it, and belongs to it."""
    model = tiny_bert()
    layers = discover_layers(model)
    tape = MaskTape(model, layers)
    split = EpochSplit(tape)
    trainer = make_trainer(
        model, tmp_path / "out", 2, lm=False, eval_strategy="steps", eval_steps=3, callbacks=[split]
    )
    trainer.add_callback(ActivationCapture(tmp_path / "run.zarr", mode="gram"))
    trainer.train()

    run = open_run(tmp_path / "run.zarr")
    assert run.epochs == [0, 1] and run.layers == list(layers)
    assert "bert-encoder-layer-0-attention-self-query" in layers and "classifier" in layers
    # 4 steps an epoch; evaluations at steps 3 and 6, and at the end of training (step 8)
    assert {k: v for k, v in run.samples().items() if k[2] == "classifier"} == {
        (0, "train", "classifier"): 16,
        (0, "eval", "classifier"): 8,
        (1, "train", "classifier"): 16,
        (1, "eval", "classifier"): 16,
    }
    tape.remove()
    assert_close(table_of(tmp_path / "run.zarr"), masked_table(split.epochs(), layers, "last_timestep"))


@pytest.mark.parametrize("restore", [False, True], ids=["trainer-state", "restored-callback"])
def test_resumed_from_an_older_checkpoint_the_store_matches_the_training(tmp_path, restore):
    """A training went on after a checkpoint; resumed from it, the store drops what came after.

    Without dropout the resumed training repeats the first one exactly, so the store must end as it
    was. ``restore_callback_states_from_checkpoint`` rebuilds the callback from its exportable state;
    without it the callback reads that state from the Trainer's.
    """
    store, out = tmp_path / "run.zarr", tmp_path / "out"

    def train(resume: Path | None = None) -> bool:
        """Train; whether the Trainer replaced the callback by one rebuilt from the checkpoint."""
        model = tiny_gpt2(dropout=0.0)
        trainer = make_trainer(
            model, out, 2, save_strategy="epoch", restore_callback_states_from_checkpoint=restore
        )
        capture = ActivationCapture(store, mode="gram")
        trainer.add_callback(capture)
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return capture not in trainer.callback_handler.callbacks

    assert not train()
    first = open_run(store)
    assert first.epochs == [0, 1]
    first_calls, first_stats = first.ranks[0].calls.copy(), table_of(store)
    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["ActivationCapture"]
    assert state["args"] == {"mode": "gram", "path": str(store), "log_stats": [], "thresholds": [0.99]}
    assert state["attributes"]["resume_state"]["epoch"] == 1

    with pytest.warns(RuntimeWarning, match=r"epoch 1 was recorded after the checkpoint .*at epoch 1"):
        assert train(resume=out / "checkpoint-4") == restore
    run = open_run(store)
    assert run.epochs == [0, 1]
    np.testing.assert_array_equal(run.ranks[0].calls, first_calls)  # the same calls, counted on
    assert_close(table_of(store), first_stats)


def test_log_stats_needs_the_trainer(tmp_path):
    trainer = make_trainer(tiny_gpt2(), tmp_path / "out", 1)
    trainer.add_callback(ActivationCapture(tmp_path / "run.zarr", mode="gram", log_stats=("lsat",)))
    with pytest.raises(ValueError, match=r"log_stats: .*needs the Trainer: add it with .*attach\(trainer\)"):
        trainer.train()
    assert not (tmp_path / "run.zarr").exists()


def test_doctests(tmp_path, monkeypatch):
    import doctest

    import pipelines.huggingface

    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(pipelines.huggingface, optionflags=doctest.ELLIPSIS)
    assert result.attempted and not result.failed
