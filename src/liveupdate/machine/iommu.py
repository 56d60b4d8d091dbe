"""The IOMMU: a VT-d-like DMA-remapping unit in legacy (non-scalable) mode, hardware that
outlives kernels (ARCHITECTURE.md, invariant 5).

Its tables live in RAM, in the layout Linux's Intel IOMMU driver writes
(``drivers/iommu/intel/iommu.h``: ``struct root_entry``, ``struct context_entry``,
``struct dma_pte``), so a kernel that preserves them hands the next kernel live tables:

* the root table: 256 16-byte entries indexed by bus; ``lo`` bit 0 present, bits 12-63 the
  context table's address;
* a context table: 256 16-byte entries indexed by devfn; ``lo`` bit 0 present, bit 1 fault
  processing disable, bits 2-3 translation type (0 multi-level, 2 pass-through), bits 12-63
  the second-level table's address; ``hi`` bits 0-2 the address width (1: 39 bits, 3 levels;
  2: 48 bits, 4 levels), bits 8-23 the domain id;
* second-level tables: 512 8-byte entries; bit 0 read, bit 1 write (neither: not present),
  bit 7 a superpage leaf at level 2 (2 MiB) or 3 (1 GiB), bits 12-51 the address.

Registers at the offsets of ``drivers/iommu/intel/iommu.h`` (``DMAR_GCMD_REG`` 0x18,
``DMAR_GSTS_REG`` 0x1c, ``DMAR_RTADDR_REG`` 0x20): writing ``SRTP`` latches the root table
address, ``TE`` turns translation on. With translation off a DMA address is a physical
address, as on the hardware. A DMA that cannot be translated is not performed and is logged
with the reason codes Linux prints (``dma_remap_fault_reasons[]`` in
``drivers/iommu/intel/dmar.c``), unless its context entry sets fault processing disable.

Deviations: the unit caches no translation (no IOTLB, no context cache), so a table change
is seen by the next DMA without an invalidation (a kernel that forgets to invalidate is not
caught); legacy mode only (``DMA_RTADDR_SMT`` is ignored, translation type 1, device-IOTLB, is
an invalid context entry); reserved bits are not checked (reasons 0xa-0xc); the fault log
keeps the newest records where the hardware keeps the first and sets PFO; CAP and ECAP read
0.
"""

from __future__ import annotations

import array
import struct
import threading
from collections import deque
from dataclasses import dataclass

from liveupdate.errors import LiveUpdateError
from liveupdate.machine.ram import Ram

DMAR_GCMD_REG, DMAR_GSTS_REG, DMAR_RTADDR_REG = 0x18, 0x1C, 0x20
GCMD_TE, GCMD_SRTP = 1 << 31, 1 << 30  # the status bits (TES, RTPS) are the same
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
PTE_READ, PTE_WRITE, PTE_LARGE = 1, 2, 1 << 7
TT_MULTI_LEVEL, TT_PASS_THROUGH = 0, 2
LEVELS = {1: 3, 2: 4}  # context address width -> second-level table levels
FAULT_LOG = 256  # fault records kept; more set the overflow flag, as PFO does
WRITE_LOG = 1 << 22  # DMA writes logged (64 MiB of records); later ones only counted

# dma_remap_fault_reasons[] of drivers/iommu/intel/dmar.c
ROOT_NOT_PRESENT, CONTEXT_NOT_PRESENT, CONTEXT_INVALID, BEYOND_MGAW = 1, 2, 3, 4
PTE_NOT_WRITABLE, PTE_NOT_READABLE = 5, 6
NEXT_TABLE_INVALID, ROOT_TABLE_INVALID, CONTEXT_TABLE_INVALID = 7, 8, 9
REASONS = {ROOT_NOT_PRESENT: "Present bit in root entry is clear",
           CONTEXT_NOT_PRESENT: "Present bit in context entry is clear",
           CONTEXT_INVALID: "Invalid context entry",
           BEYOND_MGAW: "Access beyond MGAW",
           PTE_NOT_WRITABLE: "PTE Write access is not set",
           PTE_NOT_READABLE: "PTE Read access is not set",
           NEXT_TABLE_INVALID: "Next page table ptr is invalid",
           ROOT_TABLE_INVALID: "Root table address invalid",
           CONTEXT_TABLE_INVALID: "Context table ptr is invalid"}


@dataclass(frozen=True)
class Fault:
    source: int  # requester id: bus << 8 | devfn
    address: int  # the DMA address
    write: bool
    reason: int

    def describe(self) -> str:
        return (f"DMAR: [DMA {'Write' if self.write else 'Read'}] Request device "
                f"[{self.source >> 8:02x}:{(self.source >> 3) & 0x1F:02x}.{self.source & 7}] "
                f"fault addr {self.address:#x} [fault reason {self.reason:#04x}] "
                f"{REASONS.get(self.reason, 'Unknown')}")


class DmaError(Exception):
    """A DMA the device's transaction does not complete: the device sees an abort."""


class OutsideRam(DmaError):
    """A DMA to a physical address no RAM answers (a master abort on the bus)."""


class Translated(DmaError):
    """A DMA that cannot be translated (the fault, logged or not)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.describe())
        self.fault = fault


class Iommu:
    def __init__(self, ram: Ram) -> None:
        self.ram = ram
        self.lock = threading.Lock()
        self.gsts = 0
        self.rtaddr = 0  # the register
        self.root = 0  # the latched root table address (SRTP)
        self.faults: deque[Fault] = deque(maxlen=FAULT_LOG)
        self.fault_count = 0
        self.writes = array.array("Q")  # physical address, length: every DMA write
        self.write_count = 0

    # -- registers ------------------------------------------------------------------------
    def write_reg(self, offset: int, value: int) -> None:
        with self.lock:
            if offset == DMAR_RTADDR_REG:
                self.rtaddr = value & ADDR_MASK
            elif offset == DMAR_GCMD_REG:
                if value & GCMD_SRTP:
                    self.root = self.rtaddr
                    self.gsts |= GCMD_SRTP
                self.gsts = (self.gsts & ~GCMD_TE) | (value & GCMD_TE)
            else:
                raise ValueError(f"IOMMU register {offset:#x} is not writable")

    def read_reg(self, offset: int) -> int:
        with self.lock:
            return {DMAR_GSTS_REG: self.gsts, DMAR_RTADDR_REG: self.rtaddr}.get(offset, 0)

    @property
    def enabled(self) -> bool:
        return bool(self.gsts & GCMD_TE)

    @property
    def overflowed(self) -> bool:
        return self.fault_count > FAULT_LOG

    # -- DMA ----------------------------------------------------------------------------
    def dma_read(self, source: int, address: int, size: int) -> bytes:
        """Read ``size`` bytes at DMA ``address``, page by page through the tables."""
        spans = [(self._ram_span(self.translate(source, a, n, write=False), n), n)
                 for a, n in _pages(address, size)]
        return b"".join(self.ram.read(phys, n) for phys, n in spans)

    def dma_write(self, source: int, address: int, data: bytes) -> None:
        """Write ``data`` at DMA ``address``: every page is translated and found in RAM
        before any byte lands (a fault or an abort writes nothing), and each write's
        physical range is logged (the first :data:`WRITE_LOG` of them; the rest counted)."""
        spans = [(self._ram_span(self.translate(source, a, n, write=True), n), a - address, n)
                 for a, n in _pages(address, len(data))]
        for phys, off, n in spans:
            self.ram.write(phys, data[off : off + n])
        with self.lock:
            for phys, _, n in spans:
                self.write_count += 1
                if len(self.writes) < 2 * WRITE_LOG:
                    self.writes.extend((phys, n))

    def _ram_span(self, phys: int, n: int) -> int:
        if phys + n > self.ram.size:
            raise OutsideRam(f"DMA to {phys:#x}+{n:#x}: no RAM there")
        return phys

    def written(self, since: int = 0) -> list[tuple[int, int]]:
        """The physical ranges DMA wrote, in order, from record ``since`` on."""
        with self.lock:
            flat = self.writes[2 * since :]
        return list(zip(flat[::2], flat[1::2], strict=True))

    # -- translation ----------------------------------------------------------------------
    def _u64(self, phys: int, reason: int) -> int:
        try:
            value: int = struct.unpack("<Q", self.ram.read(phys, 8))[0]
        except LiveUpdateError as e:  # a table pointer outside RAM
            raise _Bad(reason) from e
        return value

    def translate(self, source: int, address: int, size: int, write: bool) -> int:
        """The physical address of ``size`` bytes (within one page) at DMA ``address`` from
        ``source``, or :class:`Translated` with the fault (logged)."""
        if size <= 0 or (address & 0xFFF) + size > 0x1000:
            raise ValueError(f"{size} bytes at {address:#x}: not within one page")
        with self.lock:
            if not self.enabled:
                return address
            try:
                return self._walk(source, address, write)
            except _Bad as bad:
                fault = Fault(source, address, write, bad.reason)
                if not bad.quiet:
                    self.fault_count += 1
                    self.faults.append(fault)
                raise Translated(fault) from None

    def _walk(self, source: int, address: int, write: bool) -> int:
        bus, devfn = (source >> 8) & 0xFF, source & 0xFF
        root_lo = self._u64(self.root + 16 * bus, ROOT_TABLE_INVALID)
        if not root_lo & 1:
            raise _Bad(ROOT_NOT_PRESENT)
        ctx = (root_lo & ADDR_MASK) + 16 * devfn
        lo = self._u64(ctx, CONTEXT_TABLE_INVALID)
        hi = self._u64(ctx + 8, CONTEXT_TABLE_INVALID)
        quiet = bool(lo & 2)  # fault processing disable
        if not lo & 1:
            raise _Bad(CONTEXT_NOT_PRESENT, quiet)
        tt = (lo >> 2) & 3
        if tt == TT_PASS_THROUGH:
            return address
        levels = LEVELS.get(hi & 7)
        if tt != TT_MULTI_LEVEL or levels is None:
            raise _Bad(CONTEXT_INVALID, quiet)
        if address >> (12 + 9 * levels):
            raise _Bad(BEYOND_MGAW, quiet)
        table = lo & ADDR_MASK
        for level in range(levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            try:
                pte = self._u64(table + 8 * ((address >> shift) & 0x1FF), NEXT_TABLE_INVALID)
            except _Bad as bad:
                raise _Bad(bad.reason, quiet) from None
            if not pte & (PTE_WRITE if write else PTE_READ):
                raise _Bad(PTE_NOT_WRITABLE if write else PTE_NOT_READABLE, quiet)
            if level == 1 or (pte & PTE_LARGE and level in (2, 3)):
                span = (1 << shift) - 1
                return (pte & ADDR_MASK & ~span) | (address & span)
            table = pte & ADDR_MASK
        raise AssertionError("unreachable: level 1 is always a leaf")


class _Bad(Exception):
    def __init__(self, reason: int, quiet: bool = False) -> None:
        self.reason, self.quiet = reason, quiet


def _pages(address: int, size: int) -> list[tuple[int, int]]:
    out = []
    while size > 0:
        n = min(size, 0x1000 - (address & 0xFFF))
        out.append((address, n))
        address, size = address + n, size - n
    return out
