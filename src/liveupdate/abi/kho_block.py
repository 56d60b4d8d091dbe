"""KHO serialization blocks (kho-v4, Linux 7.2; spec/kho.md 3.5, spec/luo.md 4.2).

Read in upstream ``kernel/liveupdate/kho_block.c`` and ``include/linux/kho/abi/block.h``: a
list of fixed-size entries is a chain of one-page blocks, each ``kho_alloc_preserve
(PAGE_SIZE)``, starting with ``struct kho_block_header_ser { u64 next; u64 count; }`` (16
bytes, ``next`` = phys of the next block, 0 at the end) and followed by ``count`` entries.
Blocks are filled in order; only the last may be partly filled. An empty list is no chain at
all (the owner stores 0).

``kho_block_set_restore`` refuses (EINVAL, which LUO turns into a panic) ``count == 0`` or
more than fit a block, a cycle (upstream: Floyd's tortoise and hare; here a visited set,
same verdict) and more than :data:`KHO_MAX_BLOCKS` blocks. We also require every block to
be page aligned and inside RAM.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

BLOCK_SIZE = PAGE_SIZE
HEADER = np.dtype([("next", "<u8"), ("count", "<u8")])
KHO_MAX_BLOCKS = 10000


def per_block(entry_size: int) -> int:
    return (BLOCK_SIZE - HEADER.itemsize) // entry_size


def blocks_needed(n: int, entry_size: int) -> int:
    return -(-n // per_block(entry_size))


def encode(entries: bytes, entry_size: int,
           alloc: Callable[[], int]) -> tuple[int, dict[int, bytes]]:
    """Lay ``entries`` (a whole number of ``entry_size`` records) out as a chain: (first
    block phys or 0, {block phys: 4096 bytes}). ``alloc`` gives one block's address."""
    if entry_size <= 0 or len(entries) % entry_size:
        raise AbiError(msg=f"kho_block: {len(entries)} bytes are not whole {entry_size}-byte "
                       "entries")
    n = len(entries) // entry_size
    nblocks = blocks_needed(n, entry_size)
    if nblocks > KHO_MAX_BLOCKS:
        raise AbiError(msg=f"kho_block: {n} entries need {nblocks} blocks, more than "
                       f"{KHO_MAX_BLOCKS}")
    phys = [alloc() for _ in range(nblocks)]
    per = per_block(entry_size)
    pages: dict[int, bytes] = {}
    for i, p in enumerate(phys):
        chunk = entries[i * per * entry_size : (i + 1) * per * entry_size]
        head = np.array([(phys[i + 1] if i + 1 < nblocks else 0, len(chunk) // entry_size)],
                        HEADER).tobytes()
        pages[p] = (head + chunk).ljust(BLOCK_SIZE, b"\0")
    return (phys[0] if phys else 0), pages


def decode(mem: PhysMem, first: int, entry_size: int, what: str) -> tuple[bytes, list[int]]:
    """Follow a chain: (the entries, concatenated; every block's phys)."""
    per = per_block(entry_size)
    out: list[bytes] = []
    seen: list[int] = []
    for p, raw in mem.chain(first, KHO_MAX_BLOCKS, f"{what}: kho_block", BLOCK_SIZE):
        seen.append(p)
        count = int(np.frombuffer(raw[: HEADER.itemsize], HEADER)[0]["count"])
        if count == 0 or count > per:
            raise AbiError(msg=f"{what}: kho_block {p:#x} holds {count} entries (1..{per})")
        out.append(raw[HEADER.itemsize : HEADER.itemsize + count * entry_size])
    return b"".join(out), seen
