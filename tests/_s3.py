"""A real S3 API for the tests: moto's standalone server on 127.0.0.1, and a small recording to store on it.

Loaded by ``tests/conftest.py`` (``pytest_plugins``). Fixtures:

- ``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1
  once (in a child process: ``python tests/_s3.py --serve``), creates a bucket, stops the server
  at the end. No cloud, no credentials of the machine.
- ``s3``: one test's view of it: a fresh prefix, ``storage_options`` for s3fs, and the
  ``AWS_*`` environment variables set for this test only (s3fs and obstore read them).
- ``local_run`` / ``s3_run`` (session): the recording of :func:`record` on local disk, and the
  same recording on the server (``(url, storage_options)``): the reference pair of the tests.

Run as a script, this module records the run of :func:`record` into a store (a URL or a
path) and can SIGKILL itself in the middle of an epoch (``tests/test_object_store.py``)::

    python tests/_s3.py STORE [--kill EPOCH/STEP]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: The recorder options of :func:`record`: small chunks and gram blocks, so that an epoch writes
#: several raw chunks and flushes gram blocks in its middle.
RECORD_OPTIONS: dict[str, Any] = {
    "mode": "both",
    "dtype": "float16",
    "chunk_bytes": 4096,
    "gram_block_rows": 40,
}
EPOCHS = 2
TRAIN_STEPS = 4
EVAL_STEPS = 2
BATCH = 12


@dataclass
class S3Server:
    """The running test server: its endpoint, bucket and credentials."""

    endpoint: str
    bucket: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"
    env: dict[str, str] = field(default_factory=dict)

    def storage_options(self) -> dict[str, Any]:
        """s3fs options that reach this server (what a user passes as ``storage_options``)."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def filesystem(self) -> Any:
        """A plain (synchronous) s3fs filesystem on this server, for a test to look at or damage objects."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options())


@dataclass
class S3Prefix:
    """One test's part of the bucket."""

    server: S3Server
    prefix: str

    def url(self, name: str) -> str:
        """``s3://bucket/<this test's prefix>/name``."""
        return f"s3://{self.server.bucket}/{self.prefix}/{name}"

    def key(self, name: str) -> str:
        """``bucket/<prefix>/name``, the path s3fs uses."""
        return f"{self.server.bucket}/{self.prefix}/{name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options()

    def filesystem(self) -> Any:
        return self.server.filesystem()


def serve() -> None:
    """Run moto's ``ThreadedMotoServer`` on a free port of 127.0.0.1 until stdin closes; print the port."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()  # the test session closes it at the end (or dies, which closes it too)
    server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (a free port) with one bucket, for the whole session.

    The server runs in a process of its own (as a real one would): its request handling then
    takes no share of the tests' interpreter, which holds the clients.
    """
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the s3 / dev extras)")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        info = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket="delve-test")
        info.env = {
            "AWS_ENDPOINT_URL": info.endpoint,
            "AWS_ACCESS_KEY_ID": info.key,
            "AWS_SECRET_ACCESS_KEY": info.secret,
            "AWS_DEFAULT_REGION": info.region,
            "AWS_ALLOW_HTTP": "true",  # obstore: a plain-http endpoint
            # never the machine's own AWS configuration
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        info.filesystem().mkdir(info.bucket)
        yield info
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Prefix:
    """A fresh prefix on the test server; the ``AWS_*`` variables point at the server during the test."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return S3Prefix(s3_server, f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`record` on local disk, uninterrupted: the reference of every store on the server."""
    path = tmp_path_factory.mktemp("local") / "run.zarr"
    record(path)
    return path


@pytest.fixture(scope="session")
def s3_run(s3_server: S3Server) -> tuple[str, dict[str, Any]]:
    """The same recording on the S3 server (explicit storage options, no environment variables).

    Tests may damage its objects only if they put them back (``tests/test_object_store.py``).
    """
    url = f"s3://{s3_server.bucket}/shared/run.zarr"
    record(url, storage_options=s3_server.storage_options())
    return url, s3_server.storage_options()


def at_once(fn: Any, n: int = 2) -> list[Any]:
    """``fn()`` called in ``n`` threads at the same time; their results (an exception is raised)."""
    import threading

    results: list[Any] = [None] * n

    def call(i: int) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised below
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        if isinstance(got, BaseException):
            raise got
    return results


# -- a small deterministic recording -------------------------------------------------------------


def _model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(1234)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))


def _batch(epoch: int, phase: str, step: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(7919 * epoch + 101 * (phase == "eval") + step)
    return torch.randn(BATCH, 1, 6, 6, generator=g)


def record(
    store: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    resume: bool = False,
    kill: tuple[int, int] | None = None,
    **options: Any,
) -> None:
    """Record :data:`EPOCHS` epochs of a fixed model on fixed batches into ``store``.

    The model is not trained (its outputs depend only on the epoch, phase and step), so a run
    resumed after its last complete epoch records exactly what an uninterrupted one does.
    ``kill=(epoch, step)`` drains the writer after that training step, then SIGKILLs the process:
    the store then holds the epoch's data written so far, uncommitted.
    """
    import torch

    from capture import Recorder

    net = _model()
    rec = Recorder(
        net, store, storage_options=storage_options, resume=resume, **{**RECORD_OPTIONS, **options}
    )
    for epoch in range(rec.epoch, EPOCHS):
        for phase, steps in (("train", TRAIN_STEPS), ("eval", EVAL_STEPS)):
            net.train(phase == "train")
            for step in range(steps):
                with torch.no_grad():
                    net(_batch(epoch, phase, step))
                if kill == (epoch, step) and phase == "train":
                    rec.flush()  # everything of the step is in the store
                    os.kill(os.getpid(), signal.SIGKILL)
        rec.add_scalar("epoch_seen", epoch)
        rec.end_epoch()
    rec.close()


if __name__ == "__main__":  # python tests/_s3.py --serve | STORE [--kill EPOCH/STEP]
    if sys.argv[1] == "--serve":
        serve()
        sys.exit(0)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    target = sys.argv[1]
    at = None
    if len(sys.argv) > 3 and sys.argv[2] == "--kill":
        e, s = sys.argv[3].split("/")
        at = (int(e), int(s))
    record(target, kill=at)
