"""Find the KHO root FDT in a RAM image that came without ``setup_data``.

``luoctl inspect --ram RAM`` with no FILE: the root is found by content. Linux allocates it
as one preserved page (``kho_init``: ``kho_alloc_preserve(PAGE_SIZE)``, then
``kho_out_fdt_setup``; kernel/liveupdate/kexec_handover.c), so it starts on a page boundary
with the FDT magic ``0xd00dfeed`` and its root ``compatible`` is a KHO root format. Every
page start of every RAM segment is looked at (numpy over the mapping, stride 4096; only the
parts of a sparse file that hold data), every FDT there is parsed, and every KHO root among
them is a candidate.

A RAM image may hold several: the running kernel's outgoing root, the incoming one it was
booted with (kept for debugfs ``in/fdt``), stale copies in freed pages. Each candidate's
preserved-memory map is decoded (blocks inside RAM, as for any hostile map) and the whole
handover described; the one with a map that decodes and the fewest errors is chosen, ties
going to one whose map preserves its own page (a live root's does: ``kho_alloc_preserve``),
then the newest (highest ``kexec-metadata`` count, 7.1+), then the lowest address. The
report lists every candidate, and says why the chosen one won or that the choice was a tie.

A crafted image could hold a root (or an FDT) on every page, so the scan is bounded: at most
:data:`MAX_CANDIDATES` roots are examined, all of them within one report budget
(:mod:`liveupdate.tools.report_walk`), and at most :data:`SCAN_FDT_BYTES` of FDT are parsed
to learn what the pages hold; what is left is counted and reported as an error.
"""

from __future__ import annotations

import errno

import numpy as np

from liveupdate.abi import fdt, kho, kho_memmap, kho_radix
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.tools import report, report_walk
from liveupdate.tools.report import Report, hx

MAGIC = fdt.FDT_MAGIC.to_bytes(4, "big")
# The most read of one FDT found by the scan (and of --root ADDR). A KHO root is one page
# (kho_alloc_preserve(PAGE_SIZE)), but every FDT found is read to learn its compatible, and
# the other sub-FDTs may be larger; a header claiming more is listed as unreadable.
ROOT_LIMIT = 1 << 20
MAX_OTHER = 32  # non-KHO FDTs listed in the report (they are counted all the same)
# Linux leaves a handful of roots in RAM (outgoing, incoming, stale copies in freed pages);
# each is described in full, so a crafted image with thousands is cut here.
MAX_CANDIDATES = 16
# A real RAM image holds a few pages of FDT; parsing is the costly part of the scan.
SCAN_FDT_BYTES = 16 << 20


def _windows(mem: PhysMem,
             extents: list[tuple[int, int]] | None) -> list[tuple[int, int, int]]:
    """``(phys, size, buffer offset)`` pieces of RAM worth scanning: every segment, cut to
    the file extents that hold data when those are known."""
    out = []
    for phys, size, off in mem.segments():
        for lo, hi in extents if extents is not None else [(off, off + size)]:
            a, b = max(lo, off), min(hi, off + size)
            if a < b:
                out.append((phys + a - off, b - a, a))
    return out


def scan(mem: PhysMem, extents: list[tuple[int, int]] | None = None) -> list[int]:
    """Physical addresses of every page that starts with the FDT magic."""
    found: list[int] = []
    buf = mem.buffer
    for phys, size, off in _windows(mem, extents):
        first = -(-phys // PAGE_SIZE) * PAGE_SIZE
        skip = first - phys
        if skip + len(MAGIC) > size:
            continue
        n = (size - skip - len(MAGIC)) // PAGE_SIZE + 1
        view = np.frombuffer(buf, np.uint8, count=size - skip, offset=off + skip)  # type: ignore[call-overload]
        heads = np.flatnonzero(view[::PAGE_SIZE][:n] == MAGIC[0])
        for k in heads.tolist():
            p = first + k * PAGE_SIZE
            if mem.read(p, len(MAGIC)) == MAGIC:
                found.append(p)
        del view
    return sorted(found)


def _kexec_count(desc: Report) -> int:
    for sub in desc.get("subtrees", []):
        content = sub.get("content", {})
        if content.get("kind") == "kexec-metadata":
            return int(content["kexec_count"])
    return -1


def _candidate(mem: PhysMem, phys: int, blob: bytes, compat: list[str],
               bb: int | None) -> tuple[Report, Report | None]:
    """One KHO root found in RAM: its summary, and its full description if its map
    decodes."""
    cand: Report = {"phys": hx(phys), "compatible": ", ".join(compat)}
    try:
        root = kho.decode_root(blob)
        cand["preserved_memory_map"] = hx(root.mem_map)
        cand["subtrees"] = [n for n, _ in root.subtrees]
        pm = (kho_radix.decode(mem, root.mem_map, check_ram=True) if kho.is_radix(
            root.compatible) else kho_memmap.decode_mem_map(mem, root.mem_map, bb,
                                                             check_ram=True))
    except LiveUpdateError as e:
        cand["rejected"] = f"its preserved-memory map does not decode: {e}"
        return cand, None
    cand["memory_map"] = f"{len(pm)} blocks, {pm.pages()} pages"
    ends = pm.phys + (np.uint64(PAGE_SIZE) << pm.order.astype(np.uint64))
    # a live root's page is itself preserved (kho_init: kho_alloc_preserve)
    cand["self_preserved"] = bool(np.any((pm.phys <= phys) & (np.uint64(phys) < ends)))
    desc = report.guard(lambda: report.describe_root(blob, mem, bb, at=phys))
    if desc.keys() == {"error"}:  # not described at all (the scan's budget is spent)
        cand["rejected"] = f"not described: {desc['error']}"
        return cand, None
    cand["errors"] = len(report.errors(desc))
    count = _kexec_count(desc)
    if count >= 0:
        cand["kexec_count"] = count
    return cand, desc


def describe_ram(mem: PhysMem, bb: int | None = None,
                 extents: list[tuple[int, int]] | None = None) -> tuple[Report, bytes | None]:
    """Scan RAM for KHO roots, choose one, describe it: (report, the chosen root's blob)."""
    hits = scan(mem, extents)
    rep: Report = {"kind": "ram-scan", "fdt_pages": len(hits), "candidates": []}
    others: list[Report] = []
    found: list[tuple[Report, Report, bytes, int]] = []
    parsed, left = 0, []  # left: pages not looked at, past a bound
    with report_walk.shared_budget():
        for phys in hits:
            if len(rep["candidates"]) >= MAX_CANDIDATES or parsed >= SCAN_FDT_BYTES:
                left.append(phys)
                continue
            try:
                blob = mem.read_fdt(phys, "FDT", limit=ROOT_LIMIT)
                parsed += len(blob)
                compat = fdt.parse(blob).root.compatible()
            except LiveUpdateError as e:
                others.append({"phys": hx(phys), "unreadable": str(e)})
                continue
            if not set(kho.ROOT_FORMATS) & set(compat):
                others.append({"phys": hx(phys), "compatible": ", ".join(compat) or "none"})
                continue
            cand, desc = _candidate(mem, phys, blob, compat, bb)
            rep["candidates"].append(cand)
            if desc is not None:
                found.append((cand, desc, blob, phys))
    rep["other_fdts"] = {"count": len(others), "list": others[:MAX_OTHER]}
    if left:
        rep["not_examined"] = {
            "count": len(left), "list": [hx(p) for p in left[:MAX_OTHER]],
            "error": str(AbiError(
                msg=f"{len(left)} page(s) starting with the FDT magic were not examined: the "
                f"scan stops after {MAX_CANDIDATES} KHO roots or {SCAN_FDT_BYTES} bytes of "
                "FDT (a RAM image with more is crafted); use --root ADDR to decode one of "
                "them", err=errno.E2BIG))}
    if not rep["candidates"]:
        rep["error"] = (f"no KHO root FDT in RAM: {len(hits)} page(s) start with the FDT "
                        f"magic, none with a root compatible of {', '.join(kho.ROOT_FORMATS)}")
        return rep, None
    if not found:
        rep["error"] = (f"{len(rep['candidates'])} KHO root FDT(s) found, none whose "
                        "preserved-memory map decodes: stale copies left in freed pages by "
                        "earlier kernels look like this")
        return rep, None
    found.sort(key=lambda f: _rank(f[0], f[3]))
    _, desc, blob, phys = found[0]
    rep["chosen"] = hx(phys)
    rep["why"] = _why([(f[0], f[3]) for f in found], len(rep["candidates"]))
    rep["root"] = desc
    return rep, blob


def _rank(cand: Report, phys: int) -> tuple[int, int, int, int]:
    """Fewest errors, then a map that preserves the root's own page, then newest (kexec
    count), then lowest address."""
    return (cand["errors"], not cand["self_preserved"], -cand.get("kexec_count", -1), phys)


def _why(ranked: list[tuple[Report, int]], total: int) -> str:
    if total == 1:
        return "the only KHO root FDT in RAM, and its preserved-memory map decodes"
    if len(ranked) == 1:
        return (f"the only one of {total} KHO root FDTs whose preserved-memory map decodes "
                "(the others: stale copies whose map pages were freed and reused)")
    (best, bp), (second, sp) = ranked[0], ranked[1]
    a, b = _rank(best, bp), _rank(second, sp)
    head = f"{len(ranked)} of {total} candidates have maps that decode; "
    if a[0] != b[0]:
        return head + f"this one decodes with the fewest errors ({a[0]}, next {b[0]})"
    if a[1] != b[1]:
        return head + ("this one's map preserves its own page, as a live root's does "
                       f"(kho_alloc_preserve), and {second['phys']}'s does not")
    if a[2] != b[2]:
        return head + (f"they decode equally well; this one is the newest (kexec-metadata "
                       f"count {best['kexec_count']}); use --root ADDR for another")
    return head + ("they decode equally well and are equally new: AMBIGUOUS; chose the "
                   "lowest address -- use --root ADDR (or pass setup_data) to choose")
