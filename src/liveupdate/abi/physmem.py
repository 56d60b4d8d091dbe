"""Bounds-checked reads of physical memory.

A handover is a set of structures that point at each other by physical address. Decoders that
follow those pointers read through :class:`PhysMem`, which refuses any access that is not wholly
inside one RAM range, so a hostile pointer becomes an :class:`AbiError` (EFAULT), never an
``IndexError`` or a read of the wrong bytes.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from liveupdate.errors import AbiError


class Buffer(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, key: slice, /) -> bytes | bytearray | memoryview: ...


class PhysMem:
    """Physical memory backed by a buffer whose offset ``i`` is physical address ``base + i``.

    ``ranges`` lists the ``(start, size)`` ranges that are RAM; by default the whole buffer.
    """

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

    @property
    def end(self) -> int:
        return max((s + n for s, n in self.ranges), default=0)

    def contains(self, phys: int, size: int) -> bool:
        if phys < 0 or size < 0:
            return False
        return any(s <= phys and phys + size <= s + n for s, n in self.ranges)

    def room(self, phys: int) -> int:
        """Bytes of RAM from ``phys`` to the end of its range (0 outside RAM)."""
        for s, n in self.ranges:
            if s <= phys < s + n:
                return s + n - phys
        return 0

    def check(self, phys: int, size: int, what: str) -> None:
        if not self.contains(phys, size):
            raise AbiError(
                msg=f"{what} at {phys:#x}+{size:#x} is outside RAM", err=errno.EFAULT
            )

    def read(self, phys: int, size: int, what: str = "read") -> bytes:
        self.check(phys, size, what)
        off = phys - self._base
        return bytes(self._buf[off : off + size])

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
