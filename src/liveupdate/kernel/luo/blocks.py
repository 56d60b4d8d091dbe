"""The outgoing ``kho_block`` sets of 7.3.4's LUO (``kernel/liveupdate/kho_block.c``): the
blocks of the session chain are allocated and preserved at CREATE_SESSION
(``luo_session_insert`` -> ``kho_block_set_grow(count + 1)``) and a session's file blocks at
PRESERVE_FD (``luo_preserve_file``), so the 10000-block limit is ENOSPC from the ioctl, not a
failed reboot; closing a session gives its blocks back (``kho_block_set_shrink``, the last
block first). The reboot writes the entries into these blocks (``kho_block_set_it_reserve_
entry``) and allocates nothing. Which rules do this: :attr:`Rules619.blocks_at_ioctl`; the
older model of 7.2 (chains allocated at the reboot) stays where no source says otherwise."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from liveupdate.abi import kho_block
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


class BlockSet:
    def __init__(self, k: Kernel, entry_size: int) -> None:
        self.k = k
        self.per = kho_block.per_block(entry_size)
        self.pages: list[int] = []

    def grow(self, count: int) -> None:
        """``kho_block_set_grow``: blocks for ``count`` entries; all or nothing."""
        kout = self.k.require_kho()
        before = len(self.pages)
        try:
            while count > len(self.pages) * self.per:
                if len(self.pages) >= kho_block.KHO_MAX_BLOCKS:
                    raise LiveUpdateError(err=errno.ENOSPC, msg=f"kho_block: more than "
                                          f"{kho_block.KHO_MAX_BLOCKS} blocks")
                self.pages.append(kout.alloc_preserve(PAGE_SIZE))
        except LiveUpdateError:
            while len(self.pages) > before:
                kout.unpreserve_free(self.pages.pop(), PAGE_SIZE)
            raise

    def shrink(self, count: int) -> None:
        """``kho_block_set_shrink``: give back the last blocks ``count`` entries do not
        need."""
        kout = self.k.require_kho()
        while self.pages and count <= (len(self.pages) - 1) * self.per:
            kout.unpreserve_free(self.pages.pop(), PAGE_SIZE)


def preallocated(order: list[list[int]]) -> Callable[[], int]:
    """An ``alloc`` for :func:`liveupdate.abi.luo_ser.encode_sessions` that hands out the
    blocks the ioctls allocated, in the order the encoder asks for them (each session's file
    chain, then the session chain); EINVAL if it asks for more (a count out of step)."""
    pages: Iterator[int] = (p for chain in order for p in chain)

    def alloc() -> int:
        p = next(pages, None)
        if p is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="luo: a block chain outgrew the "
                                  "blocks its ioctls allocated")
        return p
    return alloc
