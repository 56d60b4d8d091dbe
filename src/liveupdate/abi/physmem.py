"""Bounds-checked reads of physical memory.

A handover is a set of structures that point at each other by physical address. Decoders that
follow those pointers read through :class:`PhysMem`, which refuses any access that is not wholly
inside one RAM range, so a hostile pointer becomes an :class:`AbiError` (EFAULT), never an
``IndexError`` or a read of the wrong bytes.

Two layouts: one buffer whose offset ``i`` is ``base + i`` (a raw RAM image, the emulated
machine's RAM), or :meth:`PhysMem.from_segments` -- pieces of one buffer at their own offsets,
as the ``PT_LOAD`` segments of a QEMU ``dump-guest-memory`` core, without copying the file.
"""

from __future__ import annotations

import bisect
import copy
import errno
import struct
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import Protocol

import numpy as np

from liveupdate.errors import AbiError

U64_MAX = (1 << 64) - 1


class Buffer(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, key: slice, /) -> bytes | bytearray | memoryview: ...


class PhysMem:
    """Physical memory backed by a buffer whose offset ``i`` is physical address ``base + i``.

    ``ranges`` lists the ``(start, size)`` ranges that are RAM; by default the whole buffer.
    """

    # (phys start, size, buffer offset) sorted by phys, when built by from_segments
    _segs: list[tuple[int, int, int]] | None = None
    _seg_starts: list[int]
    _starts: list[int]
    _reach: list[int]
    _starts_u64: np.ndarray
    _reach_u64: np.ndarray
    _spend: Callable[[int, int, str], None] | None = None  # see counted()

    def __init__(
        self,
        buf: Buffer,
        *,
        base: int = 0,
        ranges: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        self._buf = buf
        self._base = base
        if ranges is None:
            ranges = [(base, len(buf))]
        self.ranges = sorted((int(s), int(n)) for s, n in ranges if n > 0)
        for start, size in self.ranges:
            if start < base or start + size > base + len(buf):
                raise AbiError(
                    msg=f"RAM range {start:#x}+{size:#x} lies outside the backing buffer",
                    err=errno.EFAULT,
                )
        self._index()

    def _index(self) -> None:
        """Sorted starts and the running maximum of ends, so that every lookup is a bisect:
        an ELF core may bring thousands of ranges, and every read checks one. Among the
        ranges starting at or below an address, the one reaching furthest is the only one
        that can hold it -- exact even if ranges overlap (callers may pass any)."""
        self._starts = [s for s, _ in self.ranges]
        self._reach = list(accumulate((s + n for s, n in self.ranges), max))
        # uint64 copies for inside(); an end of exactly 2**64 is kept as 2**64 - 1 (a
        # block's end is computed in uint64 too, so nothing representable is lost)
        self._starts_u64 = np.array(self._starts, np.uint64)
        self._reach_u64 = np.array([min(e, U64_MAX) for e in self._reach], np.uint64)

    def _reach_at(self, phys: int) -> int:
        """The furthest end of any range starting at or below ``phys`` (0 if none)."""
        i = bisect.bisect_right(self._starts, phys) - 1
        return self._reach[i] if i >= 0 else 0

    @classmethod
    def from_segments(cls, buf: Buffer,
                      segments: Iterable[tuple[int, int, int]]) -> PhysMem:
        """RAM made of ``(phys, size, offset)`` pieces of ``buf``: bytes ``offset ..
        offset + size`` of the buffer are physical ``phys .. phys + size``. Segments must lie
        inside the buffer and must not overlap in physical space (EINVAL); segments that
        touch form one RAM range, and a read may cross from one into the next."""
        segs = sorted((int(p), int(n), int(o)) for p, n, o in segments if n > 0)
        for p, n, o in segs:
            if p < 0 or o < 0 or o + n > len(buf):
                raise AbiError(msg=f"segment {p:#x}+{n:#x} at file offset {o:#x} lies "
                               f"outside the {len(buf):#x}-byte buffer", err=errno.EFAULT)
        merged: list[list[int]] = []
        for p, n, _ in segs:
            if merged and p < merged[-1][0] + merged[-1][1]:
                raise AbiError(msg=f"segment {p:#x}+{n:#x} overlaps the one before it in "
                               "physical memory")
            if merged and merged[-1][0] + merged[-1][1] == p:
                merged[-1][1] += n
            else:
                merged.append([p, n])
        mem = cls.__new__(cls)
        mem._buf, mem._base = buf, 0
        mem.ranges = [(s, n) for s, n in merged]
        mem._segs = segs
        mem._seg_starts = [p for p, _, _ in segs]
        mem._index()
        return mem

    @property
    def buffer(self) -> Buffer:
        return self._buf

    def segments(self) -> list[tuple[int, int, int]]:
        """``(phys, size, buffer offset)`` of every piece of RAM, sorted by phys."""
        if self._segs is not None:
            return list(self._segs)
        return [(s, n, s - self._base) for s, n in self.ranges]

    def inside(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """For each ``[start, end)``: does it lie wholly inside one RAM range? (bool array)"""
        starts = np.asarray(starts, np.uint64)
        ends = np.asarray(ends, np.uint64)
        if not self.ranges:
            return np.zeros(starts.shape, bool)
        i = np.searchsorted(self._starts_u64, starts, side="right").astype(np.intp) - 1
        reach = self._reach_u64[np.maximum(i, 0)]
        return (i >= 0) & (ends <= reach) & (ends >= starts)

    @property
    def end(self) -> int:
        return max((s + n for s, n in self.ranges), default=0)

    def contains(self, phys: int, size: int) -> bool:
        if phys < 0 or size < 0:
            return False
        return phys + size <= self._reach_at(phys)

    def room(self, phys: int) -> int:
        """Bytes of RAM from ``phys`` to the end of its range (0 outside RAM)."""
        return max(self._reach_at(phys) - phys, 0)

    def check(self, phys: int, size: int, what: str) -> None:
        if not self.contains(phys, size):
            raise AbiError(
                msg=f"{what} at {phys:#x}+{size:#x} is outside RAM", err=errno.EFAULT
            )

    def counted(self, spend: Callable[[int, int, str], None]) -> PhysMem:
        """This memory (same buffer, same subclass), calling ``spend(phys, size, what)``
        before each read that lies inside RAM: ``spend`` may raise to stop a decode that
        has read too much (a report's budget)."""
        view = copy.copy(self)
        view._spend = spend
        return view

    def read(self, phys: int, size: int, what: str = "read") -> bytes:
        self.check(phys, size, what)
        if self._spend is not None:
            self._spend(phys, size, what)
        if self._segs is None:
            off = phys - self._base
            return bytes(self._buf[off : off + size])
        out = []
        i = bisect.bisect_right(self._seg_starts, phys) - 1
        while size > 0:  # check() proved the pieces touch and cover the read
            p, n, o = self._segs[i]
            take = min(size, p + n - phys)
            out.append(bytes(self._buf[o + phys - p : o + phys - p + take]))
            phys, size, i = phys + take, size - take, i + 1
        return b"".join(out)

    def read_array(self, phys: int, count: int, dtype: np.dtype[np.generic] | str,
                   what: str = "array") -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.read(phys, count * dt.itemsize, what), dtype=dt)

    def chain(self, first: int, limit: int, what: str,
              page_size: int = 4096) -> Iterator[tuple[int, bytes]]:
        """Walk a chain of pages whose first u64 is the next page's phys (0 ends it): the
        kho-v1 map's chunks, KHO vmalloc chunks, kho_block chains. Each page is yielded
        after the checks every such walker needs -- page aligned, inside RAM, not visited
        before (a loop), at most ``limit`` pages."""
        seen: set[int] = set()
        phys = first
        while phys:
            if phys in seen:
                raise AbiError(msg=f"{what} chain loops back to {phys:#x}")
            if len(seen) >= limit:
                raise AbiError(msg=f"{what} chain longer than {limit} pages")
            if phys % page_size:
                raise AbiError(msg=f"{what} {phys:#x} is not page aligned")
            seen.add(phys)
            page = self.read(phys, page_size, what)
            yield phys, page
            phys = int.from_bytes(page[:8], "little")

    def read_fdt(self, phys: int, what: str, limit: int = 1 << 24) -> bytes:
        """Read a whole FDT starting at ``phys``: its header first, then totalsize bytes --
        never more than ``limit`` (a hostile header cannot make us copy more)."""
        head = self.read(phys, 8, what)
        magic, total = struct.unpack(">II", head)
        if magic != 0xD00DFEED:
            raise AbiError(msg=f"{what} at {phys:#x}: bad FDT magic {magic:#010x}")
        if total > limit:
            raise AbiError(
                msg=f"{what} at {phys:#x}: totalsize {total:#x} exceeds the {limit:#x}-byte limit")
        return self.read(phys, max(total, 40), what)
