"""vfio-pci with the device cdev (``drivers/vfio/vfio_main.c``, ``device_cdev.c``,
``pci/vfio_pci_core.c``): the devices it claims and the file ``/dev/vfio/devices/vfioN``.

Claiming: the module parameter ``vfio-pci.ids=VVVV:DDDD[,...]`` on the command line, as
Linux's ``vfio_pci.ids`` does; every enumerated function that matches gets a cdev, numbered
in enumeration order. A device needs an IOMMU (``intel_iommu=on``): without one it has no
IOMMU group and probe fails, as in Linux. Probe sizes BAR0 as software does (all ones, read
the mask back, restore).

The file (a cdev open): every command but ``VFIO_DEVICE_BIND_IOMMUFD`` is EINVAL until it is
bound, and so are reads and writes (``df->access_granted``). Bind (``vfio_df_ioctl_bind_
iommufd``): flags other than the VF token are EINVAL, the token on a function that is no VF
is EINVAL, binding twice or a device already open through another file is EINVAL, an
iommufd fd that is not open is EBADF and one that is not an iommufd EBADFD; then
``vfio_pci_core_enable``: a function-level reset and memory space on (bus mastering stays
off until the user sets it in config space). The bound file holds its iommufd open (the
device's ``iommufd_ctx_get``). Close unbinds: detach, ``vfio_pci_core_disable`` (bus
mastering off, reset).

Regions: ``VFIO_DEVICE_GET_REGION_INFO`` and ``pread``/``pwrite`` at ``index << 40``: BAR0
(32-bit registers, 4-byte aligned accesses) and config space (any length, split into aligned
1/2/4-byte accesses). Deviations: config space is not virtualized (reads and writes reach
the function as they are, where vfio-pci emulates BARs and some bits); no BAR mmap (the
MMAP flag is not set); no interrupts (``num_irqs`` says 5 as vfio-pci does, none usable).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from liveupdate.abi.devices_uapi import VFIO_PCI_OFFSET_SHIFT
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.drivers import pci

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

PCI_BASE_ADDRESS_0 = 0x10
CONFIG_SIZE = 256
PCI_COMMAND_MEMORY = 1 << 1


@dataclass(eq=False)
class VfioPciDevice:
    """A function vfio-pci claimed (``struct vfio_pci_core_device``)."""

    k: Kernel
    bdf: int
    index: int  # N of /dev/vfio/devices/vfioN
    bar_size: int
    open: bool = False  # bound through a file (cdev: one at a time)
    preserved: bool = False  # in an outgoing LUO session
    incoming: bool = False  # preserved by the previous kernel, not finished yet

    @property
    def path(self) -> str:
        return f"/dev/vfio/devices/vfio{self.index}"

    @property
    def name(self) -> str:
        return f"0000:{self.bdf >> 8:02x}:{(self.bdf >> 3) & 31:02x}.{self.bdf & 7}"

    def config_read(self, offset: int, size: int) -> int:
        return pci.config_read(self.k, self.bdf, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        pci.config_write(self.k, self.bdf, offset, size, value)

    def flr(self) -> None:
        assert self.k.link is not None
        self.k.link.call({"op": "pci_flr", "bdf": self.bdf})

    def reset(self) -> None:
        """``pci_try_reset_function``: save, FLR, restore (the command register comes back
        as it was, so does BAR0; the device's own registers do not)."""
        command = self.config_read(pci.PCI_COMMAND, 2)
        bar = self.config_read(PCI_BASE_ADDRESS_0, 4)
        self.flr()
        self.config_write(PCI_BASE_ADDRESS_0, 4, bar)
        self.config_write(pci.PCI_COMMAND, 2, command)

    def enable(self) -> None:
        """``vfio_pci_core_enable``: reset, memory space on, bus master as the reset left it
        (off)."""
        self.flr()
        self.config_write(pci.PCI_COMMAND, 2, PCI_COMMAND_MEMORY)

    def disable(self) -> None:
        """``vfio_pci_core_disable``: bus mastering off, then reset."""
        command = self.config_read(pci.PCI_COMMAND, 2)
        self.config_write(pci.PCI_COMMAND, 2, command & ~pci.PCI_COMMAND_MASTER)
        self.flr()

    # -- regions -------------------------------------------------------------------------
    def region_rw(self, offset: int, data: bytes | None, count: int) -> bytes:
        """``vfio_pci_core_read``/``write`` at a file offset: BAR0 or config space."""
        index, off = offset >> VFIO_PCI_OFFSET_SHIFT, offset & ((1 << VFIO_PCI_OFFSET_SHIFT) - 1)
        n = count if data is None else len(data)
        if index == 7:
            if off + n > CONFIG_SIZE:
                raise LiveUpdateError(err=errno.EINVAL, msg="config access past its 256 bytes")
            return self._config_rw(off, data, n)
        if index == 0:
            if off % 4 or n % 4 or off + n > self.bar_size:
                raise LiveUpdateError(err=errno.EINVAL, msg="BAR0: 4-byte aligned 32-bit "
                                      "registers inside the BAR")
            return self._bar_rw(off, data, n)
        raise LiveUpdateError(err=errno.EINVAL, msg=f"region {index}: none on this device")

    def _config_rw(self, off: int, data: bytes | None, n: int) -> bytes:
        out = bytearray()
        pos = 0
        while pos < n:
            at = off + pos
            size = next(s for s in (4, 2, 1) if at % s == 0 and pos + s <= n)
            if data is None:
                out += self.config_read(at, size).to_bytes(size, "little")
            else:
                self.config_write(at, size, int.from_bytes(data[pos : pos + size], "little"))
            pos += size
        return bytes(out)

    def _bar_rw(self, off: int, data: bytes | None, n: int) -> bytes:
        assert self.k.link is not None
        out = bytearray()
        for at in range(off, off + n, 4):
            if data is None:
                v = self.k.link.call({"op": "bar_read", "bdf": self.bdf, "offset": at})
                out += int(v["value"]).to_bytes(4, "little")
            else:
                value = int.from_bytes(data[at - off : at - off + 4], "little")
                self.k.link.call({"op": "bar_write", "bdf": self.bdf, "offset": at,
                                  "value": value})
        return bytes(out)


def continuous(k: Kernel) -> bool:
    """``liveupdate_devices=continuous`` (our deviation; ``posted`` by default): preserved
    devices keep running through a live update (:mod:`liveupdate.kernel.vfio.luo`)."""
    return k.cmdline.get("liveupdate_devices", "posted") == "continuous"


def _ids(value: str) -> set[int]:
    """``vfio-pci.ids=VVVV:DDDD,...`` as config dword 0 reads them (device << 16 | vendor);
    a malformed entry is skipped with a warning, as the module's ``vfio_pci_fill_ids``."""
    out = set()
    for item in filter(None, value.split(",")):
        vendor, _, device = item.partition(":")
        try:
            out.add(int(device, 16) << 16 | int(vendor, 16))
        except ValueError:
            continue
    return out


def probe(k: Kernel, incoming: set[int]) -> list[VfioPciDevice]:
    """Claim the functions ``vfio-pci.ids`` names (none without an IOMMU); those in
    ``incoming`` (the PCI FLB) are marked so, and nothing else is done to them: sizing
    BAR0 rewrites its address at once and touches neither the command register nor the
    device (open question 6: enumeration leaves a preserved device running)."""
    wanted = _ids(k.cmdline.get("vfio-pci.ids", ""))
    out: list[VfioPciDevice] = []
    if not wanted or k.link is None:
        return out
    for bdf in k.pci:
        if pci.config_read(k, bdf, pci.PCI_VENDOR_ID, 4) not in wanted:
            continue
        name = f"0000:{bdf >> 8:02x}:{(bdf >> 3) & 31:02x}.{bdf & 7}"
        if k.iommu is None:
            k.printk(f"vfio-pci {name}: probe failed with error -22 (no IOMMU group)")
            continue
        bar = pci.config_read(k, bdf, PCI_BASE_ADDRESS_0, 4)
        pci.config_write(k, bdf, PCI_BASE_ADDRESS_0, 4, 0xFFFFFFFF)
        mask = pci.config_read(k, bdf, PCI_BASE_ADDRESS_0, 4) & ~0xF
        pci.config_write(k, bdf, PCI_BASE_ADDRESS_0, 4, bar)
        dev = VfioPciDevice(k, bdf, len(out), (~mask & 0xFFFFFFFF) + 1,
                            incoming=bdf in incoming)
        out.append(dev)
        k.printk(f"vfio-pci {name}: {dev.path} (BAR0 {dev.bar_size:#x} bytes)"
                 + (", incoming (preserved by the previous kernel)" if dev.incoming else ""))
    return out
