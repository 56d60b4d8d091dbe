"""The machine's control-socket client, used by ``luoctl`` and the tests.

:func:`start` runs a machine process and returns once its control socket accepts
connections (the machine reports readiness on a pipe: no polling, no sleeps).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.machine import protocol

KEXEC_TOOL = "liveupdate.userspace.kexec"
RAM_PIECE = 16 << 20  # bytes per debug-port message (a message is at most 64 MiB)


class MachineClient:
    def __init__(self, folder: str) -> None:
        self.dir = os.path.abspath(folder)
        self.path = os.path.join(self.dir, "control.sock")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise LiveUpdateError(err=errno.ECONNREFUSED,
                                      msg=f"no machine at {self.dir} ({e.strerror})") from e
            self._sock = s
        return self._sock

    def call(self, op: str, payload: bytes = b"", **args: Any) -> tuple[dict[str, Any], bytes]:
        with self._lock:
            sock = self._connect()
            try:
                protocol.send(sock, {"op": op, **args}, payload)
                msg = protocol.recv(sock)
            except OSError as e:
                self.close()
                raise LiveUpdateError(
                    err=errno.ECONNRESET, msg=f"machine connection lost: {e}") from e
            if msg is None:
                self.close()
                raise LiveUpdateError(err=errno.ECONNRESET, msg="machine closed the connection")
        reply, data = msg
        if reply.get("errno"):
            raise LiveUpdateError(err=int(reply["errno"]), msg=str(reply.get("message", "")))
        return reply, data

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- conveniences ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.call("status")[0]

    def wait(self, pattern: str, *, offset: int = 0, timeout: float = 60) -> dict[str, Any]:
        return self.call("wait", pattern=pattern, offset=offset, timeout=timeout)[0]

    def wait_state(self, *states: str, timeout: float = 60) -> dict[str, Any]:
        return self.call("wait_state", states=list(states), timeout=timeout)[0]

    def booted(self, timeout: float = 60) -> dict[str, Any]:
        """Wait for the running kernel; EIO if it panicked or powered off instead."""
        st = self.wait_state("running", "panic", "off", timeout=timeout)
        if st["state"] != "running":
            raise LiveUpdateError(err=errno.EIO, msg=f"machine is {st['state']}: {st['reason']}")
        return st

    def console(self, offset: int = 0) -> tuple[int, bytes]:
        reply, data = self.call("console", offset=offset)
        return int(reply["end"]), data

    def run(self, argv: list[str], timeout: float = 60) -> dict[str, Any]:
        return self.call("run", argv=argv, timeout=timeout)[0]

    def kexec_load(self, image: str = "images/default.img", *, cmdline: str | None = None,
                   append: str = "", finalize: bool = False, timeout: float = 60) -> str:
        """Load ``image`` (relative to the disk folder) with the kexec tool inside the
        machine (``kexec_file_load``), finalizing KHO first if ``finalize``; returns what the
        tool printed."""
        argv = [sys.executable, "-m", KEXEC_TOOL, "-l", image]
        if finalize:
            argv.append("--kho-finalize")
        if cmdline is not None:
            argv += ["--command-line", cmdline]
        if append:
            argv += ["--append", append]
        r = self.run(argv, timeout=timeout)
        if r["status"] != 0:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"kexec load failed: {r['stderr'].strip()}")
        return str(r["stdout"]).strip()

    def kexec_exec(self, timeout: float = 60) -> dict[str, Any]:
        """``reboot(LINUX_REBOOT_CMD_KEXEC)`` from inside the machine; wait for the next
        kernel and return the new status."""
        try:
            r = self.run([sys.executable, "-m", KEXEC_TOOL, "-e"], timeout=timeout)
        except LiveUpdateError as e:
            if e.errno != errno.EIO:  # EIO: the kernel went away, as it should
                raise
        else:
            raise LiveUpdateError(err=errno.EINVAL, msg=r["stderr"].strip() or "kexec -e returned")
        return self.booted(timeout)

    def kexec(self, image: str = "images/default.img", *, cmdline: str | None = None,
              append: str = "", finalize: bool = True, timeout: float = 60) -> dict[str, Any]:
        """The KHO selftest's flow: finalize KHO where the kernel has the debugfs file,
        load ``image``, execute it; returns the new kernel's status."""
        self.kexec_load(image, cmdline=cmdline, append=append, finalize=finalize,
                        timeout=timeout)
        return self.kexec_exec(timeout)

    def kho_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.call("kho_status")[0]["status"]
        return status

    def maps(self) -> list[dict[str, Any]]:
        """Each userspace process of the running kernel (host pid, argv) with the memfds it
        mapped: name, inode, size and physical extents ``[phys, bytes]`` in file order."""
        procs: list[dict[str, Any]] = self.call("maps")[0]["procs"]
        return procs

    def debugfs(self, path: str) -> bytes:
        return self.call("debugfs", path=path)[1]

    def kho_out_fdt(self) -> bytes:
        """The outgoing root FDT, read from RAM at its address (debugfs ``out/fdt`` exists
        only where Linux creates it); empty on a 6.16-6.18 kernel not yet finalized."""
        out = self.kho_status().get("out")
        if out is None:
            raise LiveUpdateError(err=errno.ENOENT, msg="KHO is disabled (kho=off)")
        if not out["root_fdt_valid"]:
            raise LiveUpdateError(err=errno.ENOENT, msg="the KHO root FDT is written only "
                                  "at finalize on this kernel (write 1 to kho/out/finalize)")
        mem = PhysMem(RemoteRam(self, int(self.status()["memory"])))
        return mem.read_fdt(int(out["root_fdt"], 16), "KHO root FDT")

    def device_wait(self, bdf: str, sent: int, timeout: float = 60) -> dict[str, Any]:
        """Wait until the NIC at ``bdf``'s source has sent ``sent`` packets; the status."""
        return self.call("device_wait", bdf=bdf, sent=sent, timeout=timeout)[0]

    def dma_log(self) -> list[tuple[int, int]]:
        """Every DMA write so far: (physical address, length), in order."""
        out: list[tuple[int, int]] = []
        while True:
            raw = self.call("dma_log", since=len(out))[1]
            if not raw:
                return out
            words = struct.unpack(f"<{len(raw) // 8}Q", raw)
            out += list(zip(words[::2], words[1::2], strict=True))

    def ram_read(self, phys: int, size: int) -> bytes:
        """Read RAM through the debug port, in pieces that fit one control message."""
        if size <= RAM_PIECE:
            return self.call("ram_read", phys=phys, size=size)[1]
        return b"".join(self.call("ram_read", phys=p, size=min(RAM_PIECE, phys + size - p))[1]
                        for p in range(phys, phys + size, RAM_PIECE))

    def ram_write(self, phys: int, data: bytes) -> None:
        """Write RAM through the debug port; the whole range is checked before any piece is
        written, so an out-of-range write changes nothing."""
        if len(data) > RAM_PIECE:
            self.call("ram_read", phys=phys + len(data) - 1, size=1)  # bounds check first
        for off in range(0, max(len(data), 1), RAM_PIECE):
            self.call("ram_write", data[off : off + RAM_PIECE], phys=phys + off)

    def power_on(self, **config: Any) -> dict[str, Any]:
        return self.call("power_on", **config)[0]

    def power_cycle(self, **config: Any) -> dict[str, Any]:
        return self.call("power_cycle", **config)[0]

    def power_off(self) -> dict[str, Any]:
        return self.call("power_off")[0]

    def shutdown(self) -> None:
        with contextlib.suppress(LiveUpdateError):  # already gone is fine
            self.call("shutdown")
        self.close()


class RemoteRam:
    """The machine's RAM as a read-only buffer, read over the control socket's debug port
    (so :class:`liveupdate.abi.physmem.PhysMem` decoders can follow pointers in it)."""

    def __init__(self, client: MachineClient, size: int) -> None:
        self.client = client
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice, /) -> bytes:
        start, stop, _ = key.indices(self.size)
        return self.client.ram_read(start, max(0, stop - start))


def start(folder: str, *, memory: int = 4 << 30, image: str = "", cmdline: str = "",
          boot: bool = True, detach: bool = False, log: str | None = None,
          devices: list[dict[str, Any]] | None = None,
          ) -> tuple[subprocess.Popen[bytes], MachineClient]:
    """Start a machine process for ``folder``; return it and a connected client.
    ``devices``: its PCI devices (:class:`liveupdate.machine.devices.Bus`)."""
    os.makedirs(folder, exist_ok=True)
    rd, wr = os.pipe()
    argv = [sys.executable, "-m", "liveupdate.machine", folder, "--memory", str(memory),
            "--ready-fd", str(wr)]
    if image:
        argv += ["--image", image]
    if cmdline:
        argv += ["--cmdline", cmdline]
    if devices:
        argv += ["--devices", json.dumps(devices)]
    if not boot:
        argv.append("--no-boot")
    out = open(log or os.devnull, "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(argv, pass_fds=(wr,), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, start_new_session=detach)
    finally:
        os.close(wr)
        out.close()
    with os.fdopen(rd, "rb") as ready:
        line = ready.readline()
    if line != b"ready\n":
        proc.wait()
        raise LiveUpdateError(err=errno.EIO, msg=f"machine failed to start (exit {proc.returncode}"
                              + (f", see {log}" if log else "") + ")")
    return proc, MachineClient(folder)
