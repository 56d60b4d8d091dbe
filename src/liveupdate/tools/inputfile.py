"""Reading what the user names on ``luoctl inspect``'s command line, with a bound.

Every blob inspect decodes is small -- a KHO root FDT is a page, the largest sub-FDTs a few,
a ``setup_data`` node 48 bytes -- but the path is anything: ``/dev/zero`` never ends, a FIFO
blocks until a writer comes, and debugfs and sysfs files report a ``st_size`` of 0 or 4096
whatever they hold. So only regular files are read (checked on the open descriptor, which
is opened without blocking), ``st_size`` is not trusted, and reading stops at
:data:`MAX_INPUT`: a file with more is EFBIG, not truncated.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from liveupdate.errors import LiveUpdateError

MAX_INPUT = 16 << 20  # the largest FDT PhysMem.read_fdt accepts: no blob is larger
_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of the regular file ``path``: LiveUpdateError if it is
    anything else (EINVAL; EISDIR for a directory), ``what`` saying what was expected."""
    # O_NONBLOCK: a FIFO opens at once instead of waiting for a writer (then is refused);
    # it changes nothing for a regular file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise LiveUpdateError(err=errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL,
                              msg=f"{path} is {kind}: {what}")
    return fd


def read_capped(path: Path, limit: int = MAX_INPUT) -> bytes:
    """The bytes of the regular file ``path``: LiveUpdateError if it is anything else
    (:func:`open_regular`) or holds more than ``limit`` bytes (EFBIG)."""
    fd = open_regular(path, "inspect reads regular files (blobs copied out of debugfs or "
                            "sysfs, or those files themselves)")
    try:
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise LiveUpdateError(
                    err=errno.EFBIG,
                    msg=f"{path} holds more than {limit} bytes ({limit >> 20} MiB), the most "
                        "inspect reads: no handover blob is that large")
        return b"".join(chunks)
    finally:
        os.close(fd)
