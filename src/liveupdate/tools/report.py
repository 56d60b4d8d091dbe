"""Decode any known handover blob into a JSON-able report, following pointers through RAM.

:func:`identify` recognizes a blob by content; :func:`describe` decodes it and, given a
:class:`PhysMem`, follows ``setup_data`` -> root FDT -> memory map and every sub-FDT it knows
(memblock, kho_test, LUO of both eras, files FDT, memfd of every format). Errors met while
following a pointer are recorded in the report as ``{"error": ...}`` next to what did decode,
so a damaged handover still shows everything readable; :func:`errors` lists them. Each report
describes a blob address once and within a budget (:mod:`liveupdate.tools.report_walk`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from liveupdate.abi import (
    bootparams,
    fdt,
    kexec_metadata,
    kho,
    kho_memmap,
    kho_radix,
    khotest,
    luo_ser,
    luo_session,
    luo_v3,
    memblock,
    memfd,
    negotiation,
    vmalloc,
)
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.tools.report_devices import (
    FLB_DESCRIBERS,
    describe_flb,
    describe_iommufd,
    describe_vfio_pci,
)
from liveupdate.tools.report_identify import identify, is_kho_data
from liveupdate.tools.report_walk import once, spend_fdt, walk

__all__ = ["DESCRIBERS", "Report", "describe", "describe_root", "errors", "guard", "hx",
           "identify", "is_kho_data"]

Report = dict[str, Any]


def hx(v: int) -> str:
    return f"{int(v):#x}"


def guard(fn: Callable[[], Report]) -> Report:
    """``fn()``, or the error it met as ``{"error": ...}``: one damaged pointer costs its
    own entry, not the report."""
    try:
        return fn()
    except LiveUpdateError as e:
        return {"error": str(e)}


def describe(blob: bytes, mem: PhysMem | None = None, bitmap_bytes: int | None = None) -> Report:
    with walk(mem) as mem:
        kind = identify(blob)
        return DESCRIBERS[kind](blob, mem, bitmap_bytes)


def _describe_at(mem: PhysMem, phys: int, what: str, bb: int | None,
                 size: int | None = None) -> Report:
    """The blob at ``phys``: an FDT (its own size), or ``size`` raw bytes (kho-v3+); once
    per report."""
    def at() -> Report:
        if size is not None and mem.read(phys, 4, what) != struct.pack(">I", fdt.FDT_MAGIC):
            return describe(mem.read(phys, min(size, 1 << 20), what), mem, bb)
        blob = mem.read_fdt(phys, what)
        spend_fdt(what, phys, len(blob))
        return describe(blob, mem, bb)
    return once(phys, what, at)


def _describe_setup_data(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    if is_kho_data(blob):  # the sysfs data file: no header, so no type or next to show
        kd = bootparams.KhoData.decode(blob)
        rep: Report = {"kind": "setup_data", "type": "SETUP_KEXEC_KHO",
                       "form": "kho_data payload (sysfs setup_data/N/data, no header)"}
    else:
        node, nxt = bootparams.decode_setup_data(blob)
        kd = bootparams.decode_kho_setup_data(node)
        rep = {"kind": "setup_data", "type": "SETUP_KEXEC_KHO", "next": hx(nxt)}
    rep["kho_data"] = {"fdt_addr": hx(kd.fdt_addr), "fdt_size": kd.fdt_size,
                       "scratch_addr": hx(kd.scratch_addr), "scratch_size": kd.scratch_size}
    if mem is not None:
        def scratch() -> Report:
            arr = bootparams.decode_scratch(mem.read(kd.scratch_addr, kd.scratch_size,
                                                     "KHO scratch array"))
            return {"areas": [{"addr": hx(a), "size": int(s)}
                              for a, s in zip(arr["addr"], arr["size"], strict=True)]}
        rep["scratch"] = guard(scratch)
        if all(a.get("size") == 0 for a in rep["scratch"].get("areas", [{}])):
            rep["scratch"]["note"] = SCRATCH_EMPTY
        rep["root"] = guard(lambda: describe_root(
            mem.read_fdt(kd.fdt_addr, "KHO root FDT", limit=kd.fdt_size), mem, bb,
            at=kd.fdt_addr))
    return rep


def memory_summary(pm: kho_memmap.PreservedMemory) -> Report:
    orders, counts = np.unique(pm.order, return_counts=True)
    per_order = [{"order": int(o), "blocks": int(n), "pages": int(n) << int(o)}
                 for o, n in zip(orders.tolist(), counts.tolist(), strict=True)]
    ranges = kho_memmap.merged_ranges(pm.phys, pm.order)
    return {"bitmap_bytes": pm.bitmap_bytes, "blocks": len(pm), "pages": pm.pages(),
            "per_order": per_order,
            "ranges": [[hx(s), hx(e)] for s, e in ranges.tolist()]}


def describe_root(blob: bytes, mem: PhysMem | None = None, bb: int | None = None, *,
                  at: int | None = None) -> Report:
    """The KHO root ``blob``; ``at``: where it is in RAM, when known (a subtree pointing
    back there is then ELOOP at once)."""
    with walk(mem) as mem:
        if at is None or mem is None:
            return _describe_root(blob, mem, bb)
        return once(at, "the KHO root", partial(_describe_root, blob, mem, bb))


def _describe_root(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    root = kho.decode_root(blob)
    rep: Report = {"kind": "kho-root", "compatible": root.compatible,
                   "preserved_memory_map": hx(root.mem_map), "subtrees": []}
    radix = kho.is_radix(root.compatible)
    for name, phys in root.subtrees:
        size = root.size(name)
        sub: Report = ({"name": name, "preserved_data": hx(phys), "blob_size": size} if radix
                       else {"name": name, "fdt": hx(phys)})
        if mem is not None and name == kexec_metadata.NODE:  # raw: known by name only
            sub["content"] = guard(partial(_kexec_metadata_at, mem, phys, size or 0))
        elif mem is not None:
            sub["content"] = guard(partial(_describe_at, mem, phys, f"subtree {name}", bb,
                                            size))
        rep["subtrees"].append(sub)
    names = [n for n, _ in root.subtrees]
    rep["negotiated"] = negotiation.NODE in names
    if root.broken:  # Linux skips these; only retrieving one by name fails
        rep["unretrievable"] = [{"name": n, "why": why} for n, why in root.broken]
    if mem is not None and root.mem_map:
        rep["memory"] = guard(lambda: memory_summary(
            kho_radix.decode(mem, root.mem_map, check_ram=True) if radix
            else kho_memmap.decode_mem_map(mem, root.mem_map, bb, check_ram=True)))
        if radix:
            rep["memory"]["format"] = "radix"
    return rep


def _describe_memblock(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    return {"kind": "memblock", "compatible": memblock.MEMBLOCK_COMPATIBLE,
            "reserve_mem": [{"name": r.name, "start": hx(r.start), "size": r.size}
                            for r in memblock.decode(blob)]}


def _order_counts(order: np.ndarray) -> dict[str, int]:
    vals, counts = np.unique(order, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(vals, counts, strict=True)}


def _describe_kho_test(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    t = khotest.decode(blob)
    rep: Report = {"kind": "kho-test", "compatible": khotest.KHO_TEST_COMPAT,
                   "nr_folios": t.nr_folios, "csum": hx(t.csum)}
    info = t.folios_info
    if t.folios_vmalloc is not None:
        rep["folios_info"] = _vmalloc_report(t.folios_vmalloc)
        if mem is not None:
            def load() -> Report:
                assert t.folios_vmalloc is not None
                area = vmalloc.decode(mem, t.folios_vmalloc).read(mem)
                if len(area) < 8 * t.nr_folios:
                    raise AbiError(msg="kho_test: folios_info area is shorter than nr_folios")
                arr = np.frombuffer(area, "<u8", count=t.nr_folios)
                return {"folios_per_order": _order_counts(arr & np.uint64(0xFFF))}
            rep["folios"] = guard(load)
    elif info is not None:
        rep["folios_per_order"] = _order_counts(info & np.uint64(0xFFF))
    return rep


def _vmalloc_report(v: vmalloc.KhoVmalloc) -> Report:
    return {"first": hx(v.first), "total_pages": v.total_pages, "flags": hx(v.flags),
            "order": v.order}


def _folio_report(f: memfd.Folios) -> Report:
    return {"count": len(f),
            "dirty": int(np.count_nonzero(f.flags & memfd.FOLIO_DIRTY)),
            "uptodate": int(np.count_nonzero(f.flags & memfd.FOLIO_UPTODATE)),
            "index_range": [int(f.index.min()), int(f.index.max())] if len(f) else []}


V3_FILE_FORMATS = frozenset({memfd.MEMFD_V1})  # v3's files FDT: memfd's own FDT


def _describe_memfd_fdt(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    st = memfd.decode_fdt(blob)
    return {"kind": "memfd-fdt", "compatible": memfd.MEMFD_V1, "pos": st.pos,
            "size": st.size, "folios": _folio_report(st.folios)}


def describe_memfd_ser(mem: PhysMem, phys: int, compatible: str) -> Report:
    size = memfd.SER_SIZE[compatible]
    with walk(mem) as counted:
        assert counted is not None
        return once(phys, f"{compatible} struct", lambda: _describe_memfd_struct(
            counted.read(phys, size, f"{compatible} struct"), counted, compatible))


def _describe_memfd_struct(raw: bytes, mem: PhysMem | None, compatible: str) -> Report:
    ser = memfd.decode_ser(raw, compatible)
    rep: Report = {"kind": "memfd-ser", "compatible": compatible, "pos": ser.pos,
                   "size": ser.size, "nr_folios": ser.nr_folios,
                   "folios_vmalloc": _vmalloc_report(ser.folios)}
    if memfd.HAS_SEALS[compatible]:
        rep["seals"] = hx(ser.seals)
    if mem is None:
        return rep

    def folios() -> Report:
        if ser.nr_folios == 0:
            return _folio_report(memfd.Folios.empty())
        area = vmalloc.decode(mem, ser.folios).read(mem)
        return _folio_report(memfd.decode_folio_array(area, ser.nr_folios, ser.size))
    rep["folios"] = guard(folios)
    return rep


def _describe_luo_v3(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    luo = luo_v3.decode_luo_fdt(blob)
    rep: Report = {"kind": "luo-v3", "compatible": luo_v3.LUO_COMPATIBLE,
                   "subsystems": {k: hx(v) for k, v in luo.subsystems.items()}}
    files_phys = luo.files_fdt
    if mem is not None and files_phys:
        rep["files"] = guard(partial(_describe_at, mem, files_phys, "files FDT", bb))
    return rep


def _describe_files_fdt(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    files = []
    for f in luo_v3.decode_files_fdt(blob):
        entry: Report = {"token": hx(f.token), "compatible": f.compatible, "data": hx(f.data)}
        if mem is not None and f.compatible in V3_FILE_FORMATS and f.data:
            entry["memfd"] = guard(partial(_describe_at, mem, f.data, "memfd FDT", bb))
        files.append(entry)
    return {"kind": "files-fdt", "compatible": luo_v3.FILES_COMPATIBLE, "files": files}


def _describe_luo_session(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    luo = luo_session.decode_luo_fdt(blob)
    rep: Report = {"kind": "luo-session", "compatible": luo_session.LUO_COMPATIBLE,
                   "liveupdate_number": luo.liveupdate_number,
                   "session_header": hx(luo.session_header)}
    if luo.flb_header is not None:
        rep["flb_header"] = hx(luo.flb_header)
    if mem is None:
        return rep
    header = luo.session_header
    rep["sessions"] = guard(lambda: _sessions_report(
        mem, luo_session.decode_sessions(mem, header)))
    if luo.flb_header:
        _flbs(rep, mem, luo.flb_header)
    return rep


def _sessions_report(mem: PhysMem, sessions: list[luo_session.SessionSer]) -> Report:
    out = []
    for s in sessions:
        files = []
        for f in s.files:
            entry: Report = {"token": hx(f.token), "compatible": f.compatible,
                             "data": hx(f.data)}
            if f.compatible in memfd.SER_SIZE:  # a memfd struct of a format we know
                entry["memfd"] = guard(partial(describe_memfd_ser, mem, f.data, f.compatible))
            files.append(entry)
        out.append({"name": s.name, "files": files})
    return {"list": out}


def _flbs(rep: Report, mem: PhysMem, phys: int) -> None:
    def one(f: luo_session.FlbSer) -> Report:
        entry: Report = {"name": f.name, "data": hx(f.data), "count": f.count}
        if f.name in FLB_DESCRIBERS:
            entry["decoded"] = guard(lambda: describe_flb(mem, f.name, f.data) or {})
        return entry
    rep["flbs"] = guard(lambda: {"list": [one(f) for f in luo_session.decode_flbs(mem, phys)]})


def _describe_luo_v5(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    ser = luo_ser.decode(blob)
    rep: Report = {"kind": "luo-v5", "compatible": luo_ser.LUO_V5,
                   "liveupdate_number": ser.liveupdate_number,
                   "sessions_pa": hx(ser.sessions_pa), "flbs_pa": hx(ser.flbs_pa)}
    if not ser.sessions_pa:
        rep["sessions_note"] = SESSIONS_PA_0
    if mem is None:
        return rep
    rep["sessions"] = guard(lambda: _sessions_report(
        mem, luo_ser.decode_sessions(mem, ser.sessions_pa)[0]))
    if ser.flbs_pa:
        _flbs(rep, mem, ser.flbs_pa)
    return rep


SCRATCH_EMPTY = ("every scratch area is empty: the array is a kexec segment, staged in other "
                 "pages (kexec_core.c kimage_alloc_page) and copied to scratch_addr only at "
                 "the jump, so RAM saved before the jump holds zeros there")
SESSIONS_PA_0 = ("sessions_pa is 0: no sessions were handed over -- or this is a running "
                 "kernel's outgoing luo_ser (debugfs out/sub_fdts/LUO), not yet serialized: "
                 "LUO writes its sessions at reboot (luo_session_serialize)")


def _kexec_metadata_at(mem: PhysMem, phys: int, size: int) -> Report:
    return _describe_kexec_metadata(mem.read(phys, min(size, PAGE_SIZE), "kexec-metadata"),
                                    mem, None)


def _describe_kexec_metadata(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    md = kexec_metadata.decode(blob)
    return {"kind": "kexec-metadata", "version": kexec_metadata.VERSION,
            "previous_release": md.previous_release, "kexec_count": md.kexec_count}


def _describe_negotiation(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    rec = negotiation.decode(blob)
    return {"kind": "lu-negotiation", "compatible": negotiation.COMPATIBLE,
            "writer": rec.writer, "reader": rec.reader, "formats": rec.formats}


Describer = Callable[[bytes, PhysMem | None, int | None], Report]

# One describer per format of abi/formats.py (tests hold the two to the same names).
DESCRIBERS: dict[str, Describer] = {
    "setup_data": _describe_setup_data,
    "kho-root": describe_root,
    "memblock": _describe_memblock,
    "kho-test": _describe_kho_test,
    "luo-v3": _describe_luo_v3,
    "luo-session": _describe_luo_session,
    "luo-flb": _describe_luo_session,
    "luo-v5": _describe_luo_v5,
    "lu-negotiation": _describe_negotiation,
    "kexec-metadata": _describe_kexec_metadata,
    "files-fdt": _describe_files_fdt,
    "memfd-fdt": _describe_memfd_fdt,
    "memfd-v1": lambda raw, mem, bb: _describe_memfd_struct(raw, mem, memfd.MEMFD_V1),
    "memfd-v2": lambda raw, mem, bb: _describe_memfd_struct(raw, mem, memfd.MEMFD_V2),
    "vfio-pci-v1": describe_vfio_pci,
    "iommufd-v1": describe_iommufd,
}


def errors(rep: Any, path: str = "") -> list[str]:
    """Every error recorded anywhere in a report, with where it was met."""
    out: list[str] = []
    if isinstance(rep, dict):
        if "error" in rep:
            out.append(f"{path or '/'}: {rep['error']}")
        for k, v in rep.items():
            out += errors(v, f"{path}/{k}")
    elif isinstance(rep, list):
        for i, v in enumerate(rep):
            out += errors(v, f"{path}[{i}]")
    return out
