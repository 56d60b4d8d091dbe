"""hugetlb: the pools' command line (mm/hugetlb.c's rules), hugetlb memfds' errnos, and the
RFC's preservation across a kexec of in-process kernels -- the same physical folios, the
pools re-made around them."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from liveupdate.abi import bootparams, image
from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs import hugetlbfs
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.mm import hugetlb
from tests.kernel.conftest import GiB, Rig
from tests.kernel.test_luo_rules73 import _luo, call, pack

MiB = 1 << 20
HUGE_1G = hugetlbfs.MFD_HUGETLB | 30 << hugetlbfs.MFD_HUGE_SHIFT
HUGE_2M = hugetlbfs.MFD_HUGETLB | 21 << hugetlbfs.MFD_HUGE_SHIFT
POSTED, PLAIN = image.KernelImage.of("7.3+posted"), image.KernelImage.of("7.3")
CMD = "kho=on liveupdate=on hugepagesz=1G hugepages=2 hugepagesz=2M hugepages=8"


def pools(raw: str) -> tuple[dict[int, int], int, list[str]]:
    warns: list[str] = []
    hs = hugetlb.parse(hugetlb.words_of(raw), warns.append)
    return ({h.order: h.max_huge_pages for h in hs.hstates}, hs.hstates[hs.default].order,
            warns)


@pytest.mark.parametrize("raw, want, default, warn", [
    ("", {18: 0, 9: 0}, 9, ""),
    ("hugepages=16", {18: 0, 9: 16}, 9, ""),
    ("hugepagesz=1G hugepages=4", {18: 4, 9: 0}, 9, ""),
    ("hugepagesz=1G hugepages=4 hugepagesz=2M hugepages=512", {18: 4, 9: 512}, 9, ""),
    ("default_hugepagesz=1G hugepages=3", {18: 3, 9: 0}, 18, ""),
    ("hugepages=3 default_hugepagesz=1G", {18: 3, 9: 0}, 18, ""),
    ("hugepagesz=16M hugepages=4", {18: 0, 9: 0}, 9, "does not follow a valid hugepagesz"),
    ("hugepagesz=2M hugepages=4 hugepages=8", {9: 4, 18: 0}, 9, "specified twice without"),
    ("hugepagesz=2M hugepages=4 hugepagesz=2M hugepages=8", {9: 4, 18: 0}, 9,
     "hugepagesz=2M specified twice"),
    ("default_hugepagesz=2M hugepagesz=2M hugepages=6", {9: 6, 18: 0}, 9, ""),
    ("hugepagesz=2M hugepages=0:5", {9: 5, 18: 0}, 9, ""),
    ("hugepagesz=2M hugepages=1:5", {9: 0, 18: 0}, 9, "Invalid hugepages parameter"),
    ("hugepagesz=2M hugepages=2 hugepages=7", {9: 2, 18: 0}, 9, "twice"),
    ("hugepagesz=2M hugepages=2 default_hugepagesz=2M default_hugepagesz=1G",
     {9: 2, 18: 0}, 9, "previously specified"),
])
def test_the_command_line_as_mm_hugetlb_c_parses_it(raw: str, want: dict[int, int],
                                                    default: int, warn: str) -> None:
    got, dflt, warns = pools(raw)
    assert got == want and dflt == default
    assert (warn in " | ".join(warns)) if warn else not warns, warns


@pytest.fixture
def big() -> Iterator[Rig]:
    r = Rig(6 * GiB)
    yield r
    r.close()


def _huge(k: Kernel, flags: int, size: int) -> File:
    m = hugetlbfs.memfd_create(k, "guest", flags)
    m.truncate(size)
    return kmemfd.open_file(m)


def test_pools_are_reserved_at_boot_outside_scratch(big: Rig) -> None:
    k = big.boot(CMD, POSTED)
    assert k.hugetlb is not None
    one_g = k.hugetlb.size_to_hstate(GiB)
    two_m = k.hugetlb.size_to_hstate(2 * MiB)
    assert one_g is not None and two_m is not None
    assert (one_g.nr_huge_pages, len(one_g.free), two_m.nr_huge_pages) == (2, 2, 8)
    assert all(p % GiB == 0 for p in one_g.free) and all(p % (2 * MiB) == 0 for p in two_m.free)
    for r in k.memblock.scratch_regions():
        assert not any(r.base <= p < r.end for p in one_g.free + two_m.free)


def test_a_file_on_a_pool_made_at_boot_lies_in_address_order(big: Rig) -> None:
    """The pool is filled from the buddy right after memblock_free_all, which walks memory
    upwards: a guest on it lies in address order, broken only where boot reserved memory,
    so its VMM maps a run per stretch of free memory, not one per folio."""
    k = big.boot("kho=on liveupdate=on hugepagesz=2M hugepages=512", POSTED)
    m = _huge(k, HUGE_2M, GiB).private
    m.fallocate(0, 0, GiB)
    phys = m.phys.astype(np.int64)
    assert len(phys) == 512 and np.all(np.diff(phys) > 0)
    free = np.zeros(k.meta.nr_pages, bool)
    for order, heads in enumerate(k.buddy.free_lists):
        for head in heads:
            free[head : head + (1 << order)] = True
    gaps = [(a + 2 * MiB, b) for a, b in itertools.pairwise(phys.tolist())
            if b != a + 2 * MiB]
    assert len(m.extents(0, GiB >> PAGE_SHIFT)) == len(gaps) + 1 <= 2
    assert not any(free[a >> PAGE_SHIFT : b >> PAGE_SHIFT].any() for a, b in gaps)


def test_hugetlb_memfd_errnos(big: Rig) -> None:
    k = big.boot(CMD, POSTED)

    def err(fn: object) -> str:
        try:
            fn()  # type: ignore[operator]
        except LiveUpdateError as e:
            return errno.errorcode[e.errno]
        return "ok"

    f = _huge(k, HUGE_2M, 4 * MiB)
    m = f.private
    assert err(lambda: hugetlbfs.memfd_create(k, "x", hugetlbfs.MFD_HUGETLB | 24 << 26)) \
        == "ENODEV"  # no 16 MiB hstate
    assert err(lambda: m.truncate(3 * MiB)) == "EINVAL"
    assert err(lambda: m.pwrite(b"x", 0)) == "EINVAL"
    assert err(lambda: m.mmap_range(4096, 4096, True)) == "EINVAL"
    assert err(lambda: m.fallocate(0, 0, 4 * MiB)) == "ok"
    assert m.nr_pages == 2 * 512 and len(m.index) == 2
    assert err(lambda: m.fallocate(0, 0, 64 * MiB)) == "ENOSPC"  # 8 in the pool
    assert m.size == 4 * MiB and len(m.index) == 8  # what was allocated before stays
    g = _huge(k, HUGE_1G, 4 * GiB).private
    assert err(lambda: g.mmap_range(0, 4 * GiB, True)) == "ENOMEM"  # 2 pages of 1 GiB
    f.get().put()  # the last reference: the folios go back to the pool
    assert len(k.hugetlb.size_to_hstate(2 * MiB).free) == 8  # type: ignore[union-attr]


def test_plain_7_3_refuses_to_preserve_a_hugetlb_memfd(big: Rig) -> None:
    k = big.boot(CMD, PLAIN)
    s = call(_luo(k).open(), "CREATE_SESSION", pack("CREATE_SESSION", name=b"vm"))
    assert isinstance(s, File)
    f = _huge(k, HUGE_2M, 2 * MiB)
    assert call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=1), f) == "ENOENT"


def test_preserved_folios_come_back_on_the_same_pages(big: Rig) -> None:
    k = big.boot(CMD, POSTED)
    s = call(_luo(k).open(), "CREATE_SESSION", pack("CREATE_SESSION", name=b"vm"))
    assert isinstance(s, File)
    f = _huge(k, HUGE_1G, 2 * GiB)
    m = f.private
    m.populate(0, m.size >> PAGE_SHIFT)
    for i, p in enumerate(m.phys.tolist()):
        k.write(p + 12345, f"folio {i}".encode())
    before = m.phys.tolist()
    assert call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=1), f) == "ok"
    assert m.frozen and call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=2),
                             _huge(k, HUGE_1G, GiB)) == "ENOSPC"  # the pool is empty
    k2 = big.kexec(k, CMD, POSTED)
    one_g = k2.hugetlb.size_to_hstate(GiB) if k2.hugetlb else None
    assert one_g is not None and one_g.nr_huge_pages == 0  # 2 asked, 2 held by the file
    s2 = call(_luo(k2).open(), "RETRIEVE_SESSION", pack("RETRIEVE_SESSION", name=b"vm"))
    assert isinstance(s2, File)
    got = call(s2, "SESSION_RETRIEVE_FD", pack("SESSION_RETRIEVE_FD", token=1))
    assert isinstance(got, File)
    m2 = got.private
    assert isinstance(m2, hugetlbfs.HugeMemfd) and m2.horder == 18 and m2.size == 2 * GiB
    assert m2.phys.tolist() == before  # zero copy: the same physical folios
    assert [k2.read(p + 12345, 7) for p in before] == [b"folio 0", b"folio 1"]
    assert one_g.nr_huge_pages == 2 and not one_g.free
    assert call(s2, "SESSION_FINISH", pack("SESSION_FINISH")) == "ok"
    got.put()
    assert sorted(one_g.free) == sorted(before)  # back to the pool, not the buddy
    assert np.all(k2.meta.refcount[np.array(before) >> PAGE_SHIFT] >= 0)


def test_the_rest_of_a_gigantic_pool_comes_back_outside_the_inherited_scratch(big: Rig
                                                                               ) -> None:
    """7.3.4's memblock_alloc_hugetlb on a KHO boot: memblock is scratch-only, the pool's
    pages the files do not hold come from the blocks kho_extend_scratch flagged, never from
    the scratch the previous kernel handed over (kho_scratch_overlap)."""
    k = big.boot(CMD, POSTED)
    s = call(_luo(k).open(), "CREATE_SESSION", pack("CREATE_SESSION", name=b"vm"))
    assert isinstance(s, File)
    f = _huge(k, HUGE_1G, GiB)  # one of the two 1 GiB pages
    f.private.populate(0, f.private.size >> PAGE_SHIFT)
    assert call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=1), f) == "ok"
    k2 = big.kexec(k, CMD, POSTED)
    one_g = k2.hugetlb.size_to_hstate(GiB) if k2.hugetlb else None
    assert one_g is not None and one_g.nr_huge_pages == 1 and len(one_g.free) == 1
    assert k2.kho_in is not None
    scratch = [(a, a + n) for a, n in bootparams.scratch_areas(k2.kho_in.scratch) if n]
    page = one_g.free[0]
    assert page % GiB == 0 and all(not (a < page + GiB and page < b) for a, b in scratch)
