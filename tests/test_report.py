"""The HTML report: structure and numbers, escaping, determinism, the command line, crash safety,
the similarity matrices, and a real browser (headless Chromium through chromedriver) opening it from disk.

The browser tests skip when Chromium, chromedriver or selenium is missing, unless
``DELVE_PIPELINE_REQUIRE_BROWSER=1`` (CI sets it): then they fail.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _runs import make_run
from test_cli import assert_usage_error, invoke, leftovers, tree

import analyze
from analyze import (
    SIMILARITY_COLUMNS,
    AnalysisOptions,
    AnalysisResult,
    analyze_runs,
    plots,
    publish_report,
    report_html,
    similarity,
)
from analyze.result import LayerFailure, SpectrumKey
from analyze.similarity_api import check_similarity

VERSIONS = {"python": "3.x", "delve-pipeline": "0.1.0", "numpy": "2.x"}
CREATED = '<time datetime="[^"]*">[^<]*</time>'


# --------------------------------------------------------------------------- reading a page back


class Page(HTMLParser):
    """What a report holds, as an HTML parser reads it: ids, links, headings, tables, images, tags."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[dict[str, str]] = []
        self.meta: list[dict[str, str]] = []
        self.headings: list[str] = []
        self.tables: list[dict[str, Any]] = []
        self.tags: list[str] = []
        self._open: dict[str, list[str] | None] = {"cell": None, "caption": None, "heading": None}
        self._row: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "img":
            self.images.append(a)
        elif tag == "meta":
            self.meta.append(a)
        elif tag == "table":
            self.tables.append({"caption": "", "rows": []})
        elif tag == "caption":
            self._open["caption"] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._open["cell"] = []
        elif re.fullmatch(r"h[1-6]", tag):
            self._open["heading"] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self.tables[-1]["caption"] = "".join(self._open["caption"] or [])
            self._open["caption"] = None
        elif tag in ("td", "th") and self._open["cell"] is not None and self._row is not None:
            self._row.append("".join(self._open["cell"]))
            self._open["cell"] = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1]["rows"].append(self._row)
            self._row = None
        elif re.fullmatch(r"h[1-6]", tag) and self._open["heading"] is not None:
            self.headings.append("".join(self._open["heading"]))
            self._open["heading"] = None

    def handle_data(self, data: str) -> None:
        for buffer in self._open.values():
            if buffer is not None:
                buffer.append(data)

    def table(self, caption: str) -> list[list[str]]:
        matches = [t["rows"] for t in self.tables if t["caption"] == caption]
        assert len(matches) == 1, (caption, [t["caption"] for t in self.tables])
        return matches[0]

    def image(self, alt_start: str) -> bytes:
        matches = [i for i in self.images if i["alt"].startswith(alt_start)]
        assert len(matches) == 1, (alt_start, [i["alt"][:60] for i in self.images])
        src = matches[0]["src"]
        assert src.startswith("data:image/png;base64,")
        return base64.b64decode(src.split(",", 1)[1])


def assert_well_formed(text: str) -> Page:
    """Self-contained, anchors resolve, tables have captions, images have alt text and sizes."""
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>")
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert not re.search(r"""(src|href)=["'](https?:|//)""", text)
    csp = [m["content"] for m in page.meta if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in page.ids), page.ids
    for link in page.links:
        assert link.startswith("#") and link[1:] in page.ids, link
    assert all(t["caption"] for t in page.tables)
    for image in page.images:
        assert image["alt"].strip()
        png = base64.b64decode(image["src"].split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert (image["width"], image["height"]) == (str(width), str(height))
    return page


# --------------------------------------------------------------------------- a result built by hand

LAYERS = ["z_in", "a_mid", "m_out"]  # not in alphabetical order: the run's order must be kept


def synthetic(runs: tuple[str, ...] = ("r",), layers: list[str] = LAYERS, epochs: int = 3) -> AnalysisResult:
    """lsat and idim at two thresholds, trc, a scalar and spectra of every layer; values from a seeded RNG."""
    rng = np.random.default_rng(7)
    rows: list[tuple[Any, ...]] = []
    spectra = {}
    for run, epoch in itertools.product(runs, range(epochs)):
        rows.append((run, epoch, "", "", "", "", np.nan, "accuracy", 0.5 + 0.1 * epoch))
        for phase, layer in itertools.product(("train", "eval"), layers):
            where = (run, epoch, phase, layer, "channelwise", "last_timestep")
            for t in (0.9, 0.99):
                rows.append((*where, t, "lsat", float(rng.uniform(0.05, 1.0))))
                rows.append((*where, t, "idim", float(rng.integers(1, 9))))
            rows.append((*where, np.nan, "trc", float(rng.uniform(1, 50))))
            spectra[SpectrumKey(*where)] = np.sort(rng.uniform(0.01, 5.0, size=6))[::-1]
    table = pd.DataFrame(rows, columns=list(analyze.TABLE_COLUMNS))
    return AnalysisResult(
        table,
        spectra=spectra,
        options={"stats": ["lsat", "idim", "trc"], "thresholds": [0.9, 0.99]},
        inputs={run: {"path": f"/nowhere/{run}.zarr", "content_hash": "ab" * 32} for run in runs},
        layer_order={run: list(layers) for run in runs},
        scalar_names={run: ["accuracy"] for run in runs},
    )


def values_of(result: AnalysisResult, run: str, phase: str, stat: str, t: float | None) -> np.ndarray:
    """epochs x layers of one statistic, read from the tidy table with plain numpy (the reference)."""
    table = result.table
    epochs = sorted(set(table["epoch"]))
    layers = result.layer_order[run]
    out = np.full((len(epochs), len(layers)), np.nan)
    for row in table.itertuples():
        same_t = np.isnan(row.threshold) if t is None else row.threshold == t
        if row.run == run and row.phase == phase and row.stat == stat and same_t:
            out[epochs.index(row.epoch), layers.index(row.layer)] = row.value
    return out


def test_structure_and_numbers_of_a_report_built_by_hand() -> None:
    result = synthetic(runs=("r", "s"))
    page = assert_well_formed(report_html(result, versions=VERSIONS, descriptions={}))
    # 2 runs x (profiles 2 thresholds x 2 phases + heatmaps (lsat 2 + idim 2 + trc 1) x 2 phases + spectra 2)
    assert len(page.images) == 2 * (4 + 10 + 2)
    captions = [t["caption"] for t in page.tables]
    assert captions == [
        "Runs analysed",
        "Scalars recorded by run r, per epoch",
        "Scalars recorded by run s, per epoch",
        "Values at epoch 2 of r, train phase",
        "Values at epoch 2 of r, eval phase",
        "Values at epoch 2 of s, train phase",
        "Values at epoch 2 of s, eval phase",
        "Inputs",
        "Analysis options",
        "Package versions",
    ]
    top = [h for h in page.headings if h in {"Summary", "Runs", "Saturation profiles", "Heatmaps", "Spectra"}]
    assert top == ["Summary", "Runs", "Saturation profiles", "Heatmaps", "Spectra"]
    assert "Options and versions" in page.headings and "Notes" not in page.headings

    # the numbers: every cell of the last-epoch table is the table's value, 4 significant digits
    rows = page.table("Values at epoch 2 of s, eval phase")
    assert rows[0] == ["layer", "lsat (t=0.9)", "lsat (t=0.99)", "idim (t=0.9)", "idim (t=0.99)", "trc"]
    assert [r[0] for r in rows[1:]] == LAYERS
    for i in range(len(LAYERS)):
        expected = [
            values_of(result, "s", "eval", stat, t)[-1, i]
            for stat, t in [("lsat", 0.9), ("lsat", 0.99), ("idim", 0.9), ("idim", 0.99), ("trc", None)]
        ]
        assert rows[1 + i][1:] == [format(v, ".4g") for v in expected]
    scalars = page.table("Scalars recorded by run r, per epoch")
    assert scalars == [["epoch", "accuracy"], ["0", "0.5"], ["1", "0.6"], ["2", "0.7"]]
    assert page.table("Package versions")[1:] == [[k, v] for k, v in VERSIONS.items()]

    # the figures are analyze.plots' figures of exactly these values, layers in the run's order
    lsat = values_of(result, "r", "train", "lsat", 0.99)
    assert page.image(
        "Line chart of saturation (t=0.99) against layer for r, train phase"
    ) == plots.layer_profile_png(
        lsat, [0, 1, 2], LAYERS, "saturation (t=0.99)", "saturation (t=0.99) (train)\nr", (0.0, 1.0)
    )
    trc = values_of(result, "s", "eval", "trc", None)
    assert page.image("Heatmap of covariance-trace for s, eval phase") == plots.heatmap_png(
        trc, [0, 1, 2], LAYERS, "covariance-trace", "covariance-trace (eval)\ns"
    )
    spectra = [
        result.spectra[SpectrumKey("r", 2, "train", lay, "channelwise", "last_timestep")] for lay in LAYERS
    ]
    assert page.image(
        "Line chart, logarithmic, of the eigenvalues of each layer against their rank for r, train"
    ) == (plots.spectrum_png(spectra, LAYERS, "eigenvalues (train), epoch 2\nr"))
    alt = next(
        i["alt"]
        for i in page.images
        if i["alt"].startswith("Line chart of saturation (t=0.9) against layer for s, eval")
    )
    last = values_of(result, "s", "eval", "lsat", 0.9)[-1]
    assert alt.endswith(", ".join(f"{lay} {v:.3g}" for lay, v in zip(LAYERS, last, strict=True)) + ".")


def test_runs_are_described_as_inspect_describes_them(runs: list[Path], result: AnalysisResult) -> None:
    page = assert_well_formed(report_html(result, versions=VERSIONS))
    info = analyze.inspect_run(runs[1])
    store = dict(tuple(r) for r in page.table("Store of run b")[1:])
    assert store["run"] == info["path"] and store["modes"] == "raw" and store["epochs"] == "0-1 (2 complete)"
    assert store["phases"] == "train, eval"
    layers = page.table("Recorded layers of run b")
    assert layers[0] == ["name", "type", "layout", "sample shape", "stored dtype", "raw", "gram methods"]
    assert [r[:2] + r[3:4] for r in layers[1:]] == [
        ["conv", "Conv2d", "4x8x8"],
        ["fc", "Linear", "6"],
        ["out", "Linear", "3"],
        ["extra", "Linear", "3"],
    ]
    samples = page.table("Samples recorded (rows of dim 0) per layer and phase of run b")
    assert samples[0] == ["layer", "train e0", "train e1", "eval e0", "eval e1"]
    assert samples[1] == ["conv", "48", "48", "20", "20"]  # 3 batches of 16, 1 of 20 per epoch
    assert page.table("Scalars recorded by run a, per epoch")[1:] == [["0", "0.5"], ["1", "0.625"]]
    # the real analysis's values and figures
    rows = page.table("Values at epoch 1 of a, eval phase")
    t = result.table
    lsat = t[(t.run == "a") & (t.epoch == 1) & (t.phase == "eval") & (t.stat == "lsat")].set_index("layer")[
        "value"
    ]
    assert [r[1] for r in rows[1:]] == [format(lsat[layer], ".4g") for layer in ("conv", "fc", "out")]
    assert sum(i["alt"].startswith("Heatmap of") for i in page.images) == 2 * 2 * 2  # runs x stats x phases
    assert page.table("Inputs")[1][2] == result.inputs["a"]["content_hash"]
    options = dict(tuple(r) for r in page.table("Analysis options")[1:])
    assert options["stats"] == "lsat, idim" and options["thresholds"] == "0.99" and options["epochs"] == "–"


def test_notes_list_skipped_layers_and_nonfinite_samples() -> None:
    result = synthetic()
    result.failures.append(LayerFailure("r", "m_out", 1, "cannot reduce <this>"))
    # a run whose every layer was skipped: its scalars only
    only_scalars = pd.DataFrame(
        [("q", 0, "", "", "", "", np.nan, "accuracy", 0.25)], columns=result.table.columns
    )
    result.table = pd.concat([result.table, only_scalars], ignore_index=True)
    result.inputs["q"] = {"path": "/nowhere/q.zarr", "content_hash": "cd" * 32}
    result.nonfinite[SpectrumKey("r", 2, "eval", "a_mid", "channelwise", "last_timestep")] = 3
    text = report_html(result, versions=VERSIONS, descriptions={})
    page = assert_well_formed(text)
    assert page.table("Layers skipped (on_error=skip)")[1] == ["r", "m_out", "1", "cannot reduce <this>"]
    assert page.table("Samples with NaN or Inf values (left out of the statistics)")[1] == [
        "r",
        "2",
        "eval",
        "a_mid",
        "channelwise",
        "last_timestep",
        "3",
    ]
    assert "Notes" in page.headings
    assert page.table("Scalars recorded by run q, per epoch")[1:] == [["0", "0.25"]]
    assert page.table("Runs analysed")[2][:5] == ["q", "/nowhere/q.zarr", "none", "0", ""]
    assert len(page.images) == 16  # run r's figures only
    assert "No statistic of this run was computed." in text


# --------------------------------------------------------------------------- hostile names

HOSTILE_RUN = '<script>alert("run")</script>'
HOSTILE_LAYERS = ["a&b<i>\"q'", "$\\frac$ cost$", "</td></tr></table><h1>x"]


def test_names_are_escaped_everywhere() -> None:
    result = synthetic(runs=(HOSTILE_RUN,), layers=HOSTILE_LAYERS)
    sim = similarity_frame(HOSTILE_RUN, HOSTILE_LAYERS, range(2))
    text = report_html(result, versions=VERSIONS, similarity=sim, descriptions={})
    page = assert_well_formed(text)
    for raw in (HOSTILE_RUN, HOSTILE_LAYERS[0], HOSTILE_LAYERS[2], "<i>", "<h1>x", '"q'):
        assert raw not in text  # only ever escaped
    assert page.headings.count(f"Run {HOSTILE_RUN}") == 4  # runs, profiles, heatmaps, spectra
    rows = page.table(f"Values at epoch 2 of {HOSTILE_RUN}, train phase")
    assert [r[0] for r in rows[1:]] == HOSTILE_LAYERS  # the names come back exactly, as text
    assert page.table("Inputs")[1][0] == HOSTILE_RUN
    assert any(HOSTILE_LAYERS[0] in i["alt"] for i in page.images)
    assert len(page.images) == 16 + 2  # the figures were drawn ('$' does not start mathtext)


# --------------------------------------------------------------------------- determinism


def test_same_inputs_give_the_same_bytes(result: AnalysisResult) -> None:
    sim = similarity_frame("a", ["conv", "fc", "out"], range(2))
    first = report_html(result, similarity=sim, created="2026-01-02T03:04:05+00:00")
    second = report_html(result, similarity=sim, created="2026-01-02T03:04:05+00:00")
    assert first == second
    assert '<time datetime="2026-01-02T03:04:05+00:00">' in first
    assert "<time" not in report_html(result, similarity=sim)


def test_command_gives_the_same_bytes_in_other_processes(runs: list[Path], tmp_path: Path) -> None:
    pages = []
    for seed in ("1", "2"):
        out = tmp_path / f"rep{seed}"
        proc = subprocess.run(
            [sys.executable, "-m", "analyze", "report", *map(str, runs), "-o", str(out), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONHASHSEED": seed, "MPLBACKEND": "Agg"},
        )
        assert proc.returncode == 0, proc.stderr
        pages.append((out / "report.html").read_text())
    assert re.search(CREATED, pages[0])
    assert re.sub(CREATED, "", pages[0]) == re.sub(CREATED, "", pages[1])


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("runs")
    return [make_run(folder / "a.zarr", 0), make_run(folder / "b.zarr", 1, extra=True)]


@pytest.fixture(scope="module")
def result(runs: list[Path]) -> AnalysisResult:
    return analyze_runs(runs, progress=False)


def test_report_command_writes_one_page_and_provenance(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    res = invoke("report", *runs, "-o", out, "--stats", "lsat,pr", "--phase", "eval", "--epochs", "last")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stdout.startswith(f"wrote {out}: report.html (") and res.stdout.endswith("provenance.json\n")
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "report.html"]
    assert (tmp_path / "rep.cache").is_dir()  # the one cache rule
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["format"] == "delve-pipeline.report" and prov["similarity"] is None
    assert prov["options"] == AnalysisOptions(stats=("lsat", "pr"), phases="eval", epochs="last").to_dict()
    import hashlib

    data = (out / "report.html").read_bytes()
    assert prov["files"] == {"report.html": hashlib.sha256(data).hexdigest()}
    page = assert_well_formed(data.decode("utf-8"))
    assert page.table("Values at epoch 1 of b, eval phase")[0] == ["layer", "lsat (t=0.99)", "pr"]
    assert not any("train" in t["caption"] for t in page.tables)
    created = re.search(r'<time datetime="([^"]*)">', data.decode()).group(1)
    assert created[:10] == prov["created"][:10]
    assert leftovers(tmp_path) == []


def test_stats_report_is_one_more_file_of_the_stats_folder(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "res"
    res = invoke("stats", runs[0], "-o", out, "--no-plots", "--report")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stdout.rstrip().endswith("report.html, provenance.json")
    assert sorted(p.name for p in out.iterdir()) == [
        "a_channelwise_last_timestep_t0.99.csv",
        "provenance.json",
        "report.html",
        "stats.csv",
    ]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["format"] == "delve-pipeline.analysis" and "report.html" in prov["files"]
    page = assert_well_formed((out / "report.html").read_text())
    assert len(page.images) == 8  # the report draws its figures even with --no-plots
    without = invoke("stats", runs[0], "-o", tmp_path / "plain", "--no-plots")
    assert without.exit_code == 0 and not (tmp_path / "plain" / "report.html").exists()
    assert (tmp_path / "plain" / "stats.csv").read_bytes() == (out / "stats.csv").read_bytes()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--threshold", "1.5"], ["'--threshold'"]),
        (["--stats", "lsat,bogus"], ["'--stats'", "bogus"]),
        (["--layers", "nomatch*"], ["layers", "'nomatch*'"]),
        (["--similarity", "cca"], ["'--similarity'", "'cca'"]),
        (["--similarity-pairs", "layers"], ["--similarity-pairs needs --similarity"]),
        (["--similarity", "cka", "--similarity-pairs", "all"], ["'--similarity-pairs'", "'all'"]),
        (["--cache-dir", "{out}/c"], ["'--cache-dir'", "inside the output folder"]),
    ],
)
def test_report_command_bad_input(
    runs: list[Path], tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "rep"
    res = invoke("report", runs[0], "-o", out, *[a.format(out=out) for a in args])
    assert_usage_error(res, *fragments)
    assert not out.exists() and leftovers(tmp_path) == []


def test_report_command_refuses_missing_stores_and_foreign_folders(runs: list[Path], tmp_path: Path) -> None:
    assert_usage_error(
        invoke("report", tmp_path / "gone.zarr", "-o", tmp_path / "rep"), "gone.zarr", "no run store"
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_usage_error(invoke("report", runs[0], "-o", mine), "mine", "not an analysis output")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert_usage_error(invoke("report", "-o", tmp_path / "x"), "RUN")


def color_range(values: Any) -> tuple[float, float]:
    """The colour scale of similarity figures: from 0, or the smallest value when one is negative, to 1."""
    return (min(0.0, float(np.nanmin(values))), 1.0)


@pytest.mark.parametrize(("args", "conv"), [((), "mean"), (("--conv-method", "max"), "max")])
def test_report_shows_the_similarity_matrices(
    runs: list[Path], tmp_path: Path, args: tuple[str, ...], conv: str
) -> None:
    """With --similarity, the matrices of analyze.similarity (conv maps pooled by mean unless asked)."""
    out = tmp_path / "rep"
    res = invoke("report", runs[0], "-o", out, "--similarity", "cka", *args)
    assert res.exit_code == 0, (res.stderr, res.exception)
    frame = similarity(runs[0], "cka", conv_methods=(conv,), progress=False)
    assert list(frame.columns) == list(SIMILARITY_COLUMNS) and set(frame["conv_method"]) == {conv}
    itself = frame[(frame.layer_a == frame.layer_b) & (frame.epoch_a == frame.epoch_b)]
    np.testing.assert_allclose(itself["value"], 1.0, rtol=1e-10)  # CKA of a layer with itself
    page = assert_well_formed((out / "report.html").read_text())
    assert "Similarity: cka" in page.headings and "a, eval" in page.headings
    alts = [i["alt"] for i in page.images if i["alt"].startswith("Matrix of cka")]
    assert len(alts) == 2 * 2  # epochs x phases
    layers = ["conv", "fc", "out"]
    for phase, epoch in itertools.product(("train", "eval"), (0, 1)):
        rows = frame[(frame.phase == phase) & (frame.epoch_a == epoch)]
        expected = matrix(rows, "layer_a", "layer_b", layers, layers)  # the table's values, run's order
        what = f"a, {phase} phase, epoch {epoch}"
        assert page.image(f"Matrix of cka for {what},") == plots.matrix_png(
            expected,
            layers,
            layers,
            "cka",
            f"cka: {what}",
            xlabel="layers of a",
            ylabel="layers of a",
            vlim=color_range(frame["value"]),
        )
        alt = next(a for a in alts if a.startswith(f"Matrix of cka for {what},"))
        assert alt.endswith(f"3 x 3 cells, values from {expected.min():.3g} to {expected.max():.3g}.")
    assert json.loads((out / "provenance.json").read_text())["similarity"] == {
        "measures": ["cka"],
        "rows": 36,
    }


def test_report_shows_every_kind_of_similarity_pairs(runs: list[Path], tmp_path: Path) -> None:
    """layer x layer per epoch, epoch x epoch per layer and run x run per layer and epoch, on one page."""
    out = tmp_path / "rep"
    kinds = ["--similarity-pairs", "layers", "--similarity-pairs", "epochs", "--similarity-pairs", "runs"]
    res = invoke("report", *runs, "-o", out, "--similarity", "cka", "--similarity", "svcca", *kinds)
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert res.stderr.count("Warning: ") == 2 and "train phase" in res.stderr  # epochs and runs on train
    page = assert_well_formed((out / "report.html").read_text())
    for measure in ("cka", "svcca"):
        alts = [i["alt"] for i in page.images if i["alt"].startswith(f"Matrix of {measure} ")]
        # a: conv, fc, out; b: conv, fc, out, extra; 2 epochs, 2 phases
        assert sum("layer against layer" in a for a in alts) == 2 * 2 * 2
        assert sum("epoch against epoch" in a for a in alts) == (3 + 4) * 2
        assert sum("run against run" in a for a in alts) == 3 * 2 * 2  # the layers both runs have
        assert "a vs b, eval, run x run" in page.headings and "b, train, epoch x epoch" in page.headings
    with pytest.warns(UserWarning, match="train phase"):
        tables = {p: similarity(runs, "svcca", pairs=p, progress=False) for p in ("layers", "epochs", "runs")}
    of_runs = tables["runs"]
    rows = of_runs[(of_runs.layer_a == "fc") & (of_runs.epoch_a == 1) & (of_runs.phase == "eval")]
    expected = matrix(rows, "run_a", "run_b", ["a", "b"], ["a", "b"])
    np.testing.assert_allclose(np.diag(expected), 1.0, rtol=1e-10)  # a run's layer with itself
    what = "layer fc of a vs b, eval phase, epoch 1"
    svcca = pd.concat(tables.values())["value"]
    assert page.image(f"Matrix of svcca for {what},") == plots.matrix_png(
        expected,
        ["a", "b"],
        ["a", "b"],
        "svcca",
        f"svcca: {what}",
        xlabel="runs",
        ylabel="runs",
        vlim=color_range(svcca),
    )
    prov = json.loads((out / "provenance.json").read_text())["similarity"]
    assert prov["measures"] == ["cka", "svcca"] and prov["rows"] == 2 * len(svcca)


# --------------------------------------------------------------------------- crash safety


def broken(*args: Any, **kwargs: Any) -> bytes:
    raise RuntimeError("drawing failed")


def test_a_failure_while_rendering_leaves_the_earlier_report(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "rep"
    assert invoke("report", runs[0], "-o", out, "--stats", "lsat").exit_code == 0
    before = tree(out)
    monkeypatch.setattr(plots, "spectrum_png", broken)
    res = invoke("report", runs[0], "-o", out, "--stats", "lsat,trc")
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert tree(out) == before
    assert leftovers(tmp_path) == []


def test_a_failing_report_leaves_the_earlier_stats_folder(
    runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "res"
    assert invoke("stats", runs[0], "-o", out, "--no-plots").exit_code == 0
    before = tree(out)
    monkeypatch.setattr(plots, "layer_profile_png", broken)  # drawn by the report only (--no-plots)
    res = invoke("stats", runs[0], "-o", out, "--no-plots", "--report", "--threshold", "0.5")
    assert isinstance(res.exception, RuntimeError)
    assert tree(out) == before and leftovers(tmp_path) == []


def test_publish_report_from_python(result: AnalysisResult, tmp_path: Path) -> None:
    path = publish_report(result, tmp_path / "out")
    assert path == (tmp_path / "out" / "report.html").absolute()
    assert_well_formed(path.read_text())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an analysis output"):
        publish_report(result, tmp_path / "foreign")


# --------------------------------------------------------------------------- similarity matrices


def similarity_frame(run: str, layers: list[str], epochs: Any, measure: str = "cka") -> pd.DataFrame:
    """Every pair of layers of every epoch (``pairs="layers"``), train phase."""
    rows = []
    for e, (i, a), (j, b) in itertools.product(epochs, enumerate(layers), enumerate(layers)):
        value = 1.0 if i == j else round(1.0 / (1 + abs(i - j) + 0.1 * e + 0.05 * i), 6)
        rows.append((run, e, a, run, e, b, "train", "channelwise", "last_timestep", measure, value))
    return pd.DataFrame(rows, columns=list(SIMILARITY_COLUMNS))


def matrix(
    frame: pd.DataFrame, rows: str, cols: str, row_labels: list[Any], col_labels: list[Any]
) -> np.ndarray:
    out = np.full((len(row_labels), len(col_labels)), np.nan)
    for r in frame.itertuples():
        out[row_labels.index(getattr(r, rows)), col_labels.index(getattr(r, cols))] = r.value
    return out


def test_layer_matrices_per_epoch_spread_over_many_epochs() -> None:
    frame = similarity_frame("r", LAYERS, range(9))
    text = report_html(synthetic(), similarity=frame, versions=VERSIONS, descriptions={})
    page = assert_well_formed(text)
    alts = [i["alt"] for i in page.images if i["alt"].startswith("Matrix of cka")]
    assert [re.search(r"epoch (\d+)", a).group(1) for a in alts] == ["0", "2", "3", "5", "6", "8"]
    assert "Showing 6 of 9 epochs (0, 2, 3, 5, 6, 8); the similarity table holds them all." in text
    last = frame[frame.epoch_a == 8]
    expected = matrix(last, "layer_a", "layer_b", LAYERS, LAYERS)  # rows in the run's layer order
    assert page.image("Matrix of cka for r, train phase, epoch 8,") == plots.matrix_png(
        expected,
        LAYERS,
        LAYERS,
        "cka",
        "cka: r, train phase, epoch 8",
        xlabel="layers of r",
        ylabel="layers of r",
        vlim=(0.0, 1.0),
    )
    assert alts[-1].endswith(f"3 x 3 cells, values from {expected.min():.3g} to {expected.max():.3g}.")
    assert "Similarity: cka" in page.headings and "r, train" in page.headings
    assert "linear CKA (Kornblith et al. 2019)." in text


def test_epoch_matrices_per_layer_and_negative_values() -> None:
    rows = []
    for (i, layer), a, b in itertools.product(enumerate(LAYERS), range(4), range(4)):
        value = 1.0 if a == b else -0.05 * i + 0.2 * (3 - abs(a - b))
        rows.append(
            ("r", a, layer, "r", b, layer, "train", "channelwise", "last_timestep", "cka_debiased", value)
        )
    frame = pd.DataFrame(rows, columns=list(SIMILARITY_COLUMNS))
    page = assert_well_formed(report_html(synthetic(), similarity=frame, versions=VERSIONS, descriptions={}))
    alts = [i["alt"] for i in page.images if i["alt"].startswith("Matrix of cka_debiased")]
    assert [a.split(" of r")[0].rsplit(" ", 1)[1] for a in alts] == LAYERS
    of_layer = frame[frame.layer_a == "m_out"]
    expected = matrix(of_layer, "epoch_a", "epoch_b", [0, 1, 2, 3], [0, 1, 2, 3])
    assert expected.min() < 0
    assert page.image("Matrix of cka_debiased for layer m_out of r, train phase") == plots.matrix_png(
        expected,
        ["0", "1", "2", "3"],
        ["0", "1", "2", "3"],
        "cka_debiased",
        "cka_debiased: layer m_out of r, train phase",
        xlabel="epochs of r",
        ylabel="epochs of r",
        vlim=(frame["value"].min(), 1.0),  # one scale for every matrix of the measure
    )


def test_run_matrices_per_layer_and_epoch() -> None:
    rows = []
    for (i, layer), e, (a, run_a), (b, run_b) in itertools.product(
        enumerate(LAYERS), range(8), enumerate("rst"), enumerate("rst")
    ):
        value = 1.0 if a == b else round(0.9 - 0.1 * i - 0.05 * abs(a - b) + 0.01 * e, 6)
        rows.append((run_a, e, layer, run_b, e, layer, "eval", "mean", "last_timestep", "cka", value))
    frame = pd.DataFrame(rows, columns=list(SIMILARITY_COLUMNS))
    text = report_html(synthetic(runs=("r", "s", "t")), similarity=frame, versions=VERSIONS, descriptions={})
    page = assert_well_formed(text)
    assert "r vs s vs t, eval" in page.headings
    alts = [i["alt"] for i in page.images if i["alt"].startswith("Matrix of cka")]
    shown = ["0", "1", "3", "4", "6", "7"]  # 6 of 8 epochs, spread, per layer in the run's order
    assert [re.search(r"layer (\S+) of .* epoch (\d+)", a).groups() for a in alts] == [
        (layer, e) for layer in LAYERS for e in shown
    ]
    assert "Showing 6 of 8 epochs (0, 1, 3, 4, 6, 7); the similarity table holds them all." in text
    of = frame[(frame.layer_a == "a_mid") & (frame.epoch_a == 4)]
    expected = matrix(of, "run_a", "run_b", ["r", "s", "t"], ["r", "s", "t"])
    what = "layer a_mid of r vs s vs t, eval phase, epoch 4"
    assert page.image(f"Matrix of cka for {what},") == plots.matrix_png(
        expected,
        ["r", "s", "t"],
        ["r", "s", "t"],
        "cka",
        f"cka: {what}",
        xlabel="runs",
        ylabel="runs",
        vlim=(0.0, 1.0),
    )
    assert page.table("Similarity")[1:] == [["measures", "cka"], ["values", str(len(frame))]]


def test_similarity_tables_are_checked() -> None:
    with pytest.raises(ValueError, match="lacks the column.*layer_b"):
        report_html(synthetic(), similarity=pd.DataFrame({"run_a": ["r"]}), descriptions={})
    with pytest.raises(ValueError, match="expected a pandas DataFrame"):
        check_similarity([("r", 0)])
    frame = similarity_frame("r", LAYERS, [0])
    assert list(check_similarity(frame[list(reversed(frame.columns))]).columns) == list(SIMILARITY_COLUMNS)
    empty = report_html(synthetic(), similarity=frame.iloc[:0], versions=VERSIONS, descriptions={})
    assert "The similarity table is empty." in empty
    across = similarity_frame("r", LAYERS, [0]).assign(run_b="s")  # other layers of another run
    with pytest.raises(
        ValueError, match="row 1 compares run 'r' epoch 0 layer 'z_in' with run 's' epoch 0 layer 'a_mid'"
    ):
        report_html(synthetic(), similarity=across, descriptions={})


# --------------------------------------------------------------------------- a real browser

WINDOW = (1366, 768)  # a laptop screen


def _browser_tools() -> tuple[str, str]:
    """Chromium and chromedriver, or skip (fail with DELVE_PIPELINE_REQUIRE_BROWSER=1)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        reason = f"the browser test needs {', '.join(missing)}"
        if os.environ.get("DELVE_PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, and DELVE_PIPELINE_REQUIRE_BROWSER=1 requires it")
        pytest.skip(reason)
    assert chromium is not None and driver is not None
    return chromium, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver = _browser_tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path is given: selenium never looks for (or downloads) one
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


_STATE = """
const images = Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, shown: i.getBoundingClientRect().width}));
return {images: images,
        captions: Array.from(document.querySelectorAll('table')).map(t => t.caption ? t.caption.textContent : null),
        cells: Array.from(document.querySelectorAll('tbody th')).map(c => c.textContent),
        scrollWidth: document.documentElement.scrollWidth, clientWidth: document.documentElement.clientWidth,
        resources: performance.getEntriesByType('resource').map(r => r.name),
        title: document.title, protocol: location.protocol};
"""


def open_in_browser(
    browser: Any, path: Path, screenshot: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Open a page from disk; its state (images, tables, widths) and the console's errors; a screenshot."""
    browser.get_log("browser")  # forget earlier pages' messages
    browser.get(path.absolute().as_uri())
    state = browser.execute_script(_STATE)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    browser.save_screenshot(str(screenshot))
    return state, errors


def test_the_report_opens_in_a_browser(browser: Any, runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert invoke("report", *runs, "-o", out, "--stats", "lsat,idim,erank").exit_code == 0
    text = (out / "report.html").read_text()
    expected = Page(text)
    state, errors = open_in_browser(browser, out / "report.html", tmp_path / "report.png")
    assert state["protocol"] == "file:"
    assert errors == []
    assert len(state["images"]) == len(expected.images) == 2 * (2 + 6 + 2)
    for image in state["images"]:
        assert image["complete"] and image["width"] > 0, image["alt"]
        assert 0 < image["shown"] <= WINDOW[0]
    assert state["captions"] == [t["caption"] for t in expected.tables]
    assert state["captions"][:3] == ["Runs analysed", "Store of run a", "Recorded layers of run a"]
    assert (
        "Values at epoch 1 of b, eval phase" in state["captions"] and "Package versions" in state["captions"]
    )
    assert state["scrollWidth"] <= state["clientWidth"]  # nothing wider than a laptop screen
    assert state["resources"] == []  # nothing loaded: images are data URIs, the style sheet inline
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_hostile_names_are_text_in_the_browser(browser: Any, tmp_path: Path) -> None:
    page = tmp_path / "hostile.html"
    sim = similarity_frame(HOSTILE_RUN, HOSTILE_LAYERS, range(2))
    page.write_text(
        report_html(synthetic(runs=(HOSTILE_RUN,), layers=HOSTILE_LAYERS), similarity=sim, descriptions={})
    )
    state, errors = open_in_browser(browser, page, tmp_path / "hostile.png")
    assert errors == []
    assert all(i["complete"] and i["width"] > 0 for i in state["images"]) and len(state["images"]) == 18
    assert state["title"] == "Layer saturation report"
    assert set(HOSTILE_LAYERS) <= set(state["cells"]) and HOSTILE_RUN in state["cells"]


def test_the_browser_check_sees_broken_images_and_console_errors(
    browser: Any, result: AnalysisResult, tmp_path: Path
) -> None:
    """The checks above can fail: a broken image, a script and a remote image are all caught."""
    text = report_html(result, descriptions={})
    text = re.sub(
        r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,iVBORw0KGgo="', text, count=1
    )
    text = text.replace(
        "</main>",
        '<script>console.error("x")</script><img src="https://example.invalid/a.png" alt="r"></main>',
    )
    page = tmp_path / "tampered.html"
    page.write_text(text)
    state, errors = open_in_browser(browser, page, tmp_path / "tampered.png")
    assert sum(not (i["complete"] and i["width"] > 0) for i in state["images"]) == 2
    assert len(errors) >= 2  # the script and the remote image are refused by the page's policy
    assert any("Content Security Policy" in e["message"] for e in errors)
    assert state["resources"] == ["https://example.invalid/a.png"]  # a remote resource is seen (and blocked)


def test_a_missing_browser_skips_or_fails_as_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without chromium and chromedriver on PATH the browser tests skip, or fail where CI requires it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DELVE_PIPELINE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs chromium, chromedriver"):
        _browser_tools()
    monkeypatch.setenv("DELVE_PIPELINE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="DELVE_PIPELINE_REQUIRE_BROWSER=1 requires it"):
        _browser_tools()


@pytest.mark.parametrize(
    "module",
    [
        "analyze.report",
        "analyze.report_html",
        "analyze.report_similarity",
        "analyze.inspection",
        "analyze.plots",
    ],
)
def test_doctests(module: str) -> None:
    import doctest
    import importlib

    failed, attempted = doctest.testmod(importlib.import_module(module))
    assert attempted > 0 and failed == 0
