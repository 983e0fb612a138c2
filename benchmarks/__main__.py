"""`python -m benchmarks [--quick] [--json] [--out DIR] [--keep]`, from the repository's top
folder: the same as `cairn bench`, whose code is in the installed package
(`cairn.coordinator.bench`), so a plain `cairn bench` needs nothing from this folder."""

from __future__ import annotations

import sys

from cairn.coordinator.cli import app

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="python -m benchmarks")
