"""Open files of the emulated kernel (``struct file``) and the handles userspace holds.

An emulated file is a real fd (ARCHITECTURE.md, the syscall transport): for every open file
the kernel makes a socketpair, hands one end to the process (the *handle*) and keeps the
other. The handle is only an identity -- it can be passed with SCM_RIGHTS, ``dup``-ed and
closed like any fd. A request that names a file attaches its handle; the kernel recognizes it
by the handle's ``(st_dev, st_ino)`` and closes its received copy after the call.

When every copy of a handle is closed, the kernel's end sees a hang-up; :meth:`FileTable.drain`
collects hang-ups before each request is served, so "close, then reopen" never races. A hung-up
handle drops its reference to the file; the file is released (``->release``) when nothing else
holds it -- LUO keeps its own reference to a preserved file, as ``fget`` does, so a caller may
close a memfd right after preserving it. Linux releases a file when its last reference goes
(``fput``: ``__fput`` at the closing task's return to userspace, or in ``exit_files``), not at
someone's next syscall; :meth:`FileTable.release_promptly` does that here too: a thread waits
for hang-ups and drains them under the kernel lock (a session's implicit FINISH, and LUO's
settle, then happen when its last holder closes it or dies).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from liveupdate.errors import LiveUpdateError

Key = tuple[int, int]  # (st_dev, st_ino) of the handle userspace holds


class FileOps(Protocol):
    """What a kind of file does (``struct file_operations``)."""

    name: str

    def release(self, f: File) -> None: ...


@runtime_checkable
class IoctlOps(Protocol):
    """A kind of file with ``unlocked_ioctl``: the struct bytes in, the bytes copied back and
    the new files out; ``fds`` are the handles attached for fd fields, resolved (EBADF) by
    ``resolve`` where the command takes them."""

    name: str

    def release(self, f: File) -> None: ...

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Callable[[int], File]) -> tuple[bytes, list[File]]: ...


@runtime_checkable
class RwOps(Protocol):
    """A kind of file with ``read_iter``/``write_iter`` at an offset of its own meaning (a
    VFIO device's regions): ``pread`` and ``pwrite``."""

    name: str

    def release(self, f: File) -> None: ...
    def pread(self, f: File, count: int, offset: int) -> bytes: ...
    def pwrite(self, f: File, data: bytes, offset: int) -> int: ...


@dataclass(eq=False)
class File:
    """``struct file``: an open file description, shared by every copy of its handle."""

    ops: FileOps
    private: Any = None  # the object behind it (a memfd inode, a LUO device, ...)
    pos: int = 0
    refs: int = 0  # open handles plus kernel references (LUO, ...)
    handles: set[Key] = field(default_factory=set)

    def get(self) -> File:
        self.refs += 1
        return self

    def put(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.ops.release(self)


class _Foreign:
    """A file of a kind the emulated kernel does not emulate (see :meth:`FileTable.lookup`)."""

    name = "foreign"

    def release(self, f: File) -> None:
        pass


FOREIGN = _Foreign()


class FileTable:
    """Every handle this kernel has handed out, by the identity of the process's end."""

    def __init__(self, on_hangup_error: Callable[[str], None]) -> None:
        self._by_key: dict[Key, tuple[File, socket.socket]] = {}
        self._by_kfd: dict[int, Key] = {}
        self._poll = select.poll()
        self._hangups = select.epoll()  # the same ends, for release_promptly's thread
        self._report = on_hangup_error

    def __len__(self) -> int:
        return len(self._by_key)

    def install(self, f: File) -> int:
        """A new handle for ``f``: returns the process's end (the caller sends, then closes
        it); the kernel keeps the other end to notice the last close."""
        try:
            kside, uside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:  # the kernel's own fd table is full
            raise LiveUpdateError(err=e.errno or errno.EMFILE,
                                  msg=f"cannot open another file: {e.strerror}") from e
        st = os.fstat(uside.fileno())
        key = (st.st_dev, st.st_ino)
        self._by_key[key] = (f.get(), kside)
        self._by_kfd[kside.fileno()] = key
        f.handles.add(key)
        self._poll.register(kside.fileno(), select.POLLHUP)
        self._hangups.register(kside.fileno(), select.EPOLLHUP)
        return uside.detach()

    def lookup(self, fd: int) -> File:
        """The file behind a received handle; EBADF if it is not open. An open fd that is
        not one of this kernel's files (a pipe, a socket, ``/dev/null``, a regular or tmpfs
        file the process opened on the host) is a :data:`FOREIGN` file: ``fget`` succeeds
        in Linux too, and such a file has no LUO handler (ENOENT at PRESERVE_FD), no
        ioctls (ENOTTY) and nothing a memfd call can use (EINVAL)."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise LiveUpdateError(err=errno.EBADF, msg=f"fd: {e.strerror}") from e
        entry = self._by_key.get((st.st_dev, st.st_ino))
        if entry is None:
            return File(FOREIGN)
        return entry[0]

    def drain(self) -> int:
        """Drop every handle whose last copy was closed; returns how many."""
        n = 0
        for kfd, _events in self._poll.poll(0):
            key = self._by_kfd.pop(kfd)
            f, kside = self._by_key.pop(key)
            self._poll.unregister(kfd)
            kside.close()
            f.handles.discard(key)
            n += 1
            try:
                f.put()
            except LiveUpdateError as e:  # release cannot fail the close; say why, go on
                self._report(f"release of {f.ops.name} file: {e}")
        return n

    def release_promptly(self, lock: threading.RLock) -> None:
        """From now on, drain hang-ups as they come (a daemon thread, under ``lock``). An
        event is only a wake-up: :meth:`drain` asks the handles themselves, and an end it
        closes leaves the epoll set with its file."""
        def watch() -> None:
            while True:
                self._hangups.poll()
                with lock:
                    try:
                        self.drain()
                    except Exception as e:  # a release's bug: said, the next still served
                        self._report(f"hang-up: {type(e).__name__}: {e}")

        threading.Thread(target=watch, name="hangups", daemon=True).start()
