"""PhysMem.from_segments: RAM in pieces of one buffer at their own offsets (an ELF core)."""

from __future__ import annotations

import errno
import subprocess
import sys

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


def test_lookups_agree_with_every_range_checked_one_by_one() -> None:
    """contains, room and inside against a brute-force oracle: gaps, touching pieces, and
    (for the plain form, whose callers pass any ranges) overlapping ones."""
    rng = np.random.default_rng(7)
    starts = np.sort(rng.choice(1 << 20, 300, replace=False)).astype(np.int64) * 16
    sizes = rng.integers(1, 64, 300) * 16
    overlapping = PhysMem(bytearray(1 << 25), ranges=zip(starts.tolist(), sizes.tolist(),
                                                        strict=True))
    pieces = [(0x0, 0x1000, 0x0), (0x1000, 0x800, 0x1000), (0x3000, 0x1000, 0x1800)]
    for mem in (overlapping, PhysMem.from_segments(bytearray(0x2800), pieces)):
        lo = np.array([s for s, _ in mem.ranges], np.int64)
        hi = np.array([s + n for s, n in mem.ranges], np.int64)
        probes = np.concatenate([lo, hi, lo - 1, hi - 1, rng.integers(0, int(hi.max()) + 64,
                                                                      2000)])
        probes = probes[probes >= 0]
        lengths = rng.integers(0, 256, len(probes))
        want_in = [bool(np.any((lo <= p) & (p + n <= hi))) for p, n in zip(
            probes.tolist(), lengths.tolist(), strict=True)]
        assert [mem.contains(p, n) for p, n in zip(probes.tolist(), lengths.tolist(),
                                                   strict=True)] == want_in
        assert mem.inside(probes.astype(np.uint64),
                          (probes + lengths).astype(np.uint64)).tolist() == want_in
        want_room = [max([int(h) - p for lo_, h in zip(lo, hi, strict=True)
                          if lo_ <= p < h], default=0) for p in probes.tolist()]
        assert [mem.room(p) for p in probes.tolist()] == want_room


def test_a_range_ending_at_2_pow_64_is_inside() -> None:
    mem = PhysMem.from_segments(bytearray(0x2000), [((1 << 64) - 0x1000, 0x1000, 0x1000)])
    top = np.array([(1 << 64) - 0x1000], np.uint64)
    assert mem.inside(top, top + np.uint64(0xFFF)).tolist() == [True]
    assert mem.contains((1 << 64) - 0x1000, 0x1000) and mem.room((1 << 64) - 1) == 1


def test_reads_through_many_segments_do_not_walk_them_all() -> None:
    """50,000 pieces, 100,000 reads and a million-block inside(): a linear walk of the
    ranges per lookup takes hours here; a bisect takes well under a second. Run in its own
    process so that a regression fails by the timeout instead of hanging the suite."""
    code = """
import numpy as np
from liveupdate.abi.physmem import PhysMem
n = 50_000
mem = PhysMem.from_segments(bytearray(16 * n), [(0x2000 * i, 16, 16 * i) for i in range(n)])
assert len(mem.ranges) == n
for i in range(0, 2 * n, 1):
    p = 0x1000 * i
    assert mem.contains(p, 16) == (i % 2 == 0)
    if i % 2 == 0:
        assert mem.read(p + 8, 8) == bytes(8)
starts = (np.arange(1_000_000, dtype=np.uint64) % np.uint64(2 * n)) * np.uint64(0x1000)
ok = mem.inside(starts, starts + np.uint64(16))
assert int(ok.sum()) == 500_000
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr
