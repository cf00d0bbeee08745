"""Capture overhead of the Hugging Face callback on a tiny GPT-2, next to a plain ``Trainer`` run.

A GPT-2 language model built from its config (2 blocks, 64 features, 4 heads, 128 token ids, no
download) is trained by ``transformers.Trainer`` on the CPU, on random token sequences of 16 to 64
tokens, right-padded to the longest of each batch of 8, with their ``attention_mask``.
Configurations, each on a fresh model with the same initial weights:

* ``none``: a plain ``Trainer`` run, no callback;
* ``raw_f16``: ``pipelines.huggingface.ActivationCapture(mode='raw', dtype='float16',
  max_positions=64)``: every default layer's outputs (GPT-2's ``Conv1D`` and the LM head), stored
  padded to 64 positions, with their token masks;
* ``gram_tokenwise``: ``ActivationCapture(mode='gram', timeseries_methods=('tokenwise',))``: float64
  moments of the real tokens' rows, the padding left out in the hook.

The configurations run round-robin, the order rotating each round; each trains ``--steps`` steps
as one epoch. Measured per configuration and round: the mean step time (the first step of the round
left out; from ``on_step_begin`` to ``on_step_end``, which holds the forward hooks) and the whole
``train()`` (callback set-up, epoch end and the store's close included). Reported: the medians over
the rounds and their ratio to ``none``, also paired with ``none`` of the same round (a check
against load that changes during the run) and of the least of the rounds (the least disturbed by
other jobs); the same for the process's CPU time (all threads: the hooks, the writer), which other
processes disturb less than wall time. For ``raw_f16``: the bytes the store
holds (raw rows and token masks, before compression) and their rate over the ``train()`` time, beside the disk's sequential write speed
(``/work/shared/perf-limits.md``: 0.8-1.2 GB/s for a few GiB), the limit that would apply if the
training produced data faster.

Run from the repository root::

    python bench/callbacks_overhead.py           # default, about 3-6 minutes on 2 cores
    python bench/callbacks_overhead.py --quick   # a few steps, to check that it runs

Results go to ``bench/results/callbacks_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT, BENCH):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from capture_overhead import fs_info, is_tmpfs, machine_info  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from capture import open_run  # noqa: E402
from pipelines.huggingface import ActivationCapture  # noqa: E402

CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "raw_f16": {"mode": "raw", "dtype": "float16", "max_positions": 64},
    "gram_tokenwise": {"mode": "gram", "timeseries_methods": ("tokenwise",)},
}
#: Sequential write speed of the disk for a few GiB (/work/shared/perf-limits.md, *Disk*), GB/s.
DISK_WRITE_GBS = (0.8, 1.2)
BATCH, SHORTEST, LONGEST, VOCAB = 8, 16, 64, 128


class RandomTokens(torch.utils.data.Dataset):
    """``n`` sequences of ``SHORTEST`` to ``LONGEST`` token ids (1 .. VOCAB-1), fixed by the seed."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(SHORTEST, LONGEST + 1, (n,), generator=g).tolist()
        self.sequences = [torch.randint(1, VOCAB, (t,), generator=g) for t in lengths]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.sequences[i]


def collate(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right padding (id 0) to the batch's longest sequence; padding is no label (-100)."""
    ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in batch], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=LONGEST, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class StepTimes(TrainerCallback):
    """Wall and CPU time (the process's, all threads) of each step, ``on_step_begin`` to ``on_step_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def raw_bytes(path: Path) -> int:
    """Bytes of the raw rows (and token masks) a store holds, as stored (before compression)."""
    run = open_run(path)
    total = 0
    for part in run.ranks:
        for name in part.layers:
            arrays = [part.raw(name), part.mask(name)]
            total += sum(math.prod(a.shape) * a.array.dtype.itemsize for a in arrays if a is not None)
    return total


def train_once(config: str, steps: int, folder: Path) -> dict[str, float]:
    """Train ``steps`` steps with ``config``'s callback (if any); its times (and store bytes)."""
    timer, store = StepTimes(), folder / f"{config}.zarr"
    callbacks: list[TrainerCallback] = [timer]
    options = CONFIGS[config]
    if options is not None:
        callbacks.append(ActivationCapture(store, overwrite=True, **options))
    args = TrainingArguments(
        str(folder / "trainer"), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="no",
        eval_strategy="no", remove_unused_columns=False, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=gpt2(), args=args, train_dataset=RandomTokens(steps * BATCH), data_collator=collate, callbacks=callbacks
    )
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics
        trainer.train()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "step_s": statistics.fmean(timer.times[1:] or timer.times),
        "step_cpu_s": statistics.fmean(timer.cpu[1:] or timer.cpu),
        "train_s": total,
        "train_cpu_s": cpu,
    }
    if options is not None:
        if options["mode"] == "raw":
            out["raw_bytes"] = raw_bytes(store)
        shutil.rmtree(store)
    return out


def _ratios(rounds: list[dict[str, dict[str, float]]], config: str, key: str) -> dict[str, float]:
    """Median of ``key`` over rounds, and against ``none``: its ratio and the median paired ratio."""
    mine = [r[config][key] for r in rounds]
    base = [r["none"][key] for r in rounds]
    return {
        "median": statistics.median(mine),
        "min": min(mine),
        "ratio": statistics.median(mine) / statistics.median(base),
        "ratio_paired": statistics.median(m / b for m, b in zip(mine, base, strict=True)),
        "ratio_of_min": min(mine) / min(base),
    }


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per configuration and measure (step wall / CPU time, ``train()`` wall / CPU time): the median
    over rounds, the least, the ratios to ``none`` (of medians, paired by round, of the least)."""
    out: dict[str, Any] = {}
    for config in CONFIGS:
        entry: dict[str, Any] = {key: _ratios(rounds, config, key) for key in rounds[0][config] if key != "raw_bytes"}
        entry["step_ms_per_round"] = [round(1e3 * r[config]["step_s"], 3) for r in rounds]
        if "raw_bytes" in rounds[0][config]:
            nbytes = statistics.median(r[config]["raw_bytes"] for r in rounds)
            entry["raw_mb"] = nbytes / 1e6
            entry["write_gbs"] = nbytes / entry["train_s"]["median"] / 1e9
            entry["disk_write_gbs_limit"] = list(DISK_WRITE_GBS)
        out[config] = entry
    return out


def report(summary: dict[str, Any]) -> str:
    """The table printed at the end: medians over rounds and ratios to ``none``."""
    head = f"{'config':<16}{'step ms':>9}{'ratio':>7}{'paired':>8}{'least':>7}{'step CPU':>10}{'ratio':>7}"
    lines = [head + f"{'train()':>9}{'ratio':>7}  written"]
    for config, e in summary.items():
        step, cpu, train = e["step_s"], e["step_cpu_s"], e["train_s"]
        written = (
            f"{e['raw_mb']:.1f} MB, {e['write_gbs']:.4f} GB/s (disk: {DISK_WRITE_GBS[0]}-{DISK_WRITE_GBS[1]} GB/s)"
            if "write_gbs" in e
            else ""
        )
        lines.append(
            f"{config:<16}{1e3 * step['median']:>9.2f}{step['ratio']:>7.3f}{step['ratio_paired']:>8.3f}"
            f"{step['ratio_of_min']:>7.3f}{1e3 * cpu['median']:>10.2f}{cpu['ratio']:>7.3f}"
            f"{train['median']:>8.2f}s{train['ratio']:>7.3f}  {written}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    ap.add_argument("--workdir", default=None, help="folder for temporary stores (default: under bench/)")
    ap.add_argument("--out", default=str(BENCH / "results" / "callbacks_overhead.json"))
    ap.add_argument("--quick", action="store_true", help="a few steps only, to check that it runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 4, 2
    base = Path(args.workdir) if args.workdir else BENCH
    if is_tmpfs(base):
        raise SystemExit(f"{base} is on a tmpfs: pass --workdir on a real disk")
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = Path(tempfile.mkdtemp(prefix="callbacks-bench-", dir=base))
    result: dict[str, Any] = {
        "benchmark": "callbacks_overhead",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "workdir": fs_info(base),
        "model": f"GPT2LMHeadModel(n_layer=2, n_embd=64, n_head=4, vocab_size={VOCAB}), batch {BATCH}, "
        f"{SHORTEST}-{LONGEST} tokens right-padded per batch",
        "configs": {k: "plain Trainer" if v is None else f"ActivationCapture({v})" for k, v in CONFIGS.items()},
        "steps": args.steps,
        "rounds": [],
        "loadavg_per_round": [],
    }
    names = list(CONFIGS)
    t_all = time.perf_counter()
    try:
        train_once("none", 2, folder)  # warm-up: imports, first-call allocations
        for k in range(args.rounds):
            order = names[k % len(names) :] + names[: k % len(names)]
            result["rounds"].append({c: train_once(c, args.steps, folder) for c in order})
            result["loadavg_per_round"].append(os.getloadavg())
            print(f"round {k + 1}/{args.rounds}: {', '.join(order)}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["summary"] = summarize(result["rounds"])
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    print(report(result["summary"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
