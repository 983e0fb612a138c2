"""Child processes tied to the process that started them: in a process group of their own
(a terminal's Ctrl-C or hang-up reaches only the parent, which stops them in order), and sent
SIGTERM by the kernel when the parent dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG), so
no nats-server or agent outlives a killed `cairn up`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Looked up once, here: the function a forked child calls must not import or allocate much.
_PRCTL = _load_prctl()


def tethered() -> dict[str, Any]:
    """`subprocess.Popen` keyword arguments for a tied child.

    The kernel signals the child when the *thread* that started it ends: start tied
    children from a thread that lives as long as the parent (the main thread)."""
    parent = os.getpid()

    def in_child() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return {"process_group": 0, "preexec_fn": in_child}
