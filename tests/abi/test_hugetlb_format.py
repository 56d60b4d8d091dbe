"""The hugetlb RFC's formats (docs/posted-series.md 4) against golden bytes written out from
the posting's field tables -- not from our codec -- and decoded back."""

from __future__ import annotations

import numpy as np

from liveupdate.abi import formats, hugetlb, vmalloc
from liveupdate.abi.vmalloc import KhoVmalloc
from liveupdate.tools import report
from tests.conftest import FakeRam


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_hugetlb_v1_is_four_packed_hstates_then_their_count() -> None:
    golden = (le(3, 8) + le(9, 1)  # hstates[0]: 3 pages of 2 MiB
              + le(8, 8) + le(18, 1)  # hstates[1]: 8 pages of 1 GiB, at offset 9 (unaligned)
              + bytes(18)  # hstates[2..3] unused
              + le(2, 1))  # nr_hstates at offset 36
    assert len(golden) == hugetlb.FLB_SIZE == 37
    ser = hugetlb.HugetlbSer(((9, 3), (18, 8)))
    assert hugetlb.encode_flb(ser) == golden
    assert hugetlb.decode_flb(golden + bytes(4096 - 37)) == ser


def test_huge_memfd_v1_is_size_pos_count_vmalloc_order() -> None:
    desc = KhoVmalloc(0x1234000, 1, 1, 0)
    golden = (le(8 << 30, 8) + le(4096, 8) + le(8, 8)  # size, pos, nr_folios
              + le(0x1234000, 8) + le(1, 4) + le(1, 2) + le(0, 2)  # struct kho_vmalloc
              + le(18, 1))  # order, at offset 40
    assert len(golden) == hugetlb.SER_SIZE == 41
    ser = hugetlb.HugeMemfdSer(8 << 30, 4096, 8, desc, 18)
    assert hugetlb.encode_ser(ser) == golden
    assert hugetlb.decode_ser(golden) == ser


def test_a_folio_is_pfn_then_index_in_base_pages() -> None:
    folios = hugetlb.HugeFolios(np.array([0x40000, 0x80000], np.uint64),
                                np.array([0, 0x40000], np.uint64))
    golden = le(0x40000, 8) + le(0, 8) + le(0x80000, 8) + le(0x40000, 8)
    assert hugetlb.encode_folios(folios) == golden
    ser = hugetlb.HugeMemfdSer(2 << 30, 0, 2, KhoVmalloc(0x1000, 1, 1, 0), 18)
    back = hugetlb.decode_folios(golden, ser)
    assert back.pfn.tolist() == [0x40000, 0x80000] and back.index.tolist() == [0, 0x40000]


def test_the_format_table_names_the_component() -> None:
    assert formats.compatible_of("huge-memfd-v1") == "huge-memfd-v1"
    rows = {f.name: f for f in formats.FORMATS}
    assert rows["hugetlb-v1"].component == rows["huge-memfd-v1"].component == "huge-memfd"


def test_inspect_describes_a_huge_memfd_and_its_folios_from_ram() -> None:

    ram = FakeRam(pages=8, base=0x100000)
    raw = hugetlb.encode_folios(hugetlb.HugeFolios(np.array([0x40000, 0x80000], np.uint64),
                                                   np.array([0, 0x40000], np.uint64)))
    nblocks, nchunks = vmalloc.pages_needed(len(raw))
    lay = vmalloc.layout(raw, np.array([ram.alloc() for _ in range(nblocks)], np.uint64),
                         np.array([ram.alloc() for _ in range(nchunks)], np.uint64))
    for p, page in lay.pages:
        ram.put(p, page)
    blob = hugetlb.encode_ser(hugetlb.HugeMemfdSer(2 << 30, 0, 2, lay.desc, 18))
    rep = report.DESCRIBERS["huge-memfd-v1"](blob, ram.mem(), None)
    assert rep["page_size"] == "1 GiB" and rep["folios"]["phys"] == ["0x40000000",
                                                                     "0x80000000"]
    flb = report.DESCRIBERS["hugetlb-v1"](hugetlb.encode_flb(hugetlb.HugetlbSer(((18, 2),))),
                                          None, None)
    assert flb["hstates"] == [{"order": 18, "page_size": "1 GiB", "nr_pages": 2}]
