"""The kho-v1 memory map written at finalize (``kho_mem_serialize``): per-order bitmaps
behind a chunk list, in freshly allocated pages that are *not* themselves preserved -- the
next kernel reads them while it still allocates from scratch only, and the sanitizer keeps
them (:meth:`liveupdate.kernel.kho.outgoing.KhoOut.kept_pages`).

The bitmap size is the format's: 512 bytes for ``kho-v1-512`` (6.16/6.17, kmalloc-512
objects: eight share a page, as here), a page for ``kho-v1`` (6.18+).
"""

from __future__ import annotations

import numpy as np

from liveupdate.abi import generations, kho_memmap
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.kernel.kho.mmops import MmOps

# the kho-v1 formats with narrower bitmaps than a page (kho-v1-512), by name
WIDTH = {generations.kho_format(kho, width): width
         for kho, width in generations.SMALL_BITMAP.items()}


def write_map(mm: MmOps, phys: np.ndarray, order: np.ndarray,
              fmt: str) -> tuple[int, list[int]]:
    """Serialize the blocks as a ``fmt`` map; returns the first chunk (0 for an empty map)
    and every page written (bitmaps, then chunks), which the caller frees before the next
    serialization."""
    bitmap_bytes = WIDTH.get(fmt, kho_memmap.BITMAP_BYTES_6_18)
    bm = kho_memmap.build_bitmaps(phys, order, bitmap_bytes)
    per_page = PAGE_SIZE // bitmap_bytes
    bitmap_pages = [mm.alloc_pages(0) for _ in range(-(-len(bm) // per_page))]
    chunk_pages = [mm.alloc_pages(0) for _ in range(bm.chunks_needed())]
    bitmap_phys = np.array([bitmap_pages[i // per_page] + (i % per_page) * bitmap_bytes
                            for i in range(len(bm))], np.uint64)
    for i, p in enumerate(bitmap_pages):
        mm.write(p, bm.bits[i * per_page : (i + 1) * per_page].tobytes()
                 .ljust(PAGE_SIZE, b"\0"))
    chunks = kho_memmap.encode_chunks(bm, bitmap_phys, np.array(chunk_pages, np.uint64))
    for p, page in zip(chunk_pages, chunks, strict=True):
        mm.write(p, page.tobytes())
    return (chunk_pages[0] if chunk_pages else 0), bitmap_pages + chunk_pages
