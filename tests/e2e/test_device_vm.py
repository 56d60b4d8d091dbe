"""A VM with the NIC assigned, live-updated through luod on ``7.3+posted`` (issue #25): the
guest itself posts its receive buffers and checks every packet (sequence number, CRC-32,
payload), counting in its own memory; the VMM preserves guest memory, iommufd and device in
its LUO session and retrieves them after the kexec.

* continuous, ring >= 2 x R x blackout: after the resume the guest has every packet sent
  during the pause, in order, intact -- no gap, no bad packet, no drop, no IOMMU fault, every
  DMA write inside the guest's memory (the preserved memfd, whose pages did not move);
* continuous, a ring of 16: the device drops while the guest is paused, and the guest's gaps
  are exactly the device's drops;
* as posted: the device is reset at freeze; the VMM finds it reset, the guest reposts and the
  gap it measures is the blackout's packets.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdate.client import faultpoint
from liveupdate.client.update import load_image, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient, start
from liveupdate.scenario import device_faults
from tests.e2e.conftest import IMAGES

BDF = "00:03.0"
RATE = 400
BASE = "kho=on liveupdate=on intel_iommu=on vfio-pci.ids=1b36:11b0"


@pytest.fixture
def vm_machine(tmp_path: Path) -> Iterator[Any]:
    running: list[Any] = []

    def make(mode: str, ring: int, plant: str = "", extra: str = "", nic: bool = True
             ) -> tuple[MachineClient, str]:
        folder = tmp_path / f"m{len(running)}"
        disk = folder / "disk"
        (disk / "images").mkdir(parents=True)
        (disk / "images" / "next.img").write_bytes(IMAGES["7.3+posted"].encode())
        (disk / "images" / "plain.img").write_bytes(IMAGES["7.3"].encode())
        py = sys.executable
        (disk / "services").write_text(
            f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60\n"
            f"@restart {py} -m liveupdate.vmm vm0 --memory 64M --accel tcg"
            + (f" --nic /dev/vfio/devices/vfio0 --ring {ring}" if nic else "")
            + (f" --plant {plant}" if plant else "") + "\n")
        proc, m = start(str(folder), memory=1 << 30, image="images/next.img",
                        cmdline=f"{BASE} liveupdate_devices={mode} {extra}".strip(),
                        log=f"{folder}.log",
                        devices=[{"kind": "nic", "bdf": BDF, "rate": RATE}])
        running.append((proc, m))
        m.booted(60)
        m.wait("luod: LUO .* listening", timeout=120)
        m.wait("vmm vm0: .* started", timeout=120)
        return m, str(folder / "run")

    yield make
    for proc, m in running:
        m.shutdown()
        proc.wait(30)


def nic(run: str) -> dict[str, Any]:
    st: dict[str, Any] = ask(os.path.join(run, "vmm-vm0.sock"), "status")
    return st


def received(m: MachineClient, run: str, n: int) -> dict[str, Any]:
    """The VM's status once its guest has received ``n`` packets (the source sends on)."""
    for _ in range(1000):
        st = nic(run)
        if st["nic"]["guest"]["received"] >= n:
            return st
        m.device_wait(BDF, m.status()["devices"]["functions"][0]["sent"] + 20)
    raise AssertionError(f"the guest did not receive {n} packets: {st}")


def update(m: MachineClient, run: str) -> tuple[dict[str, Any], dict[str, Any]]:
    load_image(os.path.join(run, "luod.sock"), "images/next.img")
    off = m.status()["console_bytes"]
    run_update(os.path.join(run, "luod.sock"))
    m.wait("vmm vm0: .* resumed", offset=off, timeout=120)
    return m.status(), nic(run)


def inside(log: list[tuple[int, int]], extents: list[list[int]]) -> bool:
    return outside(log, extents) == 0


def outside(log: list[tuple[int, int]], extents: list[list[int]]) -> int:
    return sum(1 for a, n in log
               if not any(p <= a and a + n <= p + size for p, size in extents))


def cell(name: str, m: MachineClient, run: str, log0: int, extents: list[list[int]],
         **more: Any) -> None:
    """The reliability matrix's record of device fault ``name`` (docs/reliability.md): what
    the VM and the machine show now, after the test's checks passed."""
    st, dev = nic(run), m.status()["devices"]
    log = m.dma_log()[log0:]
    g = st["nic"]["guest"]
    device_faults.record(name, {
        "gaps": g["gaps"], "bad": g["bad"], "out_of_order": g["out_of_order"],
        "iommu_faults": dev["iommu"]["faults"],
        "dma_errors": dev["functions"][0]["dma_errors"], "dma_writes": len(log),
        "dma_outside": outside(log, extents), "found_running": st["nic"]["found_running"],
        "lost": st["nic"]["lost"], "restored": st["restored"], **more})


def test_continuous_every_packet_of_the_blackout_arrives(vm_machine: Any) -> None:
    m, run = vm_machine("continuous", 4096)  # 4096 / 400 pps: 10 s of pause
    before = received(m, run, 50)
    where = ask(os.path.join(run, "vmm-vm0.sock"), "where")
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    # a next kernel without the devices' handlers: the pre-flight names what it lacks, and
    # once the VMM has preserved its device files luod refuses it, nothing paused
    loaded = load_image(os.path.join(run, "luod.sock"), "images/plain.img")
    assert loaded["lacks"]["vfio"] == "vfio-pci-v1", loaded
    boots = m.status()["boot_count"]
    with pytest.raises(LiveUpdateError) as refused:
        run_update(os.path.join(run, "luod.sock"))
    assert refused.value.errno == errno.EINVAL and "vfio-pci-v1" in refused.value.message
    assert "client vm0 preserved iommufd, vfio files" in refused.value.message
    assert not nic(run)["paused"] and m.status()["boot_count"] == boots
    still = received(m, run, nic(run)["nic"]["guest"]["received"] + 20)["nic"]["guest"]
    assert still["gaps"] == 0 and still["bad"] == 0  # it never stopped receiving
    cell("next-kernel-without-handlers", m, run, log0, where["ram"], outcome="rolled back",
         luod_says=refused.value.message)
    dev0 = m.status()["devices"]["functions"][0]
    st, after = update(m, run)
    assert st["devices"]["functions"][0]["bus_master"]  # it never stopped
    after = received(m, run, after["nic"]["guest"]["received"] + 50)
    g = after["nic"]["guest"]
    assert after["nic"]["found_running"] is True and after["restored"]
    assert g["gaps"] == 0 and g["bad"] == 0 and g["out_of_order"] == 0
    assert g["received"] == g["last_seq"] - before["nic"]["guest"]["last_seq"] \
        + before["nic"]["guest"]["received"]
    fn = m.status()["devices"]["functions"][0]
    assert fn["drops"] == dev0["drops"] and fn["dma_errors"] == 0
    assert m.status()["devices"]["iommu"]["faults"] == 0
    assert after["blackout"]["host_s"] > 0
    delivered_in_pause = fn["delivered"] - dev0["delivered"]
    assert delivered_in_pause > 0
    assert inside(m.dma_log()[log0:], where["ram"])
    assert ask(os.path.join(run, "vmm-vm0.sock"), "where")["ram"] == where["ram"]


def test_a_memfd_only_host_goes_to_plain_73(vm_machine: Any) -> None:
    """No device file preserved (the VM has no NIC): a 7.3 next kernel, which has none of
    the posted series' handlers, takes the update -- guest memory and state cross as
    memfds."""
    m, run = vm_machine("continuous", 0, nic=False)
    loaded = load_image(os.path.join(run, "luod.sock"), "images/plain.img")
    assert loaded["lacks"] and loaded["handover"]["mode"] == "native"
    boots = m.status()["boot_count"]
    off = m.status()["console_bytes"]
    run_update(os.path.join(run, "luod.sock"))
    m.wait("vmm vm0: .* resumed", offset=off, timeout=120)
    st, ms = nic(run), m.status()
    assert ms["boot_count"] == boots + 1 and st["restored"], st
    assert ms["kernel"]["release"] == IMAGES["7.3"].release


def test_continuous_small_ring_gaps_equal_drops(vm_machine: Any) -> None:
    m, run = vm_machine("continuous", 16)  # 40 ms of pause fill it
    received(m, run, 50)
    drops0 = m.status()["devices"]["functions"][0]["drops"]
    gaps0 = nic(run)["nic"]["guest"]["gaps"]
    _, after = update(m, run)
    after = received(m, run, after["nic"]["guest"]["received"] + 20)
    drops = m.status()["devices"]["functions"][0]["drops"] - drops0
    assert drops > 0 and after["nic"]["guest"]["gaps"] - gaps0 == drops
    assert after["nic"]["guest"]["bad"] == 0
    assert m.status()["devices"]["iommu"]["faults"] == 0


def test_as_posted_the_gap_is_measured(vm_machine: Any) -> None:
    m, run = vm_machine("posted", 4096)
    before = received(m, run, 50)
    _, after = update(m, run)
    after = received(m, run, after["nic"]["guest"]["received"] + 20)
    g = after["nic"]["guest"]
    assert after["nic"]["found_running"] is False
    assert g["postings"] == before["nic"]["guest"]["postings"] + 1
    assert g["gaps"] > 0 and g["bad"] == 0  # the packets of the blackout are lost
    assert g["received"] > before["nic"]["guest"]["received"]
    assert m.status()["devices"]["iommu"]["faults"] == 0


def test_fault_device_not_preserved(vm_machine: Any) -> None:
    """The VMM leaves the device out: the kexec clears its bus mastering, DMA stops, the VM
    is told and reassigns it; the guest sees the gap; nothing lands outside its memory."""
    m, run = vm_machine("continuous", 4096, plant="no-device")
    before = received(m, run, 50)
    where = ask(os.path.join(run, "vmm-vm0.sock"), "where")
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    off = m.status()["console_bytes"]
    _, after = update(m, run)
    m.wait(r"pci 0000:00:03\.0: bus mastering off \(kexec\)", offset=off)
    after = received(m, run, after["nic"]["guest"]["received"] + 20)
    g = after["nic"]["guest"]
    assert "token 3" in after["nic"]["lost"] and "token 4" in after["nic"]["lost"]
    assert g["gaps"] > 0 and g["bad"] == 0
    assert g["postings"] == before["nic"]["guest"]["postings"] + 1  # told: it reposted
    assert not after["nic"]["blackout"]["waiting"] or after["nic"]["found_running"] is False
    assert m.status()["devices"]["iommu"]["faults"] == 0
    assert inside(m.dma_log()[log0:], where["ram"])
    cell("device-not-preserved", m, run, log0, where["ram"], outcome="updated")


def test_fault_iommu_table_page_not_preserved(vm_machine: Any) -> None:
    """A page-table page left out of the handover: the sanitizer punches it; the next DMA
    faults and is logged, never lands; the next kernel blocks the domain, the VM is told and
    the device is reassigned over a new page table."""
    m, run = vm_machine("continuous", 4096, extra="iommu_lu_drop_table=1")
    received(m, run, 50)
    where = ask(os.path.join(run, "vmm-vm0.sock"), "where")
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    off = m.status()["console_bytes"]
    _, after = update(m, run)
    m.wait(r"DMAR: domain \d+: table page 0x[0-9a-f]+ was not preserved", offset=off)
    after = received(m, run, after["nic"]["guest"]["received"] + 20)
    g = after["nic"]["guest"]
    assert "token 3" in after["nic"]["lost"] and g["bad"] == 0 and g["gaps"] > 0
    st = m.status()["devices"]
    assert st["iommu"]["faults"] > 0 and st["functions"][0]["dma_errors"] > 0  # logged
    assert inside(m.dma_log()[log0:], where["ram"])  # and none landed elsewhere
    cell("iommu-table-not-preserved", m, run, log0, where["ram"], outcome="updated")


def test_fault_next_kernel_does_not_honour_the_pci_flb(vm_machine: Any) -> None:
    """The next kernel has the handlers but its PCI core ignores the PCI FLB
    (``pci_lu_ignore_flb``, on the next kernel only): the device crosses running, is
    enumerated as new, and the VMM's bind of the retrieved file resets it; the VMM finds it
    reset and tells the guest, which reposts and sees the gap. Nothing is damaged, no IOMMU
    fault, every DMA write inside the guest's (unmoved) memory."""
    m, run = vm_machine("continuous", 4096)
    before = received(m, run, 50)
    where = ask(os.path.join(run, "vmm-vm0.sock"), "where")
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    off = m.status()["console_bytes"]
    booted = m.console()[1].decode().split("Command line: ", 1)[1].splitlines()[0]
    line = f"{booted} pci_lu_ignore_flb=1"  # the next kernel's command line only
    load_image(os.path.join(run, "luod.sock"), "images/next.img", cmdline=line)
    run_update(os.path.join(run, "luod.sock"))
    m.wait("vmm vm0: .* resumed", offset=off, timeout=120)
    m.wait(r"PCI: incoming FLB not honoured", offset=off)
    m.wait(r"vfio-pci 0000:00:03\.0: reset at bind \(vfio_pci_core_enable, not incoming\)",
           offset=off)
    after = received(m, run, nic(run)["nic"]["guest"]["received"] + 20)
    g, g0 = after["nic"]["guest"], before["nic"]["guest"]
    assert after["restored"] and after["nic"]["lost"] == ""  # every file crossed
    assert after["nic"]["found_running"] is False  # ... but the device was reset
    assert g["postings"] == g0["postings"] + 1  # the VM was told: the guest reposted
    assert g["gaps"] > 0 and g["bad"] == 0 and g["out_of_order"] == 0
    assert m.status()["devices"]["iommu"]["faults"] == 0
    assert inside(m.dma_log()[log0:], where["ram"])
    assert ask(os.path.join(run, "vmm-vm0.sock"), "where")["ram"] == where["ram"]
    cell("pci-flb-not-honoured", m, run, log0, where["ram"], outcome="updated")


def test_fault_vmm_killed_with_the_device_attached(vm_machine: Any) -> None:
    """kill -9 of the VMM before the update: its files close, so vfio-pci disables the device
    (bus mastering off, reset) before unbinding -- no DMA lands after its memory is gone;
    init restarts the VMM, which assigns the device afresh; the update then goes through."""
    m, run = vm_machine("continuous", 4096)
    received(m, run, 20)
    pid = nic(run)["pid"]
    where = ask(os.path.join(run, "vmm-vm0.sock"), "where")
    off = m.status()["console_bytes"]
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    os.kill(pid, signal.SIGKILL)
    m.wait("vmm vm0: .* started", offset=off, timeout=120)  # restarted by init: a new VM
    fresh = received(m, run, 20)
    assert fresh["pid"] != pid and not fresh["restored"]
    new_where = ask(os.path.join(run, "vmm-vm0.sock"), "where")
    # the dead VM's memory saw no DMA after the device was disabled; all DMA since went to
    # one of the two VMs' memory
    assert inside(m.dma_log()[log0:], where["ram"] + new_where["ram"])
    assert m.status()["devices"]["iommu"]["faults"] == 0
    _, after = update(m, run)
    after = received(m, run, after["nic"]["guest"]["received"] + 20)
    assert after["nic"]["found_running"] and after["nic"]["guest"]["gaps"] == 0
    cell("kill-vmm@normal", m, run, log0, where["ram"] + new_where["ram"]
         + ask(os.path.join(run, "vmm-vm0.sock"), "where")["ram"], outcome="updated")


@pytest.mark.parametrize("event", faultpoint.EVENTS)
def test_fault_vmm_killed_at_each_phase(vm_machine: Any, event: str) -> None:
    """kill -9 of the VMM inside prepare or freeze (before it acknowledges: the update is
    rolled back) or in the next kernel before it retrieves anything (init's new VMM does:
    the update completes). Whatever happens, the device ends up serving a running VM, no
    IOMMU fault, and every DMA write lands in the memory of a VM."""
    m, run = vm_machine("continuous", 4096)
    received(m, run, 20)
    wheres = [ask(os.path.join(run, "vmm-vm0.sock"), "where")["ram"]]
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    luod = os.path.join(run, "luod.sock")
    faultpoint.arm(luod, "vm0", event)
    load_image(luod, "images/next.img")
    off = m.status()["console_bytes"]
    try:
        run_update(luod)
    except LiveUpdateError:
        assert event != "restore"  # rolled back
    m.wait("luod client vm0: fault point .*: killed", offset=off, timeout=30)
    m.wait("vmm vm0: .* (started|resumed)", offset=off, timeout=120)
    st = received(m, run, nic(run)["nic"]["guest"]["received"] + 20)
    wheres.append(ask(os.path.join(run, "vmm-vm0.sock"), "where")["ram"])
    assert st["restored"] == (event == "restore")
    assert st["nic"]["guest"]["bad"] == 0 and m.status()["devices"]["iommu"]["faults"] == 0
    assert inside(m.dma_log()[log0:], [r for w in wheres for r in w])
    cell(f"kill-vmm@{event}", m, run, log0, [r for w in wheres for r in w],
         outcome="updated" if event == "restore" else "rolled back")
