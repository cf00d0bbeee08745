"""Every code example in the docs and the README runs, so the docs cannot drift from the code.

Per Markdown file, in order and in one working folder: ```python blocks are executed in one
shared namespace; ```console blocks run each ``$ command`` line in a shell and must exit 0.
The README's two set-up commands are exercised by CI itself (``.ci/run``), not here.
Docstring ``Examples`` run as pytest doctests (``--doctest-modules`` over the three packages,
configured in pyproject.toml); the last test here keeps that configuration in place.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```(python|console)\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(path.read_text())]


def test_docs_have_examples() -> None:
    with_examples = [p.name for p in DOC_FILES if _blocks(p)]
    assert {"capturing.md", "analysing.md", "quickstart.md"} <= set(with_examples), with_examples


@pytest.mark.parametrize("doc", [p for p in DOC_FILES if _blocks(p)], ids=lambda p: p.name)
def test_doc_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": f"doc_{doc.stem}"}
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
    for i, (kind, code) in enumerate(_blocks(doc)):
        if kind == "python":
            exec(compile(code, f"{doc.name}[block {i}]", "exec"), namespace)  # noqa: S102 - the docs' own code
            continue
        for line in code.splitlines():
            if not line.startswith("$ "):
                continue
            command = line[2:]
            proc = subprocess.run(
                command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 0, f"{doc.name}: `{command}` failed:\n{proc.stdout}\n{proc.stderr}"
            check_console_output(shlex.split(command), proc.stdout, tmp_path)


def check_console_output(args: list[str], stdout: str, cwd: Path) -> None:
    """What a documented command printed: ``inspect`` describes the store; the others say
    ``wrote FOLDER: ...`` and FOLDER (``-o``'s, when given) holds the ``provenance.json`` that is
    written last."""
    command = " ".join(args)
    assert args[0] == "delve-analyze", f"`{command}`: the docs' console examples run delve-analyze"
    if args[1] == "inspect":
        assert stdout.splitlines()[0].split() == ["run:", args[2]], f"`{command}` printed:\n{stdout}"
        return
    match = re.match(r"wrote (.+?): ", stdout)
    assert match, f"`{command}` printed:\n{stdout}"
    folder = cwd / match.group(1)
    if "-o" in args:
        assert folder.resolve() == (cwd / args[args.index("-o") + 1]).resolve(), command
    assert (folder / "provenance.json").is_file(), f"`{command}`: {folder} has no provenance.json"


def test_cli_reference_lists_every_option() -> None:
    import click

    from pipelines.cli import cli

    text = (ROOT / "docs" / "cli.md").read_text()
    ctx = click.Context(cli, info_name="delve-analyze")
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert f"## `delve-analyze {name}`" in text, f"docs/cli.md lacks the {name!r} command"
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt in text, f"docs/cli.md lacks {name} {opt}"


def test_docstring_examples_are_collected_by_a_plain_pytest_run() -> None:
    """``python -m pytest -q`` (CI's command) runs the docstring examples of all three packages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in config["addopts"].split()
    assert {"tests", "capture", "analyze", "pipelines"} <= set(config["testpaths"])
    for package in ("capture", "analyze", "pipelines"):
        assert any(">>> " in p.read_text() for p in (ROOT / package).rglob("*.py")), package
