"""What a run store holds, as labelled values and tables: one description for every reader.

:func:`analyze.inspect_run` returns a dictionary; this module lays it out for people. The text of
``delve-analyze inspect`` (:func:`analyze.cli.render_inspection`) and the run descriptions of the
HTML report (:mod:`analyze.report`) are both drawn from :func:`store_summary`,
:func:`layer_table` and :func:`samples_table`, so they always say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "MAX_EPOCH_COLUMNS",
    "Table",
    "epoch_ranges",
    "human_bytes",
    "layer_table",
    "samples_table",
    "store_summary",
]

#: Up to this many epochs the samples table has a column per phase and epoch; beyond, their range.
MAX_EPOCH_COLUMNS = 6


class Table(NamedTuple):
    """A table for people: what it shows, its column names and its rows of plain values."""

    caption: str
    header: list[str]
    rows: list[list[Any]]


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Examples
    --------
    >>> human_bytes(512), human_bytes(1536), human_bytes(3 * 2**30)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def epoch_ranges(epochs: Sequence[int]) -> str:
    """Runs of consecutive epochs.

    Examples
    --------
    >>> epoch_ranges([0, 1, 2, 5]), epoch_ranges([])
    ('0-2, 5', 'none')
    """
    runs: list[list[int]] = []
    for e in sorted(int(e) for e in epochs):
        if runs and runs[-1][1] == e - 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def store_summary(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` pairs describing a store as a whole: path, format, modes, size, epochs, ...

    Examples
    --------
    >>> info = {"path": "r.zarr", "format_version": 1, "created": "2026-01-01", "modes": ["raw"],
    ...         "ranks": [0], "bytes": 2048, "epochs": [0, 1], "phases": ["train"]}
    >>> dict(store_summary(info))["epochs"], dict(store_summary(info))["size"]
    ('0-1 (2 complete)', '2.0 KiB')
    """
    epochs = info.get("epochs", [])
    pairs = [
        ("run", str(info.get("path"))),
        ("format", f"version {info.get('format_version')}, created {info.get('created')}"),
        ("modes", ", ".join(info.get("modes", [])) or "none"),
        ("ranks", str(len(info.get("ranks", [])))),
        ("size", human_bytes(int(info.get("bytes", 0)))),
        ("epochs", f"{epoch_ranges(epochs)} ({len(epochs)} complete)"),
    ]
    if info.get("incomplete_epoch") is not None:
        pairs.append(("incomplete epoch", f"{info['incomplete_epoch']} (not analysed)"))
    pairs.append(("phases", ", ".join(info.get("phases", [])) or "none"))
    return pairs


def layer_table(info: Mapping[str, Any]) -> Table:
    """The recorded layers: name, type, layout, sample shape, stored dtype, raw, gram methods."""
    return Table(
        "layers",
        ["name", "type", "layout", "sample shape", "stored dtype", "raw", "gram methods"],
        [
            [
                lay["name"],
                lay.get("type"),
                lay.get("layout"),
                "x".join(str(s) for s in lay.get("sample_shape", [])) or "-",
                lay.get("stored_dtype") or "-",
                "yes" if lay.get("raw") else "no",
                ",".join(lay.get("gram_methods", [])) or "-",
            ]
            for lay in info.get("layers", [])
        ],
    )


def samples_table(info: Mapping[str, Any], max_epoch_columns: int = MAX_EPOCH_COLUMNS) -> Table | None:
    """Samples recorded per layer, phase and epoch (``None`` when nothing was recorded).

    Up to ``max_epoch_columns`` epochs there is a column per phase and epoch (``train e0``);
    beyond, per phase the samples of one epoch (``10`` or a range ``10..12``) and the total.
    """
    samples: dict[tuple[str, str, int], int] = {
        (s["layer"], s["phase"], int(s["epoch"])): int(s["samples"]) for s in info.get("samples", [])
    }
    if not samples:
        return None
    layers = info.get("layers", [])
    epochs = sorted({e for _, _, e in samples})
    phases = [p for p in info.get("phases", []) if any(k[1] == p for k in samples)]
    caption = "samples recorded (rows of dim 0) per layer and phase"
    if len(epochs) <= max_epoch_columns:
        header = ["layer", *[f"{p} e{e}" for p in phases for e in epochs]]
        rows = [
            [lay["name"], *[samples.get((lay["name"], p, e), 0) for p in phases for e in epochs]]
            for lay in layers
        ]
        return Table(caption, header, rows)
    header = ["layer", *[f"{p} per epoch" for p in phases], *[f"{p} total" for p in phases]]
    rows = []
    for lay in layers:
        per = {p: [samples.get((lay["name"], p, e), 0) for e in epochs] for p in phases}
        rows.append(
            [
                lay["name"],
                *[f"{min(v)}" if min(v) == max(v) else f"{min(v)}..{max(v)}" for v in per.values()],
                *[sum(v) for v in per.values()],
            ]
        )
    return Table(caption, header, rows)
