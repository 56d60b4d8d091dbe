"""The real kernel as the demo's host (:class:`liveupdate.scenario.host.Host`), seen from
inside the QEMU guest: the harness's stage script plays init and controller.

The services are those the emulated machine's init starts from its service list
(:func:`liveupdate.scenario.demo._services`): luod (on its default socket
``/run/luod/luod.sock``: virtme-ng mounts a fresh tmpfs on ``/run`` at every boot, as a
distribution does), one VMM (``--accel tcg``: unicorn inside the QEMU guest) and the
key-value cache, each with its output in ``<service>.stage<N>.log``; :meth:`Services.start`
restarts one that a fault killed, as init's ``@restart`` does.

The checker: the emulated demo's reads guest memory from the machine's RAM by physical
extent; a real kernel gives userspace no such view (no ``/dev/mem`` here), so it opens the
VMM's guest-memory and state memfds itself through ``/proc/<pid>/fd/<n>`` (the VMM's
``where`` names the fds), maps them read-only and runs the same judgement
(:func:`liveupdate.scenario.guestcheck.judge`).

Zero copy, on the real kernel: :func:`memfd_pfns` maps the VMM's guest memfd (privately,
read-only in effect: reads map the file's own pages), touches every page and reads the
page frame numbers from ``/proc/self/pagemap`` (as root: an unprivileged reader sees
zeros). The same list before and after the kexec is the proof: ``memfd_luo`` handed the
next kernel the same folios (``memfd_luo_retrieve_folios`` re-inserts the preserved folios
into the new file's page cache; nothing is copied).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints
from liveupdate.ipc.service import ask
from liveupdate.scenario import guestcheck
from liveupdate.scenario.host import CACHE, LUOD, Say, vmm_sock
from liveupdate.vmm.vmm import STATE_SIZE
from liveupdate.vmm.where import where as vmm_where

VM, VM_MEMORY, CACHE_NAME = "vm0", 32 << 20, "cache"
CACHE_KEYS = 64
PAGE = 4096
PFN_MASK, PRESENT = (1 << 55) - 1, 1 << 63  # a /proc/PID/pagemap entry


def service_argv(py: str) -> dict[str, list[str]]:
    return {"luod": [py, "-m", "liveupdate.cli.luod", "--finish-timeout", "120",
                     "--prepare-timeout", "60", "--freeze-timeout", "60"],
            "vmm": [py, "-m", "liveupdate.vmm", VM, "--memory", f"{VM_MEMORY >> 20}M",
                    "--accel", "tcg"],
            "kvcache": [py, "-m", "liveupdate.userspace.kvcache", CACHE_NAME]}


def cmdline() -> str:
    with open("/proc/cmdline") as f:
        return f.read().strip()


class Services:
    """The services of one kernel, started as init starts them."""

    def __init__(self, out: Path, stage: int, log: Say) -> None:
        self.out, self.stage, self.log = out, stage, log
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: dict[str, int] = {}

    def start(self, name: str, argv: list[str] | None = None) -> None:
        argv = argv or service_argv(sys.executable)[name]
        n = self.started[name] = self.started.get(name, 0) + 1
        log = f"{name}.stage{self.stage}" + (f".{n}" if n > 1 else "") + ".log"
        with open(self.out / log, "wb") as f:
            self.procs[name] = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        self.log(f"started {name} (pid {self.procs[name].pid})")

    def wait_answer(self, name: str, sock: str, op: str, timeout: float = 300.0
                    ) -> dict[str, Any]:
        """The service's first answer on its control socket (it binds before it says so)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise LiveUpdateError(err=errno.ESRCH, msg=f"{name} exited {proc.returncode}"
                                      f" (see {name}.stage{self.stage}.log)")
            try:
                return ask(sock, op)
            except LiveUpdateError as e:
                if time.monotonic() > deadline or e.errno not in (
                        errno.ENOENT, errno.ECONNREFUSED):
                    raise
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


@contextlib.contextmanager
def their_file(pid: int, fd: int, size: int, private: bool = False) -> Iterator[mmap.mmap]:
    """Another process's memfd, opened through procfs and mapped (no copy): read-only and
    shared, or ``private`` (copy-on-write, never written: a read maps the file's page)."""
    own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        m = mmap.mmap(own, size, mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
                      mmap.PROT_READ | (mmap.PROT_WRITE if private else 0))
    finally:
        os.close(own)
    try:
        yield m
    finally:
        m.close()


@contextlib.contextmanager
def _view(pid: int, fd: int, size: int) -> Iterator[memoryview]:
    with their_file(pid, fd, size) as m:
        view = memoryview(m)
        try:
            yield view
        finally:
            view.release()


def memfd_pfns(pid: int, fd: int, size: int) -> list[int]:
    """The page frame number of every page of ``pid``'s memfd ``fd`` (see the module doc);
    0 for a page the pagemap shows absent."""
    with their_file(pid, fd, size, private=True) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            address = ctypes.addressof(anchor)
            for off in range(0, size, PAGE):  # a read fault maps the file's page
                m[off]
            with open("/proc/self/pagemap", "rb") as pm:
                pm.seek(address // PAGE * 8)
                raw = pm.read(size // PAGE * 8)
        finally:
            del anchor
    return [e & PFN_MASK if e & PRESENT else 0
            for (e,) in struct.iter_unpack("<Q", raw)]


class RealHost:
    """:class:`liveupdate.scenario.host.Host` on the real kernel this process runs on."""

    kind = "real"

    def __init__(self, svc: Services, pfns_before: list[int] | None = None) -> None:
        self.svc = svc
        self.vms, self.vm_memory, self.cache_keys = [VM], VM_MEMORY, CACHE_KEYS
        self.pfns_before = pfns_before
        self.pfns_after: list[int] | None = None

    def sock(self, name: str) -> str:
        if name == LUOD:
            return endpoints.socket_path(cmdline())
        return endpoints.service_socket(cmdline(), name.removesuffix(".sock"))

    def start(self) -> None:
        """Start luod, the VMM and the cache, as init does, and wait until they answer."""
        from liveupdate.client.update import reconnect

        self.svc.start("luod")
        reconnect(self.sock(LUOD), 300.0).close()
        self.svc.start("vmm")
        self.svc.start("kvcache")
        self.svc.wait_answer("vmm", self.sock(vmm_sock(VM)), "status")
        self.svc.wait_answer("kvcache", self.sock(CACHE), "stats")
        self.svc.log("luod, the VMM and the cache answer")

    def kexec(self, say: Say) -> None:
        """``luoctl update``, as an administrator's shell runs it: on success it ends with
        this kernel (and so does this process); it returns only when refused."""
        luoctl = str(Path(sys.executable).parent / "luoctl")
        os.sync()
        out = self.svc.out / f"luoctl.stage{self.svc.stage}.out"
        with open(out, "wb") as f:
            p = subprocess.run([luoctl, "update"], stdout=f, stderr=subprocess.STDOUT,
                               check=False)
        said = out.read_text(errors="replace").strip().splitlines() or [""]
        why = next((w for w in said if w.startswith("luoctl: error: ")), said[-1])
        raise LiveUpdateError(err=errno.ECANCELED, msg=f"luoctl update exited "
                              f"{p.returncode}: {why.removeprefix('luoctl: error: ')}")

    def where(self, vm: str) -> tuple[int, dict[str, Any]]:
        sock = self.sock(vmm_sock(vm))
        return int(ask(sock, "status")["pid"]), vmm_where(sock)

    def verdicts(self) -> dict[str, guestcheck.Verdict]:
        out = {}
        for vm in self.vms:
            pid, where = self.where(vm)
            fds, size = where["fds"], int(where["size"])
            saved = None
            if where.get("restored_cpu") is not None:
                with _view(pid, int(fds["state"]), STATE_SIZE) as raw:
                    saved = bytes(raw)
            ram = int(fds["ram"])
            out[vm] = guestcheck.judge(self.sock(vmm_sock(vm)), where, saved,
                                       functools.partial(_view, pid, ram, size))
        return out

    def pfns(self) -> list[int]:
        pid, where = self.where(VM)
        return memfd_pfns(pid, int(where["fds"]["ram"]), int(where["size"]))

    def settled(self) -> None:
        self.pfns_after = self.pfns()

    def zero_copy_problem(self, vm: str) -> str | None:
        before, after = self.pfns_before, self.pfns_after
        if before is None or after is None:
            return None
        if 0 in before or 0 in after:
            return (f"pagemap shows {before.count(0)} pages absent before the update and "
                    f"{after.count(0)} after (not root?)")
        moved = sum(a != b for a, b in zip(before, after, strict=True))
        if moved:
            return (f"guest memory moved: {moved} of {len(after)} pages lie on other page "
                    "frames than before the update (copied, not preserved)")
        return ""

    def figures(self, luod: dict[str, Any]) -> dict[str, Any]:
        """No machine witnesses the jump here, and the machine's resource figures do not
        exist: 0 (see :class:`liveupdate.scenario.report.UpdateResult`); luod's fds do."""
        try:
            fds: int | None = len(os.listdir(f"/proc/{int(luod['pid'])}/fd"))
        except OSError:
            fds = None
        return {"kernel_files": 0, "luod_fds": fds, "machine_rss": 0, "ram_resident": 0,
                "jump_s": None, "preserved_pages": 0, "free_pages": 0, "machine_jump": {}}
