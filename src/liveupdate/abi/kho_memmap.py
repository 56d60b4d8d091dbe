"""The ``kho-v1`` preserved-memory map: per-order bitmaps behind a chunk list (spec/kho.md 3.1).

Tracker semantics: a preserved block ``(pfn, order)`` sets bit ``(pfn >> order) % BITS`` of the
bitmap with index ``(pfn >> order) // BITS`` of that order. Serialized, each order starts a new
chain of 4096-byte chunks::

    struct khoser_mem_chunk { u64 next; u32 order; u32 num_elms;          // 16-byte header
                              struct { u64 phys_start; u64 bitmap; } bitmaps[255]; };

``phys_start`` is the address covered by bit 0; ``bitmap`` the phys of a bitmap of 4096 bytes
(6.18+) or 512 bytes (6.16/6.17; the compatible string did not change, see
:func:`detect_bitmap_bytes`). Bit *i* is byte ``i // 8``, bit ``i % 8`` (LE ``unsigned long``).

Everything is numpy end to end: encoders take arrays of block addresses and orders, decoders
return arrays. There is no Python object per page.

Orders are not capped at ``MAX_PAGE_ORDER``: upstream ``kho_preserve_pages()`` splits a range
into blocks of order ``min(ctz(pfn), ilog2(end_pfn - pfn))`` with no cap, so a large aligned
``reserve_mem`` region is carried as order-11, -12 ... blocks, and ``kho_mem_deserialize()``
accepts any order. Our one bound is :data:`MAX_MAP_ORDER`: a larger block (over 256 TiB)
cannot be RAM, and its bitmap span would overflow 64 bits. Whether each block lies in RAM is
the booting kernel's check (``liveupdate.kernel.kho.validate``); readers that have
no such check of their own (``luoctl inspect``) pass ``check_ram=True`` and a block outside
RAM is refused (EFAULT) naming its chunk, entry and address. Linux's
``kho_preserved_memory_reserve`` (kernel/liveupdate/kexec_handover.c) has no check at all: it
``memblock_reserve``s whatever the map says.

Validation on decode is stricter than Linux (which only finds map errors while reserving): the
whole chain is checked before anything is returned -- chunk alignment and bounds, loops,
``num_elms <= 255``, ``order <= MAX_MAP_ORDER``, bitmap pointers inside RAM, and
``phys_start`` alignment.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np

from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

CHUNK_SIZE = PAGE_SIZE
CHUNK_HDR_SIZE = 16
CHUNK_ENTRIES = (CHUNK_SIZE - CHUNK_HDR_SIZE) // 16  # 255
BITMAP_BYTES_6_18 = PAGE_SIZE  # PRESERVE_BITS = PAGE_SIZE * 8
BITMAP_BYTES_6_16 = 512  # PRESERVE_BITS = 512 * 8
BITMAP_SIZES = (BITMAP_BYTES_6_18, BITMAP_BYTES_6_16)
# A chain longer than this cannot describe any RAM we emulate; it is a corrupt or hostile map.
MAX_CHUNKS = 1 << 20
# The largest order a map may carry: 2^36 pages is 256 TiB, and with 32768-bit bitmaps the span
# of one bitmap (2^(15 + 12 + 36) bytes) is the largest that still fits a u64.
MAX_MAP_ORDER = 36

CHUNK_HDR_DTYPE = np.dtype([("next", "<u8"), ("order", "<u4"), ("num_elms", "<u4")])
ENTRY_DTYPE = np.dtype([("phys_start", "<u8"), ("bitmap", "<u8")])


@dataclass(frozen=True)
class Bitmaps:
    """The tracker's bitmaps, sorted by (order, phys_start) as the serializer walks them."""

    order: np.ndarray  # uint32[n]
    phys_start: np.ndarray  # uint64[n]
    bits: np.ndarray  # uint8[n, bitmap_bytes]

    @property
    def bitmap_bytes(self) -> int:
        return int(self.bits.shape[1])

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def chunks_needed(self) -> int:
        """Chunks for this map: a fresh chain of ceil(n/255) per order present."""
        _, counts = np.unique(self.order, return_counts=True)
        return int(((counts + CHUNK_ENTRIES - 1) // CHUNK_ENTRIES).sum())


@dataclass(frozen=True)
class PreservedMemory:
    """A decoded map: one entry per preserved block, in serialization order."""

    phys: np.ndarray  # uint64[n]
    order: np.ndarray  # uint8[n]
    bitmap_bytes: int
    # the map's own pages, which are not in the map (kho-v3+ radix tree nodes; kho-v1 chunks
    # and the pages holding its bitmaps), ascending
    tables: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return int(self.phys.shape[0])

    def pages(self) -> int:
        return int((np.uint64(1) << self.order.astype(np.uint64)).sum())


def _validate_blocks(phys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    phys = np.asarray(phys, dtype=np.uint64)
    order = np.asarray(order, dtype=np.uint8)
    if phys.shape != order.shape or phys.ndim != 1:
        raise AbiError(msg="preserved blocks: phys and order arrays differ in shape")
    if phys.size and int(order.max()) > MAX_MAP_ORDER:
        raise AbiError(msg=f"preserved blocks: order {int(order.max())} > {MAX_MAP_ORDER}")
    if phys.size and int(order.max()) == 0:  # the common case, without a per-block shift
        if np.any(phys & np.uint64(PAGE_SIZE - 1)):
            raise AbiError(msg="preserved blocks: a block is not aligned to its order")
        return phys, order
    mask = (np.uint64(1) << (order.astype(np.uint64) + np.uint64(PAGE_SHIFT))) - np.uint64(1)
    if np.any(phys & mask):
        raise AbiError(msg="preserved blocks: a block is not aligned to its order")
    return phys, order


def build_bitmaps(phys: np.ndarray, order: np.ndarray,
                  bitmap_bytes: int = BITMAP_BYTES_6_18) -> Bitmaps:
    """The bitmaps the kho-v1 tracker holds for these blocks (duplicates collapse)."""
    if bitmap_bytes not in BITMAP_SIZES:
        raise AbiError(msg=f"bitmap size {bitmap_bytes} is neither 4096 nor 512 bytes")
    phys, order = _validate_blocks(phys, order)
    bits_per = bitmap_bytes * 8
    bits_shift = np.uint64(bits_per.bit_length() - 1)  # bitmap sizes are powers of two
    if order.size and int(order.max()) == 0:
        high = phys >> np.uint64(PAGE_SHIFT)  # pfn >> order
    else:
        high = phys >> (order.astype(np.uint64) + np.uint64(PAGE_SHIFT))
    index = high >> bits_shift
    bit = (high & np.uint64(bits_per - 1)).astype(np.int64)
    # Group by (order, index). A dense presence table is O(n) when the index range is small
    # (always, for RAM we emulate); np.unique's sort is the general fallback.
    max_index = int(index.max()) if index.size else 0
    nr_orders = int(order.max()) + 1 if order.size else 1
    if max_index < (1 << 16):
        dense = index.astype(np.int64)
        if nr_orders > 1:
            dense += order.astype(np.int64) * (max_index + 1)
        present = np.zeros(nr_orders * (max_index + 1), dtype=bool)
        present[dense] = True
        slots = np.flatnonzero(present)
        group_of_slot = np.cumsum(present) - 1
        group = group_of_slot[dense]
        g_order = (slots // (max_index + 1)).astype(np.uint32)
        g_index = (slots % (max_index + 1)).astype(np.uint64)
    else:
        key = (order.astype(np.uint64) << np.uint64(40)) | index
        ukeys, group = np.unique(key, return_inverse=True)
        g_order = (ukeys >> np.uint64(40)).astype(np.uint32)
        g_index = ukeys & np.uint64((1 << 40) - 1)
    flat = np.zeros(len(g_order) * bits_per, dtype=bool)
    flat[(group.astype(np.int64) << int(bits_shift)) + bit] = True
    bits = np.packbits(flat, bitorder="little").reshape(len(g_order), bitmap_bytes)
    phys_start = (g_index << bits_shift) << (g_order.astype(np.uint64) + np.uint64(PAGE_SHIFT))
    return Bitmaps(g_order, phys_start, bits)


def encode_chunks(bm: Bitmaps, bitmap_phys: np.ndarray, chunk_phys: np.ndarray) -> np.ndarray:
    """Serialize: the chunk pages (uint8[nchunks, 4096]) to write at ``chunk_phys``.

    ``bitmap_phys[i]`` is where the caller stores ``bm.bits[i]``; ``chunk_phys`` must hold
    exactly ``bm.chunks_needed()`` page-aligned addresses. The map pointer is ``chunk_phys[0]``
    (or 0 when nothing is preserved).
    """
    bitmap_phys = np.asarray(bitmap_phys, dtype=np.uint64)
    chunk_phys = np.asarray(chunk_phys, dtype=np.uint64)
    if bitmap_phys.shape != (len(bm),):
        raise AbiError(msg="one bitmap address per bitmap is needed")
    if chunk_phys.shape != (bm.chunks_needed(),):
        raise AbiError(msg=f"{bm.chunks_needed()} chunk addresses are needed")
    if np.any(chunk_phys % np.uint64(PAGE_SIZE)):
        raise AbiError(msg="chunk addresses must be page aligned")
    out = np.zeros((len(chunk_phys), CHUNK_SIZE), dtype=np.uint8)
    ci = 0
    orders, starts = np.unique(bm.order, return_index=True)
    for o, start in zip(orders.tolist(), starts.tolist(), strict=True):
        n = int(np.count_nonzero(bm.order == o))
        for first in range(start, start + n, CHUNK_ENTRIES):
            count = min(CHUNK_ENTRIES, start + n - first)
            hdr = out[ci, :CHUNK_HDR_SIZE].view(CHUNK_HDR_DTYPE)
            hdr["next"] = chunk_phys[ci + 1] if ci + 1 < len(chunk_phys) else 0
            hdr["order"] = o
            hdr["num_elms"] = count
            ent = out[ci, CHUNK_HDR_SIZE:].view(ENTRY_DTYPE)
            ent["phys_start"][:count] = bm.phys_start[first : first + count]
            ent["bitmap"][:count] = bitmap_phys[first : first + count]
            ci += 1
    return out


@dataclass(frozen=True)
class ChunkEntries:
    """The raw entries of a chunk chain, before the bitmaps are read."""

    chunk_phys: np.ndarray  # uint64[chunks]
    order: np.ndarray  # uint32[n]
    phys_start: np.ndarray  # uint64[n]
    bitmap_phys: np.ndarray  # uint64[n]
    chunk_of: np.ndarray  # intp[n]: which chunk each entry was read from


def read_chunks(mem: PhysMem, first: int) -> ChunkEntries:
    """Walk and validate the chunk chain starting at ``first`` (0 = empty map)."""
    chunks: list[int] = []
    orders: list[np.ndarray] = []
    entries: list[np.ndarray] = []
    for phys, raw in mem.chain(first, MAX_CHUNKS, "KHO memory map: chunk", CHUNK_SIZE):
        page = np.frombuffer(raw, np.uint8)
        hdr = page[:CHUNK_HDR_SIZE].view(CHUNK_HDR_DTYPE)[0]
        order, num = int(hdr["order"]), int(hdr["num_elms"])
        if num > CHUNK_ENTRIES:
            raise AbiError(msg=f"KHO memory map: chunk {phys:#x} has num_elms {num} > 255")
        if order > MAX_MAP_ORDER:
            raise AbiError(msg=f"KHO memory map: chunk {phys:#x} has order {order} > "
                           f"{MAX_MAP_ORDER}")
        chunks.append(phys)
        orders.append(np.full(num, order, dtype=np.uint32))
        entries.append(page[CHUNK_HDR_SIZE:].view(ENTRY_DTYPE)[:num])
    ent = np.concatenate(entries) if entries else np.zeros(0, ENTRY_DTYPE)
    counts = [len(o) for o in orders]
    return ChunkEntries(
        np.array(chunks, dtype=np.uint64),
        np.concatenate(orders) if orders else np.zeros(0, np.uint32),
        ent["phys_start"].copy(),
        ent["bitmap"].copy(),
        np.repeat(np.arange(len(chunks), dtype=np.intp), counts),
    )


def detect_bitmap_bytes(ce: ChunkEntries) -> int:
    """Which bitmap size produced this map (spec/kho.md 3.1.4 and its errata).

    512-byte bitmaps come from kmalloc-512 slabs, so their addresses are usually not page
    aligned: that is checked first. Then the alignment rule: with 4096-byte bitmaps every
    ``phys_start`` is a multiple of ``32768 << (order + 12)``. A 512-byte producer can pass both
    by coincidence; callers that know the producer should say so instead of detecting.
    """
    if len(ce.order) == 0:
        return BITMAP_BYTES_6_18
    if np.any(ce.bitmap_phys % np.uint64(PAGE_SIZE)):
        return BITMAP_BYTES_6_16
    span = np.uint64(BITMAP_BYTES_6_18 * 8) << (ce.order.astype(np.uint64) + np.uint64(PAGE_SHIFT))
    if np.any(ce.phys_start % span):
        return BITMAP_BYTES_6_16
    return BITMAP_BYTES_6_18


def decode_mem_map(mem: PhysMem, first: int, bitmap_bytes: int | None = None, *,
                   check_ram: bool = False) -> PreservedMemory:
    """Decode the whole map into block arrays; every pointer is checked before use. With
    ``check_ram``, every preserved block must lie wholly in ``mem``'s RAM (EFAULT)."""
    ce = read_chunks(mem, first)
    if bitmap_bytes is None:
        bitmap_bytes = detect_bitmap_bytes(ce)
    if bitmap_bytes not in BITMAP_SIZES:
        raise AbiError(msg=f"bitmap size {bitmap_bytes} is neither 4096 nor 512 bytes")
    bits_per = bitmap_bytes * 8
    n = len(ce.order)
    tables = np.unique(np.concatenate([ce.chunk_phys, ce.bitmap_phys])
                       & ~np.uint64(PAGE_SIZE - 1))
    if n == 0:
        return PreservedMemory(np.zeros(0, np.uint64), np.zeros(0, np.uint8), bitmap_bytes,
                               tables)
    bits_shift = bits_per.bit_length() - 1
    shift = ce.order.astype(np.uint64) + np.uint64(PAGE_SHIFT)
    span_mask = (np.uint64(bits_per) << shift) - np.uint64(1)
    bad = np.flatnonzero(ce.phys_start & span_mask)
    if bad.size:
        i = int(bad[0])
        raise AbiError(
            msg=f"KHO memory map: entry phys_start {int(ce.phys_start[i]):#x} is not aligned to "
            f"its {bitmap_bytes}-byte bitmap span"
        )
    for bp in ce.bitmap_phys.tolist():
        mem.check(bp, bitmap_bytes, "KHO memory map bitmap")
    bits = np.frombuffer(
        b"".join(mem.read(bp, bitmap_bytes) for bp in ce.bitmap_phys.tolist()), np.uint8)
    # Bit i of the flat stream is bit (i & (bits_per - 1)) of bitmap (i >> bits_shift).
    flat = np.flatnonzero(np.unpackbits(bits, bitorder="little")).astype(np.uint64)
    row = (flat >> np.uint64(bits_shift)).astype(np.intp)
    bit = flat & np.uint64(bits_per - 1)
    if int(ce.order.max()) == int(ce.order.min()):  # one order: no per-block order lookup
        o = int(ce.order[0])
        order = np.full(len(flat), o, np.uint8)
        phys = ce.phys_start[row] + (bit << np.uint64(o + PAGE_SHIFT))
    else:
        order = ce.order[row].astype(np.uint8)
        phys = ce.phys_start[row] + (bit << shift[row])
    # No wrap is possible: phys_start is span-aligned and the span fits a u64 (MAX_MAP_ORDER).
    if check_ram:
        _check_in_ram(mem, ce, phys, order, row)
    return PreservedMemory(phys, order, bitmap_bytes, tables)


def _check_in_ram(mem: PhysMem, ce: ChunkEntries, phys: np.ndarray, order: np.ndarray,
                  row: np.ndarray) -> None:
    ends = phys + (np.uint64(PAGE_SIZE) << order.astype(np.uint64))
    bad = np.flatnonzero(~mem.inside(phys, ends))
    if not bad.size:
        return
    i, r = int(bad[0]), int(row[int(bad[0])])
    c = int(ce.chunk_of[r])  # name the chunk page and the entry's slot in it
    slot = r - int(np.searchsorted(ce.chunk_of, c))
    raise AbiError(
        msg=f"KHO memory map: chunk {int(ce.chunk_phys[c]):#x} entry {slot} (order "
        f"{int(order[i])}, phys_start {int(ce.phys_start[r]):#x}) marks block "
        f"{int(phys[i]):#x}+{int(ends[i] - phys[i]):#x}, outside RAM ({len(bad)} such "
        "blocks)", err=errno.EFAULT)


def merge_intervals(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Sorted, disjoint ``[start, end)`` ranges covering the given ones: uint64[n, 2]."""
    starts = np.asarray(starts, dtype=np.uint64)
    ends = np.asarray(ends, dtype=np.uint64)
    if starts.size == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    idx = np.argsort(starts, kind="stable")
    s, e = starts[idx], ends[idx]
    run_end = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > run_end[:-1]
    last = np.r_[np.flatnonzero(new)[1:] - 1, len(s) - 1]
    return np.stack([s[new], run_end[last]], axis=1)


def merged_ranges(phys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Merge preserved blocks into sorted, disjoint ``[start, end)`` ranges: uint64[n, 2]."""
    phys = np.asarray(phys, dtype=np.uint64)
    return merge_intervals(phys, phys + (np.uint64(PAGE_SIZE) << np.asarray(order, np.uint64)))
