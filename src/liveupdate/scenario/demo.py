"""The demo machine: an emulated machine booted with luod, VMs and a key-value cache, and
one live update of it, measured and checked (``luoctl demo``; :mod:`liveupdate.scenario.run`
runs it, the bench and the tests drive it directly).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from liveupdate.abi import generations
from liveupdate.abi import image as image_abi
from liveupdate.client.update import load_image, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient, start
from liveupdate.scenario import damage as damages
from liveupdate.scenario import guestcheck, witness
from liveupdate.scenario.damage import Damage
from liveupdate.scenario.faults import Fault, helper_line
from liveupdate.scenario.report import CacheResult, UpdateResult, VmResult
from liveupdate.vmm import guest

CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=within_size"
NEGOTIATE = "liveupdate_negotiate=on"
LUO_GENERATIONS = [g for g, r in generations.RELEASES.items() if r.has_luo]
IMAGES = {g: image_abi.KernelImage.of(g) for g in LUO_GENERATIONS}
CACHE_KEYS = 64
HEADROOM = 768 << 20  # the kernel's own memory, scratch and the services' beside the VMs


def _services(py: str, vms: int, vm_memory: int, accel: str, cache: bool,
              fault: Fault | None, memory: int, plants: dict[str, str]) -> str:
    # with a fault armed, a barrier nobody answers is given up quickly
    timeouts = " --prepare-timeout 2 --freeze-timeout 2" if fault else ""
    lines = [f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60{timeouts}"]
    lines += [f"@restart {py} -m liveupdate.vmm vm{i} --memory {vm_memory} --accel {accel}"
              + (f" --plant {plants[f'vm{i}']}" if f"vm{i}" in plants else "")
              for i in range(vms)]
    if cache:
        lines.append(f"@restart {py} -m liveupdate.userspace.kvcache cache")
    return "\n".join(lines) + "\n" + (helper_line(py, fault, memory) if fault else "")


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
                 damage: tuple[Damage, ...] = ()) -> None:
        self.folder = os.path.abspath(folder)
        self.fault = fault
        self.damage = damage
        self.rng = random.Random()
        self.cache_keys = CACHE_KEYS
        self.vms = [f"vm{i}" for i in range(vms)]
        self.vm_memory, self.memory = vm_memory, machine_memory
        self.generation, self.accel, self.cache = generation, accel, cache
        self.to = to or generation  # update n goes to ``to`` when n is odd, back when even
        self.say = say
        self.run = os.path.join(self.folder, "run")
        self.m: MachineClient | None = None
        self.proc: Any = None

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
                                                  if d.kind in damages.PLANTED}))
        self.say(f"booting a {self.memory >> 30} GiB machine, Linux {self.generation}")
        cmdline = f"{CMDLINE} {NEGOTIATE}" if self.to != self.generation else CMDLINE
        cmdline = f"{cmdline} {self.fault.cmdline}".strip() if self.fault else cmdline
        self.proc, m = start(self.folder, memory=self.memory, cmdline=cmdline,
                             image=f"images/{self.generation}.img",
                             log=os.path.join(self.folder, "machine.log"))
        self.m = m
        m.booted(120)
        m.wait("luod: LUO .* listening", timeout=120)
        for vm in self.vms:
            m.wait(f"vmm {vm}: .* started", timeout=120)
        self.say("guests running: waiting for each to walk all of its memory once")
        pages = (self.vm_memory - guest.DATA_AT) // guest.PAGE
        deadline = time.monotonic() + 300
        while any(s["steps"] < pages for s in self.statuses().values()):
            if time.monotonic() > deadline:
                raise LiveUpdateError(err=110, msg="the guests made no progress in 300 s")
            time.sleep(0.1)  # a CLI watching guests run
        if self.cache:
            m.wait("kvcache cache: started", timeout=120)
            for i in range(CACHE_KEYS):
                ask(self.sock("kvcache-cache.sock"), "put", key=f"key-{i}", value=f"value-{i}")
        return m

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {vm: ask(self.sock(f"vmm-{vm}.sock"), "status") for vm in self.vms}

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
        other than ``none`` does :attr:`damage` after it, on purpose."""
        assert self.m is not None
        before = self.statuses()
        maps_before = self.m.maps()
        off = self.m.status()["console_bytes"]
        gen = self.to if n % 2 else self.generation
        loaded = load_image(self.sock("luod.sock"), f"images/{gen}.img")
        handover = loaded["handover"]
        self.say(f"update {n} to Linux {gen}: {handover['mode']} handover ("
                 + generations.describe(handover["formats"])
                 + "); prepare, freeze, kexec")
        st, report = run_update(self.sock("luod.sock"),
                                on_phase=lambda ev: self.say(f"  {ev['phase']}"))
        for vm in self.vms:
            self.m.wait(f"vmm {vm}: .* resumed", offset=off, timeout=120)
        if self.cache:
            self.m.wait("kvcache cache: restored", offset=off, timeout=120)
        done = self.do_damage() if fault != "none" else []
        after = self.statuses()
        maps_after = self.m.maps()
        verdicts = self.verdicts()
        vms = {}
        for vm in self.vms:
            chk = verdicts[vm]
            b = after[vm]["blackout"]
            vms[vm] = VmResult(
                accel=after[vm]["accel"], memory=self.vm_memory,
                steps_before_update=before[vm]["steps"],
                steps_at_pause=b.get("steps_before"), steps_after_resume=b.get("steps_after"),
                resumed=bool(after[vm]["restored"])
                and b.get("steps_after", 0) > b.get("steps_before", 0) > 0,
                blackout_host_s=b.get("host_s"), blackout_guest_s=b.get("guest_s"),
                integrity=chk.intact, problem=chk.problem, pages_verified=chk.pages,
                vcpu_restored=chk.vcpu_restored, vcpu_problem=chk.vcpu_problem,
                blackout_ns=(b["paused_ns"], b["resumed_ns"]) if "paused_ns" in b else None,
                blackout_wall_ns=(b["paused_wall_ns"], b["resumed_wall_ns"])
                if "paused_wall_ns" in b else None,
                guest_tsc=b.get("tsc", ""), zero_copy_problem=witness.zero_copy_problem(
                    maps_before, maps_after, vm, self.vm_memory))
        cache = None
        if self.cache:
            sock = self.sock("kvcache-cache.sock")
            got = [ask(sock, "get", key=f"key-{i}") for i in range(CACHE_KEYS)]
            cache = CacheResult(CACHE_KEYS, all(
                g["found"] and g["value"] == f"value-{i}" for i, g in enumerate(got)))
        kho = self.m.kho_status()
        mst = self.m.status()
        return UpdateResult(
            update=st["update"], to=gen, handover=handover,
            timeline=report.get("timeline", {}),
            kernel_files=kho["open_files"], luod_fds=_fds(int(st["pid"])),
            machine_rss=_rss(int(mst["machine_pid"])), ram_resident=mst["ram_resident"],
            finish=report.get("finish"), jump_s=self.m.status()["last_jump_seconds"],
            vms=vms, cache=cache, damage=done,
            preserved_pages=kho["out"]["preserved_pages"], free_pages=kho["free_pages"],
            machine_jump={"request_ns": mst["jump_request_ns"],
                          "start_ns": mst["kernel_start_ns"],
                          "booted_ns": mst["kernel_booted_ns"]})

    def close(self) -> None:
        if self.m is not None:
            self.m.shutdown()
        if self.proc is not None:
            self.proc.wait(60)
