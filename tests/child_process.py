"""A stand-in child for supervisor tests: `python -m child_process` with `tests/` on PYTHONPATH.

With `CHILD_EXIT=N` it exits at once with status N; otherwise it says it is up and waits
until a signal ends it.
"""

from __future__ import annotations

import os
import signal
import sys

code = os.environ.get("CHILD_EXIT")
if code is not None:
    print(f"exiting with {code}", flush=True)
    sys.exit(int(code))
print(f"child {os.getpid()} up", flush=True)
signal.pause()
