"""KHO vmalloc preservation (spec/kho.md 3.4; 6.18+, ``u64`` fields since 7.0, same bytes).

::

    struct kho_vmalloc       { u64 first; u32 total_pages; u16 flags; u16 order; };  // 16 B
    struct kho_vmalloc_chunk { u64 next; u64 phys[511]; };                            // 4096 B

``phys[]`` holds one entry per contiguous block of ``1 << order`` pages and is zero-terminated
unless all 511 slots are used; a new (possibly empty) chunk is started as soon as one fills,
so ``n`` blocks always take ``n // 511 + 1`` chunks. ``first == 0`` means an empty area.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import numpy as np

from liveupdate.abi.consts import MAX_PAGE_ORDER, PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

KHO_VMALLOC_ALLOC = 0x1
KHO_VMALLOC_HUGE_VMAP = 0x2
KHO_VMALLOC_FLAGS = KHO_VMALLOC_ALLOC | KHO_VMALLOC_HUGE_VMAP
CHUNK_ENTRIES = (PAGE_SIZE - 8) // 8  # 511
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16
MAX_CHUNKS = 1 << 16


@dataclass(frozen=True)
class KhoVmalloc:
    first: int
    total_pages: int
    flags: int
    order: int

    def encode(self) -> bytes:
        for name, value, bits in (("first", self.first, 64), ("total_pages", self.total_pages,
                                  32), ("flags", self.flags, 16), ("order", self.order, 16)):
            if not 0 <= value < (1 << bits):
                raise AbiError(msg=f"kho_vmalloc.{name} {value} does not fit in {bits} bits")
        return DESC.pack(self.first, self.total_pages, self.flags, self.order)

    @classmethod
    def decode(cls, raw: bytes) -> KhoVmalloc:
        if len(raw) != DESC_SIZE:
            raise AbiError(msg=f"kho_vmalloc is {len(raw)} bytes, not {DESC_SIZE}")
        return cls(*DESC.unpack(raw))


def chunks_needed(nr_blocks: int) -> int:
    return nr_blocks // CHUNK_ENTRIES + 1


def encode_chunks(block_phys: np.ndarray, chunk_phys: np.ndarray) -> np.ndarray:
    """The chunk pages (uint8[nchunks, 4096]) listing ``block_phys``, chained through
    ``chunk_phys`` (exactly :func:`chunks_needed` page-aligned addresses)."""
    block_phys = np.asarray(block_phys, dtype=np.uint64)
    chunk_phys = np.asarray(chunk_phys, dtype=np.uint64)
    if chunk_phys.shape != (chunks_needed(len(block_phys)),):
        raise AbiError(msg=f"{chunks_needed(len(block_phys))} vmalloc chunk addresses are needed")
    if np.any(block_phys == 0):
        raise AbiError(msg="a vmalloc block at physical address 0 cannot be listed")
    out = np.zeros((len(chunk_phys), PAGE_SIZE // 8), dtype="<u8")
    out[:-1, 0] = chunk_phys[1:]
    for i in range(len(chunk_phys)):
        part = block_phys[i * CHUNK_ENTRIES : (i + 1) * CHUNK_ENTRIES]
        out[i, 1 : 1 + len(part)] = part
    return out.view(np.uint8).reshape(len(chunk_phys), PAGE_SIZE)


@dataclass(frozen=True)
class Layout:
    """An order-0 vmalloc area laid out at given addresses: what to write where."""

    desc: KhoVmalloc
    blocks: np.ndarray  # uint64 phys of the data pages
    chunks: np.ndarray  # uint64 phys of the chunk pages
    pages: list[tuple[int, bytes]]  # (phys, 4096 bytes) for every block and chunk page

    def all_pages(self) -> np.ndarray:
        return np.concatenate([self.blocks, self.chunks])


def pages_needed(nbytes: int) -> tuple[int, int]:
    """(data pages, chunk pages) for an order-0 area of ``nbytes`` (at least one page)."""
    pages = max(1, -(-nbytes // PAGE_SIZE))
    return pages, chunks_needed(pages)


def layout(data: bytes, blocks: np.ndarray, chunks: np.ndarray) -> Layout:
    """Lay ``data`` out as order-0 pages at ``blocks`` listed by chunks at ``chunks``
    (sizes from :func:`pages_needed`)."""
    blocks = np.asarray(blocks, np.uint64)
    chunks = np.asarray(chunks, np.uint64)
    if (len(blocks), len(chunks)) != pages_needed(len(data)):
        raise AbiError(msg=f"{pages_needed(len(data))} (data, chunk) pages are needed")
    data = data.ljust(len(blocks) * PAGE_SIZE, b"\0")
    out = [(p, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i, p in enumerate(blocks.tolist())]
    out += [(p, page.tobytes()) for p, page in
            zip(chunks.tolist(), encode_chunks(blocks, chunks), strict=True)]
    desc = KhoVmalloc(int(chunks[0]), len(blocks), KHO_VMALLOC_ALLOC, 0)
    return Layout(desc, blocks, chunks, out)


@dataclass(frozen=True)
class VmallocArea:
    desc: KhoVmalloc
    chunk_phys: np.ndarray  # uint64[chunks]
    block_phys: np.ndarray  # uint64[blocks]

    def read(self, mem: PhysMem) -> bytes:
        """The area's contents, concatenated in block order."""
        size = PAGE_SIZE << self.desc.order
        return b"".join(mem.read(p, size, "vmalloc block") for p in self.block_phys.tolist())


def decode(mem: PhysMem, desc: KhoVmalloc) -> VmallocArea:
    """kho_restore_vmalloc's checks, on the whole chain before anything is used."""
    if desc.flags & ~KHO_VMALLOC_FLAGS:
        raise AbiError(msg=f"kho_vmalloc: unknown flags {desc.flags:#x}")
    if desc.order > MAX_PAGE_ORDER:
        raise AbiError(msg=f"kho_vmalloc: order {desc.order} > {MAX_PAGE_ORDER}")
    contig = 1 << desc.order
    chunks: list[int] = []
    blocks: list[np.ndarray] = []
    idx = 0
    for phys, raw in mem.chain(desc.first, MAX_CHUNKS, "kho_vmalloc chunk", PAGE_SIZE):
        page = np.frombuffer(raw, "<u8")
        entries = page[1:]
        zero = np.flatnonzero(entries == 0)
        used = entries[: int(zero[0])] if zero.size else entries
        if np.any(used % np.uint64(PAGE_SIZE << desc.order)):
            raise AbiError(msg="kho_vmalloc: a block is not aligned to the area's order")
        idx += len(used) * contig
        if idx > desc.total_pages:
            raise AbiError(
                msg=f"kho_vmalloc: blocks cover more than total_pages {desc.total_pages}"
            )
        chunks.append(phys)
        blocks.append(used.copy())
    if idx != desc.total_pages:
        raise AbiError(msg=f"kho_vmalloc: blocks cover {idx} pages, total_pages says "
                       f"{desc.total_pages}", err=errno.EINVAL)
    return VmallocArea(
        desc,
        np.array(chunks, dtype=np.uint64),
        np.concatenate(blocks) if blocks else np.zeros(0, np.uint64),
    )
