"""Reports of the hugetlb RFC's formats (``7.3+posted``; docs/posted-series.md 4): the pools'
FLB ``hugetlb-v1`` (huge pages held by preserved files, per hstate) and a preserved hugetlb
memfd ``huge-memfd-v1`` (with RAM, its folio array through KHO vmalloc). As every describer
of :mod:`liveupdate.tools.report`, each fails with AbiError on hostile bytes."""

from __future__ import annotations

from typing import Any

from liveupdate.abi import hugetlb, vmalloc
from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.abi.physmem import PhysMem
from liveupdate.tools.report_walk import once, walk

Report = dict[str, Any]


def _size(order: int) -> str:
    kib = 1 << (order + PAGE_SHIFT - 10)
    return f"{kib >> 20} GiB" if kib >= 1 << 20 else f"{kib >> 10} MiB"


def describe_hugetlb_flb(raw: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    ser = hugetlb.decode_flb(raw)
    return {"kind": "hugetlb-v1", "compatible": hugetlb.FLB_COMPATIBLE, "hstates": [
        {"order": o, "page_size": _size(o), "nr_pages": n} for o, n in ser.hstates]}


def describe_huge_memfd(raw: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    ser = hugetlb.decode_ser(raw)
    rep: Report = {"kind": "huge-memfd-v1", "compatible": hugetlb.COMPATIBLE,
                   "size": ser.size, "pos": ser.pos, "order": ser.order,
                   "page_size": _size(ser.order), "nr_folios": ser.nr_folios,
                   "folios_vmalloc": {"first": f"{ser.folios.first:#x}",
                                      "total_pages": ser.folios.total_pages,
                                      "order": ser.folios.order}}
    if mem is not None and ser.nr_folios:
        f = hugetlb.decode_folios(vmalloc.decode(mem, ser.folios).read(mem), ser)
        rep["folios"] = {"count": len(f.pfn),
                         "phys": [f"{int(p) << PAGE_SHIFT:#x}" for p in f.pfn[:16]],
                         "index_range": [int(f.index.min()), int(f.index.max())]}
    return rep


def describe_huge_memfd_at(mem: PhysMem, phys: int) -> Report:
    """A file entry's ``data``: the struct at ``phys``, once per report."""
    with walk(mem) as counted:
        assert counted is not None
        return once(phys, "huge-memfd-v1 struct", lambda: describe_huge_memfd(
            counted.read(phys, hugetlb.SER_SIZE, "huge-memfd-v1 struct"), counted, None))
