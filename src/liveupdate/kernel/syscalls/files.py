"""System calls on files: ``open`` of /dev/liveupdate, ``ioctl``, and memfd's
``memfd_create``, ``ftruncate``, ``pread``/``pwrite``, ``read``/``write``, ``lseek``,
``fstat``, ``fallocate`` and ``mmap``.

A call that names a file attaches its handle (the first attached fd); one that returns a file
returns a new handle. ``ioctl`` carries exactly the uAPI struct bytes a real ioctl carries:
fd fields are translated by the client (attached fds in field order going in, returned
handles in field order coming out). An fd that is not a file of this kernel is EBADF; an
operation the file's kind does not have is the errno Linux gives (ENOTTY for an ioctl,
EINVAL for reads and writes of /dev/liveupdate, ESPIPE for lseek).

``mmap`` returns the physical extents of the range (allocating its holes, as faulting them
in would) plus the RAM fd, as ``/dev/mem`` would; the calling process holds a reference to
the file's inode until it exits, so the folios it maps stay allocated.

Limitation of the emulation (kept on purpose, for zero copy): the RAM fd is the machine's
whole RAM, read-write. Linux's ``mmap`` of a memfd maps that file's pages and nothing else;
here any process that maps one page of any memfd can read and write every byte of RAM --
other processes' memfds (another client's guest memory), luod's registry, KHO metadata, the
next kernel's segments. The emulated kernel cannot narrow a host mapping to a page list
without copying (each process would need its own memfd per folio, or a userfaultfd broker),
and a VMM must hand its hypervisor one contiguous range of the very pages LUO preserves. So
every permission this kernel checks (:mod:`.creds`: the device, kexec, reboot, debugfs) and
every policy luod enforces hold for what goes through system calls and luod's socket; memory
isolation between userspace processes does not exist in the emulation, and nothing that
relies on it is claimed (README, "Who may do what").
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from liveupdate.abi import wire
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.wire import Message, arg
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.fs.file import File, IoctlOps, RwOps
from liveupdate.kernel.syscalls import creds

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel
    from liveupdate.kernel.syscalls.process import Proc

MAX_IO = wire.IO_PIECE  # bytes per read or write call: a reply is one SEQPACKET record
DEV_LIVEUPDATE = "/dev/liveupdate"
PROC_FD = re.compile(r"/proc/self/fd/\d+")
TMPFS = ("/dev/shm", "/run", "/tmp")  # the tmpfs mounts a distribution has


@dataclass(frozen=True)
class Caller:
    k: Kernel
    proc: Proc | None
    peer: creds.Peer = field(default_factory=creds.Peer)  # who sent this call (its creds)


def _file(c: Caller, m: Message) -> File:
    if not m.fds:
        raise LiveUpdateError(err=errno.EBADF, msg=f"{m.header.get('op')}: no fd attached")
    return c.k.files.lookup(m.fds[0])


def _memfd(c: Caller, m: Message) -> tuple[File, memfd.Memfd]:
    f = _file(c, m)
    if not isinstance(f.private, memfd.Memfd):
        op = m.header.get("op")
        err = errno.ESPIPE if op == "lseek" else errno.EINVAL
        raise LiveUpdateError(err=err, msg=f"{op}: not supported by a {f.ops.name} file")
    return f, f.private


def _handle(c: Caller, f: File) -> Message:
    return Message({}, fds=[c.k.files.install(f)])


def sys_open(c: Caller, m: Message) -> Message:
    path = arg(m, "path", str)
    if PROC_FD.fullmatch(path):
        return _reopen(c, m, path)
    if arg(m, "flags", int, 0) & os.O_TMPFILE == os.O_TMPFILE:
        return _tmpfile(c, path)
    node = c.k.chrdevs.get(path)
    if node is not None:  # a driver's device node: root's, mode 0600, as udev makes them
        creds.may_open_root_node(c.peer.cred(), f"open: {path}", write=True)
        return _handle(c, node())
    if path != DEV_LIVEUPDATE:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"open: {path}: no such device")
    if c.k.luo is None:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"open: {path}: LUO is not enabled "
                              "(liveupdate=on, kho=on)")
    # the node is root's, mode 0600: may_open checks the caller before the driver's open
    creds.may_open_root_node(c.peer.cred(), f"open: {path}", write=True)
    return _handle(c, c.k.luo.open())


def _tmpfile(c: Caller, path: str) -> Message:
    """``open(dir, O_TMPFILE)`` on a tmpfs mount (:data:`TMPFS`): ``shmem_tmpfile``, an
    unnamed shmem inode with no links -- the object a memfd is, without ``MFD_ALLOW_SEALING``
    (``F_SEAL_SEAL``), mode 0600 -- so 7.3's ``memfd_luo_can_preserve`` (``shmem_file`` and
    ``!i_nlink``) takes it too. Any other directory: ENOENT (there is no other
    filesystem)."""
    if path.rstrip("/") not in TMPFS:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"open: {path}: no such directory")
    mf = c.k.new_memfd("")
    mf.mode = 0o600
    return _handle(c, memfd.open_file(mf))


def _reopen(c: Caller, m: Message, path: str) -> Message:
    """``open("/proc/self/fd/N")`` of a memfd: procfs's magic link opens a new file of the
    same inode (a new position; LUO sees the same file identity, the inode). The client
    attaches fd N, as the process's fd table is its own; anything else is ENXIO (sockets,
    anonymous inodes) or ENOENT (N is not open)."""
    if not m.fds:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"open: {path}: no such file")
    f = c.k.files.lookup(m.fds[0])
    if not isinstance(f.private, memfd.Memfd):
        raise LiveUpdateError(err=errno.ENXIO, msg=f"open: {path}: a {f.ops.name} file "
                              "cannot be reopened")
    return _handle(c, memfd.open_file(f.private))


def sys_ioctl(c: Caller, m: Message) -> Message:
    """The file's kind answers (``unlocked_ioctl``); fds inside the struct are resolved by
    the command itself, at the point where Linux would ``fget`` them."""
    f = _file(c, m)
    cmd = arg(m, "cmd", int)
    ops = f.ops
    if not isinstance(ops, IoctlOps):
        raise LiveUpdateError(err=errno.ENOTTY, msg=f"ioctl {cmd:#x}: not supported by a "
                              f"{ops.name} file")
    out, new = ops.ioctl(f, cmd, m.payload, m.fds[1:], c.k.files.lookup)
    return Message({}, out, [c.k.files.install(nf) for nf in new])


def sys_memfd_create(c: Caller, m: Message) -> Message:
    """``memfd_create`` (mm/memfd.c): ``check_memfd_flags`` (unknown flags, or MFD_EXEC
    with MFD_NOEXEC_SEAL: EINVAL; with ``vm.memfd_noexec`` 0, neither means MFD_EXEC), then
    ``memfd_alloc_file``'s mode and seals (:func:`memfd.init_seals`)."""
    name = arg(m, "name", str, "")
    flags = arg(m, "flags", int, 0)
    if len(name.encode()) > 249:  # MFD_NAME_MAX_LEN
        raise LiveUpdateError(err=errno.EINVAL, msg="memfd_create: name too long")
    known = memfd.MFD_CLOEXEC | memfd.MFD_ALLOW_SEALING | memfd.MFD_NOEXEC_SEAL | memfd.MFD_EXEC
    if flags & ~known:  # MFD_HUGETLB: not emulated
        raise LiveUpdateError(err=errno.EINVAL, msg=f"memfd_create: flags {flags:#x}")
    if flags & memfd.MFD_EXEC and flags & memfd.MFD_NOEXEC_SEAL:
        raise LiveUpdateError(err=errno.EINVAL, msg="memfd_create: MFD_EXEC and "
                              "MFD_NOEXEC_SEAL together")
    mf = c.k.new_memfd(name)
    memfd.init_seals(mf, flags)
    return _handle(c, memfd.open_file(mf))


def sys_add_seals(c: Caller, m: Message) -> Message:
    """``fcntl(F_ADD_SEALS)``."""
    _, mf = _memfd(c, m)
    mf.add_seals(arg(m, "seals", int))
    return Message({})


def sys_get_seals(c: Caller, m: Message) -> Message:
    """``fcntl(F_GET_SEALS)``."""
    _, mf = _memfd(c, m)
    return Message({"seals": mf.seals})


def sys_ftruncate(c: Caller, m: Message) -> Message:
    _, mf = _memfd(c, m)
    mf.truncate(arg(m, "size", int))
    return Message({})


def _count(m: Message) -> int:
    n = arg(m, "count", int)
    if not 0 <= n <= MAX_IO:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"count must be 0..{MAX_IO}")
    return n


def sys_pread(c: Caller, m: Message) -> Message:
    f = _file(c, m)
    if isinstance(f.ops, RwOps):  # a driver's file (a VFIO device's regions)
        return Message({}, f.ops.pread(f, _count(m), arg(m, "offset", int)))
    _, mf = _memfd(c, m)
    return Message({}, mf.pread(_count(m), arg(m, "offset", int)))


def sys_pwrite(c: Caller, m: Message) -> Message:
    f = _file(c, m)
    if isinstance(f.ops, RwOps):
        return Message({"written": f.ops.pwrite(f, m.payload, arg(m, "offset", int))})
    _, mf = _memfd(c, m)
    return Message({"written": mf.pwrite(m.payload, arg(m, "offset", int))})


def sys_read(c: Caller, m: Message) -> Message:
    f, mf = _memfd(c, m)
    data = mf.pread(_count(m), f.pos)
    f.pos += len(data)
    return Message({}, data)


def sys_write(c: Caller, m: Message) -> Message:
    f, mf = _memfd(c, m)
    n = mf.pwrite(m.payload, f.pos)
    f.pos += n
    return Message({"written": n})


def sys_lseek(c: Caller, m: Message) -> Message:
    f, mf = _memfd(c, m)
    f.pos = memfd.lseek(f.pos, mf.size, arg(m, "offset", int), arg(m, "whence", int))
    return Message({"offset": f.pos})


def sys_fstat(c: Caller, m: Message) -> Message:
    _, mf = _memfd(c, m)
    return Message({"size": mf.size, "blocks": mf.nr_pages * (PAGE_SIZE // 512),
                    "ino": mf.ino, "name": f"memfd:{mf.name}", "frozen": mf.frozen,
                    "seals": mf.seals})


def sys_fallocate(c: Caller, m: Message) -> Message:
    _, mf = _memfd(c, m)
    mf.fallocate(arg(m, "mode", int), arg(m, "offset", int), arg(m, "length", int))
    return Message({})


def sys_mmap(c: Caller, m: Message) -> Message:
    _, mf = _memfd(c, m)
    off, length = arg(m, "offset", int), arg(m, "length", int)
    if off < 0 or length <= 0 or off % PAGE_SIZE:
        raise LiveUpdateError(err=errno.EINVAL, msg="mmap: offset must be page aligned and "
                              "length positive")
    first, last = off >> PAGE_SHIFT, -(-(off + length) // PAGE_SIZE)
    if mf.frozen and last > -(-mf.size // PAGE_SIZE):
        raise LiveUpdateError(err=errno.EINVAL, msg="mmap: past the end of a frozen memfd")
    mf.check_write("mmap(PROT_WRITE)")
    mf.populate(first, last)
    if c.proc is not None:
        c.proc.mappings.append(mf.get())
    return Message({"extents": mf.extents(first, last)}, fds=[os.dup(c.k.ram_fd)])


FILE_SYSCALLS = {
    "open": sys_open,
    "ioctl": sys_ioctl,
    "memfd_create": sys_memfd_create,
    "ftruncate": sys_ftruncate,
    "pread": sys_pread,
    "pwrite": sys_pwrite,
    "read": sys_read,
    "write": sys_write,
    "lseek": sys_lseek,
    "fstat": sys_fstat,
    "fallocate": sys_fallocate,
    "mmap": sys_mmap,
    "add_seals": sys_add_seals,
    "get_seals": sys_get_seals,
}
