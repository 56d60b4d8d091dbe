"""The blobs of ``/sys/kernel/debug/kho/`` as Linux 7.3 exports them, and what they mean.

Read in kernel/liveupdate/kexec_handover_debugfs.c, kexec_handover.c and luo_core.c (7.3.4):

* Every file is a ``debugfs_create_blob`` wrapper: a data pointer and a size fixed when the
  file is made. Reading it copies ``size`` bytes from wherever the pointer points *now*.
* ``out/fdt`` is made at the end of ``kho_init`` (``fs_initcall``) with the root FDT's
  totalsize at that moment, when the root holds only ``kexec-metadata``. LUO
  (``late_initcall``), ``reserve_mem`` (``late_initcall``) and ``test_kho`` add their nodes
  later, so the root grows and the file keeps its old size: it is truncated (e.g. 233 bytes
  of a 285-byte FDT). libfdt keeps the strings block last, so what is cut is mostly property
  *names*. On a KHO boot ``kho_init`` returns before making ``out/fdt`` at all.
* ``out/sub_fdts/<name>`` (``kho_add_subtree``) is each blob with its blob-size: ``LUO`` is the
  32-byte ``luo_ser`` whose ``sessions_pa`` stays 0 until ``reboot()`` (LUO serializes its
  sessions in ``liveupdate_reboot``); ``kexec-metadata`` the 73-byte record; ``memblock`` and
  ``kho_test`` FDTs.
* ``in/fdt`` and ``in/sub_fdts/<name>`` (``kho_in_debugfs_init``) point at what the previous
  kernel handed over. The owners may free those pages once restored: LUO frees its
  ``luo_ser`` at boot (``luo_early_startup``: ``kho_restore_free``), so ``in/sub_fdts/LUO``
  reads whatever reused the page -- zeros, another structure, or a ``luo_ser`` whose pointers
  lead to freed session blocks.

:func:`describe_file` decodes a blob with these facts in mind: a truncated FDT is decoded as
far as it goes (names cut from the strings block are inferred from the order Linux adds them,
and said to be inferred), and a blob from ``in/`` that does not decode or points at garbage is
explained as stale rather than only refused.
"""

from __future__ import annotations

import struct
from pathlib import Path

from liveupdate.abi import bootparams, fdt, kho
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.tools import inputfile, report
from liveupdate.tools.fdt_partial import PartialFdt, PNode, walk
from liveupdate.tools.report import Report

STALE_IN = ("this is what a stale in/ blob looks like: debugfs in/sub_fdts/<name> reads the "
            "page the previous kernel handed over, and its owner frees that page once it has "
            "restored it (LUO at boot: luo_early_startup -> kho_restore_free), so the bytes "
            "are whatever reused it since")
STALE_IN_INTACT = ("LUO freed this page at boot (luo_early_startup -> kho_restore_free); "
                   "these bytes were still intact when read, but nothing keeps them so")
NOT_SERIALIZED = ("not yet serialized: LUO writes its sessions at reboot "
                  "(liveupdate_reboot -> luo_session_serialize); until then out/sub_fdts/LUO "
                  "shows sessions_pa = 0 whatever sessions exist")
TRUNCATED = ("debugfs out/fdt is sized at fs_initcall (kho_init), when the root held only "
             "kexec-metadata; nodes added later (kho_test at device_initcall, LUO and memblock "
             "at late_initcall) grew the FDT past the file's size")

# The KHO root's strings block as Linux 6.19+ lays it out: kho_out_fdt_setup writes
# compatible then preserved-memory-map in sequential-write mode, where libfdt stores each new
# string *before* the others (fdt_sw.c fdt_add_string_), so the map's name comes first; then
# every kho_add_subtree edits in read-write mode, where libfdt appends a name the first time
# it is used (fdt_rw.c fdt_find_add_string_).
ROOT_STRINGS = {
    kho.KHO_V4: [kho.MEM_MAP_PROP, "compatible", kho.DATA_PROP, kho.SIZE_PROP],
    kho.KHO_V3: [kho.MEM_MAP_PROP, "compatible", kho.DATA_PROP, kho.SIZE_PROP],
    kho.KHO_FDT_COMPATIBLE: [kho.MEM_MAP_PROP, "compatible", kho.SUBTREE_PROP],
}


def debugfs_origin(path: Path | None) -> tuple[str, str] | None:
    """``("in" | "out", name)`` when ``path`` looks like a KHO debugfs file (``.../in/fdt``,
    ``.../out/sub_fdts/LUO``, or a copy keeping those last components)."""
    if path is None:
        return None
    parts = path.absolute().parts
    if len(parts) >= 3 and parts[-2] == "sub_fdts" and parts[-3] in ("in", "out"):
        return parts[-3], parts[-1]
    if len(parts) >= 2 and parts[-1] == "fdt" and parts[-2] in ("in", "out"):
        return parts[-2], "fdt"
    return None


def is_truncated_fdt(blob: bytes) -> bool:
    if len(blob) < fdt.FDT_HEADER_SIZE or blob[:4] != fdt.FDT_MAGIC.to_bytes(4, "big"):
        return False
    return int(struct.unpack_from(">I", blob, 4)[0]) > len(blob)


def describe_truncated(blob: bytes, mem: PhysMem | None, bb: int | None) -> Report:
    """A truncated FDT: what could be read, what could not, and -- for a KHO root whose
    missing names follow Linux's order -- the root decoded from what is left."""
    part = walk(blob, ROOT_STRINGS)
    rep: Report = {"kind": "truncated-fdt", "bytes": len(blob),
                   "header_totalsize": part.totalsize,
                   "missing_bytes": part.totalsize - len(blob),
                   "read": part.read, "unreadable": part.unreadable}
    if part.inferred:
        rep["names_inferred"] = part.inferred
        rep["inferred_from"] = ("the KHO root's strings block as Linux lays it out "
                                "(kho_out_fdt_setup, then kho_add_subtree)")
    rebuilt = _rebuild(part)
    if rebuilt is not None and part.root_compatible in kho.ROOT_FORMATS:
        rep["root"] = report.guard(lambda: report.describe_root(rebuilt, mem, bb))
        rep["root"]["decoded_from"] = "the nodes and properties read above"
    return rep


def rebuilt_root(blob: bytes) -> bytes | None:
    """The KHO root recovered from a truncated FDT (for ``--extract``), or None."""
    return _rebuild(walk(blob, ROOT_STRINGS))


def _rebuild(part: PartialFdt) -> bytes | None:
    """A whole FDT holding every complete node and fully known property, or None."""
    if part.root is None:
        return None
    b = fdt.SwBuilder()

    def emit(node: PNode) -> None:
        b.begin_node(node.name)
        for name, value in node.props:
            b.prop(name, value)
        for child in node.children:
            if child.complete:
                emit(child)
        b.end_node()

    try:
        emit(part.root)
        return b.finish()
    except AbiError:
        return None


def _luo_garbage(rep: Report) -> str | None:
    """Why a decoded luo_ser cannot be a live one, if it cannot."""
    bad = [k for k in ("sessions_pa", "flbs_pa") if int(rep.get(k, "0"), 16) % 4096]
    if bad:
        return f"{' and '.join(bad)} not page aligned (kho_block pages always are)"
    if not int(rep.get("flbs_pa", "0"), 16):
        return "flbs_pa is 0 (LUO sets it at boot: luo_flb_setup_outgoing)"
    return None


def _check_sysfs_type(path: Path | None) -> None:
    """``/sys/kernel/boot_params/setup_data/N/data`` has a ``type`` file beside it: only
    type 0xa (SETUP_KEXEC_KHO) is KHO's (arch/x86/kernel/ksysfs.c exports every node)."""
    if path is None or path.name != "data" or path.parent.parent.name != "setup_data":
        return
    try:  # a few bytes ("0xa\n"); the cap keeps a crafted type file from hanging us
        kind = int(inputfile.read_capped(path.parent / "type", 64).decode().strip(), 0)
    except (OSError, ValueError, LiveUpdateError):
        return
    if kind != bootparams.SETUP_KEXEC_KHO:
        raise AbiError(msg=f"{path}: setup_data type {kind:#x} is not SETUP_KEXEC_KHO "
                       f"({bootparams.SETUP_KEXEC_KHO:#x}); KHO's is the node whose type "
                       "file says 0xa")


def describe_file(path: Path | None, blob: bytes, mem: PhysMem | None,
                  bb: int | None) -> Report:
    """:func:`report.describe` of a file, with what its debugfs origin says about it."""
    origin = debugfs_origin(path)
    _check_sysfs_type(path)
    if not blob:
        raise AbiError(msg="empty file: nothing to decode")
    if is_truncated_fdt(blob):
        rep = describe_truncated(blob, mem, bb)
        if origin == ("out", "fdt"):
            rep["why"] = TRUNCATED
        return rep
    try:
        rep = report.describe(blob, mem, bb)
    except LiveUpdateError as e:
        if origin is None or origin[0] != "in":
            raise
        return {"kind": "unknown", "bytes": len(blob), "error": str(e), "note": STALE_IN}
    if origin is None:
        return rep
    side, name = origin
    live = LIVE_BLOBS.get(str(rep.get("kind")))
    if live is not None:
        live(rep, side)
    if side == "in" and report.errors(rep):
        rep["note"] = STALE_IN
    elif side == "in" and name == "LUO":
        rep["note"] = STALE_IN_INTACT
    return rep


def _luo_v5_live(rep: Report, side: str) -> None:
    """A ``luo_ser`` in debugfs is the live blob: its session chains are written only at the
    reboot, and until then its pointers may be anything."""
    if side == "out" and "sessions_note" in rep:
        rep["sessions_note"] = NOT_SERIALIZED
    garbage = _luo_garbage(rep)
    if garbage:
        rep["error"] = f"luo_ser decodes, but its pointers are garbage: {garbage}"


# per kind: what debugfs shows of a blob the kernel keeps writing until the reboot
LIVE_BLOBS = {"luo-v5": _luo_v5_live}
