"""kho_extend_scratch (7.3.4 kexec_handover.c, the 7.3 KHO core only): on a KHO boot every
1 GiB block without preserved memory or map pages becomes memblock KHO scratch for the early
allocations; the scratch areas handed to the next kernel stay the inherited ones."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import pytest

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.image import KernelImage
from liveupdate.abi.kho_memmap import PreservedMemory
from liveupdate.kernel import debugfs
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.kho.extend_scratch import BLKSIZE, extend_scratch
from liveupdate.kernel.mm.memblock import Memblock
from liveupdate.kernel.power import Halted
from liveupdate.scenario.generations import ioctl
from tests.kernel.conftest import GiB, Rig

LINE = "kho=on liveupdate=on"


def _pm(blocks: list[tuple[int, int]], tables: list[int]) -> PreservedMemory:
    return PreservedMemory(np.array([p for p, _ in blocks], np.uint64),
                           np.array([o for _, o in blocks], np.uint8), PAGE_SIZE,
                           np.array(tables, np.uint64))


def test_marks_the_gaps_between_busy_blocks_and_up_to_the_end_of_dram() -> None:
    mb = Memblock()
    mb.add(0, 3 * GiB)  # a hole from 3 to 4 GiB, then RAM up to 7.5 GiB
    mb.add(4 * GiB, 3 * GiB + GiB // 2)
    pm = _pm([(GiB + 5 * PAGE_SIZE, 0),  # block 1
              (4 * GiB, 18)],  # 1 GiB at 4 GiB: block 4 only
             [6 * GiB + 7 * PAGE_SIZE])  # a radix table page: block 6
    marked = extend_scratch(mb, pm)
    assert marked == [(0, GiB), (2 * GiB, 2 * GiB), (5 * GiB, GiB), (7 * GiB, GiB // 2)]
    scratch = [(r.base, r.size) for r in mb.scratch_regions()]
    # memblock_mark_kho_scratch flags memory regions only: the hole stays a hole
    assert scratch == [(0, GiB), (2 * GiB, GiB), (5 * GiB, GiB), (7 * GiB, GiB // 2)]


def test_a_preservation_larger_than_a_block_makes_each_of_its_blocks_busy() -> None:
    mb = Memblock()
    mb.add(0, 4 * GiB)
    assert extend_scratch(mb, _pm([(0, 19)], [])) == [(2 * GiB, 2 * GiB)]  # 2 GiB at 0


@contextlib.contextmanager
def _updated(gen: str, line: str = LINE, memory: int = 5 * GiB) -> Iterator[Kernel]:
    """A ``gen`` kernel KHO-booted from one that preserved an 8 MiB memfd."""
    rig, img = Rig(memory), KernelImage.of(gen)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = rig.boot(line, img)
            assert k.luo is not None
            _, (s,) = ioctl(k, k.luo.open(), "CREATE_SESSION", fd=0, name=b"s")
            m = k.new_memfd("m")
            m.truncate(8 << 20)
            m.pwrite(b"kept", 0)
            ioctl(k, s, "SESSION_PRESERVE_FD", [kmemfd.open_file(m)], fd=3, token=1)
            yield rig.kexec(k, line, img)
    finally:
        rig.close()


def _ranges(areas: list[dict[str, object]]) -> set[tuple[int, int]]:
    return {(int(str(a["addr"]), 16), int(str(a["size"]))) for a in areas if a["size"]}


def _covered(ranges: set[tuple[int, int]], lo: int, hi: int) -> int:
    return sum(max(0, min(b + s, hi) - max(b, lo)) for b, s in ranges)


@pytest.mark.parametrize("gen", ["7.2", "7.3"])
def test_after_a_kho_boot_only_7_3_extends_memblock_scratch(gen: str) -> None:
    with _updated(gen) as k:
        st = debugfs.status(k)
        inherited = _ranges(st["in"]["scratch"])
        flagged = _ranges(st["in"]["memblock_scratch"])
        assert st["out"]["scratch"] == st["in"]["scratch"]  # the next kernel's: unchanged
        assert k.kho_in is not None
        pm = k.kho_in.preserved
        busy = {int(p) // BLKSIZE for p in np.concatenate([pm.phys, pm.tables]).tolist()}
        assert busy == {0}  # the memfd, LUO's pages and the radix tree all sit below 1 GiB
        extra = _covered(flagged, 0, 5 * GiB) - _covered(inherited, 0, 5 * GiB)
        if gen == "7.2":
            assert extra == 0
            return
        for blk in range(5):
            lo, hi = blk * BLKSIZE, (blk + 1) * BLKSIZE
            want = _covered(inherited, lo, hi) if blk in busy else BLKSIZE
            assert _covered(flagged, lo, hi) == want, f"1 GiB block {blk}"


@pytest.mark.parametrize("gen", ["7.2", "7.3"])
def test_a_memmap_that_does_not_fit_the_inherited_scratch(gen: str) -> None:
    """4 GiB: a 64 MiB memmap; after the image (32 MiB of the 48 MiB area) no free scratch
    piece is that large. 7.2 cannot allocate it and panics; 7.3 puts it in a free block."""
    line = "kho=on kho_scratch=16M,48M,16M"
    if gen == "7.2":
        with pytest.raises(Halted, match="cannot allocate the memmap"), \
                _updated(gen, f"{line} liveupdate=on", 4 * GiB):
            pass
        return
    with _updated(gen, f"{line} liveupdate=on", 4 * GiB) as k:
        assert k.kho_in is not None and k.kho_out is not None
        starts, ends = k.memblock.reserved_ranges()
        above = {(int(a), int(b) - int(a)) for a, b in zip(starts, ends, strict=True)}
        top, memmap = 4 * GiB, 64 << 20  # memblock is top-down: the end of DRAM
        assert _covered(above, top - memmap, top) == memmap
        assert _covered(_ranges(debugfs.status(k)["in"]["scratch"]), top - memmap, top) == 0
