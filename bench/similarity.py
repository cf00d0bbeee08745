"""The one-pass claim of ``analyze.similarity``: a 12 x 12 layer matrix against reading those layers.

Two run stores of 20,000 samples are written with ``capture.Recorder`` (``mode="raw"``, float32,
the Recorder's default chunk size of about 16 MiB, one epoch, phase ``eval``):

* ``conv`` (reading dominates): a CNN's 12 conv layers, 1x1 convolutions chained with ReLU and
  2x2 average pooling: 4 layers of 16 channels at 16 x 16, 4 of 32 channels at 8 x 8, 4 of 64
  channels at 4 x 4 (112 KiB of float32 per sample, 2.3 GB in all; three different chunk grids).
  Similarity pools each map per sample by ``mean`` (the default): widths 16, 32 and 64, 448 columns
  of joint moments in all.
* ``wide`` (compute dominates): 12 linear layers of width 128 chained with tanh (6 KiB per sample,
  123 MB). Exact joint moments cost about N times the per-layer covariances here (the
  ``12 x 12`` blocks of a ``1536 x 1536`` cross product), whatever the reading.

Then, in rounds (the machines are shared and noisy: every ratio is taken within a round, the
median over rounds is reported), warm (the stores are in the page cache after the first round):

Each step is timed in wall seconds and in CPU seconds of the process (all its threads): on a
shared machine the wall time moves with the load, the CPU time much less.

* **read**: every chunk of the 12 layers read and decoded by the reader the similarity pass uses
  (:func:`analyze.similarity_io.read_chunks`: plain chunk files into a reused buffer), the layers
  shared by two threads; nothing else is done with the rows. This is "reading those layers".
* **read + pool**: the same, plus each chunk's ``capture.reshape.to_matrix`` (``mean`` per map),
  on one torch thread per task as the pass does: the reshaping every analysis of these layers needs.
* **similarity**: ``analyze.similarity(store, "cka")``: the 12 x 12 CKA matrix, default scheduler
  (``threads``) and task size, no cache; and with ``["cka", "minibatch_cka"]`` (both accumulators).
* **run_stats**: ``analyze.run_stats(store, conv_methods="mean", stats="trc", source="raw")`` on
  the same layers: the per-layer covariances of the saturation analysis, for comparison.
* **cold** (``conv`` case): read, and similarity, each on the store evicted from the page cache
  (``posix_fadvise(DONTNEED)`` after ``sync``, as ``bench/reduce_throughput.py`` does).

Target (issue 12): similarity <= 2 x read, for the ``conv`` case. The machine's read limit from
``/work/shared/perf-limits.md`` is printed beside the results.

Run from the repository root::

    python bench/similarity.py            # both stores, 3 rounds: about 5 minutes on 2 cores
    python bench/similarity.py --quick    # 2,000 samples, one round: checks that it runs

Results go to ``bench/results/similarity.json``. The stores are deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from reduce_throughput import evict  # noqa: E402
from torch import nn  # noqa: E402

from analyze import run_stats, similarity  # noqa: E402
from analyze.similarity_io import RawSource, one_torch_thread, read_chunks  # noqa: E402
from capture import Recorder  # noqa: E402
from capture.reshape import to_matrix  # noqa: E402
from capture.store import open_run  # noqa: E402

GB = 1e9
TARGET = 2.0
LIMITS = Path("/work/shared/perf-limits.md")


class ConvStack(nn.Module):
    """12 conv layers: 4 x (16 ch, 16 x 16), 4 x (32 ch, 8 x 8), 4 x (64 ch, 4 x 4)."""

    def __init__(self) -> None:
        super().__init__()
        convs = []
        for c_in, c in ((16, 16), (16, 32), (32, 64)):
            for i in range(4):
                convs.append(nn.Conv2d(c_in if i == 0 else c, c, 1))
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            if i in (4, 8):
                x = nn.functional.avg_pool2d(x, 2)
            x = torch.relu(conv(x))
        return x


class WideStack(nn.Module):
    """12 linear layers of width 128."""

    def __init__(self) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(128, 128) for _ in range(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fcs:
            x = torch.tanh(fc(x))
        return x


CASES = {
    "conv": (ConvStack, (16, 16, 16), "a CNN's 12 conv layers stored raw, pooled per sample by mean"),
    "wide": (WideStack, (128,), "12 linear layers of width 128"),
}


def write_store(case: str, path: Path, samples: int, batch: int = 250) -> dict[str, Any]:
    factory, shape, _ = CASES[case]
    torch.manual_seed(0)
    net = factory()
    start = time.perf_counter()
    with Recorder(net, path, mode="raw") as rec, torch.no_grad():
        net.eval()
        for lo in range(0, samples, batch):
            net(torch.randn(min(batch, samples - lo), *shape))
        rec.end_epoch()
    run = open_run(path)
    part = run.ranks[0]
    layers = {name: part.raw(name) for name in run.layers}
    return {
        "layers": len(layers),
        "samples": samples,
        "decoded_bytes": int(
            sum(a.rows * int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in layers.values())
        ),
        "chunk_rows": sorted({a.chunk_rows for a in layers.values()}),
        "write_seconds": time.perf_counter() - start,
    }


def _sources(path: Path) -> list[RawSource]:
    run = open_run(path)
    part = run.ranks[0]
    out = []
    for name in run.layers:
        rec, raw = part.layers[name], part.raw(name)
        out.append(
            RawSource(
                store=str(path),
                array_path=f"{part.group.path}/{rec.raw_array}",
                stored_dtype=rec.stored_dtype or "float32",
                layout=rec.layout,
                chunk_rows=raw.chunk_rows,
                rows=raw.rows,
            )
        )
    return out


def read_layers(path: Path, pool: bool) -> int:
    """Read (and optionally pool) every chunk of every layer on two threads; decoded bytes read."""

    def one(src: RawSource) -> int:
        n_chunks = -(-src.rows // src.chunk_rows)
        total = 0
        with one_torch_thread():
            for _, _, rows in read_chunks(src, 0, n_chunks):
                total += rows.nbytes
                if pool:
                    to_matrix(rows, src.layout, "mean")
        return total

    with ThreadPoolExecutor(2) as executor:
        return sum(executor.map(one, _sources(path)))


def timed(fn: Any) -> tuple[float, float]:
    """Wall seconds and CPU seconds (every thread of this process) of ``fn()``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def cold(path: Path, fn: Any) -> Any:
    """``fn`` run on a store evicted from the page cache first (``posix_fadvise(DONTNEED)``)."""

    def run() -> Any:
        evict(path, "fadvise")
        return fn()

    return run


def measure_round(path: Path, with_cold: bool) -> dict[str, tuple[float, float]]:
    steps = {
        "read": lambda: read_layers(path, pool=False),
        "read_pool": lambda: read_layers(path, pool=True),
        "similarity_cka": lambda: similarity(path, "cka", progress=False),
        "similarity_cka_minibatch": lambda: similarity(path, ["cka", "minibatch_cka"], progress=False),
        "run_stats": lambda: run_stats(path, conv_methods="mean", stats="trc", source="raw", progress=False),
    }
    if with_cold:
        steps["read_cold"] = cold(path, lambda: read_layers(path, pool=False))
        steps["similarity_cka_cold"] = cold(path, lambda: similarity(path, "cka", progress=False))
    out = {name: timed(fn) for name, fn in steps.items()}
    read_layers(path, pool=False)  # warm again for the next round
    return out


def read_limit_line() -> str:
    try:
        for line in LIMITS.read_text().splitlines():
            if "Plain file read of the chunk files" in line:
                return line.strip("- ").strip()
    except OSError:
        pass
    return f"(no read limit found in {LIMITS})"


def run_case(case: str, workdir: Path, samples: int, rounds: int) -> dict[str, Any]:
    path = workdir / f"{case}.zarr"
    store = write_store(case, path, samples)
    table = similarity(path, "cka", progress=False)
    assert len(table) == 144, len(table)
    read_layers(path, pool=False)  # warm the page cache
    per_round = [measure_round(path, with_cold=case == "conv") for _ in range(rounds)]
    shutil.rmtree(path)
    steps = list(per_round[0])
    out: dict[str, Any] = {"description": CASES[case][2], "store": store}
    for i, clock in enumerate(("wall", "cpu")):
        out[f"{clock}_seconds_median"] = {k: statistics.median(r[k][i] for r in per_round) for k in steps}
        out[f"{clock}_ratios_median"] = {
            f"{k}_over_read": statistics.median(r[k][i] / r["read"][i] for r in per_round) for k in steps[1:]
        }
    out["read_gb_per_s"] = store["decoded_bytes"] / out["wall_seconds_median"]["read"] / GB
    if "read_cold" in steps:
        out["cold_wall_ratio_median"] = statistics.median(
            r["similarity_cka_cold"][0] / r["read_cold"][0] for r in per_round
        )
        out["read_cold_gb_per_s"] = store["decoded_bytes"] / out["wall_seconds_median"]["read_cold"] / GB
    out["rounds"] = per_round
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 samples, one round")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: bench/)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "similarity.json")
    args = parser.parse_args(argv)
    samples, rounds = (2_000, 1) if args.quick else (args.samples, args.rounds)
    workdir = Path(tempfile.mkdtemp(prefix="similarity-bench-", dir=args.workdir or HERE))
    limit = read_limit_line()
    results: dict[str, Any] = {}
    try:
        for case in CASES:
            results[case] = run_case(case, workdir, samples, rounds)
            r = results[case]
            s, q = r["wall_seconds_median"], r["wall_ratios_median"]
            c, qc = r["cpu_seconds_median"], r["cpu_ratios_median"]
            print(
                f"\n{case}: {r['description']}; {r['store']['decoded_bytes'] / GB:.2f} GB, {samples} samples"
            )
            print(f"  machine read limit: {limit}")
            print(f"  {'':<25} {'wall':>7}  {'x read':>6}  {'cpu':>7}  {'x read':>6}")
            print(
                f"  {'read':<25} {s['read']:7.2f}  {1:6.2f}  {c['read']:7.2f}  {1:6.2f}   ({r['read_gb_per_s']:.2f} GB/s)"
            )
            for name in ("read_pool", "similarity_cka", "similarity_cka_minibatch", "run_stats"):
                key = name + "_over_read"
                print(f"  {name:<25} {s[name]:7.2f}  {q[key]:6.2f}  {c[name]:7.2f}  {qc[key]:6.2f}")
            if "read_cold" in s:
                print(
                    f"  cold (evicted): read {s['read_cold']:.2f} s ({r['read_cold_gb_per_s']:.2f} GB/s), similarity "
                    f"{s['similarity_cka_cold']:.2f} s: {r['cold_wall_ratio_median']:.2f} x read"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = results["conv"]["wall_ratios_median"]["similarity_cka_over_read"]
    verdict = ratio <= TARGET
    print(
        f"\ntarget (conv case): similarity <= {TARGET} x read (wall): {ratio:.2f}, {'met' if verdict else 'NOT met'}"
    )
    document = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/similarity.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "versions": {d: metadata.version(d) for d in ("torch", "numpy", "zarr", "dask")},
        },
        "machine_read_limit": limit,
        "target": {
            "case": "conv",
            "similarity_over_read_at_most": TARGET,
            "wall_ratio": ratio,
            "met": verdict,
        },
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
