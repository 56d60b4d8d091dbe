"""The machine process: RAM, firmware, power and jump, and the kernel processes' links.

Folder layout: ``DIR/control.sock`` and ``DIR/console.log`` are the machine's own, out of
sight of every kernel and its userspace (:mod:`liveupdate.kernel.mountns`); ``DIR/disk/``
survives everything (kernel images in ``images/``, the ``services`` list, host-armed fault
points in ``faults/``); ``DIR/run/`` is, for the kernel and its userspace, a tmpfs: everything
in it is removed at every boot, after the previous kernel is gone (its userspace still --
stopped, ended once the next kernel's live update is over, :mod:`liveupdate.machine.orphans`
-- and its bound sockets unreachable by name) and before the next one starts: no state
crosses a kexec through ``run/``, and the next services never reach the previous luod.

At a jump the machine waits for the old kernel to exit and its console to drain, reads the next
image's header *from RAM* at the entry address, and sends "go" with the boot parameters'
address to the spare kernel process (:mod:`liveupdate.machine.kernels`), started when the
kernel said it loaded a kexec image (or now, if it did not). What a kernel process says
unasked goes through one table, :data:`LINK`. The machine is the independent witness of each
jump: its status gives the host CLOCK_MONOTONIC of the old kernel's jump request, of the next
kernel's "go" and of its "booted" (``jump_request_ns``, ``kernel_start_ns``,
``kernel_booted_ns``), which a VM's reported blackout must cover (:mod:`.scenario.witness`).

The machine's state is :class:`~liveupdate.machine.state.State`, every legal transition
declared once. Control requests go through the handler table of
:mod:`liveupdate.machine.control`; the console is :mod:`liveupdate.machine.console`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

from liveupdate.abi import image, wire
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.machine import firmware, kernels
from liveupdate.machine.console import Console
from liveupdate.machine.devices import Bus
from liveupdate.machine.kernels import KernelProc, Pending, Template
from liveupdate.machine.orphans import Orphans
from liveupdate.machine.ram import Ram
from liveupdate.machine.state import STOPPED, TRANSITIONS, State

# What LUO needs to be on (every generation parses liveupdate= with kstrtobool) and the
# shmem folio policy of our images (2 MiB folios for memfds that fit them).
DEFAULT_CMDLINE = "console=ttyS0 kho=on liveupdate=on transparent_hugepage_shmem=within_size"
DEFAULT_IMAGE = "images/default.img"
LINK_RECORD = wire.SEQPACKET_BUFFER
SPARE_READY = 8.0  # seconds the next kernel's process may take to start its spares


class Machine:
    def __init__(self, folder: str) -> None:
        self.dir = os.path.abspath(folder)
        self.disk = os.path.join(self.dir, "disk")
        self.run = os.path.join(self.dir, "run")
        os.makedirs(os.path.join(self.disk, "images"), exist_ok=True)
        os.makedirs(os.path.join(self.disk, "faults"), exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        default = os.path.join(self.disk, DEFAULT_IMAGE)
        if not os.path.exists(default):
            with open(default, "wb") as f:
                f.write(image.KernelImage().encode())
        self.socket_path = os.path.join(self.dir, "control.sock")
        self.cond = threading.Condition()
        self.console = Console(os.path.join(self.dir, "console.log"), self.cond)
        self.lock = threading.RLock()
        self.state = State.OFF
        self.reason = ""
        self.ram: Ram | None = None
        self.config: dict[str, Any] = {}
        self.kernel: KernelProc | None = None
        self.spare: KernelProc | None = None
        self.templates: dict[str, Template] = {}  # by entry module; they outlive power cycles
        self.bus: Bus | None = None  # the IOMMU and PCI devices, from power on to power off
        self.orphans = Orphans(self.console)  # the previous kernel's userspace, stopped
        self.boot_count = 0
        self.last_restart = ""  # why the machine last restarted itself (e.g. a power loss)
        self.jump_times: list[float] = []  # old kernel's jump request to the next one's "go"
        # the hardware's own witness of the last jump, host CLOCK_MONOTONIC ns: the old
        # kernel's jump request arrived, the next kernel was told to go, and it said booted
        self.jump_request_ns = self.kernel_start_ns = self.kernel_booted_ns = 0
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
    def wait_console(self, pattern: str, offset: int, timeout: float) -> dict[str, Any]:
        return self.console.wait(pattern, offset, timeout, self._console_done)

    def _console_done(self) -> str | None:
        """Why the console can say nothing more (the machine stopped and its kernel's
        console drained), or None. Called with ``cond`` held."""
        kp = self.kernel
        if self.state in STOPPED and (kp is None or kp.drained.is_set()):
            return f"machine is {self.state.value}" + (f" ({self.reason})" if self.reason
                                                       else "")
        return None

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
    def _spawn(self, entry: str, cmdline: str) -> KernelProc:
        assert self.ram is not None
        # one userspace spare per service line (the machine owns the disk), none without
        spares = kernels.service_count(self.disk) if self.config.get("spares", True) else 0
        return kernels.spawn(kernels.template_for(self.templates, entry, self.console),
                             self.ram.fd, self.console, cmdline, spares)

    def close_templates(self) -> None:
        for template in self.templates.values():
            template.close()
        self.templates.clear()

    def _take_kernel(self, entry: str, cmdline: str) -> KernelProc:
        spare, self.spare = self.spare, None
        if spare is not None and spare.entry == entry and spare.cmdline == cmdline and \
                spare.proc.poll() is None:
            return spare
        if spare is not None:
            spare.discard(self.run)
        return self._spawn(entry, cmdline)

    def _start(self, entry: str, bp_phys: int) -> None:
        kernels.empty_folder(self.run)  # run/ is a tmpfs for the kernel
        kp = self._take_kernel(entry, kernels.cmdline_at(self.ram, bp_phys))
        self.kernel = kp
        self._set_state(State.BOOTING)
        self.boot_count += 1
        kp.link.send(wire.pack({"op": "go", "boot_params": bp_phys}))
        self.kernel_start_ns = time.monotonic_ns()
        threading.Thread(target=self._link_reader, args=(kp,), daemon=True).start()

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
            try:
                if self._said(kp, header, payload):
                    return  # the kernel is gone
            except Exception as e:  # a machine bug must not leave a kernel unheard
                self.console.append(f"machine: {type(e).__name__} on the link "
                                    f"({header.get('op')!r}): {e}\n".encode())
                with self.lock:
                    if self.kernel is kp and self.state not in STOPPED:
                        self._set_state(State.PANIC, f"machine: {type(e).__name__}: {e}")
                break
        with self.lock:  # the kernel process died without saying why
            if self.kernel is kp and self.state in (State.BOOTING, State.RUNNING):
                self._stopped(kp, "panic", "kernel process exited unexpectedly")
        kp.fail_pending()

    def _said(self, kp: KernelProc, header: dict[str, Any], payload: bytes) -> bool:
        """One message of a kernel; True when the kernel is gone."""
        if "req" in header and header.get("op") == "kexec_loaded":
            threading.Thread(target=self._kexec_loaded, args=(kp, header), daemon=True).start()
            return False
        if "req" in header:  # the kernel reaches its hardware
            self._hardware(kp, header)
            return False
        if "id" in header:
            pending = kp.pending.pop(int(header["id"]), None)
            if pending is not None:
                pending.answer(header, payload)
            return False
        said = LINK.get(str(header.get("op")))
        return said is not None and said(self, kp, header)

    def _hardware(self, kp: KernelProc, header: dict[str, Any]) -> None:
        bus = self.bus
        reply = bus.access(header, on_bug=lambda line: self.console.append(
            f"machine: {line}\n".encode())) if bus is not None else \
            {"errno": errno.ENODEV, "message": "the machine is off"}
        try:
            msg = wire.pack({**reply, "re": header["req"]})
        except AbiError as e:  # a request id that cannot be sent back
            msg = wire.pack({"errno": errno.EINVAL, "message": str(e), "re": None})
        with contextlib.suppress(OSError):  # a kernel gone away needs no answer
            kp.link.send(msg)

    def _booted(self, kp: KernelProc, header: dict[str, Any]) -> bool:
        kp.info = header
        self.kernel_booted_ns = time.monotonic_ns()
        self._set_state(State.RUNNING)
        return False

    def _kexec_loaded(self, kp: KernelProc, header: dict[str, Any]) -> None:
        """The kernel loaded a kexec image: start its kernel process now, prepared for the
        command line loaded with it, so the jump costs no Python start-up (only a machine
        that may jump pays for one). ``kexec_file_load`` returns when it is ready, its
        userspace spares too: before any pause. The jump checks both against RAM."""
        entry, cmdline = header.get("entry"), header.get("cmdline")
        kernel = None
        if image.is_entry(entry) and isinstance(cmdline, str):
            with self.lock:
                # BOOTING too: a service may load the next kernel before "booted" is read
                if kp is self.kernel and self.state in (State.BOOTING, State.RUNNING):
                    try:
                        kernel = self.spare = self._take_kernel(entry, cmdline)
                    except LiveUpdateError as e:  # no spare: the jump starts one, or panics
                        self.console.append(f"machine: no spare kernel for {entry}: {e}\n"
                                            .encode())
        if kernel is not None and not kernels.ready(kernel, SPARE_READY):
            self.console.append(f"machine: the next kernel was not ready in "
                                f"{SPARE_READY:g} s\n".encode())
        with contextlib.suppress(OSError):  # a kernel gone away needs no answer
            kp.link.send(wire.pack({"re": header["req"]}))

    def _jumped(self, kp: KernelProc, header: dict[str, Any]) -> bool:
        self._jump(kp, int(header["entry"]), int(header["boot_params"]))
        return True

    def _settled(self, kp: KernelProc, header: dict[str, Any]) -> bool:
        if kp is self.kernel and (n := len(self.orphans.release())):  # its update is over
            self.console.append(f"machine: settled: ended {n} kept processes of the "
                                "previous userspace\n".encode())
        return False

    def _ended(self, kp: KernelProc, header: dict[str, Any]) -> bool:
        self._stopped(kp, str(header["op"]), str(header.get("reason", "")))
        return True

    def _stopped(self, kp: KernelProc, op: str, reason: str) -> None:
        with self.lock:
            kp.finish(self.run)
            self._set_state(State.PANIC if op == "panic" else State.OFF, reason)
            if op == "restart":  # a reboot or a power loss: a cold boot on fresh RAM
                self.last_restart = reason or "restart"
                try:
                    self.power_on(self.config)
                except LiveUpdateError as e:
                    self.reason = f"restart failed: {e}"

    def _jump(self, kp: KernelProc, entry: int, bp_phys: int) -> None:
        t0 = time.monotonic()
        self.jump_request_ns = time.monotonic_ns()
        with self.lock:
            self._set_state(State.JUMPING)
            kp.finish(self.run)
            assert self.ram is not None
            try:
                img = image.decode(self.ram.read(entry, PAGE_SIZE))
            except (AbiError, LiveUpdateError) as e:
                self._set_state(State.PANIC, f"jump to {entry:#x}: {e}")
                return
            self._bury_old_userspace()
            try:
                self._start(img.entry, bp_phys)
            except LiveUpdateError as e:
                self._set_state(State.PANIC, f"jump to {img.entry}: {e}")
                return
        self.jump_times.append(time.monotonic() - t0)

    def _bury_old_userspace(self) -> None:
        ours = {kp.proc.pid for kp in (self.kernel, self.spare) if kp is not None} | \
            {t.popen.pid for t in self.templates.values()}
        self.orphans.bury(ours)

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
                self.bus = Bus(self.ram, config.get("devices", []))
            except (AbiError, LiveUpdateError):
                self.ram.close()
                self.ram = None
                raise
            self.bus.start()  # the devices run from power on to power off, across kexecs
            self.config = dict(config)
            self.reason = ""
            try:
                self._start(entry, bp)
            except LiveUpdateError:
                self.power_off()
                raise

    def power_off(self) -> None:
        with self.lock:
            self.orphans.release()
            for kp in (self.kernel, self.spare):
                if kp is not None:
                    kp.discard(self.run)
            self.kernel = self.spare = None
            if self.bus is not None:
                self.bus.stop()
                self.bus = None
            if self.ram is not None:
                self.ram.close()
                self.ram = None
            self._set_state(State.OFF)

    # -- requests to the running kernel ---------------------------------------------------
    def ask_kernel(self, header: dict[str, Any], timeout: float) -> tuple[dict[str, Any], bytes]:
        """A request to the running kernel, waited for while it boots (its services may
        answer before it says "booted"); EAGAIN when none runs or comes up in time."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.state is State.BOOTING and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
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
                "jump_request_ns": self.jump_request_ns, "kernel_start_ns": self.kernel_start_ns,
                "kernel_booted_ns": self.kernel_booted_ns,
                "console_bytes": self.console.end,
                "kernel_pid": kp.proc.pid if kp else None,
                "orphans": sorted(self.orphans.stopped),  # the previous userspace, stopped
                "spare_pid": self.spare.proc.pid if self.spare else None,
                "templates": {e: t.popen.pid for e, t in self.templates.items()},
                "devices": self.bus.status() if self.bus else None,
                "kernel": kp.info if kp else {}}

    # -- control socket (served by liveupdate.machine.control) ------------------------
    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# what a kernel process says unasked, by op; a handler returns True when the kernel is gone
LINK: dict[str, Callable[[Machine, KernelProc, dict[str, Any]], bool]] = {
    "booted": Machine._booted,
    "ready": lambda m, kp, h: False,  # a kernel started at power on: its spares are ready
    "settled": Machine._settled,
    "jump": Machine._jumped,
    "panic": Machine._ended,
    "poweroff": Machine._ended,
    "restart": Machine._ended,
}
