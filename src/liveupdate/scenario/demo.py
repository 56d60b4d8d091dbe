"""The demo machine: an emulated machine booted with luod, VMs and a key-value cache, and
one live update of it, measured and checked (``luoctl demo``; :mod:`liveupdate.scenario.run`
runs it, the bench and the tests drive it directly).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from liveupdate.abi import generations
from liveupdate.abi import image as image_abi
from liveupdate.client.update import run_update
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient, start
from liveupdate.scenario import damage as damages
from liveupdate.scenario import guestcheck, host, witness
from liveupdate.scenario.damage import Damage
from liveupdate.scenario.faults import Fault, helper_line
from liveupdate.scenario.report import UpdateResult

CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=within_size"
NEGOTIATE = "liveupdate_negotiate=on"
LUO_GENERATIONS = [g for g, r in generations.RELEASES.items() if r.has_luo]
IMAGES = {g: image_abi.KernelImage.of(g) for g in LUO_GENERATIONS}
CACHE_KEYS = 64
HEADROOM = 768 << 20  # the kernel's own memory, scratch and the services' beside the VMs


def _services(py: str, vms: int, vm_memory: int, accel: str, cache: bool,
              fault: Fault | None, memory: int, plants: dict[str, str],
              hugepages: str = "") -> str:
    # with a fault armed, a barrier nobody answers is given up quickly
    timeouts = " --prepare-timeout 2 --freeze-timeout 2" if fault else ""
    lines = [f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60{timeouts}"]
    lines += [f"@restart {py} -m liveupdate.vmm vm{i} --memory {vm_memory} --accel {accel}"
              + (f" --plant {plants[f'vm{i}']}" if f"vm{i}" in plants else "")
              + (f" --hugepages {hugepages}" if hugepages else "")
              for i in range(vms)]
    if cache:
        lines.append(f"@restart {py} -m liveupdate.userspace.kvcache cache")
    return "\n".join(lines) + "\n" + (helper_line(py, fault, memory) if fault else "")


def hugepages_cmdline(size: str, total: int) -> str:
    """A pool of ``size`` pages holding ``total`` bytes of guests."""
    page = {"2M": 2 << 20, "1G": 1 << 30}[size]
    return f"hugepagesz={size} hugepages={-(-total // page)}"


def _fds(pid: int) -> int | None:
    """Open fds of a machine process (the host's view: the machine's userspace is ours)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Demo:
    """The demo machine in ``folder`` (replaced at :meth:`boot`): ``vms`` VMs running guests
    that count and checksum their own memory, luod, and the cache if ``cache``; ``say``
    receives progress lines. With ``fault``, its helper client and kernel command line are
    part of the boot (:mod:`liveupdate.scenario.faultrun` injects the rest); ``damage``
    (:mod:`liveupdate.scenario.damage`) is done to the guests at a faulted update, or
    planted in their VMMs at boot."""

    def __init__(self, folder: str, vms: int, vm_memory: int, machine_memory: int,
                 generation: str, accel: str, cache: bool, say: Any,
                 fault: Fault | None = None, to: str | None = None,
                 damage: tuple[Damage, ...] = (), hugepages: str = "",
                 spares: bool = True) -> None:
        self.folder = os.path.abspath(folder)
        self.hugepages = hugepages  # "2M"/"1G": guests on hugetlb pools sized for them
        self.spares = spares  # off: lu.spares=0 (kernel/spares.py)
        self.fault = fault
        self.damage = damage
        self.rng = random.Random()
        self.kind = "emulated"
        self.cache_keys = CACHE_KEYS if cache else 0
        self.vms = [f"vm{i}" for i in range(vms)]
        self.vm_memory, self.memory = vm_memory, machine_memory
        self.generation, self.accel, self.cache = generation, accel, cache
        self.to = to or generation  # update n goes to ``to`` when n is odd, back when even
        self.say = say
        self.run = os.path.join(self.folder, "run")
        self.m: MachineClient | None = None
        self.proc: Any = None
        self.ready: dict[str, dict[str, Any]] = {}
        self.maps_before: list[dict[str, Any]] = []
        self.maps_after: list[dict[str, Any]] = []

    def sock(self, name: str) -> str:
        return os.path.join(self.run, name)

    def boot(self) -> MachineClient:
        with_old = MachineClient(self.folder)
        try:
            with_old.shutdown()  # a previous demo's machine
        finally:
            with_old.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        disk = Path(self.folder) / "disk"
        (disk / "images").mkdir(parents=True)
        for name, img in IMAGES.items():
            (disk / "images" / f"{name}.img").write_bytes(img.encode())
        (disk / "images" / "junk.img").write_bytes(b"not a kernel image")
        (disk / "services").write_text(_services(sys.executable, len(self.vms),
                                                 self.vm_memory, self.accel, self.cache,
                                                 self.fault, self.memory,
                                                 {d.vm: damages.PLANTED[d.kind]
                                                  for d in self.damage
                                                  if d.kind in damages.PLANTED},
                                                 self.hugepages))
        self.say(f"booting a {self.memory >> 30} GiB machine, Linux {self.generation}")
        cmdline = f"{CMDLINE} {NEGOTIATE}" if self.to != self.generation else CMDLINE
        cmdline = f"{cmdline} {self.fault.cmdline}".strip() if self.fault else cmdline
        if self.hugepages:
            cmdline += f" {hugepages_cmdline(self.hugepages, len(self.vms) * self.vm_memory)}"
        cmdline = cmdline if self.spares else f"{cmdline} lu.spares=0"
        self.proc, m = start(self.folder, memory=self.memory, cmdline=cmdline,
                             image=f"images/{self.generation}.img",
                             log=os.path.join(self.folder, "machine.log"))
        self.m = m
        m.booted(120)
        m.wait("luod: LUO .* listening", timeout=120)
        for vm in self.vms:
            m.wait(f"vmm {vm}: .* started", timeout=120)
        if self.cache:
            m.wait("kvcache cache: started", timeout=120)
        self.say("guests running: waiting for each to walk all of its memory once")
        self.ready = host.ready(self, 300)
        return m

    def statuses(self) -> dict[str, dict[str, Any]]:
        return host.statuses(self)

    def do_damage(self) -> list[str]:
        """Break the guests on purpose (:attr:`damage`), each VM paused meanwhile so that
        its guest cannot overwrite the damage before the check; the VMs stay paused until
        :meth:`verdicts` has judged them."""
        assert self.m is not None
        done = []
        for d in self.damage:
            sock = self.sock(f"vmm-{d.vm}.sock")
            ask(sock, "pause")
            done.append(damages.apply(d, self.m, sock, self.vm_memory, self.rng))
        return done

    def verdicts(self) -> dict[str, guestcheck.Verdict]:
        """Each VM judged from the machine's RAM by the checker (not by its VMM); VMs that
        :meth:`do_damage` paused resume after."""
        assert self.m is not None
        out = {vm: guestcheck.check(self.m, self.sock(f"vmm-{vm}.sock")) for vm in self.vms}
        for vm in {d.vm for d in self.damage}:
            ask(self.sock(f"vmm-{vm}.sock"), "resume")
        return out

    def update(self, n: int, fault: str) -> UpdateResult:
        """Live update ``n`` (to :attr:`to` when odd, back when even), observed; ``fault``
        other than ``none`` does :attr:`damage` after it, on purpose. The scenario's steps
        are :mod:`liveupdate.scenario.host`'s, as on a real kernel."""
        assert self.m is not None
        before = host.statuses(self)
        self.maps_before = self.m.maps()
        gen = self.to if n % 2 else self.generation
        self.say(f"update {n} to Linux {gen}:")
        handover = host.load(self, f"images/{gen}.img", self.say)
        self.kexec(self.say)
        st, report = host.outcome(self, n, 120)
        done = self.do_damage() if fault != "none" else []
        return host.observe(self, gen, handover, before, st, report, done)

    # -- the scenario's host (liveupdate.scenario.host.Host) -------------------------------
    def kexec(self, say: host.Say) -> None:
        assert self.m is not None
        off = self.m.status()["console_bytes"]
        run_update(self.sock(host.LUOD), on_phase=lambda ev: say(f"  {ev['phase']}"))
        for vm in self.vms:
            self.m.wait(f"vmm {vm}: .* resumed", offset=off, timeout=120)
        if self.cache:
            self.m.wait("kvcache cache: restored", offset=off, timeout=120)

    def settled(self) -> None:
        assert self.m is not None
        self.maps_after = self.m.maps()

    def zero_copy_problem(self, vm: str) -> str | None:
        return witness.zero_copy_problem(self.maps_before, self.maps_after, vm,
                                         self.vm_memory)

    def figures(self, luod: dict[str, Any]) -> dict[str, Any]:
        assert self.m is not None
        kho, mst = self.m.kho_status(), self.m.status()
        return {"kernel_files": kho["open_files"], "luod_fds": _fds(int(luod["pid"])),
                "machine_rss": _rss(int(mst["machine_pid"])),
                "ram_resident": mst["ram_resident"], "jump_s": mst["last_jump_seconds"],
                "preserved_pages": kho["out"]["preserved_pages"],
                "free_pages": kho["free_pages"],
                "machine_jump": {"request_ns": mst["jump_request_ns"],
                                 "start_ns": mst["kernel_start_ns"],
                                 "booted_ns": mst["kernel_booted_ns"]}}

    def close(self) -> None:
        if self.m is not None:
            self.m.shutdown()
        if self.proc is not None:
            self.proc.wait(60)
