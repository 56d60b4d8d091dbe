"""The machine's devices across a real kexec: the kernel enumerates the NIC through config
space, a driver (``test_nic``) gives it a ring and DMA runs into that driver's pages only; at
the kexec ``pci_device_shutdown`` turns bus mastering off, the NIC stays (hardware outlives
kernels), the next kernel -- without the driver -- enumerates it again, and from then on what
arrives is dropped and nothing is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from liveupdate.machine.client import start

BDF = "00:03.0"
NIC = {"kind": "nic", "bdf": BDF, "rate": 2000}


@pytest.mark.parametrize("iommu", ["off", "on"])
def test_dma_runs_until_the_kexec_clears_bus_mastering(tmp_path: Path, iommu: str) -> None:
    """With the IOMMU on, the device writes through its domain (DMA addresses that are not
    the pages') and the kexec turns translation off after bus mastering."""
    proc, m = start(str(tmp_path / "m"), memory=1 << 30,
                    cmdline=f"kho=on test_nic=1 intel_iommu={iommu}", devices=[NIC],
                    log=str(tmp_path / "m.log"))
    try:
        m.booted(60)
        m.wait(r"pci 0000:00:03\.0: \[1b36:11b0\] type 00 class 0x020000")
        said = m.wait(r"test_nic: 0x0018: ring at 0x[0-9a-f]+, buffers at 0x[0-9a-f]+")
        ring, bufs, dma_ring, _ = (int(x, 16) for x in
                                   re.findall(r"0x([0-9a-f]+)", said["line"])[1:])
        assert (dma_ring != ring) == (iommu == "on")
        assert m.status()["devices"]["iommu"]["enabled"] == (iommu == "on")
        fn = m.status()["devices"]["functions"][0]
        fn = m.device_wait(BDF, fn["sent"] + 200)["functions"][0]  # 0.1 s of traffic
        assert fn["bus_master"] and fn["delivered"] > 0
        off = m.status()["console_bytes"]
        m.kexec_load(cmdline="kho=on")  # the next kernel has no driver for it
        st = m.kexec_exec()
        m.wait(r"pci 0000:00:03\.0: bus mastering off \(kexec\)", offset=off)
        if iommu == "on":
            m.wait(r"DMAR: translation disabled \(kexec\)", offset=off)
        m.wait(r"pci 0000:00:03\.0: \[1b36:11b0\]", offset=off)  # the next kernel's boot
        at_jump = st["devices"]["functions"][0]
        assert not at_jump["bus_master"]
        later = m.device_wait(BDF, at_jump["sent"] + 200)
        fn = later["functions"][0]
        assert fn["delivered"] == at_jump["delivered"]  # nothing written since
        assert fn["drops"] - at_jump["drops"] == fn["sent"] - at_jump["sent"]
        assert later["iommu"]["faults"] == 0 and not later["iommu"]["enabled"]
        log = m.dma_log()
        assert len(log) == 2 * fn["delivered"] == later["iommu"]["dma_writes"]
        inside = [(ring, ring + 4096), (bufs, bufs + 16 * 4096)]
        assert all(any(lo <= p and p + n <= hi for lo, hi in inside) for p, n in log)
    finally:
        m.shutdown()
        proc.wait(30)
