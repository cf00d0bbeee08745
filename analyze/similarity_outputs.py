"""Files a similarity analysis leaves behind: ``similarity.csv``, heatmaps and provenance.

Layout of a similarity output folder
------------------------------------
``similarity.csv``
    The table of :func:`analyze.similarity` (:data:`analyze.SIMILARITY_COLUMNS`), in
    its order, formatted as ``stats.csv`` (:func:`analyze.outputs.table_csv`): ``,``, no index,
    ``\\n`` line ends, floats in their shortest round-trip form.
``plots/`` (unless ``plots=False``)
    One heatmap per matrix (:func:`analyze.plots.matrix_png`, the colour scale from 0, or the
    smallest value when one is negative, to 1: :func:`analyze.similarity_api.similarity_range`):
    ``{run}_{conv}_{ts}_{phase}_{measure}_layers_epoch{E}.png`` (layer x layer),
    ``{run}_{conv}_{ts}_{phase}_{measure}_epochs_{layer}.png`` (epoch x epoch) and
    ``{conv}_{ts}_{phase}_{measure}_runs_{layer}_epoch{E}.png`` (run x run).
``provenance.json``
    Written last (:class:`analyze.OutputFolder`): the inputs with their content hashes, every
    option, the number of rows, the skipped layers, versions and the SHA-256 of every other file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from analyze.output_folder import OutputFolder
from analyze.outputs import PLOTS_DIR, table_csv
from analyze.similarity_api import SimilarityMatrix, SimilarityResult, similarity_matrices, similarity_range

__all__ = [
    "SIMILARITY_FORMAT",
    "SIMILARITY_NAME",
    "matrix_file_name",
    "publish_similarity",
    "similarity_files",
    "similarity_provenance",
]

SIMILARITY_NAME = "similarity.csv"
SIMILARITY_FORMAT = "delve-pipeline.similarity"


def _safe(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", str(name)) or "-"


def matrix_file_name(matrix: SimilarityMatrix) -> str:
    """The heatmap file name of a matrix (see the module docstring).

    Examples
    --------
    >>> import numpy as np
    >>> m = SimilarityMatrix("epochs", {"run": "cnn", "layer": "conv1", "phase": "eval", "conv_method": "mean",
    ...                      "timeseries_method": "last_timestep", "measure": "cka"}, [0, 1], np.eye(2))
    >>> matrix_file_name(m)
    'cnn_mean_last_timestep_eval_cka_epochs_conv1.png'
    """
    f = matrix.fixed
    methods = (
        f"{_safe(f['conv_method'])}_{_safe(f['timeseries_method'])}_{_safe(f['phase'])}_{_safe(f['measure'])}"
    )
    if matrix.pairs == "layers":
        return f"{_safe(f['run'])}_{methods}_layers_epoch{f['epoch']}.png"
    if matrix.pairs == "epochs":
        return f"{_safe(f['run'])}_{methods}_epochs_{_safe(f['layer'])}.png"
    return f"{methods}_runs_{_safe(f['layer'])}_epoch{f['epoch']}.png"


def similarity_files(result: SimilarityResult, plots: bool = True) -> Iterator[tuple[str, str, bytes]]:
    """``(kind, relative path, bytes)`` of every file but the provenance: ``"similarity"``, ``"plots"``."""
    yield "similarity", SIMILARITY_NAME, table_csv(result.table)
    if not plots:
        return
    from analyze.plots import matrix_png  # matplotlib only when plots are asked for

    axis = {"layers": "layer", "epochs": "epoch", "runs": "run"}[result.pairs]
    for matrix in similarity_matrices(result.table, result.pairs):
        png = matrix_png(
            matrix.values,
            matrix.labels,
            matrix.labels,
            matrix.fixed["measure"],
            matrix.title.replace(" | ", "\n", 1),
            xlabel=axis,
            ylabel=axis,
            vlim=similarity_range(matrix.values),
        )
        yield "plots", f"{PLOTS_DIR}/{matrix_file_name(matrix)}", png


def similarity_provenance(result: SimilarityResult) -> dict[str, Any]:
    """The fields of a similarity output's ``provenance.json`` beyond those every output folder has."""
    return {
        "inputs": result.inputs,
        "options": result.options,
        "rows": len(result.table),
        "skipped": list(result.skipped),
    }


def publish_similarity(
    result: SimilarityResult, out_dir: str | os.PathLike[str], plots: bool = True
) -> dict[str, list[Path]]:
    """Write a similarity output folder; ``out_dir`` appears, or is replaced, only once complete.

    Files go into a staging folder next to ``out_dir`` that is renamed to it at the end
    (:class:`analyze.OutputFolder`); on any failure ``out_dir`` is as it was.

    Returns
    -------
    dict
        ``"similarity"``, ``"plots"`` and ``"provenance"`` -> the final paths written.

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file or a foreign folder, or another analysis published to it meanwhile.
    """
    written: dict[str, list[Path]] = {"similarity": [], "plots": [], "provenance": []}
    with OutputFolder(out_dir, format=SIMILARITY_FORMAT) as folder:
        for kind, relative, data in similarity_files(result, plots):
            written[kind].append(folder.final_path(folder.write(relative, data)))
        written["provenance"].append(folder.publish(similarity_provenance(result)))
    return written
