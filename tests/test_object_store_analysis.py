"""Analysing run stores on object storage (moto's S3 server, ``tests/_s3.py``): the same bytes as on disk.

The run is the recording of ``_s3.record`` (mode ``both``, float16, small chunks), once on local
disk (``local_run``) and once on the server (``s3_run``). Every analysis of the ``s3://`` store,
by the Python API or ``delve-analyze``, on threads, on a ``distributed`` cluster of process
workers or two at once, must write the same CSV bytes as the same analysis of the local store.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _s3 import S3Prefix, S3Server, at_once
from click.testing import CliRunner

from analyze import analyze_runs, similarity
from analyze.outputs import sorted_table, table_csv
from analyze.reduce import ChunkReadError
from capture.read_store import READER_VARIABLE
from capture.storage import REDACTED, open_store
from pipelines.cli import cli

RAW = "rank-00000/layers/0/raw"  # the conv layer's raw array
FAST = {"progress": False, "cache_dir": None}


def cli_options(options: dict[str, Any]) -> list[str]:
    """``--storage-option KEY=VALUE`` for each of ``options``."""
    return [a for k, v in options.items() for a in ("--storage-option", f"{k}={v}")]


def delve(*args: Any) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def csv_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.csv"))}


def stats_csv(runs: Any, **kwargs: Any) -> bytes:
    return table_csv(sorted_table(analyze_runs(runs, **FAST, **kwargs)))


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "reader"), [("raw", "auto"), ("raw", "fsspec"), ("auto", "auto")])
def test_stats_of_s3_writes_the_csvs_of_the_local_run(
    s3_run: tuple[str, dict],
    local_run: Path,
    tmp_path: Path,
    source: str,
    reader: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raw chunks read through obstore's ObjectStore (the default here) or s3fs's FsspecStore."""
    from zarr.storage import FsspecStore, ObjectStore

    url, options = s3_run
    monkeypatch.setenv(READER_VARIABLE, reader)
    store = open_store(url, options, read_only=True)
    assert isinstance(store, ObjectStore if reader == "auto" else FsspecStore)
    common = ["--source", source, "--threshold", "0.9", "--threshold", "0.99", "--no-plots", "--no-progress"]
    local = delve("stats", local_run, "-o", tmp_path / "local", "--no-cache", *common)
    assert local.exit_code == 0, local.output
    remote = delve("stats", url, "-o", tmp_path / "s3", *cli_options(options), *common)
    assert remote.exit_code == 0, remote.output
    got, expected = csv_files(tmp_path / "s3"), csv_files(tmp_path / "local")
    assert len(expected) >= 3 and got == expected  # stats.csv and the delve-format CSVs, byte for byte
    # the output and its cache are local; the record names the URL, its options without credentials
    assert (tmp_path / "s3.cache").is_dir()
    provenance = json.loads((tmp_path / "s3" / "provenance.json").read_text())
    (entry,) = provenance["inputs"].values()
    assert entry["path"] == url
    assert entry["storage_options"] == {"endpoint_url": options["endpoint_url"], "key": REDACTED, "secret": REDACTED}
    # a re-run reads the covariances from the local cache: the same bytes again
    again = delve("stats", url, "-o", tmp_path / "s3", *cli_options(options), *common)
    assert again.exit_code == 0, again.output
    assert csv_files(tmp_path / "s3") == expected


def test_inspect_compare_and_sweep_take_urls(
    s3_run: tuple[str, dict], local_run: Path, tmp_path: Path
) -> None:
    url, options = s3_run
    shown = delve("inspect", url, "--json", *cli_options(options))
    assert shown.exit_code == 0, shown.output
    reference = delve("inspect", local_run, "--json")
    got, expected = json.loads(shown.output), json.loads(reference.output)
    assert got.pop("path") == url and expected.pop("path") == str(local_run)
    del got["created"], expected["created"]  # two recordings of the same run
    assert got == expected
    compared = delve(
        "compare", local_run, url, "-o", tmp_path / "cmp", "--no-plots", "--no-progress", *cli_options(options)
    )
    assert compared.exit_code == 0, compared.output
    import pandas as pd

    frame = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(frame) > 10 and (frame["value_a"].isna() == frame["value_b"].isna()).all()
    np.testing.assert_array_equal(frame["value_a"].to_numpy(), frame["value_b"].to_numpy())
    # a sweep configuration naming a URL, its storage options in the file and on the command line
    config = tmp_path / "sweep.toml"
    config.write_text(
        f'runs = ["{url}"]\noutput = "sw"\nthresholds = [0.9, 0.99]\nplots = false\n'
        f'[storage_options]\nendpoint_url = "{options["endpoint_url"]}"\n'
    )
    swept = delve(
        "sweep", config, "--no-progress", "--storage-option", f"key={options['key']}",
        "--storage-option", f"secret={options['secret']}",
    )
    assert swept.exit_code == 0, swept.output
    assert (tmp_path / "sw" / "sweep.csv").read_bytes() == stats_csv(
        local_run, thresholds=(0.9, 0.99), stats=("lsat",)
    )
    recorded = json.loads((tmp_path / "sw" / "provenance.json").read_text())
    assert recorded["config"]["storage_options"] == {"endpoint_url": options["endpoint_url"]}
    assert options["secret"] not in json.dumps(recorded["inputs"]).replace(options["endpoint_url"], "")


def test_storage_option_errors(s3_run: tuple[str, dict], local_run: Path, tmp_path: Path) -> None:
    url, _ = s3_run
    bad = delve("stats", url, "-o", tmp_path / "o", "--storage-option", "anon")
    assert bad.exit_code == 2 and "Invalid value for '--storage-option': 'anon' is not KEY=VALUE" in bad.output
    local = delve("inspect", local_run, "--storage-option", "anon=true")
    assert local.exit_code == 2 and "--storage-option applies to runs at URLs" in local.output
    with pytest.raises(Exception, match="storage_options: .*every run here is a local path"):
        analyze_runs(local_run, storage_options={"anon": True}, **FAST)


# -- the Python API: similarity, two analyses at once, a cluster of process workers ---------------


def test_similarity_of_s3_equals_the_local_run(s3_run: tuple[str, dict], local_run: Path) -> None:
    url, options = s3_run
    got = similarity(url, ["cka", "svcca"], storage_options=options, **FAST)
    expected = similarity(local_run, ["cka", "svcca"], **FAST)
    assert len(expected) > 4 and table_csv(got) == table_csv(expected)


def test_two_analyses_at_once(s3_run: tuple[str, dict], local_run: Path) -> None:
    url, options = s3_run
    expected = stats_csv(local_run, source="raw")
    results = at_once(lambda: stats_csv(url, source="raw", storage_options=options, scheduler="threads"))
    assert results == [expected, expected]


def test_a_cluster_of_process_workers_reads_s3(s3_run: tuple[str, dict], local_run: Path) -> None:
    """Each worker process opens the store itself: the same CSV bytes as a local run on one thread."""
    distributed = pytest.importorskip("distributed")
    url, options = s3_run
    expected_stats = stats_csv(local_run, source="raw", scheduler="synchronous")
    expected_similarity = table_csv(similarity(local_run, "cka", scheduler="synchronous", **FAST))
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        got = stats_csv(url, source="raw", storage_options=options, scheduler=address)
        got_similarity = table_csv(
            similarity(url, "cka", storage_options=options, scheduler=address, **FAST)
        )
    assert got == expected_stats
    assert got_similarity == expected_similarity


# -- checksums on object storage -----------------------------------------------------------------


@pytest.fixture
def damaged(s3_run: tuple[str, dict], s3: S3Prefix, s3_server: S3Server) -> str:
    """A copy of the S3 run whose raw chunk 2 of layer ``0`` has a flipped byte."""
    url, _ = s3_run
    fs = s3_server.filesystem()
    source, copy = url[len("s3://") :], s3.key("damaged.zarr")
    for key in fs.find(source):
        fs.copy(key, f"{copy}{key[len(source):]}")
    chunk = f"{copy}/{RAW}/c/2/0/0/0"
    data = fs.cat_file(chunk)
    fs.pipe_file(chunk, data[:10] + bytes([data[10] ^ 0x55]) + data[11:])
    return s3.url("damaged.zarr")


def test_a_damaged_object_is_named_and_skipped(
    damaged: str, s3: S3Prefix, local_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(ChunkReadError, match=f"array '{RAW}', chunk 2: .*damaged"):
        analyze_runs(damaged, source="raw", storage_options=s3.storage_options, **FAST)
    out = delve(
        "stats", damaged, "-o", tmp_path / "o", "--source", "raw", "--on-error", "skip", "--no-plots",
        "--no-progress", *cli_options(s3.storage_options),
    )
    assert out.exit_code == 0, out.output
    warnings = [line for line in out.output.splitlines() if line.startswith("Warning: skipped")]
    assert len(warnings) == 1
    assert "layer '0'" in warnings[0] and f"array '{RAW}', chunk 2" in warnings[0]
    # every other layer is there, with the local run's values
    import pandas as pd

    got = pd.read_csv(tmp_path / "o" / "stats.csv", dtype={"layer": str})
    expected = pd.read_csv(io.BytesIO(stats_csv(local_run, source="raw")), dtype={"layer": str})
    assert set(got["layer"].dropna()) == {"3"} and set(expected["layer"].dropna()) == {"0", "3"}
    kept = expected[expected["layer"] != "0"].reset_index(drop=True).assign(run="damaged")
    pd.testing.assert_frame_equal(got, kept)


# -- the store of reads at s3:// and forks --------------------------------------------------------


def _forked_read(url: str, options: dict[str, Any]) -> tuple[str, bytes]:
    """In a forked child: the type of the store reads get, and the CSV bytes of an analysis."""
    store = open_store(url, options, read_only=True)
    return type(store).__name__, stats_csv(url, source="raw", storage_options=options, scheduler="synchronous")


def test_a_forked_child_does_not_use_its_parents_object_store(
    s3_run: tuple[str, dict], local_run: Path
) -> None:
    """obstore does not survive a fork: a child of a process that used it reads through s3fs."""
    import multiprocessing

    url, options = s3_run
    assert type(open_store(url, options, read_only=True)).__name__ == "ObjectStore"
    stats_csv(url, source="raw", storage_options=options)  # this process used it
    with multiprocessing.get_context("fork").Pool(1) as pool:
        kind, got = pool.apply_async(_forked_read, (url, options)).get(timeout=120)
    assert kind == "FsspecStore"
    assert got == stats_csv(local_run, source="raw")


def test_an_object_store_that_fails_gives_way_to_s3fs(
    s3_run: tuple[str, dict], local_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """obstore configured to reach nothing (a closed port): the reader falls back to s3fs, same bytes."""
    import datetime

    from capture import read_store

    url, options = s3_run
    mapped = read_store.obstore_config

    def unreachable(location: str, storage_options: Any, environ: Any = None) -> Any:
        config = mapped(location, storage_options, environ)
        if config is None:
            return None
        retry = {"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=1)}  # fail at once
        return {**config, "endpoint": "http://127.0.0.1:1", "retry_config": retry}

    monkeypatch.setattr(read_store, "obstore_config", unreachable)
    assert type(open_store(url, options, read_only=True)).__name__ == "ObjectStore"
    assert stats_csv(url, source="raw", storage_options=options, scheduler="synchronous") == stats_csv(
        local_run, source="raw"
    )
    assert type(open_store(url, options, read_only=True)).__name__ == "FsspecStore"  # not tried again
