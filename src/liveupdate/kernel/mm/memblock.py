"""memblock: the boot-time memory map and allocator (mm/memblock.c), interval based.

``memory`` holds the RAM regions from the e820 map with their flags; ``reserved`` holds what
is taken. Allocations are top-down and, while *scratch-only* mode is on (a KHO boot, from
``kho_populate`` until ``memblock_free_all``), come only from regions flagged
``MEMBLOCK_KHO_SCRATCH`` -- so nothing the previous kernel preserved can be overwritten before
the preserved-memory map has been read and reserved. Reserved ranges are numpy arrays, so
reserving a million preserved blocks is a few array operations.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from liveupdate.abi.kho_memmap import merge_intervals
from liveupdate.errors import LiveUpdateError

MEMBLOCK_NONE = 0x0
MEMBLOCK_RSRV_NOINIT = 0x10
MEMBLOCK_RSRV_KERN = 0x20
MEMBLOCK_KHO_SCRATCH = 0x40
PHYS_MAX = (1 << 64) - 1


@dataclass
class Region:
    base: int
    size: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size


class Memblock:
    def __init__(self) -> None:
        self.memory: list[Region] = []
        self._rs = np.zeros(0, np.uint64)
        self._re = np.zeros(0, np.uint64)
        self._rf = np.zeros(0, np.uint8)
        self.scratch_only = False

    # -- memory ---------------------------------------------------------------------------
    def add(self, base: int, size: int, flags: int = 0) -> None:
        if size <= 0:
            return
        self.memory.append(Region(base, size, flags))
        self.memory.sort(key=lambda r: r.base)

    def _set_flag(self, base: int, size: int, flag: int, on: bool) -> None:
        out: list[Region] = []
        end = base + size
        for r in self.memory:
            lo, hi = max(r.base, base), min(r.end, end)
            if lo >= hi:
                out.append(r)
                continue
            if r.base < lo:
                out.append(Region(r.base, lo - r.base, r.flags))
            out.append(Region(lo, hi - lo, (r.flags | flag) if on else (r.flags & ~flag)))
            if hi < r.end:
                out.append(Region(hi, r.end - hi, r.flags))
        self.memory = out

    def mark_kho_scratch(self, base: int, size: int) -> None:
        self._set_flag(base, size, MEMBLOCK_KHO_SCRATCH, True)

    def clear_kho_scratch(self, base: int, size: int) -> None:
        self._set_flag(base, size, MEMBLOCK_KHO_SCRATCH, False)

    def scratch_regions(self) -> list[Region]:
        return [r for r in self.memory if r.flags & MEMBLOCK_KHO_SCRATCH]

    def is_memory(self, base: int, size: int) -> bool:
        return any(r.base <= base and base + size <= r.end for r in self.memory)

    # -- reserved -------------------------------------------------------------------------
    def reserve(self, base: int, size: int, flags: int = 0) -> None:
        if not size:  # memblock_add_range ignores an empty range
            return
        self.reserve_many(np.array([base], np.uint64), np.array([base + size], np.uint64),
                          flags)

    def reserve_many(self, starts: np.ndarray, ends: np.ndarray, flags: int = 0) -> None:
        self._rs = np.concatenate([self._rs, np.asarray(starts, np.uint64)])
        self._re = np.concatenate([self._re, np.asarray(ends, np.uint64)])
        self._rf = np.concatenate([self._rf, np.full(len(starts), flags, np.uint8)])

    def free(self, base: int, size: int) -> None:
        """memblock_phys_free: drop reservations inside [base, base+size)."""
        keep = ~((self._rs >= base) & (self._re <= base + size))
        self._rs, self._re, self._rf = self._rs[keep], self._re[keep], self._rf[keep]

    def reserved_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        merged = merge_intervals(self._rs, self._re)
        return merged[:, 0], merged[:, 1]

    def is_reserved(self, base: int, size: int) -> bool:
        return bool(np.any((self._rs < base + size) & (self._re > base)))

    def reserved_kern(self, lo: int = 0, hi: int = PHYS_MAX) -> int:
        """Bytes reserved with MEMBLOCK_RSRV_KERN inside [lo, hi) (scratch sizing)."""
        sel = (self._rf & MEMBLOCK_RSRV_KERN) != 0
        s = np.clip(self._rs[sel], lo, hi)
        e = np.clip(self._re[sel], lo, hi)
        return int((e - s).sum())

    # -- allocation -----------------------------------------------------------------------
    def free_ranges(self, regions: list[Region] | None = None) -> list[tuple[int, int]]:
        """Memory minus reserved, as [start, end) ranges, ascending."""
        rs, re_ = self.reserved_ranges()
        out: list[tuple[int, int]] = []
        for r in self.memory if regions is None else regions:
            cur = r.base
            i = int(np.searchsorted(re_, np.uint64(r.base), side="right"))
            while i < len(rs) and int(rs[i]) < r.end:
                if int(rs[i]) > cur:
                    out.append((cur, int(rs[i])))
                cur = max(cur, int(re_[i]))
                i += 1
            if cur < r.end:
                out.append((cur, r.end))
        return out

    def alloc(self, size: int, align: int, *, lo: int = 0, hi: int = PHYS_MAX,
              flags: int = MEMBLOCK_RSRV_KERN, exact_scratch: bool = False) -> int:
        """memblock_phys_alloc_range, top-down; scratch-only mode honoured. ENOMEM."""
        want_scratch = self.scratch_only or exact_scratch
        regions = [r for r in self.memory
                   if not want_scratch or r.flags & MEMBLOCK_KHO_SCRATCH]
        for start, end in reversed(self.free_ranges(regions)):
            top = min(end, hi)
            addr = (top - size) // align * align
            if addr >= max(start, lo) and top - size >= 0:
                self.reserve(addr, size, flags)
                return addr
        raise LiveUpdateError(err=errno.ENOMEM, msg=f"memblock: cannot allocate {size:#x} bytes"
                              + (" from scratch" if want_scratch else ""))
