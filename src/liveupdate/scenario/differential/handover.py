"""The handover at the jump, decoded structure by structure (:mod:`liveupdate.tools.report`),
reduced to what is stable across two kernels running the same steps.

Kept: the root's compatible, the subtrees in FDT order (name, blob size, what they hold),
LUO's sessions in order (name, files in order: token, handler compatible, memfd size,
position, seals, folio count and flags, index range) and its FLBs (name, data, count),
kexec-metadata's version and count. Not kept: physical addresses, the preserved-memory map's
ranges and radix nodes (where pages landed), vmalloc chunk counts, the scratch array (a kexec
segment, unwritten when the real kernel's RAM is saved), kho_test's checksum and folios (its
random allocation).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

from liveupdate.abi.physmem import PhysMem
from liveupdate.tools import report

Stable = dict[str, Any]


def _memfd(f: dict[str, Any]) -> dict[str, Any]:
    m = f.get("memfd", {})
    folios = m.get("folios", {})
    return {"token": f["token"], "compatible": f["compatible"],
            "size": m.get("size"), "pos": m.get("pos"), "seals": m.get("seals"),
            "nr_folios": m.get("nr_folios"), "dirty": folios.get("dirty"),
            "uptodate": folios.get("uptodate"), "index_range": folios.get("index_range")}


def _content(c: dict[str, Any]) -> dict[str, Any]:
    kind = c.get("kind")
    if "sessions" in c:  # LUO's own blob, whichever format the report decoded
        return {"kind": kind, "compatible": c.get("compatible"),
                "liveupdate_number": c.get("liveupdate_number"),
                "sessions": [{"name": s["name"], "files": [_memfd(f) for f in s["files"]]}
                             for s in c.get("sessions", {}).get("list", [])],
                "flbs": c.get("flbs", {}).get("list", [])}
    if "kexec_count" in c:
        return {"kind": kind, "version": c.get("version"), "kexec_count": c.get("kexec_count")}
    return {"kind": kind, "compatible": c.get("compatible")}


def stable(root: dict[str, Any]) -> Stable:
    """The stable part of a ``kho-root`` report."""
    subtrees = root.get("subtrees", [])
    return {"compatible": root.get("compatible"),
            "subtree_order": [s["name"] for s in subtrees],
            "subtrees": {s["name"]: {"blob_size": s.get("blob_size"),
                                     **_content(s.get("content", {}))} for s in subtrees},
            # the map's radix tree is read from RAM the next kernel has begun to use again
            # once it reserved the preserved ranges: not compared, nor its errors
            "errors": [e for e in report.errors(root) if not e.startswith("/memory")]}


def of_capture(folder: Path, payload: bytes) -> Stable:
    """The stable handover in a real capture's RAM (``ram.raw``, offset == physical)."""
    with open(folder / "ram.raw", "rb") as f, \
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        rep = report.describe(payload, PhysMem(m))
    return stable(rep["root"])


def of_root(fdt: bytes, mem: PhysMem) -> Stable:
    """The stable handover from its root FDT and the RAM it points into."""
    return stable(report.describe_root(fdt, mem))


def leaves(s: Any) -> int:
    """How many values a stable handover compares."""
    if isinstance(s, dict):
        return sum(leaves(v) for v in s.values())
    if isinstance(s, list) and s:
        return sum(leaves(v) for v in s)
    return 1


def differences(real: Stable, emulated: Stable) -> list[tuple[str, Any, Any]]:
    """(path, real, emulated) for every leaf that differs."""
    out: list[tuple[str, Any, Any]] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in dict.fromkeys([*a, *b]):
                walk(f"{path}.{k}" if path else str(k), a.get(k), b.get(k))
        elif isinstance(a, list) and isinstance(b, list) and a and b:
            for i in range(max(len(a), len(b))):
                walk(f"{path}[{i}]", a[i] if i < len(a) else None,
                     b[i] if i < len(b) else None)
        elif a != b:
            out.append((path, a, b))

    walk("", real, emulated)
    return out
