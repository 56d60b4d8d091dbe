"""The debugfs view of KHO (``/sys/kernel/debug/kho/``) and a status summary.

Files, per KHO core (:mod:`liveupdate.kernel.kho.core`, spec/kho.md 6): ``out/finalize``
(``%llu\n``; 6.16-6.18: 1 finalizes, 0 aborts, the same value twice is EEXIST / ENOENT;
6.19: non-zero finalizes, 0 is EINVAL; absent on 7.1), ``out/fdt`` (6.16-6.18 while
finalized; 6.19+ on cold boots only, cut to its length at ``kho_init``), ``out/scratch_phys``
/ ``out/scratch_len`` (``0x%llx\n`` per area), ``out/sub_fdts/<name>`` (6.16-6.18 while
finalized), ``in/fdt``, ``in/sub_fdts/<name>``. With ``kho=off`` there is no ``kho/``
directory at all (``kho_init`` returns before creating it).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import numpy as np

from liveupdate.abi import bootparams, fdt
from liveupdate.abi import kho as kho_abi
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel import negotiate

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def _sub_fdt(k: Kernel, subtrees: tuple[tuple[str, int], ...], name: str,
             size: int | None = None) -> bytes:
    """``sub_fdts/<name>``: on a root that says each blob's size (kho-v3+, spec/kho.md 6)
    the blob of ``blob-size`` bytes, whatever it holds (7.3.4 ``__kho_debugfs_blob_add``:
    LUO's raw ``luo_ser``, kexec-metadata); else an FDT read to its ``totalsize``."""
    for n, phys in subtrees:
        if n == name:
            try:
                if size is not None:
                    return k.mem.read(phys, size, f"sub blob {name}")
                return k.mem.read_fdt(phys, f"sub FDT {name}")
            except AbiError as e:
                raise LiveUpdateError(err=errno.EIO, msg=e.message) from e
    raise LiveUpdateError(err=errno.ENOENT, msg=f"no sub FDT {name}")


def _lines(values: list[int]) -> bytes:
    return "".join(f"{v:#x}\n" for v in values).encode()


def read(k: Kernel, path: str) -> bytes:
    kout, kin = k.kho_out, k.kho_in
    parts = path.strip("/").split("/")
    if kout is None:
        raise LiveUpdateError(err=errno.ENOENT, msg="no debugfs directory kho/ (kho=off)")
    if parts[0] == "out":
        if parts[1:] == ["finalize"] and kout.core.has_finalize_file:
            return f"{int(kout.finalized)}\n".encode()
        if parts[1:] == ["fdt"] and (blob := kout.strategy.debugfs_fdt(kin is not None)) \
                is not None:
            return blob
        if parts[1:] == ["scratch_phys"]:
            return _lines(kout.scratch["addr"].tolist())
        if parts[1:] == ["scratch_len"]:
            return _lines(kout.scratch["size"].tolist())
        if len(parts) == 3 and parts[1] == "sub_fdts":
            sizes = kho_abi.decode_root(kout.root_blob()) if kout.radix is not None else None
            return _sub_fdt(k, kout.subtrees(), parts[2],
                            None if sizes is None else sizes.size(parts[2]))
    if parts[0] == "in" and kin is not None:
        if parts[1:] == ["fdt"]:
            return kin.fdt[: fdt.check_header(kin.fdt).totalsize]
        if len(parts) == 3 and parts[1] == "sub_fdts":
            if parts[2] in kin.sub_fdts:
                return kin.sub_fdts[parts[2]]
            return _sub_fdt(k, kin.root.subtrees, parts[2], kin.root.size(parts[2]))
    raise LiveUpdateError(err=errno.ENOENT, msg=f"no debugfs file kho/{path}")


def write(k: Kernel, path: str, value: bytes) -> None:
    kout = k.kho_out
    if kout is None:
        raise LiveUpdateError(err=errno.ENOENT, msg="no debugfs directory kho/ (kho=off)")
    if path.strip("/") != "out/finalize" or not kout.core.has_finalize_file:
        read(k, path)  # ENOENT for what does not exist
        raise LiveUpdateError(err=errno.EACCES, msg=f"kho/{path} is not writable")
    try:  # simple_attr_write: kstrtoull(buf, 0)
        on = int(value.strip(b"\0\n ") or b"0", 0)
    except ValueError as e:
        raise LiveUpdateError(err=errno.EINVAL, msg="finalize takes a number") from e
    kout.core.write_finalize(kout, on)


def _areas(scratch: np.ndarray) -> list[dict[str, Any]]:
    return [{"addr": f"{a:#x}", "size": s} for a, s in bootparams.scratch_areas(scratch)]


def _per_order(order: np.ndarray) -> list[dict[str, int]]:
    counts: list[int] = np.bincount(order.astype(np.int64)).tolist()
    return [{"order": o, "blocks": c, "pages": c << o} for o, c in enumerate(counts) if c]


def status(k: Kernel) -> dict[str, Any]:
    kout, kin = k.kho_out, k.kho_in
    rep: dict[str, Any] = {"enabled": kout is not None, "kho_boot": kin is not None,
                           "release": k.image.release, "kho_core": k.image.kho_core,
                           "boot_id": k.boot_id, "free_pages": k.buddy.nr_free,
                           "open_files": len(k.files)}
    if kout is not None:
        _, order = kout.preserved()
        rep["out"] = {
            "format": kout.format,
            "finalized": kout.finalized,
            "root_fdt": f"{kout.root_phys:#x}",
            "root_fdt_valid": kout.strategy.valid(),
            "preserved_memory_map": f"{kout.mem_map:#x}",
            "scratch": _areas(kout.scratch),
            "preserved": _per_order(order),
            "preserved_pages": int((np.uint64(1) << order.astype(np.uint64)).sum()),
            "subtrees": [{"name": n, "fdt": f"{p:#x}"} for n, p in kout.subtrees()],
        }
    if kin is not None:
        rec = k.negotiated_in
        rep["in"] = {
            "format": kin.root.compatible,
            "negotiated": None if rec is None else {"writer": rec.writer,
                                                    "formats": rec.formats},
            "root_fdt": f"{kin.fdt_phys:#x}",
            "preserved_pages": kin.preserved.pages(),
            "preserved": _per_order(kin.preserved.order),
            "restored_pages": kin.restored,
            "scratch": _areas(kin.scratch),
            # memblock's KHO_SCRATCH regions: the areas above, and on the 7.3 core what
            # kho_extend_scratch added for this boot's early allocations
            "memblock_scratch": [{"addr": f"{r.base:#x}", "size": r.size}
                                 for r in k.memblock.scratch_regions()],
            "subtrees": [{"name": n, "fdt": f"{p:#x}"} for n, p in kin.root.subtrees],
            "unretrievable": [{"name": n, "why": why} for n, why in kin.root.broken],
        }
    rep["reserve_mem"] = k.reserve_mem
    rep["luo"] = k.luo.status() if k.luo is not None else None
    loaded = k.kexec_image
    rep["handover"] = {"native": k.image.native(), "negotiate": negotiate.enabled(k.cmdline),
                       "writes": negotiate.written(k),
                       "plan": None if loaded is None or loaded.plan is None else {
                           "mode": loaded.plan.mode,
                           "formats": loaded.plan.formats}}
    rep["kexec"] = None if loaded is None else {
        "release": loaded.release, "entry": f"{loaded.entry:#x}",
        "segments": [{"phys": f"{s.phys:#x}", "bufsz": s.bufsz, "memsz": s.memsz}
                     for s in loaded.segments]}
    return rep
