"""A worked example of the whole pipeline on scikit-learn's 8x8 handwritten digits, on the CPU.

:func:`run_demo` trains two small models on the 1,797 digits that ship with scikit-learn
(no download), captures their layers with :class:`capture.Recorder`, analyses the run stores
with :func:`analyze.analyze_runs` and :func:`analyze.similarity` and writes the analysis with
:func:`analyze.outputs.write_analysis`
(:data:`MODELS` names each model's capture mode):

``cnn``
    Conv2d(1->16) -> ReLU -> max-pool -> Conv2d(16->32) -> ReLU -> max-pool -> Linear(128->64)
    -> ReLU -> Linear(64->10), captured in ``both`` modes: every layer output is kept (so any
    conv reduction can be chosen at analysis time) and the float64 moments of each layer's
    matrix (``channelwise`` for the convolutions) are accumulated during training; the analysis
    reads those moments (``source="auto"`` prefers them when they serve the request).
``mlp``
    Linear(64->512) -> ReLU -> Linear(512->64) -> ReLU -> Linear(64->10), captured in ``raw``
    mode (every layer output is kept). ``fc1`` is deliberately too wide: its output is an affine
    map of 64 pixels, so at most 64 of its 512 dimensions can carry variance, and its saturation
    stays below 64 / 512 = 0.125: the unused tail that saturation is meant to reveal.

Each epoch records the training batches (phase ``train``) and one pass over the held-out
images (phase ``eval``), and adds the ``train_accuracy`` (a clean pass over the training
images with the recorder paused) and ``test_accuracy`` scalars.

Output folder
-------------
``{out}/runs/cnn.zarr``, ``{out}/runs/mlp.zarr``
    The run stores.
``{out}/analysis/``
    ``stats.csv``, the delve-format CSVs, ``plots/`` and ``provenance.json``
    (see :mod:`analyze.outputs`); and the representational similarity of each model's layers
    (linear CKA, :func:`analyze.similarity`) on the held-out images: ``similarity_layers.csv``
    (every pair of layers at every epoch) and ``similarity_epochs.csv`` (each layer with itself at
    every other epoch), with one heatmap per matrix in ``plots/``
    (see :mod:`analyze.similarity_outputs`).
``{out}/demo.json``
    Written last: what the demo ran (seed, epochs, models, accuracies), package versions and the
    SHA-256 of every other file; it marks the folder as a demo output, which a later demo may
    replace.

The whole folder is an :class:`analyze.OutputFolder`: the models are trained, captured and
analysed into a staging folder next to ``out``, which replaces ``out`` (an earlier demo output
as a whole) only once everything is written; on a failure ``out`` is as it was.

Determinism
-----------
For a given seed the results are identical from run to run: the split, the initial weights
and the batch order come from the seed, training runs single-threaded with
``torch.use_deterministic_algorithms(True)`` (both restored afterwards), so ``stats.csv`` is
the same byte for byte.

Run it with ``delve-analyze demo -o OUT`` (every option), or ``python -m pipelines.demo [OUT]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from analyze import AnalysisResult, OutputFolder, analyze_runs, analyze_similarity
from analyze.outputs import PROVENANCE_FORMAT, write_analysis
from analyze.similarity_outputs import similarity_files
from capture import Recorder

__all__ = [
    "DEFAULT_EPOCHS",
    "DEMO_MARKER",
    "DemoResult",
    "DigitsCNN",
    "WideMLP",
    "load_digits_split",
    "run_demo",
]

#: Epochs trained by default (about 15 s of CPU time in all, test accuracies around 0.97).
DEFAULT_EPOCHS = 8
#: File that marks a folder as a demo output.
DEMO_MARKER = "demo.json"
#: Threshold of the saturation shown in the report.
THRESHOLD = 0.99
#: The similarity matrices written: the measure, on the held-out images (the same samples every epoch).
SIMILARITY = {"measure": "cka", "phases": ("eval",)}
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
TEST_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """A small CNN for ``(B, 1, 8, 8)`` digits: two conv blocks and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 16, 4, 4)
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)  # (B, 32, 2, 2)
        h = torch.relu(self.fc1(h.flatten(1)))
        return self.fc2(h)


class WideMLP(nn.Module):
    """An MLP for flattened digits whose first layer (512 wide on 64 inputs) is far too wide."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        h = torch.relu(self.fc2(h))
        return self.fc3(h)


#: Model name -> (constructor, capture mode).
MODELS: dict[str, tuple[type[nn.Module], str]] = {"cnn": (DigitsCNN, "both"), "mlp": (WideMLP, "raw")}


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes
    ----------
    out : Path
        The demo's output folder.
    runs : dict
        Model name -> run store.
    analysis_dir : Path
        The analysis output folder (``stats.csv``, delve CSVs, ``plots/``, ``provenance.json``).
    files : dict
        The analysis files, as :func:`analyze.write_outputs` returns them (kind -> paths), plus
        ``similarity`` (the two similarity tables); ``plots`` holds the similarity heatmaps too.
    result : AnalysisResult
        The analysis.
    summary : pandas.DataFrame
        One row per model and layer at the last epoch: ``model, layer, width, lsat_train,
        lsat_eval`` (threshold :data:`THRESHOLD`, channelwise conv reduction).
    accuracy : pandas.DataFrame
        One row per model at the last epoch: ``model, train_accuracy, test_accuracy``.
    epochs, seed : int
    seconds : float
        Wall time of the whole demo.
    """

    out: Path
    runs: dict[str, Path]
    analysis_dir: Path
    files: dict[str, list[Path]]
    result: AnalysisResult
    summary: pd.DataFrame
    accuracy: pd.DataFrame
    epochs: int
    seed: int
    seconds: float = field(default=0.0, compare=False)

    def report(self) -> str:
        """Where the files are, and the per-layer saturation and accuracy table, as text."""
        files = self.files
        last = self.epochs - 1
        lines = [
            f"delve-pipeline demo: {len(self.runs)} models trained for {self.epochs} epoch(s) on scikit-learn's "
            f"1,797 8x8 digits (seed {self.seed}) in {self.seconds:.1f} s",
            "",
            "run stores:  " + ", ".join(f"{p} ({MODELS[m][1]})" for m, p in self.runs.items()),
            f"tidy table:  {self.analysis_dir / 'stats.csv'}",
            "delve CSVs:  " + ", ".join(str(self.analysis_dir / p.name) for p in files.get("delve_csv", [])),
            "similarity:  "
            + ", ".join(str(self.analysis_dir / p.name) for p in files.get("similarity", []))
            + " (linear CKA on the held-out images)",
            f"plots:       {self.analysis_dir / 'plots'} ({len(files.get('plots', []))} PNG files)",
            f"provenance:  {self.analysis_dir / 'provenance.json'}",
            "",
            f"saturation (share of a layer's width holding {THRESHOLD:.0%} of its variance) and accuracy, "
            f"epoch {last}:",
        ]
        header = ("model", "layer", "width", "train", "eval")
        rows: list[tuple[str, ...]] = []
        for model in self.runs:
            for rec in self.summary[self.summary["model"] == model].itertuples(index=False):
                rows.append((model, rec.layer, str(rec.width), _fmt(rec.lsat_train), _fmt(rec.lsat_eval)))
            acc = self.accuracy[self.accuracy["model"] == model].iloc[0]
            rows.append((model, "accuracy", "", _fmt(acc["train_accuracy"]), _fmt(acc["test_accuracy"])))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = (False, False, True, True, True)
        for r in [header, *rows]:
            cells = [c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right, strict=True)]
            lines.append("  ".join(cells).rstrip())
            if r is header:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("train: the 1,438 training images; eval: the 359 held-out images.")
        wide = self.summary[(self.summary["model"] == "mlp") & (self.summary["layer"] == "fc1")]
        if not wide.empty:
            lines += [
                "",
                "mlp.fc1 is 512 wide on 64 inputs: at most 64 of its dimensions can vary, so its "
                "saturation stays below 0.125 (the unused tail).",
            ]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return str(value)


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``, images ``(N, 1, 8, 8)`` in [0, 1].

    A seeded random split with :data:`TEST_FRACTION` of the 1,797 images held out.

    Examples
    --------
    >>> x_train, y_train, x_test, y_test = load_digits_split(0)
    >>> tuple(x_train.shape), tuple(x_test.shape), float(x_train.max())
    ((1438, 1, 8, 8), (359, 1, 8, 8), 1.0)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs scikit-learn (pip install 'delve-pipeline[demo]' or scikit-learn)"
        ) from exc
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    images = torch.from_numpy((x / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(y.astype(np.int64))
    return images[train], labels[train], images[test], labels[test]


@contextmanager
def _deterministic_torch() -> Iterator[None]:
    """Single-threaded, deterministic torch for the block; the caller's settings come back after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum()) / len(y)


def _train(
    name: str,
    model: nn.Module,
    mode: str,
    store: Path,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    epochs: int,
    seed: int,
    progress: bool,
) -> dict[str, float]:
    """Train ``model`` for ``epochs`` epochs, capturing its layers into ``store``; last accuracies."""
    x_train, y_train, x_test, y_test = data
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    last: dict[str, float] = {}
    with Recorder(model, store, mode=mode, overwrite=True) as rec:
        bar = tqdm(range(epochs), desc=f"training {name} ({mode})", unit="epoch", disable=not progress)
        for _ in bar:
            model.train()
            for idx in torch.randperm(len(y_train), generator=order).split(BATCH_SIZE):
                optimizer.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
            model.eval()
            rec.stop()  # a clean pass over the training images, not recorded
            train_acc = _accuracy(model, x_train, y_train)
            rec.resume()
            test_acc = _accuracy(model, x_test, y_test)  # recorded: phase "eval"
            rec.add_scalar("train_accuracy", train_acc)
            rec.add_scalar("test_accuracy", test_acc)
            rec.end_epoch()
            last = {"train_accuracy": train_acc, "test_accuracy": test_acc}
            bar.set_postfix(train=f"{train_acc:.3f}", test=f"{test_acc:.3f}")
    return last


def _train_all(
    stores: dict[str, Path], seed: int, epochs: int, progress: bool
) -> dict[str, dict[str, float]]:
    """Train and capture every model of :data:`MODELS` into ``stores``; model -> last accuracies."""
    data = load_digits_split(seed)
    accuracy = {}
    with _deterministic_torch():
        for model_name, (factory, mode) in MODELS.items():
            torch.manual_seed(seed)
            model = factory()
            accuracy[model_name] = _train(
                model_name, model, mode, stores[model_name], data, epochs, seed, progress
            )
    return accuracy


def _summary(result: AnalysisResult, names: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-layer saturation and per-model accuracy at each run's last epoch."""
    table = result.table
    rows, acc_rows = [], []
    for model, run in names.items():
        sub = table[table["run"] == run]
        last = int(sub["epoch"].max())
        sub = sub[sub["epoch"] == last]
        sat = sub[(sub["stat"] == "lsat") & (sub["threshold"] == THRESHOLD)]
        sat = sat[sat["conv_method"].isin(("channelwise", "none", ""))]
        for layer in result.layer_order[run]:
            values = {
                p: sat.loc[(sat["layer"] == layer) & (sat["phase"] == p), "value"] for p in ("train", "eval")
            }
            key = next(k for k in result.spectra if k[0] == run and k[1] == last and k[3] == layer)
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "width": int(len(result.spectra[key])),
                    "lsat_train": float(values["train"].iloc[0]) if len(values["train"]) else float("nan"),
                    "lsat_eval": float(values["eval"].iloc[0]) if len(values["eval"]) else float("nan"),
                }
            )
        scalars = sub[sub["phase"] == ""].set_index("stat")["value"]
        acc_rows.append(
            {
                "model": model,
                "train_accuracy": float(scalars.get("train_accuracy", float("nan"))),
                "test_accuracy": float(scalars.get("test_accuracy", float("nan"))),
            }
        )
    return pd.DataFrame(rows), pd.DataFrame(acc_rows)


def _write_similarity(stores: list[str], analysis: OutputFolder, progress: bool) -> dict[str, list[Path]]:
    """CKA of every pair of layers (per epoch) and of each layer across epochs, into ``analysis``."""
    written: dict[str, list[Path]] = {"similarity": [], "plots": []}
    for pairs in ("layers", "epochs"):
        result = analyze_similarity(stores, pairs=pairs, progress=progress, **SIMILARITY)
        for kind, relative, data in similarity_files(result):
            name = f"similarity_{pairs}.csv" if kind == "similarity" else relative
            written[kind].append(analysis.write(name, data))
    return written


def run_demo(
    out: str | os.PathLike[str] = "demo-output",
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    progress: bool = True,
    print_report: bool = True,
) -> DemoResult:
    """Train, capture, analyse and write the digits demo (see the module docstring).

    Parameters
    ----------
    out : str or PathLike
        Output folder: absent, empty, or an earlier demo output (which is overwritten).
    seed : int
        Seeds the split, the weights and the batch order; same seed, same ``stats.csv`` bytes.
    epochs : int
        Epochs per model (at least 1).
    progress : bool
        Show progress bars (training epochs, reduction) on stderr.
    print_report : bool
        Print :meth:`DemoResult.report` on stdout at the end.

    Returns
    -------
    DemoResult

    Raises
    ------
    ValueError
        ``epochs`` below 1 or ``seed`` not an integer.
    FileExistsError
        ``out`` is a file or a non-empty folder that is not a demo output.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
    ...     demo = run_demo(tmp, epochs=2, progress=False, print_report=False)
    ...     sorted(demo.runs)
    ['cnn', 'mlp']
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs: must be a positive integer, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    epochs, seed = int(epochs), int(seed)
    start = time.perf_counter()
    out = Path(out)
    config = {"seed": seed, "epochs": epochs, "models": {m: mode for m, (_, mode) in MODELS.items()}}
    with OutputFolder(
        out, format="delve-pipeline.demo", provenance_name=DEMO_MARKER, kind="a demo output"
    ) as folder:

        def published(path: str | os.PathLike[str]) -> Path:
            """Where a path of the staging folder will be, in the caller's form of ``out``."""
            return out / Path(path).relative_to(folder.path)

        staged = {m: folder.path / "runs" / f"{m}.zarr" for m in MODELS}
        accuracy = _train_all(staged, seed, epochs, progress)
        result = analyze_runs(
            [str(p) for p in staged.values()],
            thresholds=(THRESHOLD,),
            stats=("lsat", "idim"),
            progress=progress,
        )
        for info in result.inputs.values():  # the stores' published paths, for provenance.json
            info["path"] = os.fspath(folder.final_path(info["path"]))
        if progress:
            print("comparing layers, writing CSVs and plots ...", file=sys.stderr, flush=True)
        analysis = OutputFolder(folder.path / "analysis", format=PROVENANCE_FORMAT, staged=False)
        similarity = _write_similarity([str(p) for p in staged.values()], analysis, progress)
        written = write_analysis(result, analysis, plots=True)  # provenance last, hashing every file
        written = {
            **written,
            "similarity": similarity["similarity"],
            "plots": written["plots"] + similarity["plots"],
        }
        files = {kind: [published(p) for p in paths] for kind, paths in written.items()}
        runs = {m: published(p) for m, p in staged.items()}
        names = dict(zip(runs, result.inputs, strict=True))  # model -> run name in the table
        summary, acc_table = _summary(result, names)
        folder.publish(
            {**config, "complete": True, "accuracy": accuracy, "runs": {m: str(p) for m, p in runs.items()}}
        )
    demo = DemoResult(
        out=out,
        runs=runs,
        analysis_dir=out / "analysis",
        files=files,
        result=result,
        summary=summary,
        accuracy=acc_table,
        epochs=epochs,
        seed=seed,
        seconds=time.perf_counter() - start,
    )
    if print_report:
        print(demo.report(), flush=True)
    return demo


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.demo [OUT]``: the demo with its defaults (``delve-analyze demo`` has every option)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        raise SystemExit(
            "usage: python -m pipelines.demo [OUT]  (delve-analyze demo --help lists every option)"
        )
    try:
        run_demo(args[0] if args else "demo-output", progress=sys.stderr.isatty())
    except (ValueError, OSError) as exc:
        raise SystemExit(f"Error: {' '.join(str(exc).split())}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
