"""The sessions front end's handover formats, one writer/reader object each, chosen by
format name: ``luo-v1`` (6.19-7.1, ``luo_session.c``/``luo_core.c``) and ``luo-v5`` (7.2+).

* ``luo-v1`` -- at boot a one-page FDT (``liveupdate-number`` = the previous one + 1) with the
  ``luo-session-v2`` node pointing at a 16-page session header; 7.0+ adds the ``luo-flb-v1``
  node and its header page. Each session with files has a 2-page ``luo_file_ser`` array,
  allocated at its first PRESERVE_FD. The arrays are the limits: 819 sessions (ENOMEM on the
  820th CREATE_SESSION), 128 files per session (ENOSPC on the 129th PRESERVE_FD).
* ``luo-v5`` -- the ``luo_ser`` blob is stored raw from boot (the root says its size) and the
  session and file block chains are written at the reboot: no array limits.

A writer runs at boot only for the kernel's own format; at the reboot the plan's format writes
(a 7.2 kernel negotiated down to ``luo-v1`` allocates that header and FDT only then). Pages
allocated at the reboot are recorded by the front end and given back if the freeze fails.
The reader of the next kernel is the one whose format the blob is, among those it reads: a
native kernel reads only its own and meets the other one as garbage (a panic, as Linux).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from liveupdate.abi import luo_ser, luo_session
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.kernel.luo.blocks import preallocated

if TYPE_CHECKING:
    from liveupdate.kernel.luo.session import LuoSessions

FDT_MAGIC = b"\xd0\x0d\xfe\xed"


@dataclass
class Incoming:
    sessions: list[luo_session.SessionSer]
    number: int
    flbs: int  # the FLB header's address, 0 without
    meta: list[int]  # the previous kernel's LUO pages, given back after reading
    # 7.3.4: the sessions' entries and file chains, read at the first open (each session's
    # file blocks put in the dict it is given, by name); None when everything was read at boot
    later: Callable[[dict[str, list[int]]], list[luo_session.SessionSer]] | None = None


class Handover(Protocol):
    format: str
    session_max: int | None  # None: no limit
    file_max: int | None
    files_array_at_preserve: bool  # a session's file array is allocated at PRESERVE_FD

    def sniff(self, head: bytes) -> bool: ...

    def boot(self, luo: LuoSessions) -> None: ...

    def read(self, mem: PhysMem, phys: int, size: int | None, require_flb: bool,
             defer: bool = False) -> Incoming:
        """``defer``: only what 7.3.4 reads at boot; the rest at the first open."""
        ...

    def serialize(self, luo: LuoSessions, sessions: list[tuple[str, list[
            luo_session.FileSer]]], flb: bool) -> None: ...


class LuoV1:
    format = "luo-v1"
    session_max: int | None = luo_session.SESSION_MAX
    file_max: int | None = luo_session.FILE_MAX
    files_array_at_preserve = True

    def sniff(self, head: bytes) -> bool:
        return head == FDT_MAGIC

    def boot(self, luo: LuoSessions) -> None:
        kout = luo.k.require_kho()
        luo.header = kout.alloc_preserve(luo_session.SESSION_BLOCK)
        luo.k.write(luo.header, luo_session.encode_sessions([]))
        blob = luo_session.encode_luo_fdt(luo.number + 1, luo.header, luo.flb_header or None)
        luo.fdt = kout.store(blob)
        luo.publish(luo.fdt, len(blob))

    def read(self, mem: PhysMem, phys: int, size: int | None, require_flb: bool,
             defer: bool = False) -> Incoming:
        """7.3 reads only luo-v5 natively; a negotiated luo-v1 is read whole at boot."""
        fdt = luo_session.decode_luo_fdt(mem.read_fdt(phys, "LUO FDT"), require_flb=require_flb)
        sessions = luo_session.decode_sessions(mem, fdt.session_header)
        meta = [phys, fdt.session_header] + [s.files_phys for s in sessions if s.files]
        return Incoming(sessions, fdt.liveupdate_number, fdt.flb_header or 0, meta)

    def serialize(self, luo: LuoSessions, sessions: list[tuple[str, list[
            luo_session.FileSer]]], flb: bool) -> None:
        rows: list[tuple[str, int, int]] = []
        for (name, files), s in zip(sessions, luo.outgoing.values(), strict=True):
            if files and not s.files_array:
                s.files_array = luo.alloc_at_reboot(luo_session.FILE_BLOCK)
            if files:
                luo.k.write(s.files_array, luo_session.encode_files(files))
            rows.append((name, s.files_array if files else 0, len(files)))
        if not luo.header:  # another format's kernel writing luo-v1: header and FDT now
            luo.header = luo.alloc_at_reboot(luo_session.SESSION_BLOCK)
            luo.fdt = luo.alloc_at_reboot()
        luo.k.write(luo.header, luo_session.encode_sessions(rows))
        blob = luo_session.encode_luo_fdt(luo.number + 1, luo.header,
                                          luo.flb_header if flb else None)
        luo.k.write(luo.fdt, blob.ljust(PAGE_SIZE, b"\0"))
        luo.publish(luo.fdt, len(blob))


class LuoV5:
    format = "luo-v5"
    session_max: int | None = None
    file_max: int | None = None
    files_array_at_preserve = False

    def sniff(self, head: bytes) -> bool:
        return head != FDT_MAGIC

    def boot(self, luo: LuoSessions) -> None:
        luo.ser = luo.k.require_kho().store(luo_ser.encode(
            luo_ser.LuoSer(luo.number + 1, 0, luo.flb_header)))
        luo.publish(luo.ser, luo_ser.LUO_SER.size)

    def read(self, mem: PhysMem, phys: int, size: int | None, require_flb: bool,
             defer: bool = False) -> Incoming:
        """``luo_early_startup``: the blob must hold a ``luo_ser`` (kho-v1 roots carry no
        size, so the struct's own is read)."""
        want = luo_ser.LUO_SER.size if size is None else min(size, PAGE_SIZE)
        ser = luo_ser.decode(mem.read(phys, want, "luo_ser"))
        if not defer:
            sessions, blocks = luo_ser.decode_sessions(mem, ser.sessions_pa)
            return Incoming(sessions, ser.liveupdate_number, ser.flbs_pa, [phys, *blocks])
        rows, blocks = luo_ser.session_rows(mem, ser.sessions_pa) if ser.sessions_pa \
            else (np.zeros(0, luo_session.SESSION_DTYPE), [])

        def later(per_session: dict[str, list[int]]) -> list[luo_session.SessionSer]:
            def files(name: str, files_pa: int, n: int) -> np.ndarray:
                blocks: list[int] = []
                arr = luo_ser.file_reader(mem, blocks)(name, files_pa, n)
                per_session[name] = blocks
                return arr
            return luo_session.deserialize_73(rows, files)
        return Incoming([], ser.liveupdate_number, ser.flbs_pa, [phys, *blocks], later)

    def serialize(self, luo: LuoSessions, sessions: list[tuple[str, list[
            luo_session.FileSer]]], flb: bool) -> None:
        alloc: Callable[[], int] = luo.alloc_at_reboot
        if luo.rules.blocks_at_ioctl:  # 7.3.4: into the blocks the ioctls allocated
            alloc = preallocated([*(s.blocks.pages for s in luo.outgoing.values()
                                    if s.blocks is not None), luo.session_blocks.pages])
        first, pages = luo_ser.encode_sessions(sessions, alloc)
        for p, page in pages.items():
            luo.k.write(p, page)
        luo.k.write(luo.ser, luo_ser.encode(luo_ser.LuoSer(luo.number + 1, first,
                                                         luo.flb_header)))
        luo.publish(luo.ser, luo_ser.LUO_SER.size)


HANDOVERS: dict[str, Handover] = {h.format: h for h in (LuoV1(), LuoV5())}


def reader_for(reads: tuple[str, ...], head: bytes) -> Handover:
    """Among the formats this kernel reads, the one the blob is; with one, that one."""
    mine = [HANDOVERS[f] for f in reads if f in HANDOVERS]
    return next((h for h in mine if h.sniff(head)), mine[-1]) if len(mine) > 1 else mine[0]
