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
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi import image, wire
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.machine import firmware, protocol
from liveupdate.machine.ram import Ram

DEFAULT_CMDLINE = "console=ttyS0 kho=on"
DEFAULT_IMAGE = "images/default.img"
LINK_RECORD = 1 << 20
CONSOLE_KEEP = 32 << 20  # bytes of console kept in memory for wait/console requests


@dataclass
class KernelProc:
    popen: subprocess.Popen[bytes]
    link: socket.socket
    console: int  # read end of its console pipe
    entry: str
    drained: threading.Event = field(default_factory=threading.Event)
    info: dict[str, Any] = field(default_factory=dict)
    # requests sent to this kernel, by id: failed when it goes, never another kernel's
    pending: dict[int, tuple[threading.Event, list[Any]]] = field(default_factory=dict)


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
        self.state = "off"
        self.reason = ""
        self.ram: Ram | None = None
        self.config: dict[str, Any] = {}
        self.kernel: KernelProc | None = None
        self.spare: KernelProc | None = None
        self.boot_count = 0
        self.jump_times: list[float] = []  # old kernel's jump request to the next one's "go"
        self.next_id = 1
        self.server: socketserver.ThreadingUnixStreamServer | None = None

    def _set_state(self, state: str, reason: str | None = None) -> None:
        with self.cond:
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

    def wait_console(self, pattern: str, offset: int, timeout: float) -> dict[str, Any]:
        try:
            rx = re.compile(pattern.encode())
        except re.error as e:
            raise LiveUpdateError(errno.EINVAL, f"bad pattern: {e}") from e
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.console, max(0, offset - self.console_base))
                if m:
                    line_start = self.console.rfind(b"\n", 0, m.start()) + 1
                    line_end = self.console.find(b"\n", m.end())
                    line = self.console[line_start : line_end if line_end >= 0 else None]
                    base = self.console_base
                    return {"start": base + m.start(), "end": base + m.end(),
                            "line": line.decode(errors="replace")}
                kp = self.kernel
                if self.state in ("panic", "off") and (kp is None or kp.drained.is_set()):
                    raise LiveUpdateError(errno.EIO, f"machine is {self.state}"
                                          + (f" ({self.reason})" if self.reason else "")
                                          + f" and the console never matched {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LiveUpdateError(errno.ETIMEDOUT,
                                          f"console did not match {pattern!r} in {timeout}s")
                self.cond.wait(left)

    def wait_state(self, states: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.state not in states:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LiveUpdateError(errno.ETIMEDOUT, f"machine stayed {self.state}, "
                                          f"not {'/'.join(states)}, for {timeout}s")
                self.cond.wait(left)
        return self.status()

    # -- kernel processes -----------------------------------------------------------------
    def _spawn(self, entry: str) -> KernelProc:
        assert self.ram is not None
        mside, kside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
        if kp.popen.poll() is None:
            kp.popen.kill()
        self._finish(kp)

    def _start(self, entry: str, bp_phys: int) -> None:
        kp = self._take_kernel(entry)
        self.kernel = kp
        self._set_state("booting")
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
                slot = kp.pending.pop(int(header["id"]), None)
                if slot is not None:
                    slot[1].extend([header, payload])
                    slot[0].set()
                continue
            op = header.get("op")
            if op == "booted":
                kp.info = header
                self._set_state("running")
            elif op == "jump":
                self._jump(kp, int(header["entry"]), int(header["boot_params"]))
                return
            elif op in ("panic", "poweroff", "restart"):
                self._stopped(kp, op, str(header.get("reason", "")))
                return
        with self.lock:  # the kernel process died without saying why
            if self.kernel is kp and self.state in ("booting", "running"):
                self._stopped(kp, "panic", "kernel process exited unexpectedly")
        self._fail_pending(kp)

    def _fail_pending(self, kp: KernelProc) -> None:
        for key in list(kp.pending):
            slot = kp.pending.pop(key, None)
            if slot is not None:
                slot[1].extend([{"errno": errno.EIO, "message": "the kernel went away"}, b""])
                slot[0].set()

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
            self._set_state("panic" if op == "panic" else "off", reason)
            if op == "restart":
                self.power_on(self.config)

    def _jump(self, kp: KernelProc, entry: int, bp_phys: int) -> None:
        t0 = time.monotonic()
        with self.lock:
            self._set_state("jumping")
            self._finish(kp)
            assert self.ram is not None
            try:
                img = image.decode(self.ram.read(entry, PAGE_SIZE))
            except (AbiError, LiveUpdateError) as e:
                self._set_state("panic", f"jump to {entry:#x}: {e}")
                return
            self._start(img.entry, bp_phys)
        self.jump_times.append(time.monotonic() - t0)

    # -- power ----------------------------------------------------------------------------
    def power_on(self, config: dict[str, Any]) -> None:
        with self.lock:
            if self.state != "off" and self.state != "panic":
                raise LiveUpdateError(errno.EBUSY, f"machine is {self.state}")
            self.power_off()
            memory = int(config.get("memory", 4 << 30))
            img_path = os.path.join(self.disk, str(config.get("image") or DEFAULT_IMAGE))
            try:
                with open(img_path, "rb") as f:
                    raw = f.read(PAGE_SIZE)
            except OSError as e:
                raise LiveUpdateError(errno.ENOENT, f"image {img_path}: {e.strerror}") from e
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
            self._set_state("off")

    # -- requests to the running kernel ---------------------------------------------------
    def ask_kernel(self, header: dict[str, Any], timeout: float) -> tuple[dict[str, Any], bytes]:
        with self.lock:
            kp = self.kernel
            if kp is None or self.state != "running":
                raise LiveUpdateError(errno.EAGAIN, f"no running kernel (machine is "
                                      f"{self.state})")
            rid = self.next_id
            self.next_id += 1
            slot: tuple[threading.Event, list[Any]] = (threading.Event(), [])
            kp.pending[rid] = slot
            kp.link.send(wire.pack({**header, "id": rid}))
        if not slot[0].wait(timeout):
            kp.pending.pop(rid, None)
            raise LiveUpdateError(errno.ETIMEDOUT, f"kernel did not answer {header['op']}")
        reply, payload = slot[1]
        if reply.get("errno"):
            raise LiveUpdateError(int(reply["errno"]), str(reply.get("message", "")))
        return reply, payload

    def status(self) -> dict[str, Any]:
        kp = self.kernel
        return {"state": self.state, "reason": self.reason, "dir": self.dir,
                "machine_pid": os.getpid(),
                "memory": self.ram.size if self.ram else 0,
                "ram_resident": self.ram.resident() if self.ram else 0,
                "boot_count": self.boot_count,
                "last_jump_seconds": self.jump_times[-1] if self.jump_times else None,
                "console_bytes": self.console_base + len(self.console),
                "kernel_pid": kp.popen.pid if kp else None,
                "spare_pid": self.spare.popen.pid if self.spare else None,
                "kernel": kp.info if kp else {}}

    # -- control socket -------------------------------------------------------------------
    def handle(self, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        op = h.get("op")
        if op == "status":
            return self.status(), b""
        if op == "power_on":
            self.power_on(h)
            return self.status(), b""
        if op == "power_off":
            self.power_off()
            return self.status(), b""
        if op == "power_cycle":
            config = {**self.config, **{k: v for k, v in h.items() if k != "op"}}
            self.power_off()
            self.power_on(config)
            return self.status(), b""
        if op == "console":
            off = int(h.get("offset", 0))
            with self.cond:
                end = self.console_base + len(self.console)
                if off < self.console_base:
                    raise LiveUpdateError(errno.ERANGE, f"console before byte "
                                          f"{self.console_base} is only in {self.console_path}")
                return {"end": end}, bytes(self.console[off - self.console_base :])
        if op == "wait":
            return self.wait_console(str(h["pattern"]), int(h.get("offset", 0)),
                                     float(h.get("timeout", 60))), b""
        if op == "wait_state":
            return self.wait_state(list(h["states"]), float(h.get("timeout", 60))), b""
        if op in ("run", "kho_status", "debugfs"):
            return self.ask_kernel(h, float(h.get("timeout", 60)) + 5)
        if op == "ram_read":
            if self.ram is None:
                raise LiveUpdateError(errno.EAGAIN, "machine is off")
            return {}, self.ram.read(int(h["phys"]), int(h["size"]))
        if op == "ram_write":
            if self.ram is None:
                raise LiveUpdateError(errno.EAGAIN, "machine is off")
            self.ram.write(int(h["phys"]), payload)
            return {}, b""
        if op == "shutdown":
            self.power_off()
            threading.Thread(target=self.stop, daemon=True).start()
            return {}, b""
        raise LiveUpdateError(errno.ENOSYS, f"unknown machine operation {op!r}")

    def serve(self, ready_fd: int | None = None) -> None:
        machine = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while True:
                    try:
                        msg = protocol.recv(self.request)
                    except (OSError, LiveUpdateError, AbiError):
                        return
                    if msg is None:
                        return
                    try:
                        reply, data = machine.handle(*msg)
                        reply = {**reply, "errno": 0}
                    except LiveUpdateError as e:
                        reply, data = {"errno": e.errno, "message": e.message}, b""
                    except (KeyError, ValueError, TypeError) as e:
                        reply, data = {"errno": errno.EINVAL, "message": f"bad request: {e}"}, b""
                    try:
                        protocol.send(self.request, reply, data)
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
