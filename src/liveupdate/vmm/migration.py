"""Live migration, the sending side: pre-copy with write tracking, then stop-and-copy.

The state a live update keeps in place is the state a migration streams (the issue's "note
the similarities to live migration"): guest memory, then the VM state described by
:data:`liveupdate.vmm.vmstate.VM_STATE` -- the very bytes freeze writes into the preserved
state memfd (:meth:`liveupdate.vmm.vmm.Vmm.state_bytes`). The receiving VMM
(:mod:`liveupdate.vmm.incoming`) resumes from them exactly as a VMM resumes after a kexec,
and measures its downtime with the same code as a live update's blackout.

The algorithm is QEMU's ``migration/ram.c`` in small: round 0 sends every page while the
guest runs with its writes tracked; each later round sends the pages written meanwhile
(``migration_bitmap_sync``); when a round leaves at most :data:`STOP_PAGES` pages dirty, or
after :data:`MAX_ROUNDS`, or when a round did not shrink the dirty set (a guest that
rewrites its whole memory between rounds -- a small one walking it -- never converges), the
vCPU is paused at an exit (the downtime starts: its CLOCK_REALTIME is the VM state's
``last_exit_wall_ns``, as at freeze), the last dirty pages and the low
area (page tables, code, state page: written by the MMU's A/D bits too, which no hook sees)
are sent with the state, and the destination resumes. The guest runs on during the
pre-copy rounds under either accelerator. Write tracking (:func:`tracker`): under KVM its
dirty log, as QEMU (:mod:`liveupdate.vmm.dirtylog`: ``KVM_MEM_LOG_DIRTY_PAGES`` on every
memory slot when migration starts, ``KVM_GET_DIRTY_LOG`` per slot each round --
``kvm_physical_sync_dirty_bitmap`` -- mapped back to pages of the memory file, the flag
removed when migration ends or fails); under TCG a unicorn ``UC_HOOK_MEM_WRITE`` hook marks
each written page in a bitmap, which QEMU's TCG does through its own dirty memory bitmap.
Neither sees the VMM's own writes nor, everywhere, the page walker's A/D bits: hence the
low area re-sent with the state, under both.

The channel is a host Unix socket to the destination VMM's listener (the "network"; it is
not emulated). It is not a way to carry anything across a kexec: it lives in the two VMM
processes, which the reboot path stops and kills, and a kernel holds no end of it.

Wire format (little-endian): ``hello`` is ``b"LUMG" u32 len`` + JSON; a page batch is
``b"PAGE" u32 n`` + ``n`` u32 page numbers + ``n`` pages; the end is ``b"STAT" u32 len`` + the
VM state bytes; the destination answers one ``b"DONE" u32 len`` + JSON (its downtime).
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import guest
from liveupdate.vmm.dirtylog import KvmTracker
from liveupdate.vmm.kvm import Kvm

if TYPE_CHECKING:
    from liveupdate.vmm.tcg import Tcg
    from liveupdate.vmm.vmm import Vmm

HEAD = struct.Struct("<4sI")
PAGE = guest.PAGE
MAX_ROUNDS = 8
STOP_PAGES = 256  # 1 MiB left dirty: stop and copy (QEMU's downtime-limit in pages, small)
LOW_PAGES = guest.DATA_AT // PAGE  # page tables, code, stack, state page: always re-sent


def send_record(sock: socket.socket, tag: bytes, payload: bytes) -> None:
    sock.sendall(HEAD.pack(tag, len(payload)) + payload)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise LiveUpdateError(err=errno.ECONNRESET, msg="migration: the peer hung up")
        got += n


def recv_head(sock: socket.socket) -> tuple[bytes, int]:
    buf = bytearray(HEAD.size)
    recv_exact(sock, memoryview(buf))
    tag, n = HEAD.unpack(buf)
    return bytes(tag), int(n)


def recv_json(sock: socket.socket, tag: bytes) -> dict[str, Any]:
    got, n = recv_head(sock)
    if got != tag or n > 1 << 20:
        raise LiveUpdateError(err=errno.EPROTO, msg=f"migration: expected {tag!r}, got {got!r}")
    buf = bytearray(n)
    recv_exact(sock, memoryview(buf))
    out: dict[str, Any] = json.loads(buf)
    return out


class Tracker(Protocol):
    """Which guest pages were written since the last :meth:`collect`, as page numbers of the
    memory file: :meth:`start` when the first round starts, :meth:`stop` when migration
    ends or fails (idempotent)."""

    def start(self) -> None: ...
    def collect(self, running: bool) -> np.ndarray: ...
    def stop(self) -> None: ...


def tracker(vmm: Vmm) -> Tracker:
    """The write tracking of ``vmm``'s accelerator: KVM's dirty log or the TCG hook."""
    accel = vmm.vm.accel
    if isinstance(accel, Kvm):
        return KvmTracker(vmm, accel)
    from liveupdate.vmm.tcg import Tcg  # only now: unicorn's import is slow (vcpu.py)

    if isinstance(accel, Tcg):
        return TcgTracker(vmm, accel)
    raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"migration under {accel.name}: no "
                          "write tracking")


class TcgTracker:
    """Which guest pages were written since the last :meth:`collect` (a unicorn write hook
    marking a bitmap; see the module docstring)."""

    def __init__(self, vmm: Vmm, accel: Tcg) -> None:
        self.vmm = vmm
        self.uc: Any = accel.uc  # unicorn's bindings are untyped
        self.bits = bytearray(vmm.size // PAGE)
        self.hook: Any = None

    def _mark(self, uc: Any, access: int, address: int, size: int, value: int,
              data: Any) -> None:
        self.bits[address >> 12] = 1

    def start(self) -> None:
        from unicorn import UC_HOOK_MEM_WRITE

        self.vmm.vm.pause()  # hooks change between runs of the vCPU, never during one
        try:
            self.hook = self.uc.hook_add(UC_HOOK_MEM_WRITE, self._mark, None, 0,
                                         self.vmm.size - 1)
            # TCG decides at translation whether a memory access calls hooks: drop what
            # was translated before this one (QEMU's TCG flushes when dirty logging starts)
            self.uc.ctl_flush_tb()
        finally:
            self.vmm.vm.resume()

    def collect(self, running: bool) -> np.ndarray:
        """The pages written since the last call. While the guest ``running``, a write whose
        hook marked the old bitmap may land just after: waiting for the vCPU's next exit
        (the end of the run in progress) makes sure it has before the pages are read."""
        old, self.bits = self.bits, bytearray(len(self.bits))
        if running:
            self.vmm.vm.wait_exits(1)
        return np.flatnonzero(np.frombuffer(old, np.uint8)).astype(np.uint32)

    def stop(self) -> None:
        if self.hook is None:
            return
        held = self.vmm.vm.want_pause  # paused for the stop-and-copy: stays paused
        if not held:
            self.vmm.vm.pause()
        try:
            self.uc.hook_del(self.hook)
            self.hook = None
        finally:
            if not held:
                self.vmm.vm.resume()


def send_pages(sock: socket.socket, mem: memoryview, pages: np.ndarray) -> None:
    """One batch: the page numbers, then the pages, each sent straight from the guest's
    mapping (no copy into a buffer beyond the socket's)."""
    sock.sendall(HEAD.pack(b"PAGE", len(pages)) + pages.astype("<u4").tobytes())
    if not len(pages):
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1  # runs of consecutive pages
    for run in np.split(pages, breaks):
        first, n = int(run[0]), len(run)
        sock.sendall(mem[first * PAGE : (first + n) * PAGE])


def send(vmm: Vmm, to: str, origin: str, timeout: float = 120.0) -> dict[str, Any]:
    """Migrate ``vmm``'s VM to the VMM listening at ``to``; the VM stays paused here (the
    source's "postmigrate"). Returns the rounds, the pages each sent and the destination's
    measure of the downtime."""
    if vmm.limited:
        raise LiveUpdateError(err=errno.EBUSY, msg="a live update is under way: no migration")
    track = tracker(vmm)
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(to)
        except OSError as e:
            raise LiveUpdateError(err=e.errno or errno.ECONNREFUSED,
                                  msg=f"migration to {to}: {e.strerror}") from e
        send_record(sock, b"LUMG", json.dumps({"size": vmm.size, "origin": origin,
                                               "accel": vmm.vm.accel.name}).encode())
        track.start()
        rounds: list[int] = []
        pages = np.arange(vmm.size // PAGE, dtype=np.uint32)
        try:
            while True:
                send_pages(sock, vmm.mem, pages)
                rounds.append(len(pages))
                pages = track.collect(running=True)
                if (len(pages) <= STOP_PAGES or len(rounds) >= MAX_ROUNDS
                        or (len(rounds) >= 2 and len(pages) >= rounds[-1])):
                    break  # converged, out of rounds, or not converging (QEMU would
                    # throttle the vCPU: auto-converge) -- stop and copy
            vmm.vm.pause()  # stop and copy: the downtime starts at this exit
            # what the last round left dirty, what was written since, and the low area
            last = np.union1d(np.union1d(pages, track.collect(running=False)),
                              np.arange(LOW_PAGES, dtype=np.uint32)).astype(np.uint32)
            send_pages(sock, vmm.mem, last)
            rounds.append(len(last))
            send_record(sock, b"STAT", vmm.state_bytes())
            done = recv_json(sock, b"DONE")
        except (OSError, LiveUpdateError) as e:  # the VM stays here and runs on
            track.stop()
            vmm.vm.resume()
            if isinstance(e, LiveUpdateError):
                raise
            raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"migration: {e}") from e
        finally:
            track.stop()
    return {"to": to, "rounds": rounds, "pages_sent": sum(rounds),
            "seconds": time.monotonic() - started, **done}
