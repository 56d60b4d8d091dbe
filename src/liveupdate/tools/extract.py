"""``luoctl inspect --extract DIR``: every preserved memfd's contents, as files.

The handover is walked from the KHO root to LUO's sessions (luo-v5 ``kho_block`` chains of
7.2+, the luo-v1 FDT with ``luo-session-v2`` arrays of 6.19-7.1, or the v3 postings' files
FDT), to each memfd's serialized state (``memfd-v1``/``memfd-v2`` structs, or the v3 FDT
``memfd-v1``) and its folio array. A folio record holds a PFN and a file index in pages; its
size is not in the record but in the KHO memory map, which tracks every preserved folio with
its order (``kho_preserve_folio``; the next kernel's ``kho_restore_folio`` reads the order
back from there -- mm/memfd_luo.c ``memfd_luo_retrieve_folios``). So each folio is looked up
in the map: one that is not a preserved block is refused, as the next kernel would fail it.

Everything is validated before a byte is written -- every folio a preserved block wholly in
RAM, aligned to its order in the file, inside the file size, not overlapping another folio of
any file, every session name usable as a directory, no two files at one path -- so hostile
input produces an error and no output. Then :mod:`liveupdate.tools.extract_write` writes
``DIR/<session>/<token as 16 hex digits>.bin`` sparse and ``DIR/manifest.json`` (session,
token, size, pos, seals, nr_folios and sha256 of every file; the files not extracted and
why), all or nothing.

Files of other kinds (a session may hold any file type with a LUO handler) are not memfds and
have no contents here: they are listed as skipped, with the reason. A root with no LUO
subtree has nothing to extract: that is said (:data:`NO_LUO`), and is not an error.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liveupdate.abi import fdt, kho, kho_memmap, kho_radix, luo_ser, luo_session, luo_v3, memfd
from liveupdate.abi import vmalloc as kvm
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from liveupdate.tools import extract_write, report
from liveupdate.tools.extract_write import MANIFEST

V3_DIR = "luo-v3"  # the v3 postings had no sessions: their files go here
NO_LUO = "no LUO subtree: nothing to extract"


@dataclass(frozen=True)
class Memfd:
    session: str | None  # None: v3 (no sessions)
    token: int
    compatible: str
    pos: int
    size: int
    seals: int
    nr_folios: int
    folios: memfd.Folios


@dataclass(frozen=True)
class Planned:
    file: Memfd
    relpath: str
    phys: np.ndarray  # uint64, sorted by index
    order: np.ndarray  # uint8
    index: np.ndarray  # uint64


@dataclass(frozen=True)
class Skipped:
    """A preserved file that is not extracted, and why."""

    session: str | None
    token: int
    compatible: str
    why: str

    def report(self) -> dict[str, Any]:
        return {"session": self.session, "token": f"{self.token:#x}",
                "compatible": self.compatible, "why": self.why}


@dataclass(frozen=True)
class Plan:
    files: list[Planned]
    skipped: list[Skipped] = field(default_factory=list)
    note: str | None = None  # NO_LUO


def dirname(session: str) -> str:
    """A session name as one directory name: ``/``, ``%`` and control characters become
    ``%XX`` (so distinct names stay distinct), and so does the dot of a session named
    ``manifest.json`` (its directory would take the manifest's place); names that would
    not stay inside DIR (empty, ``.``, ``..``) are refused."""
    if session in ("", ".", ".."):
        raise AbiError(msg=f"session name {session!r} cannot be a directory inside the "
                       "extract directory")
    if session == MANIFEST:
        return MANIFEST.replace(".", "%2E")
    return "".join(f"%{ord(c):02X}" if c in "/%" or ord(c) < 0x20 or ord(c) == 0x7F else c
                   for c in session)


def _not_memfd(session: str | None, token: int, compatible: str) -> Skipped:
    return Skipped(session, token, compatible, f"not a memfd ({compatible}): only memfd "
                   "contents are in the handover's memory to extract")


def _memfds(mem: PhysMem, root: kho.KhoRoot) -> tuple[list[Memfd], list[Skipped]] | None:
    """Every preserved memfd of the handover, decoded (folio arrays included), and every
    other file; None when there is no LUO subtree."""
    try:
        phys = root.subtree("LUO")
    except AbiError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    size = root.size("LUO")
    head = mem.read(phys, 4, "LUO subtree")
    blob = (mem.read_fdt(phys, "LUO FDT") if head == fdt.FDT_MAGIC.to_bytes(4, "big")
            else mem.read(phys, min(size or luo_ser.LUO_SER.size, PAGE_SIZE), "luo_ser"))
    kind = report.identify(blob)
    if kind in V3_READERS:
        return V3_READERS[kind](blob, mem)
    if kind not in SESSION_READERS:
        raise AbiError(msg=f"LUO subtree holds {kind}, not a LUO handover")
    out: list[Memfd] = []
    skipped: list[Skipped] = []
    for s in SESSION_READERS[kind](blob, mem):
        for f in s.files:
            if f.compatible not in memfd.SER_SIZE:
                skipped.append(_not_memfd(s.name, f.token, f.compatible))
                continue
            ser = memfd.decode_ser(mem.read(f.data, memfd.SER_SIZE[f.compatible],
                                            f"{f.compatible} struct"), f.compatible)
            folios = memfd.Folios.empty()
            if ser.nr_folios:
                area = kvm.decode(mem, ser.folios).read(mem)
                folios = memfd.decode_folio_array(area, ser.nr_folios, ser.size)
            out.append(Memfd(s.name, f.token, f.compatible, ser.pos, ser.size, ser.seals,
                             ser.nr_folios, folios))
    return out, skipped


def _v3_memfds(blob: bytes, mem: PhysMem) -> tuple[list[Memfd], list[Skipped]]:
    """v3's files FDT: each memfd in its own FDT."""
    out: list[Memfd] = []
    skipped: list[Skipped] = []
    files_phys = luo_v3.decode_luo_fdt(blob).files_fdt
    files = luo_v3.decode_files_fdt(mem.read_fdt(files_phys, "files FDT")) \
        if files_phys else []
    for v3 in files:
        if v3.compatible not in report.V3_FILE_FORMATS:
            skipped.append(_not_memfd(None, v3.token, v3.compatible))
        elif not v3.data:
            skipped.append(Skipped(None, v3.token, v3.compatible,
                                   "its data is 0: no memfd FDT to read"))
        else:
            st = memfd.decode_fdt(mem.read_fdt(v3.data, "memfd FDT"))
            out.append(Memfd(None, v3.token, "memfd-v1 (FDT)", st.pos, st.size, 0,
                             len(st.folios), st.folios))
    return out, skipped


def _luo_v5_sessions(blob: bytes, mem: PhysMem) -> list[luo_session.SessionSer]:
    return luo_ser.decode_sessions(mem, luo_ser.decode(blob).sessions_pa)[0]


def _luo_v1_sessions(blob: bytes, mem: PhysMem) -> list[luo_session.SessionSer]:
    return luo_session.decode_sessions(mem, luo_session.decode_luo_fdt(blob).session_header)


# per kind of LUO blob (report.identify): how its files are found
V3_READERS = {"luo-v3": _v3_memfds}
SESSION_READERS = {"luo-v5": _luo_v5_sessions, "luo-session": _luo_v1_sessions}


def plan(mem: PhysMem, root_blob: bytes, bb: int | None = None) -> Plan:
    """Decode and validate everything to extract; raises AbiError, writes nothing."""
    root = kho.decode_root(root_blob)
    found = _memfds(mem, root)
    if found is None:
        return Plan([], note=NO_LUO)
    memfds, skipped = found
    pm = (kho_radix.decode(mem, root.mem_map, check_ram=True) if kho.is_radix(root.compatible)
          else kho_memmap.decode_mem_map(mem, root.mem_map, bb, check_ram=True))
    by_phys = np.argsort(pm.phys, kind="stable")
    map_phys, map_order = pm.phys[by_phys], pm.order[by_phys]
    ram_bytes = sum(n for _, n in mem.ranges)
    planned: list[Planned] = []
    for f in memfds:
        what = (f"session {f.session!r} token {f.token:#x}" if f.session is not None
                else f"v3 file token {f.token:#x}")
        if f.size > ram_bytes:  # Linux fills holes at preserve: the data must fit RAM
            raise AbiError(msg=f"{what}: size {f.size:#x} exceeds all of RAM "
                           f"({ram_bytes:#x} bytes)", err=errno.EFBIG)
        phys = f.folios.pfn << np.uint64(12)
        at = np.minimum(np.searchsorted(map_phys, phys), max(len(map_phys) - 1, 0))
        known = (map_phys[at] == phys) if len(map_phys) else np.zeros(len(phys), bool)
        if not np.all(known):
            bad = int(phys[~known][0])
            raise AbiError(msg=f"{what}: folio at {bad:#x} is not a preserved block in the KHO "
                           "memory map (the next kernel's kho_restore_folio would fail: EIO)")
        order = map_order[at] if len(phys) else np.zeros(0, np.uint8)
        index = f.folios.index
        pages = np.uint64(1) << order.astype(np.uint64)
        if np.any(index % pages):
            i = int(np.flatnonzero(index % pages)[0])
            raise AbiError(msg=f"{what}: folio at {int(phys[i]):#x} (order {int(order[i])}) "
                           f"has file index {int(index[i])}, not aligned to its order")
        by_index = np.argsort(index, kind="stable")
        phys, order, index, pages = (phys[by_index], order[by_index], index[by_index],
                                     pages[by_index])
        if np.any(index[:-1] + pages[:-1] > index[1:]):
            i = int(np.flatnonzero(index[:-1] + pages[:-1] > index[1:])[0])
            raise AbiError(msg=f"{what}: folios at file pages {int(index[i])} and "
                           f"{int(index[i + 1])} overlap")
        name = V3_DIR if f.session is None else dirname(f.session)
        planned.append(Planned(f, f"{name}/{f.token:016x}.bin", phys, order, index))
    _check_paths(planned)
    _check_shared(planned)
    return Plan(planned, skipped)


def _check_paths(planned: list[Planned]) -> None:
    """No two files at one path (a session name or token given twice): the second would
    silently replace the first."""
    seen: set[str] = set()
    for p in planned:
        if p.relpath in seen:
            raise AbiError(msg=f"two preserved files would both be written to {p.relpath} "
                           "(the same session and token twice)", err=errno.EEXIST)
        seen.add(p.relpath)


def _check_shared(planned: list[Planned]) -> None:
    """No physical page may back two folios (the second kho_restore_folio would fail)."""
    if not planned:
        return
    starts = np.concatenate([p.phys for p in planned])
    ends = starts + (np.uint64(PAGE_SIZE) << np.concatenate([p.order for p in planned]
                                                            ).astype(np.uint64))
    o = np.argsort(starts, kind="stable")
    clash = np.flatnonzero(ends[o][:-1] > starts[o][1:])
    if clash.size:
        raise AbiError(msg=f"folio at {int(starts[o][clash[0] + 1]):#x} overlaps another "
                       "preserved folio in physical memory")


def extract(mem: PhysMem, root_blob: bytes, out: Path, bb: int | None = None) -> dict[str, Any]:
    """Check DIR, validate, then write everything or nothing: the report's ``extract``
    entry. LiveUpdateError (with the errno of a failed write) when nothing was written."""
    extract_write.check_target(out)
    p = plan(mem, root_blob, bb)
    manifest = extract_write.write(mem, p, out)
    rep: dict[str, Any] = {"dir": str(out), "manifest": str(out / MANIFEST),
                           "files": [{"path": e["path"], "size": e["size"],
                                      "sha256": e["sha256"]} for e in manifest["files"]]}
    if p.skipped:
        rep["skipped"] = manifest["skipped"]
    if p.note:
        rep["note"] = p.note
    return rep
