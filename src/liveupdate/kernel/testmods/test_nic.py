"""A minimal driver for the machine's NIC (``test_nic=1``): at boot it gives each NIC a ring
of :data:`ENTRIES` descriptors and their buffers in pages of its own and turns receive and
bus mastering on -- what a NIC driver's probe does. With the IOMMU on (``intel_iommu=on``)
the device gets a domain of its own where the ring and the buffers sit at :data:`IOVA`
(the DMA API's way); without, DMA addresses are physical. It preserves nothing: at a kexec
``pci_device_shutdown`` turns bus mastering off, and from then on the NIC drops what
arrives while the rings' pages go back to the free pool."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.kernel.drivers import pci

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

NIC_IDS = 0x11B0 << 16 | 0x1B36  # device << 16 | vendor, as config dword 0 reads
ENTRIES, BUF = 256, 256
DESC = struct.Struct("<QHHB3x")
COMMAND_MEMORY_MASTER = 0b110
IOVA = 0x10000000


def late(k: Kernel) -> None:
    assert k.link is not None
    for bdf in k.pci:
        if pci.config_read(k, bdf, pci.PCI_VENDOR_ID, 4) != NIC_IDS:
            continue
        ring = k.alloc_pages(0)
        bufs = k.alloc_pages(4)  # 64 KiB: 256 buffers of 256 bytes
        dma_ring, dma_bufs = ring, bufs
        if k.iommu is not None:
            d = k.iommu.domain()
            dma_ring, dma_bufs = IOVA, IOVA + 0x10000
            k.iommu.map(d, dma_ring, ring, PAGE_SIZE)
            k.iommu.map(d, dma_bufs, bufs, 16 * PAGE_SIZE)
            k.iommu.attach(d, bdf)
        descs = b"".join(DESC.pack(dma_bufs + BUF * i, BUF, 0, 0) for i in range(ENTRIES))
        k.ram[ring : ring + len(descs)] = descs
        pci.config_write(k, bdf, pci.PCI_COMMAND, 2, COMMAND_MEMORY_MASTER)
        for reg, value in (("RING_LO", dma_ring & 0xFFFFFFFF), ("RING_HI", dma_ring >> 32),
                           ("RING_SIZE", ENTRIES), ("CTRL", 1)):
            k.link.call({"op": "bar_write", "bdf": bdf, "reg": reg, "value": value})
        k.printk(f"test_nic: {bdf:#06x}: ring at {ring:#x}, buffers at {bufs:#x} "
                 f"({16 * PAGE_SIZE // BUF} x {BUF} bytes), DMA addresses {dma_ring:#x} and "
                 f"{dma_bufs:#x}")
