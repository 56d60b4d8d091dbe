"""Map scattered physical extents into one contiguous virtual range (zero copy).

A VMM must give its hypervisor one guest-memory region, but a memfd's folios lie anywhere in
RAM. The emulated kernel's ``mmap`` returns the folios' physical extents and the RAM fd (as
``/dev/mem`` would); :func:`map_extents` reserves one range of address space and maps each
extent over it with ``MAP_FIXED`` -- one system call per extent, none per page, and no byte
copied. Physically adjacent folios arrive merged into one extent. Each extent is one VMA, so
a file scattered into more than ``vm.max_map_count`` (65530 by default) extents cannot be
mapped whole; 2 MiB folios (``transparent_hugepage_shmem=within_size``) keep a 64 GiB guest
at 32768 extents or fewer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from liveupdate.errors import LiveUpdateError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_NORESERVE = 0x4000
MAP_FIXED = 0x10  # Python's mmap module exports neither of these
PROT_NONE = 0


@dataclass
class Mapping:
    """``size`` bytes at ``address``; :attr:`view` reads and writes them in place."""

    address: int
    size: int
    extents: int
    ranges: tuple[tuple[int, int], ...] = ()  # (phys, bytes) mapped in order, when known

    @property
    def view(self) -> memoryview:
        return memoryview((ctypes.c_char * self.size).from_address(self.address)).cast("B")

    def close(self) -> None:
        if self.size:
            _libc.munmap(self.address, self.size)
            self.size = 0


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int, off: int) -> int:
    got = _libc.mmap(addr, size, prot, flags, fd, off)
    if got is None or got == MAP_FAILED:
        e = ctypes.get_errno()
        raise LiveUpdateError(err=e or errno.ENOMEM, msg=f"mmap: {os.strerror(e)}")
    return int(got)


def map_extents(ram_fd: int, extents: list[tuple[int, int]], writable: bool = True
                ) -> Mapping:
    total = sum(n for _, n in extents)
    if total == 0:
        raise LiveUpdateError(err=errno.EINVAL, msg="mmap: nothing to map")
    base = _mmap(None, total, PROT_NONE,
                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    off = 0
    try:
        for phys, n in extents:
            _mmap(base + off, n, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0),
                  mmap.MAP_SHARED | MAP_FIXED, ram_fd, phys)
            off += n
    except LiveUpdateError:
        _libc.munmap(base, total)
        raise
    return Mapping(base, total, len(extents), tuple(extents))
