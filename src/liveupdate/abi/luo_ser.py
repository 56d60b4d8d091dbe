"""LUO handover of 7.2: ``luo-v5``, a raw KHO subtree over ``kho_block`` chains
(spec/luo.md 4.2).

Read in upstream ``include/linux/kho/abi/luo.h`` (linux-mm @fb2257f1) and
``kernel/liveupdate/luo_core.c``/``luo_session.c`` (torvalds @637315cb)::

    struct luo_ser { char compatible[8] /* "luo-v5" */; u64 liveupdate_num;
                     u64 sessions_pa; u64 flbs_pa; } __packed;          // 32 bytes

``sessions_pa`` is a chain of blocks of ``luo_session_ser`` (80 bytes, 51 per block; 0 when
there are no sessions); each session's ``files`` a chain of ``luo_file_ser`` (64 bytes, 63 per
block; 0 when empty). ``flbs_pa`` is the same FLB header page as 7.0/7.1 (``luo_flb_header_ser``
+ ``luo_flb_ser[]``). The 819-session and 128-file limits of the arrays are gone; the block
limit (:data:`kho_block.KHO_MAX_BLOCKS`) remains.

``luo_early_startup`` checks the blob is at least 32 bytes and ``strncmp(compatible,
"luo-v5", 8) == 0`` (7.3.4: the byte after the string's NUL is not compared); anything else
is EINVAL and a panic.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from liveupdate.abi import kho_block, luo_session
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

LUO_V5 = "luo-v5"
COMPAT_LEN = 8
LUO_SER = struct.Struct("<8sQQQ")
assert LUO_SER.size == 32


@dataclass(frozen=True)
class LuoSer:
    liveupdate_number: int
    sessions_pa: int
    flbs_pa: int


def encode(ser: LuoSer) -> bytes:
    return LUO_SER.pack(LUO_V5.encode(), ser.liveupdate_number, ser.sessions_pa, ser.flbs_pa)


def decode(raw: bytes) -> LuoSer:
    if len(raw) < LUO_SER.size:
        raise AbiError(msg=f"luo_ser is {len(raw)} bytes, less than {LUO_SER.size}")
    compat, num, sessions, flbs = LUO_SER.unpack_from(raw)
    # strncmp: the compare ends at the first NUL, so bytes after "luo-v5\0" are not read
    if compat.split(b"\0", 1)[0] != LUO_V5.encode():
        raise AbiError(msg=f"luo_ser compatible is {compat.rstrip(bytes(1))!r}, not {LUO_V5!r}")
    return LuoSer(num, sessions, flbs)


def encode_sessions(sessions: list[tuple[str, list[luo_session.FileSer]]],
                    alloc: Callable[[], int]) -> tuple[int, dict[int, bytes]]:
    """Every session's file chain, then the session chain: (sessions_pa, {phys: page})."""
    pages: dict[int, bytes] = {}
    rows = np.zeros(len(sessions), luo_session.SESSION_DTYPE)
    for i, (name, files) in enumerate(sessions):
        arr = np.zeros(len(files), luo_session.FILE_DTYPE)
        for j, f in enumerate(files):
            arr[j] = (luo_session.name_field(f.compatible, luo_session.HNDL_COMPAT_LEN,
                                              "handler compatible"), f.data, f.token)
        first, fp = kho_block.encode(arr.tobytes(), luo_session.FILE_DTYPE.itemsize, alloc)
        pages.update(fp)
        rows[i] = (luo_session.name_field(name, luo_session.SESSION_NAME_LEN, "session name"),
                   first, len(files))
    first, sp = kho_block.encode(rows.tobytes(), luo_session.SESSION_DTYPE.itemsize, alloc)
    pages.update(sp)
    return first, pages


def session_rows(mem: PhysMem, sessions_pa: int) -> tuple[np.ndarray, list[int]]:
    """The session chain alone (7.3.4 ``luo_session_setup_incoming``:
    ``kho_block_set_restore`` at boot): its ``luo_session_ser`` rows and its blocks."""
    raw, blocks = kho_block.decode(mem, sessions_pa, luo_session.SESSION_DTYPE.itemsize,
                                   "luo sessions")
    return np.frombuffer(raw, luo_session.SESSION_DTYPE), blocks


def file_reader(mem: PhysMem, blocks: list[int]) -> Callable[[str, int, int], np.ndarray]:
    """Reads one session's file chain, adding its blocks to ``blocks``."""
    def files(name: str, phys: int, n: int) -> np.ndarray:
        fraw, fblocks = kho_block.decode(mem, phys, luo_session.FILE_DTYPE.itemsize,
                                         f"session {name!r} files")
        blocks.extend(fblocks)
        return np.frombuffer(fraw, luo_session.FILE_DTYPE)
    return files


def decode_sessions(mem: PhysMem, sessions_pa: int) -> tuple[list[luo_session.SessionSer],
                                                             list[int]]:
    """Every session and its files from the block chains; also every block's phys (the
    pages the next kernel restores and frees once it has read them)."""
    rows, blocks = session_rows(mem, sessions_pa)
    return luo_session.check_sessions(rows, file_reader(mem, blocks)), blocks
