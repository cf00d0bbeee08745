"""What several test files share: small models, float64 references, a plain forward-hook tape,
a one-thread fixture, the command line (console script and click runner), and delve 0.1.50 as an
oracle.

Keep this module generic (any stage's tests may use it); test-specific references belong in the
test files. Plain helpers are imported as ``from conftest import ...``; fixtures need no import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

# Helper scripts, not test modules: importing _kill_worker.py for its doctests would set torch's
# thread count for the whole session.
collect_ignore = ["_kill_worker.py", "_runs.py"]

pytest_plugins = ["_s3"]  # the test S3 server (moto) and its fixtures: tests/_s3.py

# -- small models ------------------------------------------------------------------------------


class OracleNet(nn.Module):
    """The model of the delve oracle recipe (``/work/shared/delve-0.1.50.md``).

    Conv2d(1->4, 3x3, padding 1) -> ReLU -> flatten -> Linear(256->6) -> repeat 3 times along a
    time axis -> LSTM(6->5, batch_first) -> Linear(5->2) on the 3-D sequence output. Input
    ``(B, 1, 8, 8)``. It exercises every path of delve: 4-D, 3-D (LSTM and a Linear on a
    sequence) and 2-D outputs. The sizes are parameters: input ``(B, 1, side, side)``,
    ``channels`` conv maps, ``features`` outputs of the Linear, ``hidden`` LSTM units.
    """

    def __init__(self, side: int = 8, channels: int = 4, features: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.fc = nn.Linear(channels * side * side, features)
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        h = self.fc(h)
        seq, _ = self.lstm(h[:, None, :].repeat(1, 3, 1))
        return self.head(seq)[:, -1, :]


class MixedNet(nn.Module):
    """Every layout the capture stage handles, in a few hundred parameters.

    Input ``(B, 1, 8, 8)``: a Conv2d with stride 2 -> ``(B, 3, 4, 4)``; its maps as a 1-D signal
    into a Conv1d -> ``(B, 4, 16)``; that as a sequence of 16 steps into a bidirectional LSTM that
    is *not* batch first -> ``(16, B, 6)``; a batch-first GRU -> ``(B, 16, 3)``; a Linear on that
    3-D output -> ``(B, 16, 2)``; a Linear on the last step -> ``(B, 2)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(3, 4, 3, padding=1)
        self.bilstm = nn.LSTM(4, 3, bidirectional=True)
        self.gru = nn.GRU(6, 3, batch_first=True)
        self.seq_fc = nn.Linear(3, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))  # (B, 3, 4, 4)
        h = self.conv1d(h.flatten(2))  # (B, 4, 16)
        h, _ = self.bilstm(h.permute(2, 0, 1))  # (16, B, 6)
        h, _ = self.gru(h.transpose(0, 1))  # (B, 16, 6) -> (B, 16, 3)
        h = self.seq_fc(h)  # (B, 16, 2)
        return self.out(h[:, -1])


@pytest.fixture(scope="session")
def oracle_net() -> Callable[[int], OracleNet]:
    """Factory: ``oracle_net(seed)`` -> a freshly initialised :class:`OracleNet`."""

    def make(seed: int = 0) -> OracleNet:
        torch.manual_seed(seed)
        return OracleNet()

    return make


@pytest.fixture(scope="session")
def mixed_net() -> Callable[[int], MixedNet]:
    """Factory: ``mixed_net(seed)`` -> a freshly initialised :class:`MixedNet`."""

    def make(seed: int = 0) -> MixedNet:
        torch.manual_seed(seed)
        return MixedNet()

    return make


# -- float64 references -----------------------------------------------------------------------------


def covariance64(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and centred second moment of ``x`` (n, d), two-pass in float64."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    return len(x), mean, centred.T @ centred


def population_cov(x: np.ndarray) -> np.ndarray:
    """The population covariance (divided by n) of ``x`` (n, d), two-pass in float64."""
    count, _, m2 = covariance64(x)
    return m2 / count


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest absolute expected value."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max(initial=0.0)
    diff = np.abs(actual - expected).max(initial=0.0)
    return diff / scale if scale > 0 else diff


# -- delve's reshaping rules, written directly in numpy ----------------------------------------------


def numpy_matrix(x: np.ndarray, layout: str, method: str = "none") -> np.ndarray:
    """The 2-D sample matrix of an output ``x`` (samples first) by delve's rules, in numpy.

    ``layout`` is ``"conv"`` (``(N, C, *spatial)``; ``method`` a conv method), ``"sequence"``
    (``(N, T, U)``; a time-series method) or ``"flat"``. Median is the lower median.
    """
    n = len(x)
    if layout == "flat":
        return x.reshape(n, -1)
    if layout == "sequence":
        return {
            "last_timestep": lambda: x[:, -1, :],
            "timestepwise": lambda: x.reshape(n, -1),
            "tokenwise": lambda: x.reshape(-1, x.shape[-1]),  # a row per (sample, position)
        }[method]()
    c = x.shape[1]
    per_map = x.reshape(n, c, -1)
    k = per_map.shape[2]
    return {
        "channelwise": lambda: np.moveaxis(x, 1, -1).reshape(-1, c),
        "mean": lambda: per_map.astype(np.float64).mean(axis=2),
        "max": lambda: per_map.max(axis=2),
        "median": lambda: np.sort(per_map, axis=2)[:, :, (k - 1) // 2],
        "flatten": lambda: x.reshape(n, -1),
    }[method]()


@pytest.fixture
def reference_matrix() -> Callable[..., np.ndarray]:
    """:func:`numpy_matrix`: delve's reshaping rules in numpy (an independent reference)."""
    return numpy_matrix


# -- a plain forward-hook tape (the reference for what a capture hook sees) ----------------------


@dataclass
class Seen:
    """One forward call as a plain forward hook sees it."""

    name: str
    training: bool
    output: torch.Tensor  # the module's output (first element of a tuple), detached and cloned
    batch_first: bool  # False for an RNN whose output is (T, B, H)


class HookTape:
    """Records every forward output of the given modules with a plain ``register_forward_hook``."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.seen: list[Seen] = []
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            batch_first = not isinstance(module, nn.RNNBase) or bool(module.batch_first)
            self.seen.append(Seen(name, module.training, out.detach().clone(), batch_first))

        return hook

    def calls(self, name: str, training: bool | None = None) -> list[Seen]:
        return [s for s in self.seen if s.name == name and (training is None or s.training == training)]

    def clear(self) -> None:
        self.seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@pytest.fixture
def hook_tape() -> Iterator[Callable[[dict[str, nn.Module]], HookTape]]:
    """Factory: ``hook_tape({name: module})`` -> a :class:`HookTape` (removed at teardown)."""
    tapes: list[HookTape] = []

    def make(modules: dict[str, nn.Module]) -> HookTape:
        tape = HookTape(modules)
        tapes.append(tape)
        return tape

    yield make
    for tape in tapes:
        tape.remove()


# -- one thread ---------------------------------------------------------------------------------------


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: the same bits every run, and small eigh calls fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the command line -----------------------------------------------------------------------------------


def delve_analyze() -> list[str]:
    """The installed ``delve-analyze`` console script (the one next to this interpreter first).

    Skips the test when the project is not installed (``pip install -e .``).
    """
    path = shutil.which("delve-analyze", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip("the delve-analyze console script is not installed")
    return [path]


def run_delve_analyze(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed ``delve-analyze`` with ``args`` in a fresh process; output captured as text."""
    return subprocess.run(
        [*delve_analyze(), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def invoke(*args: Any) -> Any:
    """``delve-analyze ARGS`` through click's runner, in this process (the console script's group)."""
    from click.testing import CliRunner

    from pipelines.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="delve-analyze")


def assert_usage_error(result: Any, *fragments: str) -> None:
    """Exit status 2, one line ``Error: ...`` on stderr holding every fragment, nothing on stdout,
    no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- delve 0.1.50 as an oracle --------------------------------------------------------------------


@pytest.fixture
def delve_tracker(tmp_path: Any) -> Callable[..., Any]:
    """Factory: ``delve_tracker(model, save_to=["csv", "npy"], **kwargs)`` -> delve's SaturationTracker.

    Runs on the CPU (``device='cpu'``) and writes under ``tmp_path / "delve" / "run"``; the
    tracker's ``savefile`` attribute is set to that path.
    """
    torchcallback = pytest.importorskip("delve.torchcallback")

    def make(model: Any, save_to: Any = ("csv", "npy"), **kwargs: Any) -> Any:
        savefile = tmp_path / "delve" / "run"
        kwargs.setdefault("device", "cpu")
        tracker = torchcallback.SaturationTracker(str(savefile), list(save_to), model, **kwargs)
        tracker.savefile = str(savefile)
        return tracker

    return make
