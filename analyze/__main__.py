"""``python -m analyze``: the ``delve-analyze`` command line (analysis commands only)."""

from __future__ import annotations

from analyze.cli import main

if __name__ == "__main__":
    main()
