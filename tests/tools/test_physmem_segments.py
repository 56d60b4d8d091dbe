"""PhysMem.from_segments: RAM in pieces of one buffer at their own offsets (an ELF core)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError


def _buf() -> bytearray:
    return bytearray(bytes(range(256)) * 64)  # 16 KiB, byte i == i % 256


def test_reads_map_phys_to_each_segments_offset() -> None:
    buf = _buf()
    # phys 0x0-0x1000 at file 0x2000, phys 0x1000-0x1800 at 0x100 (touching: one range),
    # phys 0x10000-0x10400 at 0x3000 (a range of its own)
    mem = PhysMem.from_segments(buf, [(0x10000, 0x400, 0x3000), (0x0, 0x1000, 0x2000),
                                      (0x1000, 0x800, 0x100)])
    assert mem.ranges == [(0x0, 0x1800), (0x10000, 0x400)]
    assert mem.read(0x10, 4) == bytes(buf[0x2010:0x2014])
    assert mem.read(0x10000, 8) == bytes(buf[0x3000:0x3008])
    # a read across the boundary of two touching segments takes from both
    assert mem.read(0xFFC, 8) == bytes(buf[0x2FFC:0x3000]) + bytes(buf[0x100:0x104])
    assert mem.segments()[0] == (0x0, 0x1000, 0x2000)


def test_reads_outside_ram_are_efault() -> None:
    mem = PhysMem.from_segments(_buf(), [(0x0, 0x1000, 0x0), (0x2000, 0x1000, 0x1000)])
    for phys, size in ((0xFFF, 2), (0x1000, 1), (0x3000, 1), (0x2FFF, 2)):
        with pytest.raises(AbiError) as e:
            mem.read(phys, size, "probe")
        assert e.value.errno == errno.EFAULT and f"probe at {phys:#x}" in e.value.message
    assert mem.read(0x2FFF, 1) == bytes([0x1FFF % 256])


def test_inside_is_per_range() -> None:
    mem = PhysMem.from_segments(_buf(), [(0x0, 0x1000, 0x0), (0x2000, 0x1000, 0x1000)])
    starts = np.array([0x0, 0x800, 0x2000, 0x1000, 0x2800], np.uint64)
    ends = starts + np.uint64(0x1000)
    assert mem.inside(starts, ends).tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("segs, message", [
    ([(0x0, 0x1000, 0x3800)], "outside the 0x4000-byte buffer"),
    ([(0x0, 0x1000, 0x0), (0x800, 0x1000, 0x1000)], "overlaps the one before it"),
])
def test_bad_segments_are_refused(segs: list[tuple[int, int, int]], message: str) -> None:
    with pytest.raises(AbiError, match=message):
        PhysMem.from_segments(_buf(), segs)
