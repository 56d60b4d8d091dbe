"""The machine process: RAM, firmware, console, power and jump, and the control socket.

Folder layout: ``DIR/disk/`` survives everything (kernel images in ``images/``, the
``services`` list); ``DIR/run/`` holds the control socket, ``console.log`` and each kernel's
runtime folder, which the machine removes when that kernel is gone.

Each boot runs one kernel process, started with the RAM fd, one end of a SOCK_SEQPACKET link
and a pipe for its console, in an empty environment. A spare kernel process is started ahead
of time with its code imported, waiting for "go" -- a loaded kexec image already sits in
memory -- so a jump costs no Python start-up. At a jump the machine waits for the old kernel to
exit and its console to drain, reads the next image's header *from RAM* at the entry address,
and sends "go" with the boot parameters' address; the old kernel says nothing else.

The machine's state is :class:`State`, with every legal transition declared once in
:data:`TRANSITIONS` (qemu.qmp's ``Runstate`` is the model). Control requests go through one
handler table and :func:`liveupdate.abi.wire.dispatch`. The RAM debug port (``ram_read``,
``ram_write``) answers host-side tools only: a peer (SO_PEERCRED) that descends from this
machine process -- a kernel process or any of its userspace -- gets EPERM.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi import image, wire
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.wire import Message, arg
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.machine import firmware, protocol
from liveupdate.machine.ram import Ram
from liveupdate.procs import children_of

# What LUO needs to be on (every generation parses liveupdate= with kstrtobool) and the
# shmem folio policy of our images (2 MiB folios for memfds that fit them).
DEFAULT_CMDLINE = "console=ttyS0 kho=on liveupdate=on transparent_hugepage_shmem=within_size"
DEFAULT_IMAGE = "images/default.img"
LINK_RECORD = wire.SEQPACKET_BUFFER
# the console's newest bytes kept in memory for waits; all of it is in run/console.log, read
# from there for older offsets (so the machine's memory does not grow with every boot's log)
CONSOLE_KEEP = 64 << 10
POWER_OFF_GRACE = 5.0  # bytes of console kept in memory for wait/console requests


class State(enum.Enum):
    OFF = "off"
    BOOTING = "booting"
    RUNNING = "running"
    JUMPING = "jumping"
    PANIC = "panic"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.OFF: frozenset({State.OFF, State.BOOTING}),
    State.BOOTING: frozenset({State.RUNNING, State.PANIC, State.OFF}),
    State.RUNNING: frozenset({State.JUMPING, State.PANIC, State.OFF}),
    State.JUMPING: frozenset({State.BOOTING, State.PANIC, State.OFF}),
    State.PANIC: frozenset({State.OFF}),
}
STOPPED = frozenset({State.OFF, State.PANIC})


def parse_states(names: object) -> list[State]:
    if not isinstance(names, list) or not names:
        raise LiveUpdateError(err=errno.EINVAL, msg="states must be a non-empty list")
    try:
        return [State(n) for n in names]
    except ValueError as e:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"unknown machine state: {e}") from e


@dataclass
class Pending:
    """A request sent to one kernel process, waiting for its reply."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def answer(self, reply: dict[str, Any], payload: bytes = b"") -> None:
        self.reply, self.payload = reply, payload
        self.done.set()


@dataclass
class KernelProc:
    popen: subprocess.Popen[bytes]
    link: socket.socket
    console: int  # read end of its console pipe
    entry: str
    drained: threading.Event = field(default_factory=threading.Event)
    info: dict[str, Any] = field(default_factory=dict)
    # requests sent to this kernel, by id: failed when it goes, never another kernel's
    pending: dict[int, Pending] = field(default_factory=dict)


class Machine:
    def __init__(self, folder: str) -> None:
        self.dir = os.path.abspath(folder)
        self.disk = os.path.join(self.dir, "disk")
        self.run = os.path.join(self.dir, "run")
        os.makedirs(os.path.join(self.disk, "images"), exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        default = os.path.join(self.disk, DEFAULT_IMAGE)
        if not os.path.exists(default):
            with open(default, "wb") as f:
                f.write(image.KernelImage().encode())
        self.socket_path = os.path.join(self.run, "control.sock")
        self.console_path = os.path.join(self.run, "console.log")
        self.console = bytearray()  # the newest part of the console; all of it is in the file
        self.console_base = 0  # absolute offset of self.console[0]
        self.console_file = open(self.console_path, "wb")  # noqa: SIM115 - lives with the machine
        self.cond = threading.Condition()
        self.lock = threading.RLock()
        self.state = State.OFF
        self.reason = ""
        self.ram: Ram | None = None
        self.config: dict[str, Any] = {}
        self.kernel: KernelProc | None = None
        self.spare: KernelProc | None = None
        self.boot_count = 0
        self.last_restart = ""  # why the machine last restarted itself (e.g. a power loss)
        self.jump_times: list[float] = []  # old kernel's jump request to the next one's "go"
        self.next_id = 1
        self.server: socketserver.ThreadingUnixStreamServer | None = None

    def _set_state(self, state: State, reason: str | None = None) -> None:
        with self.cond:
            if state not in TRANSITIONS[self.state]:
                raise RuntimeError(f"machine: no transition {self.state.value} -> {state.value}")
            self.state = state
            if reason is not None:
                self.reason = reason
            self.cond.notify_all()

    # -- console --------------------------------------------------------------------------
    def _append_console(self, data: bytes) -> None:
        with self.cond:
            self.console += data
            if len(self.console) > CONSOLE_KEEP:
                drop = len(self.console) - CONSOLE_KEEP // 2
                del self.console[:drop]
                self.console_base += drop
            self.console_file.write(data)
            self.console_file.flush()
            self.cond.notify_all()

    def _console_reader(self, kp: KernelProc) -> None:
        while True:
            data = os.read(kp.console, 65536)
            if not data:
                break
            self._append_console(data)
        os.close(kp.console)
        with self.cond:
            kp.drained.set()
            self.cond.notify_all()

    def console_from(self, offset: int) -> tuple[int, bytes]:
        """(base, bytes): the console from ``offset`` (clamped to 0) to now; the part older
        than the in-memory tail comes from the console file. Call with ``cond`` held."""
        offset = max(0, offset)
        if offset >= self.console_base:
            return offset, bytes(self.console[offset - self.console_base :])
        with open(self.console_path, "rb") as f:
            f.seek(offset)
            old = f.read(self.console_base - offset)
        return offset, old + bytes(self.console)

    def wait_console(self, pattern: str, offset: int, timeout: float) -> dict[str, Any]:
        try:
            rx = re.compile(pattern.encode())
        except re.error as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"bad pattern: {e}") from e
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                base, text = self.console_from(offset)
                m = rx.search(text)
                if m:
                    line_start = text.rfind(b"\n", 0, m.start()) + 1
                    line_end = text.find(b"\n", m.end())
                    line = text[line_start : line_end if line_end >= 0 else None]
                    return {"start": base + m.start(), "end": base + m.end(),
                            "line": line.decode(errors="replace")}
                kp = self.kernel
                if self.state in STOPPED and (kp is None or kp.drained.is_set()):
                    raise LiveUpdateError(err=errno.EIO, msg=f"machine is {self.state.value}"
                                          + (f" ({self.reason})" if self.reason else "")
                                          + f" and the console never matched {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LiveUpdateError(err=errno.ETIMEDOUT,
                                          msg=f"console did not match {pattern!r} in {timeout}s")
                self.cond.wait(left)

    def wait_state(self, states: list[State], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.state not in states:
                left = deadline - time.monotonic()
                if left <= 0:
                    names = "/".join(s.value for s in states)
                    raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"machine stayed "
                                          f"{self.state.value}, not {names}, for {timeout}s")
                self.cond.wait(left)
        return self.status()

    # -- kernel processes -----------------------------------------------------------------
    def _spawn(self, entry: str) -> KernelProc:
        assert self.ram is not None
        mside, kside = wire.seqpacket_pair()
        rd, wr = os.pipe()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-u", "-m", entry, "--ram-fd", str(self.ram.fd),
                 "--link-fd", str(kside.fileno())],
                pass_fds=(self.ram.fd, kside.fileno()), stdin=subprocess.DEVNULL,
                stdout=wr, stderr=wr, env={}, cwd="/", close_fds=True)
        finally:
            os.close(wr)
            kside.close()
        kp = KernelProc(popen, mside, rd, entry)
        threading.Thread(target=self._console_reader, args=(kp,), daemon=True).start()
        return kp

    def _take_kernel(self, entry: str) -> KernelProc:
        spare, self.spare = self.spare, None
        if spare is not None and spare.entry == entry and spare.popen.poll() is None:
            return spare
        if spare is not None:
            self._discard(spare)
        return self._spawn(entry)

    def _discard(self, kp: KernelProc) -> None:
        """Power is cut: the kernel sees its link close and ends its userspace (daemons
        included, which would otherwise outlive it holding the console); SIGKILL if it
        does not go within :data:`POWER_OFF_GRACE` seconds."""
        if kp.popen.poll() is None:
            with contextlib.suppress(OSError):
                kp.link.shutdown(socket.SHUT_RDWR)
            try:
                kp.popen.wait(POWER_OFF_GRACE)
            except subprocess.TimeoutExpired:
                kp.popen.kill()
        self._finish(kp)

    def _start(self, entry: str, bp_phys: int) -> None:
        kp = self._take_kernel(entry)
        self.kernel = kp
        self._set_state(State.BOOTING)
        self.boot_count += 1
        kp.link.send(wire.pack({"op": "go", "boot_params": bp_phys}))
        threading.Thread(target=self._link_reader, args=(kp,), daemon=True).start()
        self.spare = self._spawn(entry)

    def _link_reader(self, kp: KernelProc) -> None:
        while True:
            try:
                msg = kp.link.recv(LINK_RECORD)
            except OSError:
                msg = b""
            if not msg:
                break
            try:
                header, payload = wire.unpack(msg)
            except AbiError:
                continue
            if "id" in header:
                pending = kp.pending.pop(int(header["id"]), None)
                if pending is not None:
                    pending.answer(header, payload)
                continue
            op = header.get("op")
            if op == "booted":
                kp.info = header
                self._set_state(State.RUNNING)
            elif op == "jump":
                self._jump(kp, int(header["entry"]), int(header["boot_params"]))
                return
            elif op in ("panic", "poweroff", "restart"):
                self._stopped(kp, op, str(header.get("reason", "")))
                return
        with self.lock:  # the kernel process died without saying why
            if self.kernel is kp and self.state in (State.BOOTING, State.RUNNING):
                self._stopped(kp, "panic", "kernel process exited unexpectedly")
        self._fail_pending(kp)

    def _fail_pending(self, kp: KernelProc) -> None:
        for key in list(kp.pending):
            pending = kp.pending.pop(key, None)
            if pending is not None:
                pending.answer({"errno": errno.EIO, "message": "the kernel went away"})

    def _finish(self, kp: KernelProc) -> None:
        kp.popen.wait()
        kp.link.close()
        kp.drained.wait(10)
        run_dir = kp.info.get("run_dir")
        if run_dir and os.path.dirname(run_dir) == self.run:
            shutil.rmtree(run_dir, ignore_errors=True)
        self._fail_pending(kp)

    def _stopped(self, kp: KernelProc, op: str, reason: str) -> None:
        with self.lock:
            self._finish(kp)
            self._set_state(State.PANIC if op == "panic" else State.OFF, reason)
            if op == "restart":  # a reboot or a power loss: a cold boot on fresh RAM
                self.last_restart = reason or "restart"
                self.power_on(self.config)

    def _jump(self, kp: KernelProc, entry: int, bp_phys: int) -> None:
        t0 = time.monotonic()
        with self.lock:
            self._set_state(State.JUMPING)
            self._finish(kp)
            assert self.ram is not None
            try:
                img = image.decode(self.ram.read(entry, PAGE_SIZE))
            except (AbiError, LiveUpdateError) as e:
                self._set_state(State.PANIC, f"jump to {entry:#x}: {e}")
                return
            self._start(img.entry, bp_phys)
        self.jump_times.append(time.monotonic() - t0)
        self._reap_orphans()

    def _reap_orphans(self) -> None:
        """The old kernel SIGKILLed its userspace without waiting for the host to tear it
        down; those processes are re-parented here (subreaper). Reap them in the background."""
        ours = {kp.popen.pid for kp in (self.kernel, self.spare) if kp is not None}
        orphans = [p for p in children_of(os.getpid()) if p not in ours]

        def reap() -> None:
            for pid in orphans:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        if orphans:
            threading.Thread(target=reap, daemon=True).start()

    # -- power ----------------------------------------------------------------------------
    def power_on(self, config: dict[str, Any]) -> None:
        with self.lock:
            if self.state not in STOPPED:
                raise LiveUpdateError(err=errno.EBUSY, msg=f"machine is {self.state.value}")
            memory = config.get("memory", 4 << 30)
            if not isinstance(memory, int) or isinstance(memory, bool):
                raise LiveUpdateError(err=errno.EINVAL, msg="memory must be a number of bytes")
            self.power_off()
            img_path = os.path.join(self.disk, str(config.get("image") or DEFAULT_IMAGE))
            try:
                with open(img_path, "rb") as f:
                    raw = f.read(PAGE_SIZE)
            except OSError as e:
                raise LiveUpdateError(
                    err=errno.ENOENT, msg=f"image {img_path}: {e.strerror}") from e
            cmdline = str(config.get("cmdline") or DEFAULT_CMDLINE)
            cmdline += f" lu.disk={self.disk} lu.run={self.run}"
            self.ram = Ram(memory)
            try:
                bp = firmware.cold_boot(self.ram, raw, cmdline)
                entry = image.decode(raw).entry
            except (AbiError, LiveUpdateError):
                self.ram.close()
                self.ram = None
                raise
            self.config = dict(config)
            self.reason = ""
            self._start(entry, bp)

    def power_off(self) -> None:
        with self.lock:
            for kp in (self.kernel, self.spare):
                if kp is not None:
                    self._discard(kp)
            self.kernel = self.spare = None
            if self.ram is not None:
                self.ram.close()
                self.ram = None
            self._set_state(State.OFF)

    # -- requests to the running kernel ---------------------------------------------------
    def ask_kernel(self, header: dict[str, Any], timeout: float) -> tuple[dict[str, Any], bytes]:
        with self.lock:
            kp = self.kernel
            if kp is None or self.state is not State.RUNNING:
                raise LiveUpdateError(err=errno.EAGAIN, msg=f"no running kernel (machine is "
                                      f"{self.state.value})")
            rid = self.next_id
            self.next_id += 1
            pending = Pending()
            kp.pending[rid] = pending
            kp.link.send(wire.pack({**header, "id": rid}))
        if not pending.done.wait(timeout):
            kp.pending.pop(rid, None)
            raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"kernel did not answer {header['op']}")
        if pending.reply.get("errno"):
            raise LiveUpdateError(err=int(pending.reply["errno"]),
                                  msg=str(pending.reply.get("message", "")))
        return pending.reply, pending.payload

    def status(self) -> dict[str, Any]:
        kp = self.kernel
        return {"state": self.state.value, "reason": self.reason, "dir": self.dir,
                "machine_pid": os.getpid(),
                "memory": self.ram.size if self.ram else 0,
                "ram_resident": self.ram.resident() if self.ram else 0,
                "boot_count": self.boot_count, "last_restart": self.last_restart,
                "last_jump_seconds": self.jump_times[-1] if self.jump_times else None,
                "console_bytes": self.console_base + len(self.console),
                "kernel_pid": kp.popen.pid if kp else None,
                "spare_pid": self.spare.popen.pid if self.spare else None,
                "kernel": kp.info if kp else {}}

    # -- control socket -------------------------------------------------------------------
    def is_guest(self, pid: int) -> bool:
        """Whether ``pid`` descends from this machine process: one of its kernels or their
        userspace (kernels are subreapers, so daemons stay below them)."""
        me = os.getpid()
        for _ in range(4096):  # a parent chain is finite; bounded anyway
            if pid == me:
                return True
            if pid <= 1:
                return False
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                return False
            pid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        return False

    def serve(self, ready_fd: int | None = None) -> None:
        machine = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                struct.calcsize("3i"))
                peer = Peer(machine, machine.is_guest(struct.unpack("3i", creds)[0]))
                while True:
                    try:
                        msg = protocol.recv(self.request)
                    except (OSError, LiveUpdateError, AbiError):
                        return
                    if msg is None:
                        return
                    reply = wire.dispatch(CONTROL, peer, Message(*msg), server="machine",
                                          on_bug=_log_bug)
                    try:
                        protocol.send(self.request, reply.header, reply.payload)
                    except OSError:
                        return

        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self.server = socketserver.ThreadingUnixStreamServer(self.socket_path, Handler)
        self.server.daemon_threads = True
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        self.server.serve_forever()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# -- the control socket's operations -----------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """One control connection: the machine, and whether the peer is its own guest."""

    machine: Machine
    guest: bool


def _log_bug(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ram(peer: Peer) -> Ram:
    if peer.guest:
        raise LiveUpdateError(
            err=errno.EPERM, msg="the RAM debug port answers host-side tools only, "
            "not the machine's own kernels or their userspace")
    if peer.machine.ram is None:
        raise LiveUpdateError(err=errno.EAGAIN, msg="machine is off")
    return peer.machine.ram


def _status(p: Peer, m: Message) -> Message:
    return Message(p.machine.status())


def _power_on(p: Peer, m: Message) -> Message:
    p.machine.power_on(m.header)
    return Message(p.machine.status())


def _power_off(p: Peer, m: Message) -> Message:
    p.machine.power_off()
    return Message(p.machine.status())


def _power_cycle(p: Peer, m: Message) -> Message:
    config = {**p.machine.config, **{k: v for k, v in m.header.items() if k != "op"}}
    p.machine.power_off()
    p.machine.power_on(config)
    return Message(p.machine.status())


def _console(p: Peer, m: Message) -> Message:
    mc, off = p.machine, arg(m, "offset", int, 0)
    with mc.cond:
        end = mc.console_base + len(mc.console)
        _, text = mc.console_from(off)
        return Message({"end": end}, text)


def _wait(p: Peer, m: Message) -> Message:
    return Message(p.machine.wait_console(arg(m, "pattern", str), arg(m, "offset", int, 0),
                                          arg(m, "timeout", float, 60.0)))


def _wait_state(p: Peer, m: Message) -> Message:
    return Message(p.machine.wait_state(parse_states(m.header.get("states")),
                                        arg(m, "timeout", float, 60.0)))


def _to_kernel(p: Peer, m: Message) -> Message:
    return Message(*p.machine.ask_kernel(m.header, arg(m, "timeout", float, 60.0) + 5))


def _ram_read(p: Peer, m: Message) -> Message:
    return Message({}, _ram(p).read(arg(m, "phys", int), arg(m, "size", int)))


def _ram_write(p: Peer, m: Message) -> Message:
    _ram(p).write(arg(m, "phys", int), m.payload)
    return Message({})


def _shutdown(p: Peer, m: Message) -> Message:
    p.machine.power_off()
    threading.Thread(target=p.machine.stop, daemon=True).start()
    return Message({})


CONTROL: dict[str, wire.Handler[Peer]] = {
    "status": _status,
    "power_on": _power_on,
    "power_off": _power_off,
    "power_cycle": _power_cycle,
    "console": _console,
    "wait": _wait,
    "wait_state": _wait_state,
    "run": _to_kernel,
    "kho_status": _to_kernel,
    "debugfs": _to_kernel,
    "ram_read": _ram_read,
    "ram_write": _ram_write,
    "shutdown": _shutdown,
}
