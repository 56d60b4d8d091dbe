"""RAM: one sparse memfd. Only touched pages cost host memory; punched pages read as zero."""

from __future__ import annotations

import errno
import mmap
import os

from liveupdate.errors import LiveUpdateError

MIN_MEMORY = 128 << 20
MAX_MEMORY = 1 << 40


class Ram:
    def __init__(self, size: int) -> None:
        if not MIN_MEMORY <= size <= MAX_MEMORY or size % (2 << 20):
            raise LiveUpdateError(
                err=errno.EINVAL, msg=f"memory must be a multiple of 2 MiB between "
                f"{MIN_MEMORY >> 20} MiB and {MAX_MEMORY >> 40} TiB")
        self.size = size
        self.fd = os.memfd_create("lu-ram", 0)
        os.set_inheritable(self.fd, False)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _check(self, phys: int, n: int) -> None:
        if phys < 0 or n < 0 or phys + n > self.size:
            raise LiveUpdateError(err=errno.EFAULT, msg=f"{phys:#x}+{n:#x} is outside RAM")

    def read(self, phys: int, n: int) -> bytes:
        self._check(phys, n)
        return self.map[phys : phys + n]

    def write(self, phys: int, data: bytes) -> None:
        self._check(phys, len(data))
        self.map[phys : phys + len(data)] = data

    def resident(self) -> int:
        """Bytes of RAM actually backed on the host."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
