"""The drop-in tracker on delve's own ``example_fc`` usage: delve 0.1.50 against this package, interleaved.

delve's ``examples/example_fc.py``, as its users run it: ``LayerCake``, six linear layers
(100 -> h -> 50 -> 50 -> 50 -> 50 -> 10, a ReLU after each but the last), batch 64 of fixed random
data, SGD (lr 1e-3) on a summed MSE, and
``SaturationTracker(folder, 'csv', model, device='cpu', reset_covariance=True)`` (the default
``stats=['lsat']``) with ``add_saturations()`` after every optimiser step, which writes the CSV
every step. The example runs ``h`` = 10, 100 and 300; so does this benchmark (``--widths``).

Configurations, each with its own copy of the model (the same initial weights) and its own folder:

* ``none``: no tracker (the training step alone);
* ``delve``: ``delve.SaturationTracker`` (0.1.50);
* ``pipelines``: ``pipelines.SaturationTracker``, the same arguments.

Each width runs ``--rounds`` rounds; in a round every configuration trains ``--steps`` steps, the
order rotating from round to round. The trackers live through all rounds (their CSVs grow as the
example's do). Every step is timed in three parts: ``train`` (forward, loss, backward, optimiser
step; the trackers' forward hooks run here), ``stats`` (``add_saturations(save=False)``) and
``save`` (``save()``, the CSV); ``step`` is their sum. Reported per configuration: the median of
each part over all steps, the median step per round, and the ratio pipelines / delve of the median
step (the target: at most 1), also taken per round and then the median (a check against a load
that changes during the run).

**Limit.** The least a tracker can do per step beside the training: cast each layer's (64, d)
output to float64, centre it, ``x.T @ x`` (the float64 products) and ``eigvalsh`` of the
covariance (the eigenvalues that ``lsat`` needs), on one BLAS thread, measured outside training
on one step's layer outputs (median of ``--floor-reps``). ``limit step`` = median ``none`` step +
that. The trackers' ``save`` rewrites a CSV that grows every step, which no limit covers; it is
shown apart.

Run from the repository root::

    python bench/tracker_overhead.py            # default, about 3-4 minutes on 2 cores
    python bench/tracker_overhead.py --quick    # a few steps, to check that it runs

Results go to ``bench/results/tracker_overhead.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from capture_overhead import fs_info, is_tmpfs, machine_info  # noqa: E402

CONFIGS = ("none", "delve", "pipelines")
PARTS = ("train", "stats", "save", "step")
BATCH, D_IN, D_OUT, HIDDEN = 64, 100, 10, 50


class LayerCake(nn.Module):
    """delve's example model: six linear layers, a ReLU (``clamp(min=0)``) after each but the last."""

    def __init__(self, d_in: int, h1: int, h2: int, h3: int, h4: int, h5: int, d_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, h1)
        self.linear2 = nn.Linear(h1, h2)
        self.linear3 = nn.Linear(h2, h3)
        self.linear4 = nn.Linear(h3, h4)
        self.linear5 = nn.Linear(h4, h5)
        self.linear6 = nn.Linear(h5, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(x).clamp(min=0)
        x = self.linear2(x).clamp(min=0)
        x = self.linear3(x).clamp(min=0)
        x = self.linear4(x).clamp(min=0)
        x = self.linear5(x).clamp(min=0)
        return self.linear6(x)


def make_tracker(kind: str, model: nn.Module, folder: Path) -> Any:
    """The example's tracker (``kind`` delve or pipelines), or None for ``none``."""
    if kind == "none":
        return None
    if kind == "delve":
        from delve import SaturationTracker
    else:
        from pipelines import SaturationTracker
    with contextlib.redirect_stdout(io.StringIO()):
        return SaturationTracker(
            str(folder / f"{kind}_run"), "csv", model, device="cpu", reset_covariance=True
        )


class Config:
    """One configuration: its model copy, optimiser, tracker and timed steps."""

    def __init__(self, kind: str, model: nn.Module, folder: Path) -> None:
        self.kind = kind
        self.model = copy.deepcopy(model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.loss = nn.MSELoss(reduction="sum")
        self.tracker = make_tracker(kind, self.model, folder)
        self.times: dict[str, list[float]] = {part: [] for part in PARTS}
        self.round_steps: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = self.loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        t1 = time.perf_counter()
        if self.tracker is not None:
            self.tracker.add_saturations(save=False)
        t2 = time.perf_counter()
        if self.tracker is not None:
            self.tracker.save()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    def run(self, x: torch.Tensor, y: torch.Tensor, steps: int, record: bool) -> None:
        steps_of_round = []
        for _ in range(steps):
            parts = self.step(x, y)
            if record:
                for part, value in zip(PARTS, (*parts, sum(parts)), strict=True):
                    self.times[part].append(value)
                steps_of_round.append(sum(parts))
        if record:
            self.round_steps.append(statistics.median(steps_of_round))

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def layer_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """The float32 outputs of the model's linear layers for one batch (what the hooks see)."""
    outs: list[np.ndarray] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().numpy().copy()))
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def floor_seconds(outs: list[np.ndarray], reps: int) -> float:
    """Float64 products and eigvalsh of every layer output, one BLAS thread: the median per step."""
    from threadpoolctl import threadpool_limits

    def work() -> None:
        for out in outs:
            x = out.astype(np.float64)
            x -= x.mean(axis=0)
            np.linalg.eigvalsh((x.T @ x) / x.shape[0], UPLO="U")

    with threadpool_limits(limits=1, user_api="blas"):
        work()
        return statistics.median(timeit.repeat(work, number=1, repeat=reps))


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def run_width(h: int, steps: int, rounds: int, warmup: int, floor_reps: int, workdir: Path) -> dict[str, Any]:
    """All rounds of one hidden width; returns its summary."""
    torch.manual_seed(1)
    x, y = torch.randn(BATCH, D_IN), torch.randn(BATCH, D_OUT)
    model = LayerCake(D_IN, h, HIDDEN, HIDDEN, HIDDEN, HIDDEN, D_OUT)
    folder = Path(tempfile.mkdtemp(prefix=f"tracker_h{h}_", dir=workdir))
    configs = {kind: Config(kind, model, folder) for kind in CONFIGS}
    loads = []
    try:
        for cfg in configs.values():
            cfg.run(x, y, warmup, record=False)
        for r in range(rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for kind in order:
                configs[kind].run(x, y, steps, record=True)
            loads.append(round(os.getloadavg()[0], 2))
        floor = floor_seconds(layer_outputs(configs["none"].model, x), floor_reps)
    finally:
        for cfg in configs.values():
            cfg.close()
        shutil.rmtree(folder, ignore_errors=True)
    med = {k: {p: statistics.median(c.times[p]) for p in PARTS} for k, c in configs.items()}
    per_round = [
        p / d for p, d in zip(configs["pipelines"].round_steps, configs["delve"].round_steps, strict=True)
    ]
    ratio = med["pipelines"]["step"] / med["delve"]["step"]
    return {
        "h": h,
        "widths": [h, HIDDEN, HIDDEN, HIDDEN, HIDDEN, D_OUT],
        "median_ms": {k: {p: ms(v) for p, v in parts.items()} for k, parts in med.items()},
        "round_step_ms": {k: [ms(v) for v in c.round_steps] for k, c in configs.items()},
        "overhead_ms": {k: ms(med[k]["step"] - med["none"]["step"]) for k in ("delve", "pipelines")},
        "ratio_step": round(ratio, 3),
        "ratio_step_per_round_median": round(statistics.median(per_round), 3),
        "ratio_train": round(med["pipelines"]["train"] / med["delve"]["train"], 3),
        "ratio_stats": round(med["pipelines"]["stats"] / med["delve"]["stats"], 3),
        "ratio_save": round(med["pipelines"]["save"] / med["delve"]["save"], 3),
        "limit": {
            "products_eigvalsh_ms": ms(floor),
            "step_ms": ms(med["none"]["step"] + floor),
            "pipelines_stats_x_limit": round(med["pipelines"]["stats"] / floor, 2),
        },
        "target_met": ratio <= 1.0,
        "loadavg_per_round": loads,
    }


def print_width(res: dict[str, Any]) -> None:
    m = res["median_ms"]
    print(f"h={res['h']} (layer widths {res['widths']}), median ms per step:")
    print(f"  {'':10s}" + "".join(f"{p:>9s}" for p in PARTS))
    for kind in CONFIGS:
        print(f"  {kind:10s}" + "".join(f"{m[kind][p]:9.3f}" for p in PARTS))
    lim = res["limit"]
    print(
        f"  pipelines / delve: step {res['ratio_step']:.2f} (per round {res['ratio_step_per_round_median']:.2f}), "
        f"train {res['ratio_train']:.2f}, stats {res['ratio_stats']:.2f}, save {res['ratio_save']:.2f}; "
        f"target <= 1: {'met' if res['target_met'] else 'NOT met'}"
    )
    print(
        f"  limit: products + eigvalsh {lim['products_eigvalsh_ms']:.3f} ms, limit step {lim['step_ms']:.3f} ms "
        f"(none + that); pipelines stats = {lim['pipelines_stats_x_limit']:.2f}x the products + eigvalsh"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--widths", default="10,100,300", help="hidden widths h of the example (comma separated)"
    )
    parser.add_argument("--steps", type=int, default=100, help="steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per configuration first")
    parser.add_argument("--floor-reps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check that it runs")
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / "bench", help="where the CSVs go (not a tmpfs)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracker_overhead.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup, args.floor_reps = 10, 2, 3, 20
    if is_tmpfs(args.workdir):
        parser.error(f"--workdir {args.workdir} is a tmpfs: the CSV writes would measure memory")
    warnings.simplefilter("ignore")  # delve's CSV writer and its deprecations
    start = time.perf_counter()
    results = []
    for h in (int(w) for w in args.widths.split(",")):
        res = run_width(h, args.steps, args.rounds, args.warmup, args.floor_reps, args.workdir)
        print_width(res)
        results.append(res)
    out = {
        "benchmark": "tracker_overhead",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "disk": fs_info(args.workdir),
        "settings": {
            "batch": BATCH,
            "steps": args.steps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "floor_reps": args.floor_reps,
        },
        "widths": results,
        "all_targets_met": all(r["target_met"] for r in results),
        "seconds": round(time.perf_counter() - start, 1),
        "loadavg_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.out} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
