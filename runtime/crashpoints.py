"""Named points where fault tests can make a process die with SIGKILL.

`CAIRN_CRASH_AT=after-commit:3` (`Settings.crash_at`) kills the process the third time it passes
the `after-commit` point, once its entry point has called `arm(settings.crash_at)`. Unarmed
(always, in production), a crash point costs one comparison.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_target: tuple[str, int] | None = None


def arm(target: tuple[str, int] | None) -> None:
    """Crash at `(point, pass)`, or nowhere (None); the passes are counted from now."""
    global _target
    _target = target
    _counts.clear()


def crash_point(name: str) -> None:
    """Die here if this is the armed point's armed pass."""
    if _target is None or _target[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
