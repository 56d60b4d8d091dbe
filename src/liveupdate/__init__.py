"""liveupdate: Kexec HandOver (KHO) and the Live Update Orchestrator (LUO) in Python."""

from liveupdate.errors import AbiError, LiveUpdateError

__all__ = ["AbiError", "LiveUpdateError"]
