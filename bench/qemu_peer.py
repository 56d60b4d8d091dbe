"""QEMU 7.2 (Debian's ``qemu-system-x86``, TCG) as the peer of our blackout: a guest walking
all of its memory, paused and resumed in a new QEMU process two ways.

* ``copy``: copying save/restore through a file -- ``stop``, ``migrate exec:cat > FILE`` (every
  guest page written out), a new QEMU with ``-incoming defer`` and ``migrate-incoming
  exec:cat FILE`` (every page read back), ``cont``.
* ``inplace``: restart in place on shared RAM -- guest RAM is a ``/dev/shm`` file
  (``memory-backend-file,share=on``) and both QEMUs set the ``x-ignore-shared`` migration
  capability, so only device state goes through the file; the new QEMU maps the same RAM.
  (QEMU 7.2 cannot reopen a memfd in a new process: hence the named file.)

Blackout is the host clock from sending ``stop`` to the new QEMU's answer to ``cont``,
including the new QEMU's process start and QMP handshake. Migration bandwidth is unlimited
(QEMU's default throttle would dominate the copy). The state file lies in /dev/shm
(tmpfs: QEMU's copy is not slowed by a disk). The guest (``qemu/walker.S``, a multiboot image
assembled with GNU as) enters long mode on 2 MiB pages and adds 1 to the first qword of every
4 KiB page of its RAM, forever, counting passes at 0x500: every page is non-zero, so QEMU's
zero-page shortcut does not apply. The run checks that the pass counter continues after the
resume (the guest did not restart).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
HERE = Path(__file__).resolve().parent
GiB = 1 << 30
UNLIMITED = 1 << 50  # max-bandwidth: no throttle (QEMU's default caps the copy)
LOWMEM_SPLIT = 0xE0000000  # pc (i440fx): RAM at or above 3.5 GiB is split at 3 GiB


def unavailable() -> str | None:
    """Why the peer cannot run here, or None."""
    for tool in (QEMU, "as", "ld"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install qemu-system-x86 binutils)"
    return None


def version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[0].replace("QEMU emulator version ", "")


def build_guest(size: int, out: Path) -> Path:
    """The walker for a ``size`` guest on QEMU's pc machine (its RAM split around the PCI
    hole: below 3 GiB and from 4 GiB up when the guest has 3.5 GiB or more)."""
    low = min(size, 3 * GiB) if size >= LOWMEM_SPLIT else size
    high = size - low
    obj, binary = out / "walker.o", out / "walker.bin"
    subprocess.run(["as", "--64", "--defsym", f"LOW_END={low:#x}", "--defsym",
                    f"HIGH_START={4 * GiB:#x}", "--defsym", f"HIGH_END={4 * GiB + high:#x}",
                    "-o", str(obj), str(HERE / "qemu" / "walker.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "--oformat", "binary", "-Ttext=0x100000",
                    "-o", str(binary), str(obj)], check=True)
    return binary


class Qmp:
    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())  # the greeting
        self.call("qmp_capabilities")

    def call(self, cmd: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
                     + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "error" in r:
                raise RuntimeError(f"QMP {cmd}: {r['error']}")
            if "return" in r:
                return r["return"]

    def passes(self) -> int:
        out = self.call("human-monitor-command", **{"command-line": "xp /1gx 0x500"})
        return int(out.split(":")[1].strip(), 16)

    def wait_migration(self) -> None:
        while True:
            st = self.call("query-migrate").get("status")
            if st == "completed":
                return
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"migration {st}")
            time.sleep(0.0005)

    def close(self) -> None:
        self.sock.close()


def _qemu(size: int, guest: Path, sock: Path, shm: Path | None,
          incoming: bool) -> subprocess.Popen[bytes]:
    mem = ["-m", str(size >> 20)]
    machine = "pc,accel=tcg"
    if shm is not None:
        mem += ["-object", f"memory-backend-file,id=ram,size={size},mem-path={shm},share=on"]
        machine += ",memory-backend=ram"
    return subprocess.Popen(
        [QEMU, "-machine", machine, "-cpu", "qemu64", *mem, "-display", "none", "-nodefaults",
         "-kernel", str(guest), "-qmp", f"unix:{sock},server=on,wait=off",
         *(["-incoming", "defer"] if incoming else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def blackout(size: int, mode: str) -> float:
    """One pause and resume of a ``size`` guest in a new QEMU; seconds, stop to cont."""
    assert mode in ("copy", "inplace")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="qemu-peer-") as d:
        work = Path(d)
        guest = build_guest(size, work)
        shm = work / "ram" if mode == "inplace" else None
        state = work / "state"
        caps = [{"capability": "x-ignore-shared", "state": True}] if shm else []
        a = _qemu(size, guest, work / "a.sock", shm, False)
        b: subprocess.Popen[bytes] | None = None
        try:
            qa = Qmp(work / "a.sock")
            while qa.passes() < 2:  # every page written at least once
                time.sleep(0.05)
            if caps:
                qa.call("migrate-set-capabilities", capabilities=caps)
            qa.call("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
            t0 = time.monotonic()
            qa.call("stop")
            before = qa.passes()
            qa.call("migrate", uri=f"exec:cat > {state}")
            qa.wait_migration()
            qa.call("quit")
            qa.close()
            b = _qemu(size, guest, work / "b.sock", shm, True)
            qb = Qmp(work / "b.sock")
            if caps:
                qb.call("migrate-set-capabilities", capabilities=caps)
            qb.call("migrate-incoming", uri=f"exec:cat {state}")
            qb.wait_migration()
            qb.call("cont")
            t1 = time.monotonic()
            after = qb.passes()
            while qb.passes() == after:  # it runs on from where it was
                time.sleep(0.01)
            if after < before:
                raise RuntimeError(f"the guest restarted ({before} passes -> {after})")
            qb.call("quit")
            qb.close()
            return t1 - t0
        finally:
            for p in (a, b):
                if p is not None:
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            if shm is not None and shm.exists():
                os.unlink(shm)
