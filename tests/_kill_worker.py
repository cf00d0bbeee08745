"""A small, deterministic training process that tests/test_reliability_capture.py kills.

Not a test module (the leading underscore keeps pytest away). Usage::

    python tests/_kill_worker.py reference STORE LOG.json
    python tests/_kill_worker.py batch JOBS.json RESULTS.json

``reference`` trains :data:`EPOCHS` epochs without interruption into ``STORE`` and writes, for
every file the zarr local store writes (counted in the order the writes start), its key and,
for the rank group's ``zarr.json``, the epochs that write declares complete and open.

``batch`` imports torch once and, for each job, forks a child that trains into the job's store
and is SIGKILLed at the job's kill point: either the child kills itself at a chosen store write,
writer method call or training step, or (``{"at": "timed"}``) this process kills it from outside
after a delay. The killed store is then copied to ``resume_store`` and a second child continues
that copy with ``Recorder(..., resume=True)`` to the end. The child's kill point, the wait status
and the store-write counters at the kill are written to ``RESULTS.json``.

Every batch of data is a function of (epoch, phase, step) alone, and a resumed child restores the
model by replaying the completed epochs without recording (a stand-in for loading a
checkpoint), so an interrupted and resumed run must store exactly the uninterrupted run's values.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import zarr.storage._local as zarr_local  # noqa: E402
from torch import nn  # noqa: E402

import capture.recorder as recorder_module  # noqa: E402
import capture.store_writer as store_writer  # noqa: E402
import capture.writer as writer_module  # noqa: E402
from capture import Recorder  # noqa: E402

torch.set_num_threads(1)

SEED = 20240611
EPOCHS = 3
TRAIN_STEPS = 4
EVAL_STEPS = 2
BATCH = 6
#: Small chunks and blocks, so that an epoch writes many raw chunks and flushes many gram blocks.
RECORDER_OPTIONS: dict[str, Any] = {
    "mode": "both",
    "chunk_bytes": 2048,
    "gram_block_rows": 18,
    "conv_methods": ("channelwise",),
}

#: Methods whose calls the reference run counts (a job may kill the child at any of their calls).
COUNTED = (
    "RunStoreWriter.open_epoch",
    "RunStoreWriter.write_gram_block",
    "RunStoreWriter.commit_blocks",
    "RunStoreWriter.write_calls",
    "RunStoreWriter.commit_epoch",
    "_RawSink._write",
    "_GrowingArray.trim",
)
#: Class name -> the module that defines it.
METHOD_TARGETS = {
    "RunStoreWriter": store_writer,
    "_RawSink": store_writer,
    "_GrowingArray": store_writer,
    "BackgroundWriter": writer_module,
    "Recorder": recorder_module,
}


class Net(nn.Module):
    """Conv2d(1->3, 3x3, padding 1) -> ReLU -> flatten -> Linear(108->3); input (B, 1, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(108, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Sgd:
    """Plain SGD with momentum (``torch.optim`` is avoided: it imports torch._dynamo, 3 s here)."""

    def __init__(self, model: nn.Module, lr: float = 0.05, momentum: float = 0.9) -> None:
        self.params = list(model.parameters())
        self.lr, self.momentum = lr, momentum
        self.velocity = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p, v in zip(self.params, self.velocity, strict=True):
            v.mul_(self.momentum).add_(p.grad)
            p.sub_(self.lr * v)


def batch_of(epoch: int, phase: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1000 * epoch + 100 * (phase == "eval") + step)
    return torch.randn(BATCH, 1, 6, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


# -- kill points ---------------------------------------------------------------------------------
STATE: dict[str, Any] = {"epoch": -1, "phase": "", "step": -1}
_lock = threading.Lock()
#: Store writes started, and finished (a refused exclusive write of an existing key counts too).
COUNTS = {"started": 0, "finished": 0}
LOG: list[dict[str, Any]] = []


def journal(store: str, where: str, **extra: Any) -> None:
    """What the child was doing when it killed itself (read back by the test)."""
    with _lock:
        counts = dict(COUNTS)
    record = {"where": where, **counts, **STATE, **extra}
    Path(f"{store}.journal").write_text(json.dumps(record))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - never reached


def count_writes(store: str, kill: dict[str, Any] | None, log: bool) -> None:
    """Wrap zarr's local-store file write: count it, log it, or die at the job's write."""
    original = zarr_local._put
    root = Path(store).resolve()

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        with _lock:
            COUNTS["started"] += 1
            n = COUNTS["started"]
        key = str(Path(path).resolve().relative_to(root))
        if kill is not None and kill.get("at") == "write" and kill["n"] == n and kill["how"] != "after":
            journal(store, f"write {n} {kill['how']}", key=key)
            if kill["how"] == "partial":  # a torn temporary file, as zarr's _atomic_write leaves it
                path.parent.mkdir(parents=True, exist_ok=True)
                data = bytes(value.as_buffer_like())
                path.with_suffix(".killed.partial").write_bytes(data[: len(data) // 2])
            die()
        try:
            out = original(path, value, exclusive=exclusive)
        finally:  # an exclusive write of an existing key raises (zarr ignores it): still a kill point
            with _lock:
                COUNTS["finished"] += 1
            if kill is not None and kill.get("at") == "write" and kill["n"] == n and kill["how"] == "after":
                journal(store, f"write {n} after", key=key)
                die()
        with _lock:
            if log:
                entry: dict[str, Any] = {"n": n, "key": key}
                if key == "zarr.json":
                    attrs = json.loads(bytes(value.as_buffer_like())).get("attributes", {})
                    entry["root_attrs"] = "delve_pipeline" in attrs
                if key == "rank-00000/zarr.json":
                    attrs = json.loads(bytes(value.as_buffer_like())).get("attributes", {})
                    state = attrs.get("delve_pipeline")
                    entry["complete"] = None if state is None else state["epochs_complete"]
                    entry["open"] = None if state is None else state["epoch_open"]
                LOG.append(entry)
        return out

    zarr_local._put = put


CALLS: dict[str, int] = {}


def arm_method(store: str, target: str, kill: dict[str, Any] | None) -> None:
    """Count the calls of ``Class.method``; die before or after the n-th one if ``kill`` says so."""
    cls_name, method = target.split(".")
    cls = getattr(METHOD_TARGETS[cls_name], cls_name)
    original = getattr(cls, method)
    CALLS[target] = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            CALLS[target] += 1
            n = CALLS[target]
        if kill is None:
            return original(*args, **kwargs)
        if n == kill["n"] and kill["how"] == "before":
            journal(store, f"{kill['target']} call {n} before")
            die()
        out = original(*args, **kwargs)
        if n == kill["n"] and kill["how"] == "after":
            journal(store, f"{kill['target']} call {n} after")
            die()
        return out

    setattr(cls, method, wrapper)


# -- training ------------------------------------------------------------------------------------
def train(store: str, *, resume: bool, kill: dict[str, Any] | None, sleep: float = 0.0) -> None:
    torch.manual_seed(SEED)
    model = Net()
    opt = Sgd(model)
    loss_fn = nn.CrossEntropyLoss()
    rec = Recorder(model, store, resume=resume, **RECORDER_OPTIONS)
    start = rec.epoch
    if kill is not None and kill.get("at") == "timed":
        os.write(kill["ready_fd"], b"r")
    if start:  # restore the model: replay the completed epochs without recording
        rec.stop()
        for epoch in range(start):
            run_epoch(model, opt, loss_fn, epoch, None, None, store, 0.0)
        rec.resume()
    for epoch in range(start, EPOCHS):
        run_epoch(model, opt, loss_fn, epoch, rec, kill, store, sleep)
    rec.close()


def run_epoch(
    model: Net,
    opt: Sgd,
    loss_fn: nn.Module,
    epoch: int,
    rec: Recorder | None,
    kill: dict[str, Any] | None,
    store: str,
    sleep: float,
) -> None:
    STATE["epoch"] = epoch
    step_kill = kill if kill is not None and kill.get("at") == "step" else None
    total = 0.0
    for phase, steps in (("train", TRAIN_STEPS), ("eval", EVAL_STEPS)):
        STATE["phase"] = phase
        model.train(phase == "train")
        for step in range(steps):
            STATE["step"] = step
            x, y = batch_of(epoch, phase, step)
            if phase == "train":
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                total += loss.item()
            else:
                with torch.no_grad():
                    model(x)
            if sleep:
                time.sleep(sleep)
            if step_kill and (step_kill["epoch"], step_kill["phase"], step_kill["step"]) == (
                epoch,
                phase,
                step,
            ):
                if step_kill.get("drain") and rec is not None:
                    rec._writer.flush()  # noqa: SLF001 - make the store's state at the kill known
                journal(store, f"step {epoch}/{phase}/{step}")
                die()
    if rec is not None:
        rec.add_scalar("loss", total / TRAIN_STEPS)
        rec.end_epoch()


# -- modes ---------------------------------------------------------------------------------------
def reference(store: str, log_path: str) -> None:
    count_writes(store, None, log=True)
    for target in COUNTED:
        arm_method(store, target, None)
    train(store, resume=False, kill=None)
    Path(log_path).write_text(json.dumps({"writes": LOG, "total": COUNTS["started"], "calls": CALLS}))


def child_kill(job: dict[str, Any]) -> None:
    kill = job["kill"]
    store = job["store"]
    count_writes(store, kill, log=False)
    if kill["at"] == "method":
        arm_method(store, kill["target"], kill)
    train(store, resume=False, kill=kill, sleep=job.get("sleep", 0.0))


def fork_run(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            import traceback

            traceback.print_exc()
            code = 3 if not isinstance(exc, SystemExit) else int(exc.code or 0)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def status_of(wait_status: int) -> dict[str, Any]:
    if os.WIFSIGNALED(wait_status):
        return {"signal": os.WTERMSIG(wait_status), "exit": None}
    return {"signal": None, "exit": os.WEXITSTATUS(wait_status)}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    kill = job["kill"]
    if kill["at"] == "timed":
        read_fd, write_fd = os.pipe()
        kill = {**kill, "ready_fd": write_fd}
        pid = fork_run(child_kill, {**job, "kill": kill})
        os.close(write_fd)
        ready = os.read(read_fd, 1)
        os.close(read_fd)
        time.sleep(kill["delay"])
        killed_at = time.perf_counter() - started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # pragma: no cover - finished before the delay
            pass
        _, status = os.waitpid(pid, 0)
        extra = {"ready": ready == b"r", "killed_after_s": round(killed_at, 3)}
    else:
        pid = fork_run(child_kill, job)
        _, status = os.waitpid(pid, 0)
        extra = {}
    journal_path = Path(f"{job['store']}.journal")
    record = json.loads(journal_path.read_text()) if journal_path.exists() else None
    result = {"id": job["id"], "kill_status": status_of(status), "journal": record, **extra}
    if job.get("resume_store"):
        if Path(job["store"]).exists():
            shutil.copytree(job["store"], job["resume_store"])
        pid = fork_run(lambda: train(job["resume_store"], resume=True, kill=None))
        _, status = os.waitpid(pid, 0)
        result["resume_status"] = status_of(status)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def batch(jobs_path: str, results_path: str) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    results = [run_job(job) for job in jobs]
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "reference":
        reference(sys.argv[2], sys.argv[3])
    elif mode == "batch":
        batch(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
