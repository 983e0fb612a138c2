"""`python -m cairn.benchmarks [--quick] [--json] [--out DIR] [--keep] [--home DIR]`: the same
as `cairn bench`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from cairn.benchmarks.command import measure, table
from cairn.runtime.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cairn.benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small run for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON for tools")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()
    err = Console(stderr=True)
    report, files = measure(
        Settings.from_env(args.home).home,
        quick=args.quick,
        out=args.out,
        keep=args.keep,
        progress=lambda m: err.print(m, style="dim", highlight=False),
    )
    if args.json:
        sys.stdout.write(
            json.dumps({**report.to_json(), "files": [str(f) for f in files]}, indent=2) + "\n"
        )
        return
    Console().print(table(report))


if __name__ == "__main__":
    main()
