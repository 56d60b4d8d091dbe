"""The differential suite's program: one batch of scenarios, run as userspace of a kernel.

The same steps run on the real Linux (inside QEMU, :mod:`liveupdate.realkernel.guest`'s
``differential`` job: real system calls, real ioctls on ``/dev/liveupdate``) and on the
emulated machine (``python -m liveupdate.userspace.differential STAGE BATCH`` as a
process of the emulated kernel, over its syscall connection). Only :class:`Sys` differs.

A scenario is a list of steps (JSON objects, see :func:`step`); the step ``{"op": "kexec"}``
ends stage 1. Every step is recorded: an ``errno`` name, or what the call returned -- every
field of an ioctl's struct as the kernel left it (fd fields as ``"fd"`` when the kernel put
a new file there, ``"same"`` when they still hold what was passed: fd numbers are not
comparable between two processes), and for ``view`` a memfd's size, position, seals and
sha256. Stage 1 keeps every fd it opened until the kexec, as a process that preserves its
sessions does (the real harness jumps from this process; on the emulated machine a daemon
child holds them, as the kernel selftests' ``daemonize_and_wait`` does).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Protocol

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.client.generation import generation_of
from liveupdate.errors import LiveUpdateError

DEVICE = "/dev/liveupdate"
Step = dict[str, Any]
Record = dict[str, Any]


class Sys(Protocol):
    """The system calls a scenario makes; an error raises OSError or LiveUpdateError."""

    def uname(self) -> str: ...
    def open_device(self) -> int: ...
    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None: ...
    def memfd_create(self, name: str, flags: int) -> int: ...
    def ftruncate(self, fd: int, size: int) -> None: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def pread(self, fd: int, count: int, offset: int) -> bytes: ...
    def lseek(self, fd: int, offset: int, whence: int) -> int: ...
    def add_seals(self, fd: int, seals: int) -> None: ...
    def get_seals(self, fd: int) -> int: ...
    def size(self, fd: int) -> int: ...
    def reopen(self, fd: int) -> int: ...
    def tmpfile(self) -> int: ...


class RealSys:
    """Linux's own system calls."""

    def uname(self) -> str:
        return os.uname().release

    def open_device(self) -> int:
        return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        fcntl.ioctl(fd, cmd, buf, True)

    def memfd_create(self, name: str, flags: int) -> int:
        return os.memfd_create(name, flags)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        return os.pread(fd, count, offset)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        return os.lseek(fd, offset, whence)

    def add_seals(self, fd: int, seals: int) -> None:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)

    def get_seals(self, fd: int) -> int:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def reopen(self, fd: int) -> int:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)

    def tmpfile(self) -> int:
        return os.open(_tmpfs(), os.O_TMPFILE | os.O_RDWR, 0o600)


class EmulatedSys:
    """The emulated kernel's syscall connection (:class:`liveupdate.client.syscall.Kernel`)."""

    def __init__(self) -> None:
        from liveupdate.client.syscall import Kernel

        self.k = Kernel()

    def uname(self) -> str:
        return self.k.uname()

    def open_device(self) -> int:
        return self.k.open(DEVICE)

    def ioctl(self, fd: int, cmd: int, buf: bytearray) -> None:
        self.k.ioctl(fd, cmd, buf)

    def memfd_create(self, name: str, flags: int) -> int:
        return self.k.memfd_create(name, flags)

    def ftruncate(self, fd: int, size: int) -> None:
        self.k.ftruncate(fd, size)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return self.k.pwrite(fd, data, offset)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        return self.k.pread(fd, count, offset)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        return self.k.lseek(fd, offset, whence)

    def add_seals(self, fd: int, seals: int) -> None:
        self.k.add_seals(fd, seals)

    def get_seals(self, fd: int) -> int:
        return self.k.get_seals(fd)

    def size(self, fd: int) -> int:
        return int(self.k.fstat(fd)["size"])

    def reopen(self, fd: int) -> int:
        return self.k.open(f"/proc/self/fd/{fd}")

    def tmpfile(self) -> int:
        return self.k.open("/dev/shm", os.O_TMPFILE)


def fill(seed: int, page: int) -> bytes:
    """A page no other page of another file or index shares."""
    head = f"seed {seed:#x} page {page}\n".encode()
    return (head * (PAGE_SIZE // len(head) + 1))[:PAGE_SIZE]


def _tmpfs() -> str:
    """A writable tmpfs mount (``/dev/shm`` on a distribution, ``/run`` or ``/tmp`` in a
    virtme-ng guest)."""
    with open("/proc/self/mounts") as f:
        mounts = {line.split()[1]: line.split()[2] for line in f}
    for path in ("/dev/shm", "/run", "/tmp"):
        if mounts.get(path) == "tmpfs" and os.access(path, os.W_OK):
            return path
    raise OSError(errno.ENOENT, "no writable tmpfs")


def _field(value: Any) -> Any:
    """A struct field from a step: an int, a UTF-8 string, or ``{"hex": ...}`` raw bytes."""
    if isinstance(value, dict):
        return bytes.fromhex(value["hex"])
    if isinstance(value, str):
        return value.encode()
    return value


class Runner:
    """Runs steps in order; ``fds`` binds the names steps give (``"as"``) to fd numbers."""

    def __init__(self, sys_: Sys, device: int) -> None:
        self.sys, self.device = sys_, device
        self.gen = generation_of(sys_.uname())
        self.fds: dict[str, int] = {}
        self.held: list[int] = []  # every fd opened: kept to the kexec, not closed by us

    def fd(self, ref: Any) -> int:
        """A step's fd: a bound name, ``"closed"`` (a number no fd holds) or an int."""
        if ref == "closed":
            spare = os.open(os.devnull, os.O_RDONLY)
            os.close(spare)
            return spare
        if isinstance(ref, str):
            if ref not in self.fds:  # a name an earlier failed step never bound
                raise OSError(errno.EBADF, f"{ref} is not open")
            return self.fds[ref]
        return int(ref)

    def bind(self, st: Step, fd: int) -> None:
        self.held.append(fd)
        if "as" in st:
            self.fds[st["as"]] = fd

    def run(self, st: Step) -> Record:
        """One step and its record (the errno of a failed call is the record)."""
        try:
            return getattr(self, "op_" + st["op"])(st)  # type: ignore[no-any-return]
        except LiveUpdateError as e:
            return {"errno": e.errno_name}
        except OSError as e:
            return {"errno": errno.errorcode.get(e.errno or 0, str(e.errno))}

    def op_device(self, st: Step) -> Record:
        """The batch's ``/dev/liveupdate`` (opened once: the device is exclusive), or with
        ``again`` a second open of it."""
        if st.get("again"):
            self.bind(st, self.sys.open_device())
        elif "as" in st:
            self.fds[st["as"]] = self.device
        return {"ok": True}

    def op_memfd(self, st: Step) -> Record:
        """``memfd_create``, ``ftruncate``, the chosen pages written, ``lseek``, seals."""
        fd = self.sys.memfd_create(st.get("name", "diff"), st.get("flags", 2))  # ALLOW_SEALING
        self.bind(st, fd)
        size, seed = int(st.get("size", 0)), int(st.get("seed", 0))
        self.sys.ftruncate(fd, size)
        pages = st.get("pages")
        for p in range((size + PAGE_SIZE - 1) // PAGE_SIZE) if pages is None else pages:
            self.sys.pwrite(fd, fill(seed, p)[: size - p * PAGE_SIZE], p * PAGE_SIZE)
        self.sys.lseek(fd, int(st.get("pos", 0)), os.SEEK_SET)
        if st.get("seals"):
            self.sys.add_seals(fd, int(st["seals"]))
        return {"ok": True}

    def op_other(self, st: Step) -> Record:
        """A file that is not a memfd: a pipe, a socket, ``/dev/null`` (the host's own, on
        both kernels: the emulated kernel sees a file it does not emulate) or an unlinked
        tmpfs file (``O_TMPFILE``, the kernel's)."""
        kind = st["kind"]
        if kind == "pipe":
            r, w = os.pipe()
            self.held.append(w)
            fd = r
        elif kind == "socket":
            fd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
        elif kind == "devnull":
            fd = os.open(os.devnull, os.O_RDWR)
        elif kind == "tmpfile":  # an unlinked file of a tmpfs: shmem, like a memfd
            fd = self.sys.tmpfile()
        else:
            raise ValueError(f"unknown kind {kind!r}")
        self.bind(st, fd)
        return {"ok": True}

    def op_ioctl(self, st: Step) -> Record:
        """One ioctl: the struct packed from ``fields`` (fd fields name bound fds), its
        ``size`` field and buffer length as ``size`` says (default the struct's), ``tail``
        (hex) appended; the record is the struct as the kernel left it."""
        entry = self.gen.ioctl(st["cmd"])
        fields = {k: self.fd(v) if k in entry.fd_in else _field(v)
                  for k, v in st.get("fields", {}).items()}
        tail = bytes.fromhex(st.get("tail", ""))
        size = int(st.get("size", entry.size + len(tail)))
        buf = bytearray(entry.pack(**{**fields, "size": size}) + tail)
        buf += bytes(max(0, size - len(buf)))  # the kernel reads ``size`` bytes
        given = bytes(buf)
        self.sys.ioctl(self.fd(st["target"]), entry.number, buf)
        out: Record = {}
        for name, value in entry.unpack(bytes(buf[: entry.size])).items():
            if name in entry.fd_in or name in entry.fd_out:
                if value == entry.field(given, name):
                    value = "same"
                elif value >= 0:
                    self.bind(st, value)
                    value = "fd"
            out[name] = value.hex() if isinstance(value, bytes) else value
        if buf[entry.size:] != given[entry.size:]:
            out["tail"] = bytes(buf[entry.size:]).hex()
        return out

    def op_close(self, st: Step) -> Record:
        fd = self.fd(st["fd"])
        del self.fds[st["fd"]]
        self.held.remove(fd)
        os.close(fd)
        return {"ok": True}

    def op_dup(self, st: Step) -> Record:
        self.bind(st, os.dup(self.fd(st["fd"])))
        return {"ok": True}

    def op_reopen(self, st: Step) -> Record:
        self.bind(st, self.sys.reopen(self.fd(st["fd"])))
        return {"ok": True}

    def op_write(self, st: Step) -> Record:
        data = fill(int(st.get("seed", 0)), 0)[: int(st.get("length", 16))]
        return {"written": self.sys.pwrite(self.fd(st["fd"]), data, int(st["offset"]))}

    def op_seek(self, st: Step) -> Record:
        return {"pos": self.sys.lseek(self.fd(st["fd"]), int(st["offset"]),
                                      int(st.get("whence", os.SEEK_SET)))}

    def op_truncate(self, st: Step) -> Record:
        self.sys.ftruncate(self.fd(st["fd"]), int(st["size"]))
        return {"ok": True}

    def op_seal(self, st: Step) -> Record:
        self.sys.add_seals(self.fd(st["fd"]), int(st["seals"]))
        return {"ok": True}

    def op_view(self, st: Step) -> Record:
        """What userspace sees of a memfd, its position unmoved."""
        fd = self.fd(st["fd"])
        size = self.sys.size(fd)
        pos = self.sys.lseek(fd, 0, os.SEEK_CUR)
        digest, off = hashlib.sha256(), 0
        while off < size:
            chunk = self.sys.pread(fd, min(1 << 17, size - off), off)
            if not chunk:
                break
            digest.update(chunk)
            off += len(chunk)
        return {"size": size, "pos": pos, "seals": self.sys.get_seals(fd),
                "sha256": digest.hexdigest()[:32]}


def stage_steps(steps: list[Step], stage: int) -> list[Step]:
    """The steps of ``stage`` (1: before the ``kexec`` step, 2: after it)."""
    cut = next((i for i, s in enumerate(steps) if s["op"] == "kexec"), len(steps))
    return steps[:cut] if stage == 1 else steps[cut + 1:]


def run_batch(sys_: Sys, batch: dict[str, list[Step]], stage: int
              ) -> tuple[dict[str, list[Record]], list[Runner]]:
    """Every scenario's steps of ``stage``, scenario after scenario, sharing one open
    ``/dev/liveupdate``; the runners hold the fds their scenario opened."""
    records: dict[str, list[Record]] = {}
    runners = []
    device = sys_.open_device()
    for sid, steps in batch.items():
        r = Runner(sys_, device)
        records[sid] = [r.run(st) for st in stage_steps(steps, stage)]
        runners.append(r)
    return records, runners


_HELD: list[Runner] = []  # stage 1's fds, open until the kexec ends this process


def real_stage(stage: int, batch: Path, out: Path) -> int:
    """One stage on the real kernel (the harness's ``differential`` job): the records go to
    ``out/stage<N>.json``; stage 1's fds stay open for the kexec the harness then does."""
    records, runners = run_batch(RealSys(), json.loads(batch.read_text()), stage)
    _HELD.extend(runners)
    (out / f"stage{stage}.json").write_text(json.dumps(records, indent=0) + "\n")
    return 0


def main(argv: list[str]) -> int:
    """``STAGE BATCH`` on the emulated kernel: the records go to stdout (one JSON line);
    stage 1 then holds its fds in a daemon child until the kexec ends it."""
    stage, batch = int(argv[0]), Path(argv[1])
    records, _runners = run_batch(EmulatedSys(), json.loads(batch.read_text()), stage)
    sys.stdout.write(json.dumps(records) + "\n")
    sys.stdout.flush()
    if stage == 1:
        if os.fork():
            os._exit(0)
        os.setsid()
        for fd in (0, 1, 2):  # so whoever collects our output sees it end
            os.close(fd)
        signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
