"""A PCI function's configuration space: the part of a device a kernel enumerates and
programs, hardware that outlives kernels (ARCHITECTURE.md, invariant 5).

Type 0 header (PCI Local Bus 3.0, as ``include/uapi/linux/pci_regs.h`` names it): vendor
and device id, ``PCI_COMMAND`` (bit 1 memory space, bit 2 bus master: without it the device
issues no DMA), ``PCI_STATUS``, class code, and one 32-bit memory BAR (``PCI_BASE_ADDRESS_0``)
of :attr:`PciFunction.bar_size` bytes, sized as software sizes it (write all ones, read the
mask back). A function-level reset returns the header to its power-on values (bus master off)
and resets the device behind it; ``pci_device_shutdown`` clearing bus mastering is a config
write of ``PCI_COMMAND``.
"""

from __future__ import annotations

import struct
import threading

PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_COMMAND, PCI_STATUS = 0x00, 0x02, 0x04, 0x06
PCI_CLASS_REVISION, PCI_BASE_ADDRESS_0 = 0x08, 0x10
PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 1 << 1, 1 << 2
COMMAND_WRITABLE = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | (1 << 10)  # + INTx disable
CONFIG_SIZE = 256


def bdf(text: str) -> int:
    """``BB:DD.F`` -> the requester id ``bus << 8 | dev << 3 | fn`` (ValueError if bad)."""
    bus, _, rest = text.partition(":")
    dev, _, fn = rest.partition(".")
    b, d, f = int(bus, 16), int(dev, 16), int(fn, 16)
    if not (0 <= b < 256 and 0 <= d < 32 and 0 <= f < 8):
        raise ValueError(f"{text}: not a bus:device.function")
    return b << 8 | d << 3 | f


def bdf_text(source: int) -> str:
    """The requester id as ``BB:DD.F`` (:func:`bdf`'s inverse)."""
    return f"{source >> 8:02x}:{(source >> 3) & 31:02x}.{source & 7}"


class PciFunction:
    """Config space and reset; a device subclasses it and overrides :meth:`reset_device`."""

    def __init__(self, source: int, vendor: int, device: int, class_code: int,
                 bar_size: int) -> None:
        if bar_size < 16 or bar_size & (bar_size - 1):
            raise ValueError("a memory BAR's size is a power of two of at least 16 bytes")
        self.source = source
        self.bar_size = bar_size
        self.lock = threading.RLock()
        self._ids = struct.pack("<HH", vendor, device)
        self._class = class_code
        self.config = bytearray(CONFIG_SIZE)
        self._power_on()

    def _power_on(self) -> None:
        self.config[:] = bytes(CONFIG_SIZE)
        self.config[0:4] = self._ids
        struct.pack_into("<I", self.config, PCI_CLASS_REVISION, self._class << 8 | 1)

    @property
    def command(self) -> int:
        value: int = struct.unpack_from("<H", self.config, PCI_COMMAND)[0]
        return value

    @property
    def bus_master(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def bar0(self) -> int:
        value: int = struct.unpack_from("<I", self.config, PCI_BASE_ADDRESS_0)[0]
        return value & ~0xF

    def config_read(self, offset: int, size: int) -> int:
        check(offset, size)
        with self.lock:
            return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Only the writable bits change; the rest of the header is read-only."""
        check(offset, size)
        with self.lock:
            raw = bytearray(self.config)
            raw[offset : offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size,
                                                                                 "little")
            command = struct.unpack_from("<H", raw, PCI_COMMAND)[0] & COMMAND_WRITABLE
            bar = struct.unpack_from("<I", raw, PCI_BASE_ADDRESS_0)[0] & ~(self.bar_size - 1)
            struct.pack_into("<H", self.config, PCI_COMMAND, command)
            struct.pack_into("<I", self.config, PCI_BASE_ADDRESS_0, bar & 0xFFFFFFF0)

    def reset(self) -> None:
        """Function-level reset: the header as at power on (bus master off), the device too."""
        with self.lock:
            self._power_on()
            self.reset_device()

    def reset_device(self) -> None:
        """What the device behind the header loses at a reset (nothing here)."""


def check(offset: int, size: int) -> None:
    if size not in (1, 2, 4) or offset < 0 or offset % size or offset + size > CONFIG_SIZE:
        raise ValueError(f"config access of {size} bytes at {offset:#x}")
