"""The Intel IOMMU driver's tables, legacy mode, as ``drivers/iommu/intel/`` writes them: one
root table, a context table per bus on first use, and per domain a 4-level second-level page
table (48-bit address width, ``agaw`` 2) with 4 KiB, 2 MiB and 1 GiB leaves.

Formats (``drivers/iommu/intel/iommu.h``): a root entry's ``lo`` is the context table's
address | present; a context entry's ``lo`` the page table's address | translation type
(multi-level, 0) << 2 | present, its ``hi`` the address width | domain id << 8; a PTE the
address | read | write (| ``DMA_PTE_LARGE_PAGE`` for a superpage). The unit is programmed as
``iommu_set_root_entry`` (``DMAR_RTADDR_REG``, then ``SRTP`` in ``DMAR_GCMD_REG``) and
``iommu_enable_translation`` (``TE``) do; ``intel_iommu_shutdown`` at a kexec turns
translation off (:func:`shutdown`).

Table pages come from an allocator of zeroed pages and are written through a memory view:
the same code runs in the kernel (the buddy allocator, RAM) and in tests against the
machine's walker.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from liveupdate.errors import LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

PAGE = 0x1000
READ, WRITE, LARGE = 1, 2, 1 << 7
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
LEVELS, AGAW_48 = 4, 2
DMAR_GCMD_REG, DMAR_GSTS_REG, DMAR_RTADDR_REG = 0x18, 0x1C, 0x20
GCMD_TE, GCMD_SRTP = 1 << 31, 1 << 30
LEAF_SIZES = (1 << 30, 1 << 21, 1 << 12)  # the largest leaf that fits is used


class Memory(Protocol):
    def __getitem__(self, key: slice, /) -> bytes: ...
    def __setitem__(self, key: slice, value: bytes, /) -> None: ...


@dataclass
class Domain:
    """One IO address space: its top table and the devices (requester ids) attached."""

    did: int
    top: int
    devices: set[int] = field(default_factory=set)


class Tables:
    def __init__(self, mem: Memory, alloc_page: Callable[[], int],
                 free_page: Callable[[int], None] | None = None) -> None:
        self.mem, self.alloc_page, self.free_page = mem, alloc_page, free_page
        self.root = self._zeroed()
        self.domains: dict[int, Domain] = {}

    @classmethod
    def adopt(cls, mem: Memory, alloc_page: Callable[[], int],
              free_page: Callable[[int], None], root: int) -> Tables:
        """Tables around a root table already in use (the live update take-over); the
        caller adds the domains it knows."""
        t = cls.__new__(cls)
        t.mem, t.alloc_page, t.free_page = mem, alloc_page, free_page
        t.root, t.domains = root, {}
        return t

    def _zeroed(self) -> int:
        phys = self.alloc_page()
        self.mem[phys : phys + PAGE] = bytes(PAGE)
        return phys

    def _get(self, phys: int) -> int:
        value: int = struct.unpack("<Q", self.mem[phys : phys + 8])[0]
        return value

    def _set(self, phys: int, value: int) -> None:
        self.mem[phys : phys + 8] = struct.pack("<Q", value)

    def domain(self) -> Domain:
        did = max(self.domains, default=0) + 1  # domain id 0 is reserved (caching mode)
        self.domains[did] = Domain(did, self._zeroed())
        return self.domains[did]

    def free_domain(self, d: Domain) -> None:
        """``intel_iommu_domain_free``: every device detached, every table page freed."""
        for source in list(d.devices):
            self.detach(d, source)
        pages = self._walk_pages(d.top, LEVELS)
        del self.domains[d.did]
        if self.free_page is not None:
            for page in pages:
                self.free_page(page)

    def attach(self, d: Domain, source: int) -> None:
        """``domain_context_mapping_one``: the device's context entry points at ``d``."""
        bus, devfn = source >> 8, source & 0xFF
        root = self.root + 16 * bus
        ctx = self._get(root) & ADDR_MASK
        if not ctx:
            ctx = self._zeroed()
            self._set(root, ctx | 1)
        entry = ctx + 16 * devfn
        self._set(entry + 8, AGAW_48 | d.did << 8)
        self._set(entry, d.top | 1)  # present last, as the driver orders it
        d.devices.add(source)

    def detach(self, d: Domain, source: int) -> None:
        """``domain_context_clear_one``: the device's context entry cleared (present first),
        so its next DMA faults (context not present) until it is attached again."""
        ctx = self._get(self.root + 16 * (source >> 8)) & ADDR_MASK
        if ctx:
            entry = ctx + 16 * (source & 0xFF)
            self._set(entry, 0)
            self._set(entry + 8, 0)
        d.devices.discard(source)

    def unmap(self, d: Domain, iova: int, size: int) -> None:
        """Clear the leaves of ``[iova, iova + size)``; a superpage must be covered whole
        (iommufd only unmaps whole areas, which were mapped with these leaves)."""
        end = iova + size
        while iova < end:
            slot, span = self._slot(d, iova)
            if slot is None or iova & (span - 1) or iova + span > end:
                raise ValueError(f"iova {iova:#x}: no leaf of the range starts there")
            self._set(slot, 0)
            iova += span

    def _slot(self, d: Domain, iova: int) -> tuple[int | None, int]:
        """The leaf slot mapping ``iova`` and its span (None: not mapped)."""
        table = d.top
        for level in range(LEVELS, 0, -1):
            shift = 12 + 9 * (level - 1)
            slot = table + 8 * ((iova >> shift) & 0x1FF)
            entry = self._get(slot)
            if not entry:
                return None, 1 << shift
            if level == 1 or entry & LARGE:
                return slot, 1 << shift
            table = entry & ADDR_MASK
        return None, PAGE

    def map(self, d: Domain, iova: int, phys: int, size: int, prot: int = READ | WRITE) -> None:
        """Map ``size`` bytes (page multiples, aligned) with the largest leaves that fit."""
        if (iova | phys | size) & (PAGE - 1) or size <= 0 or iova + size > 1 << 48:
            raise ValueError(f"map {iova:#x}->{phys:#x}+{size:#x}: not page-aligned or "
                             "beyond 48 bits")
        while size:
            leaf = next(s for s in LEAF_SIZES if not (iova | phys) & (s - 1) and s <= size)
            self._leaf(d, iova, phys | prot | (LARGE if leaf > PAGE else 0), leaf)
            iova, phys, size = iova + leaf, phys + leaf, size - leaf

    def _leaf(self, d: Domain, iova: int, pte: int, leaf: int) -> None:
        table = d.top
        for level in range(LEVELS, 0, -1):
            shift = 12 + 9 * (level - 1)
            slot = table + 8 * ((iova >> shift) & 0x1FF)
            if 1 << shift == leaf:
                if self._get(slot):
                    raise ValueError(f"iova {iova:#x} is already mapped")
                self._set(slot, pte)
                return
            entry = self._get(slot)
            if entry & LARGE:
                raise ValueError(f"iova {iova:#x} is inside a superpage already mapped")
            if not entry:
                entry = self._zeroed() | READ | WRITE
                self._set(slot, entry)
            table = entry & ADDR_MASK
        raise ValueError(f"no level has leaves of {leaf:#x} bytes")

    def table_pages(self) -> list[int]:
        """Every page of the tables: what a live update preserves to keep DMA translating."""
        pages = [self.root]
        for bus in range(256):
            ctx = self._get(self.root + 16 * bus) & ADDR_MASK
            if ctx:
                pages.append(ctx)
        for d in self.domains.values():
            pages += self._walk_pages(d.top, LEVELS)
        return pages

    def _walk_pages(self, table: int, level: int) -> list[int]:
        pages = [table]
        if level > 1:
            for i in range(512):
                pte = self._get(table + 8 * i)
                if pte and not pte & LARGE:
                    pages += self._walk_pages(pte & ADDR_MASK, level - 1)
        return pages


def program(write_reg: Callable[[int, int], None], root: int) -> None:
    """``iommu_set_root_entry`` then ``iommu_enable_translation``."""
    write_reg(DMAR_RTADDR_REG, root)
    write_reg(DMAR_GCMD_REG, GCMD_SRTP)
    write_reg(DMAR_GCMD_REG, GCMD_TE)


def shutdown(write_reg: Callable[[int, int], None]) -> None:
    """``intel_iommu_shutdown`` -> ``iommu_disable_translation``."""
    write_reg(DMAR_GCMD_REG, 0)


# -- the kernel's driver: ``intel_iommu=on`` ----------------------------------------------
def init(k: Kernel) -> None:
    """``intel_iommu_init`` when the command line asks for it (Linux's ``intel_iommu=on``):
    a root table in a page of the kernel's, programmed into the unit."""
    k.iommu = None
    if k.link is None or k.cmdline.get("intel_iommu", "off") != "on":
        return
    k.iommu = Tables(k.ram, lambda: k.alloc_pages(0), lambda p: k.free_pages(p, 0))
    program(lambda offset, value: _write_reg(k, offset, value), k.iommu.root)
    k.printk(f"DMAR: IOMMU enabled, root table at {k.iommu.root:#x}")


def kernel_shutdown(k: Kernel, kept: set[int] | None = None) -> None:
    """At a kexec, after ``device_shutdown``: translation off -- unless a live update keeps
    devices (``kept``, not None: the requester ids that go on translating; possibly none,
    when each was blocked): then, as the posted series' ``clear_unpreserved_context_entries``,
    every other device's context entry is cleared and translation stays on."""
    if k.iommu is not None and kept is not None:
        t = k.iommu
        for d in t.domains.values():
            for source in list(d.devices - kept):
                t.detach(d, source)
        k.printk(f"DMAR: translation kept for {len(kept)} preserved devices (kexec)")
        return
    if k.iommu is not None:
        try:
            shutdown(lambda offset, value: _write_reg(k, offset, value))
        except LiveUpdateError as e:  # the reboot goes on, as device_shutdown's does
            k.printk(f"DMAR: shutdown failed: {e}")
            return
        k.printk("DMAR: translation disabled (kexec)")


def _write_reg(k: Kernel, offset: int, value: int) -> None:
    assert k.link is not None
    k.link.call({"op": "iommu_write", "offset": offset, "value": value})
