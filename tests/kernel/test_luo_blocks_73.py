"""7.3.4's kho_block sets of LUO's outgoing state: blocks preserved at CREATE_SESSION and
PRESERVE_FD (luo_session_insert, luo_preserve_file: kho_block_set_grow), given back when a
session closes (kho_block_set_shrink), ENOSPC past KHO_MAX_BLOCKS from the call that needs
one more; 7.2 (as modelled) allocates its chains at the reboot."""

from __future__ import annotations

import contextlib
import errno
import io
from collections.abc import Iterator

import pytest

from liveupdate.abi import kho_block, luo_session
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.image import KernelImage
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.luo.blocks import BlockSet
from tests.kernel.conftest import Rig

PER_BLOCK = kho_block.per_block(luo_session.SESSION_DTYPE.itemsize)  # 51


@contextlib.contextmanager
def booted(gen: str) -> Iterator[Kernel]:
    rig = Rig()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield rig.boot("kho=on liveupdate=on", KernelImage.of(gen))
    finally:
        rig.close()


def preserved(k: Kernel) -> int:
    phys, _ = k.require_kho().preserved()
    return len(phys)


@pytest.mark.parametrize("gen, at_ioctl", [("7.3", True), ("7.2", False)])
def test_session_blocks_come_with_create_session_and_go_with_the_last_close(
        gen: str, at_ioctl: bool) -> None:
    with booted(gen) as k:
        assert k.luo is not None
        base = preserved(k)
        files = [k.luo.create(f"s{i}").get() for i in range(PER_BLOCK + 1)]  # as an fd holds
        assert preserved(k) - base == (2 if at_ioctl else 0)  # 51 fill a block, the 52nd
        for f in reversed(files):
            f.put()
        assert preserved(k) == base


def test_a_block_set_stops_at_kho_max_blocks_and_keeps_nothing_of_the_failed_grow() -> None:
    with booted("7.3") as k:
        one = PAGE_SIZE - kho_block.HEADER.itemsize  # one entry a block
        bs = BlockSet(k, one)
        base = preserved(k)
        bs.grow(kho_block.KHO_MAX_BLOCKS - 2)
        with pytest.raises(LiveUpdateError) as e:
            bs.grow(kho_block.KHO_MAX_BLOCKS + 1)
        assert e.value.errno == errno.ENOSPC
        assert len(bs.pages) == kho_block.KHO_MAX_BLOCKS - 2  # all or nothing
        bs.grow(kho_block.KHO_MAX_BLOCKS)  # the last two still fit
        assert preserved(k) - base == kho_block.KHO_MAX_BLOCKS
        bs.shrink(0)
        assert preserved(k) == base
