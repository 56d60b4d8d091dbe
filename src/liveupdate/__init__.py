"""liveupdate: Kexec HandOver (KHO) and the Live Update Orchestrator (LUO) in Python."""

import os

# Before anything imports numpy: we use it for page metadata and bitmaps, never for linear
# algebra, and OpenBLAS otherwise starts a thread per core at import -- ~90 ms of CPU in every
# kernel, machine, luod and VMM process (0.22 s -> 0.13 s per import on this machine).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from liveupdate.errors import AbiError, LiveUpdateError

__all__ = ["AbiError", "LiveUpdateError"]
