"""The transport under the device object (ARCHITECTURE.md, invariant 4): the same calls on a
real Linux kernel and on the emulated one.

* :class:`RealBackend` -- ``os.open``, ``fcntl.ioctl`` with the uAPI struct bytes (the kernel
  writes its reply into the same buffer), ``os.memfd_create``, ``mmap``, the
  ``kexec_file_load`` and ``reboot`` system calls through libc.
* :class:`EmulatedBackend` -- the same operations over the emulated kernel's syscall transport
  (:mod:`liveupdate.client.syscall`), which carries exactly the same struct bytes.

:func:`open_backend` picks the emulated one when the process was started by the emulated
kernel (``LU_SYSCALL_FD`` is set), else the real one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from typing import Protocol

from liveupdate.abi import syscalls
from liveupdate.client.mapping import Mapping, _mmap
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError

SYS_KEXEC_FILE_LOAD = 320  # x86_64
KEXEC_FILE_NO_INITRAMFS = 0x4
F_ADD_SEALS = 1033  # fcntl.h: F_LINUX_SPECIFIC_BASE + 9


class Backend(Protocol):
    emulated: bool

    def uname(self) -> str: ...
    def cmdline(self) -> str: ...
    def boot_id(self) -> str: ...
    def open(self, path: str) -> int: ...
    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None: ...
    def memfd_create(self, name: str, flags: int = 0) -> int: ...
    def ftruncate(self, fd: int, size: int) -> None: ...
    def size(self, fd: int) -> int: ...
    def pread(self, fd: int, count: int, offset: int) -> bytes: ...
    def add_seals(self, fd: int, seals: int) -> None: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def map(self, fd: int, length: int) -> Mapping: ...
    def kexec_file_load(self, image: str, cmdline: str) -> None: ...
    def reboot_kexec(self) -> None: ...


def _oserror(e: OSError, what: str) -> LiveUpdateError:
    return LiveUpdateError(err=e.errno or errno.EIO, msg=f"{what}: {e.strerror}")


class RealBackend:
    emulated = False

    def uname(self) -> str:
        return os.uname().release

    def cmdline(self) -> str:
        with open("/proc/cmdline") as f:
            return f.read().strip()

    def boot_id(self) -> str:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()

    def open(self, path: str) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _oserror(e, f"open {path}") from e

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        try:
            fcntl.ioctl(fd, cmd, buf, True)
        except OSError as e:
            raise _oserror(e, f"ioctl {cmd:#x}") from e

    def memfd_create(self, name: str, flags: int = 0) -> int:
        return os.memfd_create(name, flags | os.MFD_CLOEXEC)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def add_seals(self, fd: int, seals: int) -> None:
        try:
            fcntl.fcntl(fd, F_ADD_SEALS, seals)
        except OSError as e:
            raise _oserror(e, "F_ADD_SEALS") from e

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        try:
            return os.pread(fd, count, offset)
        except OSError as e:
            raise _oserror(e, "pread") from e

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        try:
            return os.pwrite(fd, data, offset)
        except OSError as e:
            raise _oserror(e, "pwrite") from e

    def map(self, fd: int, length: int) -> Mapping:
        addr = _mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        return Mapping(addr, length, 1)

    def kexec_file_load(self, image: str, cmdline: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        line = cmdline.encode() + b"\0"
        try:
            kfd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _oserror(e, f"open {image}") from e
        try:
            if libc.syscall(SYS_KEXEC_FILE_LOAD, kfd, -1, len(line), line,
                            KEXEC_FILE_NO_INITRAMFS) != 0:
                raise LiveUpdateError(err=ctypes.get_errno(), msg="kexec_file_load failed")
        finally:
            os.close(kfd)

    def reboot_kexec(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.reboot(syscalls.LINUX_REBOOT_CMD_KEXEC) != 0:
            raise LiveUpdateError(err=ctypes.get_errno(), msg="reboot(LINUX_REBOOT_CMD_KEXEC)")


class EmulatedBackend:
    emulated = True

    def __init__(self, kernel: Kernel | None = None) -> None:
        self.k = kernel or Kernel()

    def uname(self) -> str:
        return self.k.uname()

    def cmdline(self) -> str:
        return self.k.cmdline()

    def boot_id(self) -> str:
        return self.k.boot_id()

    def open(self, path: str) -> int:
        return self.k.open(path)

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        self.k.ioctl(fd, cmd, buf)

    def memfd_create(self, name: str, flags: int = 0) -> int:
        return self.k.memfd_create(name, flags)

    def ftruncate(self, fd: int, size: int) -> None:
        self.k.ftruncate(fd, size)

    def size(self, fd: int) -> int:
        return int(self.k.fstat(fd)["size"])

    def add_seals(self, fd: int, seals: int) -> None:
        self.k.add_seals(fd, seals)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        return self.k.pread(fd, count, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return self.k.pwrite(fd, data, offset)

    def map(self, fd: int, length: int) -> Mapping:
        return self.k.mmap(fd, length)

    def kexec_file_load(self, image: str, cmdline: str) -> None:
        try:
            with open(image, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise _oserror(e, f"open {image}") from e
        self.k.kexec_file_load(raw, cmdline)

    def reboot_kexec(self) -> None:
        self.k.reboot(syscalls.LINUX_REBOOT_CMD_KEXEC)


def open_backend() -> Backend:
    if os.environ.get(syscalls.SYSCALL_FD_ENV):
        return EmulatedBackend()
    return RealBackend()
