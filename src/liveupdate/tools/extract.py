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
any file, every session name usable as a directory -- so hostile input produces an error
and no output. Then ``DIR/<session>/<token as 16 hex digits>.bin`` is written sparse (the
file is sized with ftruncate and only pages holding a non-zero byte are written; Linux 7.3
fills a memfd's holes with zeroed folios at preserve, ``memfd_pin_folios``, and those stay
holes here), plus ``DIR/manifest.json``: session, token, size, pos, seals, nr_folios and
the sha256 of the ``size`` bytes of contents of every file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from liveupdate.abi import kho, kho_memmap, kho_radix, luo_ser, luo_session, luo_v3, memfd
from liveupdate.abi import vmalloc as kvm
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from liveupdate.tools import report

V3_DIR = "luo-v3"  # the v3 postings had no sessions: their files go here
ZEROS = bytes(1 << 20)


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


def dirname(session: str) -> str:
    """A session name as one directory name: ``/``, ``%`` and control characters become
    ``%XX`` (so distinct names stay distinct); names that would not stay inside DIR
    (empty, ``.``, ``..``) are refused."""
    if session in ("", ".", ".."):
        raise AbiError(msg=f"session name {session!r} cannot be a directory inside the "
                       "extract directory")
    return "".join(f"%{ord(c):02X}" if c in "/%" or ord(c) < 0x20 or ord(c) == 0x7F else c
                   for c in session)


def _memfds(mem: PhysMem, root: kho.KhoRoot) -> list[Memfd]:
    """Every preserved memfd of the handover, decoded (folio arrays included)."""
    try:
        phys = root.subtree("LUO")
    except AbiError as e:
        if e.errno == errno.ENOENT:
            return []
        raise
    size = root.size("LUO")
    head = mem.read(phys, 4, "LUO subtree")
    blob = (mem.read_fdt(phys, "LUO FDT") if head == b"\xd0\x0d\xfe\xed"
            else mem.read(phys, min(size or luo_ser.LUO_SER.size, PAGE_SIZE), "luo_ser"))
    kind = report.identify(blob)
    out: list[Memfd] = []
    if kind == "luo-v3":
        files_phys = luo_v3.decode_luo_fdt(blob).files_fdt
        files = luo_v3.decode_files_fdt(mem.read_fdt(files_phys, "files FDT")) \
            if files_phys else []
        for v3 in files:
            if v3.compatible == memfd.MEMFD_V1 and v3.data:
                st = memfd.decode_fdt(mem.read_fdt(v3.data, "memfd FDT"))
                out.append(Memfd(None, v3.token, "memfd-v1 (FDT)", st.pos, st.size, 0,
                                 len(st.folios), st.folios))
        return out
    if kind == "luo-v5":
        sessions = luo_ser.decode_sessions(mem, luo_ser.decode(blob).sessions_pa)[0]
    elif kind == "luo-session":
        sessions = luo_session.decode_sessions(
            mem, luo_session.decode_luo_fdt(blob).session_header)
    else:
        raise AbiError(msg=f"LUO subtree holds {kind}, not a LUO handover")
    for s in sessions:
        for f in s.files:
            if f.compatible not in (memfd.MEMFD_V1, memfd.MEMFD_V2):
                continue
            n = memfd.SER_V2_SIZE if f.compatible == memfd.MEMFD_V2 else memfd.SER_V1_SIZE
            ser = memfd.decode_ser(mem.read(f.data, n, f"{f.compatible} struct"),
                                   f.compatible)
            folios = memfd.Folios.empty()
            if ser.nr_folios:
                area = kvm.decode(mem, ser.folios).read(mem)
                folios = memfd.decode_folio_array(area, ser.nr_folios, ser.size)
            out.append(Memfd(s.name, f.token, f.compatible, ser.pos, ser.size, ser.seals,
                             ser.nr_folios, folios))
    return out


def plan(mem: PhysMem, root_blob: bytes, bb: int | None = None) -> list[Planned]:
    """Decode and validate everything to extract; raises AbiError, writes nothing."""
    root = kho.decode_root(root_blob)
    pm = (kho_radix.decode(mem, root.mem_map, check_ram=True) if kho.is_radix(root.compatible)
          else kho_memmap.decode_mem_map(mem, root.mem_map, bb, check_ram=True))
    by_phys = np.argsort(pm.phys, kind="stable")
    map_phys, map_order = pm.phys[by_phys], pm.order[by_phys]
    ram_bytes = sum(n for _, n in mem.ranges)
    planned: list[Planned] = []
    for f in _memfds(mem, root):
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
    _check_shared(planned)
    return planned


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


def _write_one(mem: PhysMem, p: Planned, path: Path) -> tuple[str, int]:
    """Write one file sparse; return (sha256 hex, data pages written)."""
    f, h, written, at = p.file, hashlib.sha256(), 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.ftruncate(fd, f.size)
        for phys, order, index in zip(p.phys.tolist(), p.order.tolist(), p.index.tolist(),
                                      strict=True):
            start = index * PAGE_SIZE
            n = min(PAGE_SIZE << order, f.size - start)
            _zeros(h, start - at)
            data = mem.read(phys, n, "memfd folio")
            h.update(data)
            pages = np.frombuffer(data[: n - n % PAGE_SIZE], np.uint8).reshape(-1, PAGE_SIZE)
            live = np.flatnonzero(pages.any(axis=1)).tolist()
            if n % PAGE_SIZE and any(data[n - n % PAGE_SIZE :]):
                live.append(n // PAGE_SIZE)
            for k in live:
                os.pwrite(fd, data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE], start + k * PAGE_SIZE)
            written += len(live)
            at = start + n
        _zeros(h, f.size - at)
    finally:
        os.close(fd)
    return h.hexdigest(), written


def _zeros(h: Any, n: int) -> None:
    while n > 0:
        h.update(ZEROS[: min(n, len(ZEROS))])
        n -= len(ZEROS)


def write(mem: PhysMem, planned: list[Planned], out: Path) -> dict[str, Any]:
    """Write every planned file and the manifest; return the manifest."""
    for p in planned:  # a symlink already in DIR must not take a file elsewhere
        for link in (out / p.relpath).parent, out / p.relpath:
            if link.is_symlink():
                raise AbiError(msg=f"{link} is a symbolic link: refusing to write through it",
                               err=errno.EEXIST)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for p in planned:
        path = out / p.relpath
        path.parent.mkdir(exist_ok=True)
        digest, pages = _write_one(mem, p, path)
        f = p.file
        entries.append({"session": f.session, "token": f"{f.token:#x}",
                        "compatible": f.compatible, "size": f.size, "pos": f.pos,
                        "seals": f"{f.seals:#x}", "nr_folios": f.nr_folios,
                        "sha256": digest, "path": p.relpath, "data_pages": pages})
    manifest = {"files": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def extract(mem: PhysMem, root_blob: bytes, out: Path, bb: int | None = None) -> dict[str, Any]:
    """Validate, then write: the report's ``extract`` entry."""
    planned = plan(mem, root_blob, bb)
    manifest = write(mem, planned, out)
    return {"dir": str(out), "manifest": str(out / "manifest.json"),
            "files": [{"path": e["path"], "size": e["size"], "sha256": e["sha256"]}
                      for e in manifest["files"]]}
