"""KHO scratch areas after boot: CMA-like memory that only kexec segments use.

Linux hands scratch pageblocks to the buddy allocator as MIGRATE_CMA, so only movable
allocations land there and no preserved page ever does. The emulated kernel makes no movable
allocations, so scratch memory is kept apart, as free intervals, for the next kexec image's
segments (``kho_locate_mem_hole``).
"""

from __future__ import annotations

import errno

from liveupdate.errors import LiveUpdateError


class ScratchPool:
    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []  # [start, end), ascending

    def add(self, start: int, end: int) -> None:
        if start < end:
            self.free.append((start, end))
            self._normalize()

    def _normalize(self) -> None:
        merged: list[tuple[int, int]] = []
        for s, e in sorted(self.free):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            else:
                merged.append((s, e))
        self.free = merged

    def alloc(self, size: int, align: int, top_down: bool = True) -> int:
        """A hole of ``size`` bytes inside scratch; EADDRNOTAVAIL when none fits."""
        order = reversed(range(len(self.free))) if top_down else range(len(self.free))
        for i in order:
            s, e = self.free[i]
            addr = (e - size) // align * align if top_down else -(-s // align) * align
            if s <= addr and addr + size <= e:
                rest = [(s, addr), (addr + size, e)]
                self.free[i : i + 1] = [(a, b) for a, b in rest if a < b]
                return addr
        raise LiveUpdateError(err=errno.EADDRNOTAVAIL,
                              msg=f"no {size:#x}-byte hole in KHO scratch for a kexec segment")

    def release(self, start: int, size: int) -> None:
        self.add(start, start + size)
