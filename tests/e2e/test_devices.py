"""The machine's devices across a real kexec: the kernel enumerates the NIC through config
space, a driver (``test_nic``) gives it a ring and DMA runs into that driver's pages only; at
the kexec ``pci_device_shutdown`` turns bus mastering off (and ``intel_iommu_shutdown`` the
IOMMU's translation), the NIC and its counters stay (hardware outlives kernels), the next
kernel -- without the driver -- enumerates it again. Then the host hands the device a ring
again at the addresses it still holds: a device left mastering would write into what are
now the next kernel's free pages; this one drops every packet and writes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from liveupdate.kernel.testmods.test_nic import BUF, ENTRIES
from liveupdate.machine.client import start
from liveupdate.machine.nic import DESC

BDF = "00:03.0"
NIC = {"kind": "nic", "bdf": BDF, "rate": 2000}


@pytest.mark.parametrize("iommu", ["off", "on"])
def test_dma_runs_until_the_kexec_clears_bus_mastering(tmp_path: Path, iommu: str) -> None:
    proc, m = start(str(tmp_path / "m"), memory=1 << 30,
                    cmdline=f"kho=on test_nic=1 intel_iommu={iommu}", devices=[NIC],
                    log=str(tmp_path / "m.log"))
    try:
        m.booted(60)
        m.wait(r"pci 0000:00:03\.0: \[1b36:11b0\] type 00 class 0x020000")
        said = m.wait(r"test_nic: 0x0018: ring at 0x[0-9a-f]+, buffers at 0x[0-9a-f]+")
        ring, bufs, dma_ring, dma_bufs = (int(x, 16) for x in
                                          re.findall(r"0x([0-9a-f]+)", said["line"])[1:])
        assert (dma_ring != ring) == (iommu == "on")
        assert m.status()["devices"]["iommu"]["enabled"] == (iommu == "on")
        before = m.device_wait(BDF, m.status()["devices"]["functions"][0]["sent"] + 200)
        assert before["functions"][0]["bus_master"] and before["functions"][0]["delivered"]
        log = m.dma_log()  # a packet and its descriptor each, while packets go on landing
        now = m.status()["devices"]["functions"][0]["delivered"]
        assert 2 * before["functions"][0]["delivered"] <= len(log) <= 2 * now
        inside = [(ring, ring + 4096), (bufs, bufs + 16 * 4096)]
        assert all(any(lo <= p and p + n <= hi for lo, hi in inside) for p, n in log)

        off = m.status()["console_bytes"]
        m.kexec_load(cmdline="kho=on")  # the next kernel has no driver for it
        st = m.kexec_exec()
        m.wait(r"pci 0000:00:03\.0: bus mastering off \(kexec\)", offset=off)
        if iommu == "on":
            m.wait(r"DMAR: translation disabled \(kexec\)", offset=off)
        m.wait(r"pci 0000:00:03\.0: \[1b36:11b0\]", offset=off)  # the next kernel's boot
        at_jump = st["devices"]["functions"][0]
        was = before["functions"][0]
        assert not at_jump["bus_master"] and not st["devices"]["iommu"]["enabled"]
        # the same device: its source and counters went on through the jump
        assert at_jump["sent"] > was["sent"] and at_jump["delivered"] >= was["delivered"]

        # the ring it still points at (untranslated now), made ready to receive again
        m.ram_write(dma_ring, b"".join(DESC.pack(dma_bufs + BUF * i, BUF, 0, 0)
                                       for i in range(ENTRIES)))
        later = m.device_wait(BDF, at_jump["sent"] + 200)
        fn = later["functions"][0]
        assert fn["delivered"] == at_jump["delivered"]
        assert fn["drops"] - at_jump["drops"] == fn["sent"] - at_jump["sent"] >= 200
        assert later["iommu"]["dma_writes"] == st["devices"]["iommu"]["dma_writes"]
        assert later["iommu"]["faults"] == 0
    finally:
        m.shutdown()
        proc.wait(30)
