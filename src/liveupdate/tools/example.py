"""A sample handover, laid out in RAM the way an outgoing kernel leaves it at kexec.

This is what ``luoctl example`` writes, from the codecs alone -- a second writer, independent
of the emulated kernel's code, that ``luoctl inspect`` must decode as well as what the kernel
writes (``luoctl capture``, :mod:`liveupdate.tools.capture`). It holds: boot parameters with a
``SETUP_KEXEC_KHO`` node, a KHO root FDT with ``memblock``, ``kho_test`` and ``LUO``
subtrees, a serialized ``kho-v1`` memory map (chunks and bitmaps not themselves preserved, as
in Linux) and a memfd holding "VM memory". ``generation`` picks the LUO
era: ``6.19`` (sessions, struct memfd-v1 over a KHO vmalloc array, live root FDT) or ``v3``
(state machine, FDT memfd-v1, sequential 6.16 root FDT). Only the bytes are produced here;
the caller writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liveupdate.abi import (
    bootparams,
    kho,
    kho_memmap,
    khotest,
    luo_session,
    luo_v3,
    memblock,
    memfd,
    vmalloc,
)
from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, get_order
from liveupdate.errors import AbiError

MiB = 1 << 20


@dataclass
class Ram:
    """A bump allocator over sparse RAM that records writes and preservations."""

    size: int
    next: int = 256 * MiB
    writes: dict[int, bytes] = field(default_factory=dict)
    preserved: list[tuple[int, int]] = field(default_factory=list)

    def alloc(self, order: int = 0) -> int:
        align = PAGE_SIZE << order
        phys = -(-self.next // align) * align
        if phys + align > self.size:
            raise AbiError(msg=f"example does not fit in {self.size // MiB} MiB of RAM")
        self.next = phys + align
        return phys

    def alloc_bytes(self, nbytes: int) -> int:
        return self.alloc(get_order(nbytes))

    def put(self, phys: int, data: bytes) -> None:
        self.writes[phys] = bytes(data)

    def preserve(self, phys: int, order: int = 0) -> None:
        self.preserved.append((phys, order))

    def store_preserved(self, data: bytes) -> int:
        """kho_alloc_preserve + copy: a preserved folio holding ``data``."""
        phys = self.alloc_bytes(len(data))
        self.put(phys, data)
        self.preserve(phys, get_order(len(data)))
        return phys

    def store_vmalloc(self, data: bytes) -> vmalloc.KhoVmalloc:
        """kho_preserve_vmalloc of order-0 pages holding ``data``."""
        nblocks, nchunks = vmalloc.pages_needed(len(data))
        lay = vmalloc.layout(data, np.array([self.alloc() for _ in range(nblocks)], np.uint64),
                             np.array([self.alloc() for _ in range(nchunks)], np.uint64))
        for p, page in lay.pages:
            self.put(p, page)
            self.preserve(p)
        return lay.desc


@dataclass(frozen=True)
class Example:
    ram_size: int
    writes: dict[int, bytes]
    setup_data: bytes
    boot_params_phys: int
    preserved_pages: int


def _memfd_folios(ram: Ram, rng: np.random.Generator, vm_mib: int) -> memfd.Folios:
    """Guest memory: 2 MiB folios (order 9) plus a 4 KiB tail, each stamped at its start."""
    pfns, idx = [], []
    for i in range(vm_mib // 2):
        p = ram.alloc(9)
        ram.put(p, f"guest page {i * 512}".encode())
        ram.preserve(p, 9)
        pfns.append(p >> PAGE_SHIFT)
        idx.append(i * 512)
    p = ram.alloc(0)
    ram.put(p, b"tail" + rng.bytes(60))
    ram.preserve(p, 0)
    pfns.append(p >> PAGE_SHIFT)
    idx.append((vm_mib // 2) * 512)
    n = len(pfns)
    return memfd.Folios(np.array(pfns, np.uint64),
                        np.full(n, memfd.FOLIO_DIRTY | memfd.FOLIO_UPTODATE, np.uint16),
                        np.array(idx, np.uint64))


class _V3:
    """The seed's era: kho_test's array inline, the files FDT and memfd FDTs, and the root
    built in one go at finalize."""

    @staticmethod
    def kho_test(ram: Ram, info: np.ndarray, csum: int) -> khotest.KhoTest:
        return khotest.KhoTest(len(info), csum, info, None)

    @staticmethod
    def luo(ram: Ram, folios: memfd.Folios, size: int) -> int:
        memfd_phys = ram.store_preserved(memfd.encode_fdt(memfd.MemfdState(0, size, folios)))
        files = luo_v3.encode_files_fdt([luo_v3.FileEntry(0x1, memfd.MEMFD_V1, memfd_phys)])
        files_phys = ram.store_preserved(files)
        return ram.store_preserved(luo_v3.encode_luo_fdt([(luo_v3.FILES_SUBSYSTEM, files_phys)]))

    @staticmethod
    def root(mem_map: int, subtrees: list[tuple[str, int]]) -> bytes:
        return kho.encode_root_sequential(mem_map, subtrees)


class _V619:
    """6.19: kho_test's array in KHO vmalloc, sessions with memfd structs, the live root."""

    @staticmethod
    def kho_test(ram: Ram, info: np.ndarray, csum: int) -> khotest.KhoTest:
        return khotest.KhoTest(len(info), csum, None, ram.store_vmalloc(info.tobytes()))

    @staticmethod
    def luo(ram: Ram, folios: memfd.Folios, size: int) -> int:
        area = ram.store_vmalloc(memfd.encode_folio_array(folios))
        ser_phys = ram.store_preserved(memfd.encode_ser(
            memfd.MemfdSer(0, size, len(folios), area)))
        files_phys = ram.store_preserved(luo_session.encode_files(
            [luo_session.FileSer(memfd.MEMFD_V1, ser_phys, 0x1)]))
        header_phys = ram.store_preserved(luo_session.encode_sessions(
            [("vm1", files_phys, 1), ("empty", 0, 0)]))
        return ram.store_preserved(luo_session.encode_luo_fdt(1, header_phys))

    @staticmethod
    def root(mem_map: int, subtrees: list[tuple[str, int]]) -> bytes:
        live = kho.LiveRoot()
        for name, p in subtrees:
            live.add_subtree(name, p)
        live.set_mem_map(mem_map)
        return live.blob


ERAS: dict[str, type[_V3] | type[_V619]] = {"6.19": _V619, "v3": _V3}
GENERATIONS = tuple(ERAS)


def build(generation: str = "6.19", ram_size: int = 1 << 30, vm_mib: int = 16,
          bitmap_bytes: int = kho_memmap.BITMAP_BYTES_6_18, seed: int = 1) -> Example:
    if generation not in GENERATIONS:
        raise AbiError(msg=f"unknown generation {generation!r} (choose from {GENERATIONS})")
    rng = np.random.default_rng(seed)
    ram = Ram(ram_size)
    scratch = np.array([[16 * MiB, 64 * MiB], [96 * MiB, 128 * MiB]], dtype=np.uint64)

    # reserve_mem=4M:4096:trace (its pages are preserved by memblock itself)
    trace = ram.alloc(10)
    ram.preserve(trace, 10)
    memblock_phys = ram.store_preserved(
        memblock.encode([memblock.ReserveMem("trace", trace, 4 * MiB)]))

    # test_kho: random folios and their list
    orders = rng.integers(0, MAX_PAGE_ORDER + 1, size=12)
    info = []
    for o in orders.tolist():
        p = ram.alloc(o)
        ram.put(p, rng.bytes(64))
        ram.preserve(p, o)
        info.append(p | o)
    info_arr = np.array(info, np.uint64)
    csum = int(rng.integers(0, 1 << 32))
    era = ERAS[generation]
    test_phys = ram.store_preserved(khotest.encode(era.kho_test(ram, info_arr, csum)))

    folios = _memfd_folios(ram, rng, vm_mib)
    size = (int(folios.index.max()) + 1) * PAGE_SIZE
    luo_phys = era.luo(ram, folios, size)

    subtrees = [("memblock", memblock_phys), (khotest.KHO_TEST_SUBTREE, test_phys),
                (luo_v3.LUO_KHO_ENTRY_NAME, luo_phys)]
    root_phys = ram.alloc()
    ram.preserve(root_phys)

    # kho_finalize: serialize the memory map (chunks and bitmaps are not preserved)
    phys = np.array([p for p, _ in ram.preserved], np.uint64)
    order = np.array([o for _, o in ram.preserved], np.uint8)
    bm = kho_memmap.build_bitmaps(phys, order, bitmap_bytes)
    bitmap_phys = np.array([ram.alloc() for _ in range(len(bm))], np.uint64)
    for p, bits in zip(bitmap_phys.tolist(), bm.bits, strict=True):
        ram.put(p, bits.tobytes())
    chunk_phys = np.array([ram.alloc() for _ in range(bm.chunks_needed())], np.uint64)
    for p, page in zip(chunk_phys.tolist(),
                       kho_memmap.encode_chunks(bm, bitmap_phys, chunk_phys), strict=True):
        ram.put(p, page.tobytes())
    mem_map = int(chunk_phys[0]) if len(chunk_phys) else 0

    ram.put(root_phys, era.root(mem_map, subtrees))

    # kexec_file_load: scratch array segment, setup_data and boot params inside scratch
    scratch_phys = int(scratch[0, 0])
    scratch_raw = bootparams.encode_scratch(scratch[:, 0], scratch[:, 1])
    ram.put(scratch_phys, scratch_raw)
    kd = bootparams.KhoData(root_phys, PAGE_SIZE, scratch_phys, len(scratch_raw))
    sd = bootparams.kho_setup_data(kd)
    sd_phys = scratch_phys + 0x10000
    ram.put(sd_phys, sd)
    cmdline_phys = sd_phys + 0x1000
    ram.put(cmdline_phys, b"console=ttyS0 kho=on liveupdate=on\0")
    bp_phys = sd_phys + 0x2000
    e820 = np.array([(0, 0x9F000, bootparams.E820_RAM),
                     (0x100000, ram_size - 0x100000, bootparams.E820_RAM)],
                    dtype=bootparams.E820_DTYPE)
    ram.put(bp_phys, bootparams.BootParams(e820, cmdline_phys, 2048, sd_phys).encode())
    pages = int((np.uint64(1) << order.astype(np.uint64)).sum())
    return Example(ram_size, ram.writes, sd, bp_phys, pages)


def write(ex: Example, out: Path) -> Path:
    """Lay ``ex`` out as ``luoctl example`` does: ``out/ram.img`` (sparse: only the written
    ranges hold blocks) and ``out/setup_data.bin``. Returns the RAM image's path."""
    out.mkdir(parents=True, exist_ok=True)
    ram_path = out / "ram.img"
    fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, ex.ram_size)
        for phys, data in sorted(ex.writes.items()):
            os.pwrite(fd, data, phys)
    finally:
        os.close(fd)
    (out / "setup_data.bin").write_bytes(ex.setup_data)
    return ram_path
