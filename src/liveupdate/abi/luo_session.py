"""LUO handover of 6.19-7.1: ``luo-v1`` FDT + ``luo-session-v2`` arrays (spec/luo.md 4.1).

KHO subtree ``LUO`` -> one-page FDT built sequentially at boot::

    / { compatible = "luo-v1"; liveupdate-number = <u64>;
        luo-session { compatible = "luo-session-v2"; luo-session-header = <u64 phys>; };
        luo-flb     { compatible = "luo-flb-v1";     luo-flb-header     = <u64 phys>; }; }; // 7.0+

The node and property order is ``luo_session_setup_outgoing``'s (read in the 6.19 patch mails:
``fdt_begin_node``, ``compatible``, header). The session header is a 16-page block: ``u64
count`` then ``luo_session_ser[count]`` (80 bytes: ``char name[64]; u64 files; u64 count``), at
most 819. Each session's files are a 2-page array of ``luo_file_ser`` (64 bytes: ``char
compatible[48]; u64 data; u64 token``), at most 128, ``files == 0`` when empty. The FLB header
is one page: ``u64 pgcnt (=1); u64 count`` then ``luo_flb_ser[count]`` (64 bytes: ``char
name[48]; u64 data; u64 count``), at most 63.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from liveupdate.abi import fdt
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

LUO_COMPATIBLE = "luo-v1"
LIVEUPDATE_NUM_PROP = "liveupdate-number"
SESSION_NODE = "luo-session"
SESSION_COMPATIBLE = "luo-session-v2"
SESSION_HEADER_PROP = "luo-session-header"
FLB_NODE = "luo-flb"
FLB_COMPATIBLE = "luo-flb-v1"
FLB_HEADER_PROP = "luo-flb-header"

SESSION_PGCNT = 16
SESSION_BLOCK = SESSION_PGCNT * PAGE_SIZE
SESSION_NAME_LEN = 64
SESSION_DTYPE = np.dtype([("name", "S64"), ("files", "<u8"), ("count", "<u8")])
SESSION_MAX = (SESSION_BLOCK - 8) // SESSION_DTYPE.itemsize  # 819
FILE_PGCNT = 2
FILE_BLOCK = FILE_PGCNT * PAGE_SIZE
HNDL_COMPAT_LEN = 48
FILE_DTYPE = np.dtype([("compatible", "S48"), ("data", "<u8"), ("token", "<u8")])
FILE_MAX = FILE_BLOCK // FILE_DTYPE.itemsize  # 128
FLB_DTYPE = np.dtype([("name", "S48"), ("data", "<u8"), ("count", "<u8")])
FLB_MAX = (PAGE_SIZE - 16) // FLB_DTYPE.itemsize  # 63

assert SESSION_DTYPE.itemsize == 80 and FILE_DTYPE.itemsize == 64


@dataclass(frozen=True)
class LuoFdt:
    liveupdate_number: int
    session_header: int
    flb_header: int | None


def encode_luo_fdt(liveupdate_number: int, session_header: int,
                   flb_header: int | None = None) -> bytes:
    b = fdt.SwBuilder().begin_node("")
    b.prop("compatible", fdt.string(LUO_COMPATIBLE))
    b.prop(LIVEUPDATE_NUM_PROP, fdt.u64(liveupdate_number))
    b.begin_node(SESSION_NODE).prop("compatible", fdt.string(SESSION_COMPATIBLE))
    b.prop(SESSION_HEADER_PROP, fdt.u64(session_header)).end_node()
    if flb_header is not None:
        b.begin_node(FLB_NODE).prop("compatible", fdt.string(FLB_COMPATIBLE))
        b.prop(FLB_HEADER_PROP, fdt.u64(flb_header)).end_node()
    return b.end_node().finish()


def decode_luo_fdt(blob: bytes, *, require_flb: bool = False) -> LuoFdt:
    what = "LUO FDT"
    tree = fdt.parse(blob, what)
    tree.root.check_compatible(LUO_COMPATIBLE, what)
    num = tree.root.u64(LIVEUPDATE_NUM_PROP, what)
    sess = tree.root.need_child(SESSION_NODE, what)
    sess.check_compatible(SESSION_COMPATIBLE, what)
    header = sess.u64(SESSION_HEADER_PROP, what)
    flb = tree.root.child(FLB_NODE)
    if flb is None and require_flb:
        raise AbiError(msg=f"{what}: no {FLB_NODE} node", err=errno.ENOENT)
    flb_header = None
    if flb is not None:
        flb.check_compatible(FLB_COMPATIBLE, what)
        flb_header = flb.u64(FLB_HEADER_PROP, what)
    return LuoFdt(num, header, flb_header)


def _cstr(raw: bytes, size: int, what: str) -> str:
    # numpy "S" strips trailing NULs; the C reader stops at the first NUL.
    if b"\0" in raw:
        raw = raw[: raw.index(b"\0")]
    elif len(raw) >= size:
        raise AbiError(msg=f"{what} is not NUL-terminated within {size} bytes")
    return raw.decode("utf-8", "surrogateescape")  # bytes to Linux: any but NUL


def name_field(name: str, size: int, what: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= size or b"\0" in raw:
        raise AbiError(msg=f"{what} {name!r} does not fit {size - 1} bytes")
    return raw


@dataclass(frozen=True)
class FileSer:
    compatible: str
    data: int
    token: int


@dataclass(frozen=True)
class SessionSer:
    name: str
    files_phys: int
    files: tuple[FileSer, ...]


def encode_files(files: list[FileSer]) -> bytes:
    """A session's 2-page ``luo_file_ser`` array (empty sessions store none)."""
    if len(files) > FILE_MAX:
        raise AbiError(
            msg=f"{len(files)} files, more than {FILE_MAX} per session", err=errno.ENOSPC)
    arr = np.zeros(FILE_MAX, FILE_DTYPE)
    for i, f in enumerate(files):
        arr[i] = (name_field(f.compatible, HNDL_COMPAT_LEN, "handler compatible"),
                  f.data, f.token)
    return arr.tobytes()


def encode_sessions(sessions: list[tuple[str, int, int]]) -> bytes:
    """The 16-page header block from ``(name, files_phys, nr_files)``."""
    if len(sessions) > SESSION_MAX:
        raise AbiError(msg=f"{len(sessions)} sessions, more than {SESSION_MAX}", err=errno.ENOMEM)
    arr = np.zeros(SESSION_MAX, SESSION_DTYPE)
    for i, (name, files, count) in enumerate(sessions):
        arr[i] = (name_field(name, SESSION_NAME_LEN, "session name"), files, count)
    return np.uint64(len(sessions)).tobytes() + arr.tobytes() + bytes(
        SESSION_BLOCK - 8 - arr.nbytes)


def decode_sessions(mem: PhysMem, header_phys: int) -> list[SessionSer]:
    """Read every session and its files, validating counts, names and pointers."""
    (count,) = np.frombuffer(mem.read(header_phys, 8, "luo session header"), "<u8")
    if count > SESSION_MAX:
        raise AbiError(msg=f"luo session header: count {int(count)} > {SESSION_MAX}")
    arr = mem.read_array(header_phys + 8, int(count), SESSION_DTYPE, "luo_session_ser array")

    def files(name: str, phys: int, n: int) -> np.ndarray:
        if n > FILE_MAX:
            raise AbiError(msg=f"session {name!r}: {n} files > {FILE_MAX}")
        return mem.read_array(phys, n, FILE_DTYPE, f"session {name!r} files")

    return check_sessions(arr, files)


def check_sessions(arr: np.ndarray,
                   read_files: Callable[[str, int, int], np.ndarray]) -> list[SessionSer]:
    """Sessions from ``luo_session_ser`` rows, their files read by ``read_files(name, phys,
    count)``: names NUL-terminated and unique, tokens unique per session, a file array
    wherever files are counted. Shared by luo-session-v2 arrays and luo-v5 block chains."""
    out: list[SessionSer] = []
    names: set[str] = set()
    for s in arr:
        name = _cstr(bytes(s["name"]), SESSION_NAME_LEN, "luo_session_ser.name")
        if name in names:
            raise AbiError(msg=f"duplicate session name {name!r}", err=errno.EEXIST)
        names.add(name)
        nfiles, files_phys = int(s["count"]), int(s["files"])
        if nfiles and not files_phys:
            raise AbiError(msg=f"session {name!r}: {nfiles} files but no file array")
        files = read_files(name, files_phys, nfiles) if nfiles else np.zeros(0, FILE_DTYPE)
        if len(files) != nfiles:
            raise AbiError(msg=f"session {name!r}: {nfiles} files counted, {len(files)} "
                           "stored")
        tokens: set[int] = set()
        entries = []
        for f in files:
            compat = _cstr(bytes(f["compatible"]), HNDL_COMPAT_LEN, "luo_file_ser.compatible")
            token = int(f["token"])
            if token in tokens:
                raise AbiError(
                    msg=f"session {name!r}: duplicate token {token:#x}", err=errno.EEXIST)
            tokens.add(token)
            entries.append(FileSer(compat, int(f["data"]), token))
        out.append(SessionSer(name, files_phys, tuple(entries)))
    return out


def _strscpy(raw: bytes, size: int) -> str:
    """``strscpy(dst, src, size)``: up to the first NUL, at most ``size - 1`` bytes."""
    return raw.split(b"\0", 1)[0][: size - 1].decode("utf-8", "surrogateescape")


def deserialize_73(arr: np.ndarray,
                   read_files: Callable[[str, int, int], np.ndarray]) -> list[SessionSer]:
    """Linux 7.3.4's ``luo_session_deserialize`` and ``luo_file_deserialize``, run at the
    first open of /dev/liveupdate (any error then is EIO on every open): a name is
    ``strscpy``'d (an unterminated one loses its last byte), a duplicate name is EEXIST, a
    session without a file chain has no files whatever its count says (a WARN), a chain
    holding another number of files than counted is EINVAL, duplicate tokens are kept (a
    retrieve finds the first). An unterminated handler compatible matches no handler."""
    out: list[SessionSer] = []
    names: set[str] = set()
    for s in arr:
        name = _strscpy(bytes(s["name"]), SESSION_NAME_LEN)
        if name in names:
            raise AbiError(msg=f"duplicate session name {name!r}", err=errno.EEXIST)
        names.add(name)
        nfiles, files_phys = int(s["count"]), int(s["files"])
        files = read_files(name, files_phys, nfiles) if files_phys else np.zeros(0, FILE_DTYPE)
        if files_phys and len(files) != nfiles:
            raise AbiError(msg=f"session {name!r}: file count mismatch: expected {nfiles}, "
                           f"found {len(files)}")
        entries = []
        for f in files:
            raw = bytes(f["compatible"])  # numpy drops trailing NULs: full length = none
            compat = raw.decode("utf-8", "surrogateescape") if len(raw) < HNDL_COMPAT_LEN \
                else raw.hex()  # read past the field by strcmp: matches no handler
            entries.append(FileSer(compat, int(f["data"]), int(f["token"])))
        out.append(SessionSer(name, files_phys, tuple(entries)))
    return out


@dataclass(frozen=True)
class FlbSer:
    name: str
    data: int
    count: int


def encode_flbs(flbs: list[FlbSer]) -> bytes:
    if len(flbs) > FLB_MAX:
        raise AbiError(msg=f"{len(flbs)} FLBs, more than {FLB_MAX}", err=errno.ENOSPC)
    arr = np.zeros(FLB_MAX, FLB_DTYPE)
    for i, f in enumerate(flbs):
        arr[i] = (name_field(f.name, HNDL_COMPAT_LEN, "FLB name"), f.data, f.count)
    return np.array([1, len(flbs)], "<u8").tobytes() + arr.tobytes()


def decode_flbs(mem: PhysMem, header_phys: int) -> list[FlbSer]:
    pgcnt, count = np.frombuffer(mem.read(header_phys, 16, "luo FLB header"), "<u8")
    if pgcnt != 1 or count > FLB_MAX:
        raise AbiError(msg=f"luo FLB header: pgcnt {int(pgcnt)}, count {int(count)} invalid")
    arr = mem.read_array(header_phys + 16, int(count), FLB_DTYPE, "luo_flb_ser array")
    return [FlbSer(_cstr(bytes(f["name"]), HNDL_COMPAT_LEN, "luo_flb_ser.name"),
                   int(f["data"]), int(f["count"])) for f in arr]
