"""The devices demo (issue #25; ``luoctl demo --devices``): a ``7.3+posted`` machine with a
NIC per VM, each VM's guest consuming its NIC's packets itself (:mod:`liveupdate.vmm.nic`),
live-updated through luod, once per mode -- ``continuous`` (our deviation: DMA never stops)
and ``posted`` (the device reset at freeze) -- each on a machine of its own.

Per VM it reports: the mode, the blackout (host clock), the packets the device delivered
while the guest was paused (waiting in its ring when the next VMM retrieved it: sequence
number and send time each), the guest's own counts after the resume (received, gaps, bad
packets, out of order), the device's drops, the IOMMU's faults, and the DMA writes outside
the memory the handover preserved -- the machine's DMA log from before the update against
the guest memory the VMMs preserved (its physical extents, the same before and after the
update: zero copy). The KHO radix tree itself cannot be the witness here: the next kernel
frees its pages at boot, before luod's update returns (tests/e2e/test_device_update.py
checks the FLBs at the jump, where the test does the kexec itself).
"""

from __future__ import annotations

import bisect
import errno
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from liveupdate.abi import image as image_abi
from liveupdate.client.update import load_image, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient, start
from liveupdate.vmm.where import where as vmm_where

GEN = "7.3+posted"
CMDLINE = "kho=on liveupdate=on intel_iommu=on vfio-pci.ids=1b36:11b0"
MODES = ("continuous", "posted")
RATE = 400  # packets per second per NIC


@dataclass
class DeviceVm:
    vm: str
    mode: str
    ring: int
    blackout_s: float
    delivered_in_blackout: int
    waiting: list[tuple[int, int]]  # (seq, sent ns) delivered during the pause
    paused_ns: int
    resumed_ns: int
    received_before: int
    received_after: int
    gaps: int
    bad: int
    out_of_order: int
    drops: int
    iommu_faults: int
    dma_writes: int
    dma_outside_preserved: int
    found_running: bool | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def guest_ranges(wheres: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The RAM of the VMs' guest memory (the memfds their VMMs preserve), sorted
    (start, end), from each VMM's ``where`` (physical extents of its mapping)."""
    return sorted((int(p), int(p) + int(n)) for w in wheres for p, n in w["ram"])


def outside(log: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> int:
    starts = [a for a, _ in ranges]
    n = 0
    for phys, size in log:
        i = bisect.bisect_right(starts, phys) - 1
        if i < 0 or phys + size > ranges[i][1]:
            n += 1
    return n


class DevicesDemo:
    def __init__(self, folder: str, mode: str, vms: int, ring: int, accel: str,
                 say: Any) -> None:
        self.folder, self.mode, self.ring, self.accel = os.path.abspath(folder), mode, ring, \
            accel
        self.vms = [f"vm{i}" for i in range(vms)]
        self.say = say
        self.run = os.path.join(self.folder, "run")
        self.m: MachineClient | None = None
        self.proc: Any = None

    def sock(self, name: str) -> str:
        return os.path.join(self.run, name)

    def boot(self) -> MachineClient:
        shutil.rmtree(self.folder, ignore_errors=True)
        disk = Path(self.folder) / "disk"
        (disk / "images").mkdir(parents=True)
        (disk / "images" / "next.img").write_bytes(image_abi.KernelImage.of(GEN).encode())
        py = sys.executable
        lines = [f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60"]
        lines += [f"@restart {py} -m liveupdate.vmm {vm} --memory 64M --accel {self.accel} "
                  f"--nic /dev/vfio/devices/vfio{i} --ring {self.ring}"
                  for i, vm in enumerate(self.vms)]
        (disk / "services").write_text("\n".join(lines) + "\n")
        devices = [{"kind": "nic", "bdf": f"00:{3 + i:02x}.0", "rate": RATE}
                   for i in range(len(self.vms))]
        self.say(f"booting Linux {GEN} ({self.mode} devices), {len(self.vms)} VMs with a NIC "
                 f"each ({RATE} packets/s, ring {self.ring})")
        self.proc, m = start(self.folder, memory=1 << 30, image="images/next.img",
                             cmdline=f"{CMDLINE} liveupdate_devices={self.mode}",
                             devices=devices, log=os.path.join(self.folder, "machine.log"))
        self.m = m
        m.booted(60)
        m.wait("luod: LUO .* listening", timeout=120)
        for vm in self.vms:
            m.wait(f"vmm {vm}: .* started", timeout=120)
        return m

    def status(self, vm: str) -> dict[str, Any]:
        return ask(self.sock(f"vmm-{vm}.sock"), "status")

    def received(self, vm: str, n: int) -> dict[str, Any]:
        assert self.m is not None
        for _ in range(1000):
            st = self.status(vm)
            if st["nic"]["guest"]["received"] >= n:
                return st
            fn = self.m.status()["devices"]["functions"][0]
            self.m.device_wait(fn["bdf"], fn["sent"] + 20)
        raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"{vm}: its guest did not receive "
                              f"{n} packets")

    def update(self) -> list[DeviceVm]:
        m = self.m
        assert m is not None
        before = {vm: self.received(vm, 50) for vm in self.vms}
        wheres = [vmm_where(self.sock(f"vmm-{vm}.sock")) for vm in self.vms]
        log0 = m.status()["devices"]["iommu"]["dma_writes"]
        self.say(f"guests receiving; live update ({self.mode}): prepare, freeze, kexec")
        load_image(self.sock("luod.sock"), "images/next.img")
        off = m.status()["console_bytes"]
        run_update(self.sock("luod.sock"))
        for vm in self.vms:
            m.wait(f"vmm {vm}: .* resumed", offset=off, timeout=120)
        st = m.status()
        ranges = guest_ranges(wheres)
        moved = [vm for vm, w in zip(self.vms, wheres, strict=True)
                 if vmm_where(self.sock(f"vmm-{vm}.sock"))["ram"] != w["ram"]]
        if moved:
            raise LiveUpdateError(err=errno.EIO, msg=f"guest memory of {moved} moved: copied, not "
                                  "preserved")
        log = m.dma_log()[log0:]
        out = []
        for vm in self.vms:
            a = self.received(vm, self.status(vm)["nic"]["guest"]["received"] + 20)
            out.append(self._result(vm, before[vm], a, st, log, ranges))
        return out

    def _result(self, vm: str, b: dict[str, Any], a: dict[str, Any], st: dict[str, Any],
                log: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> DeviceVm:
        g, bo, nic = a["nic"]["guest"], a["blackout"], a["nic"]
        waiting = [tuple(w) for w in nic["blackout"].get("waiting", [])]
        r = DeviceVm(vm, self.mode, self.ring, float(bo.get("host_s") or 0.0), len(waiting),
                     waiting, int(bo.get("paused_ns", 0)), int(bo.get("resumed_ns", 0)),
                     b["nic"]["guest"]["received"], g["received"], g["gaps"], g["bad"],
                     g["out_of_order"], nic["drops"], st["devices"]["iommu"]["faults"],
                     len(log), outside(log, ranges), nic["found_running"])
        r.problems = self._judge(r)
        return r

    def _judge(self, r: DeviceVm) -> list[str]:
        p = []
        if r.bad or r.out_of_order:
            p.append(f"{r.bad} damaged and {r.out_of_order} out-of-order packets")
        if r.iommu_faults:
            p.append(f"{r.iommu_faults} IOMMU faults")
        if r.dma_outside_preserved:
            p.append(f"{r.dma_outside_preserved} DMA writes outside preserved memory")
        big = r.ring >= 2 * RATE * max(r.blackout_s, 0.001)
        if self.mode == "continuous" and big and (r.gaps or r.drops
                                                  or not r.delivered_in_blackout):
            p.append(f"continuous with a ring of {r.ring}: {r.gaps} missing, "
                     f"{r.drops} drops, {r.delivered_in_blackout} delivered in the pause")
        if self.mode == "continuous" and r.gaps != r.drops:
            p.append(f"the guest's gaps ({r.gaps}) differ from the device's drops ({r.drops})")
        return p

    def close(self) -> None:
        if self.m is not None:
            self.m.shutdown()
        if self.proc is not None:
            self.proc.wait(30)


def run(folder: str, modes: tuple[str, ...], vms: int, ring: int, accel: str,
        say: Any) -> list[DeviceVm]:
    out: list[DeviceVm] = []
    for mode in modes:
        d = DevicesDemo(os.path.join(folder, mode[0]), mode, vms, ring, accel, say)  # short:
        # the services' sockets live below it (AF_UNIX paths end at 108 bytes)
        try:
            d.boot()
            out += d.update()
        finally:
            d.close()
    return out


def to_json(results: list[DeviceVm]) -> dict[str, Any]:
    return {"ok": all(r.ok for r in results),
            "vms": [{**asdict(r), "waiting": len(r.waiting), "ok": r.ok} for r in results]}
