"""``/dev/iommu``: the iommufd character device's file and its ioctls, as an ops table
(``iommufd_ioctl_ops`` of ``drivers/iommu/iommufd/main.c``) in the style of the LUO uAPI
(:mod:`liveupdate.kernel.luo.session_ioctl`): the dispatcher's checks and size rules
(:func:`liveupdate.abi.devices_uapi.lookup`), then the command, whose reply is the struct
with its out fields written, cut to the size the user passed (``iommufd_ucmd_respond``).

The commands of 7.3 the devices issue needs: ``IOAS_ALLOC``, ``IOAS_MAP_FILE``,
``IOAS_UNMAP``, ``HWPT_ALLOC``, ``DESTROY``. ``IOAS_MAP`` (a user VA) is EOPNOTSUPP here: the
emulated kernel has no view of a process's address space (a deviation; userspace maps
memfds by file, which is also what the posted live update series requires).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from liveupdate.abi import devices_uapi as du
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.drivers import iommu as intel
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.iommufd.objects import IOVA_LIMIT, Area, Hwpt, Ictx, Idev, Ioas

Resolve = Callable[[int], File]
Out = dict[str, int]
U64_MAX = (1 << 64) - 1


def _ioas_alloc(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    if a["flags"]:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="IOAS_ALLOC: flags must be 0")
    return {"out_ioas_id": ctx.new_ioas().id}


def _ioas_map(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="IOAS_MAP: user VAs are not emulated; "
                          "map a memfd with IOAS_MAP_FILE")


def _map_flags(flags: int, iova: int, length: int) -> None:
    """``iommufd_ioas_map_file``'s checks, in its order."""
    known = du.MAP_FIXED_IOVA | du.MAP_WRITEABLE | du.MAP_READABLE
    if flags & ~known:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"map: flags {flags:#x}")
    if iova >= U64_MAX or length >= U64_MAX:
        raise LiveUpdateError(err=errno.EOVERFLOW, msg="map: iova or length overflows")
    if not flags & (du.MAP_WRITEABLE | du.MAP_READABLE):
        raise LiveUpdateError(err=errno.EINVAL, msg="map: neither readable nor writeable")


def _ioas_map_file(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    flags, iova, length, start = a["flags"], a["iova"], a["length"], a["start"]
    _map_flags(flags, iova, length)
    ioas = ctx.get(a["ioas_id"], Ioas, "IOAS_MAP_FILE")
    assert isinstance(ioas, Ioas)
    if not fds:
        raise LiveUpdateError(err=errno.EBADF, msg=f"IOAS_MAP_FILE: fd {a['fd']} is not open")
    f = resolve(fds[0])
    if not isinstance(f.private, memfd.Memfd):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"IOAS_MAP_FILE: a {f.ops.name} file "
                              "is not a memfd")
    mf: memfd.Memfd = f.private
    if not length or (length | start) & (PAGE_SIZE - 1) or (
            flags & du.MAP_FIXED_IOVA and iova & (PAGE_SIZE - 1)):
        raise LiveUpdateError(err=errno.EINVAL, msg="IOAS_MAP_FILE: start, length and iova "
                              "must be page aligned, length non-zero")
    if start + length > mf.size:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"IOAS_MAP_FILE: {start:#x}+{length:#x} "
                              f"is past the file's end ({mf.size:#x})")
    if ioas.immutable:
        raise LiveUpdateError(err=errno.EBUSY, msg="IOAS_MAP_FILE: the IOAS is preserved")
    if flags & du.MAP_FIXED_IOVA:
        if iova + length > IOVA_LIMIT:
            raise LiveUpdateError(err=errno.EINVAL, msg="IOAS_MAP_FILE: beyond the 48-bit "
                                  "IOVA space")
        if ioas.overlaps(iova, length):
            raise LiveUpdateError(err=errno.EEXIST, msg=f"IOAS_MAP_FILE: {iova:#x}+"
                                  f"{length:#x} overlaps a mapping")
    else:
        iova = ioas.free_iova(length)
    prot = flags & (du.MAP_WRITEABLE | du.MAP_READABLE)
    ctx.map_area(ioas, Area(iova, length, mf, start, prot, mf.seals))
    return {"iova": iova}


def _ioas_unmap(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    ioas = ctx.get(a["ioas_id"], Ioas, "IOAS_UNMAP")
    assert isinstance(ioas, Ioas)
    if ioas.immutable:
        raise LiveUpdateError(err=errno.EBUSY, msg="IOAS_UNMAP: the IOAS is preserved")
    iova, length = a["iova"], a["length"]
    if iova == 0 and length == U64_MAX:  # unmap everything
        n = sum(x.length for x in ioas.areas)
        for x in list(ioas.areas):
            ctx.remove_area(ioas, x)
        return {"length": n}
    if not length or iova + length > U64_MAX + 1:
        raise LiveUpdateError(err=errno.EINVAL if not length else errno.EOVERFLOW,
                              msg="IOAS_UNMAP: empty or overflowing range")
    return {"length": ctx.unmap(ioas, iova, length)}


def _hwpt_alloc(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    """``iommufd_hwpt_alloc``: a kernel-managed paging domain from an IOAS for a bound
    device; nesting, dirty tracking, fault queues and PASIDs are EOPNOTSUPP (the unit's
    CAP/ECAP read 0)."""
    if a["reserved"] or a["reserved2"]:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="HWPT_ALLOC: reserved must be 0")
    if (a["data_type"] == du.HWPT_DATA_NONE) == bool(a["data_len"]):
        raise LiveUpdateError(err=errno.EINVAL, msg="HWPT_ALLOC: data_len must be 0 exactly "
                              "for IOMMU_HWPT_DATA_NONE")
    if a["flags"] or a["data_type"] != du.HWPT_DATA_NONE:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"HWPT_ALLOC: flags {a['flags']:#x}, "
                              f"data type {a['data_type']}: not supported by this IOMMU")
    ctx.get(a["dev_id"], Idev, "HWPT_ALLOC")
    pt = ctx.objects.get(a["pt_id"])
    if not isinstance(pt, Ioas):
        raise LiveUpdateError(err=errno.ENOENT if pt is None else errno.EINVAL,
                              msg=f"HWPT_ALLOC: {a['pt_id']} is not an IOAS")
    return {"out_hwpt_id": ctx.hwpt_alloc(pt, auto=False).id}


def _destroy(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    ctx.destroy(a["id"])
    return {}


def _mark_preserve(ctx: Ictx, a: dict[str, Any], fds: list[int], resolve: Resolve) -> Out:
    """``IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE`` (posted, 3.7): EADDRINUSE for a token this
    context already uses; no unmark."""
    h = ctx.get(a["hwpt_id"], Hwpt, "HWPT_LU_MARK_PRESERVE")
    assert isinstance(h, Hwpt)
    if any(isinstance(o, Hwpt) and o.token == a["hwpt_token"] for o in ctx.objects.values()):
        raise LiveUpdateError(err=errno.EADDRINUSE, msg="MARK_PRESERVE: token in use")
    h.token = a["hwpt_token"]
    return {}


Command = Callable[[Ictx, dict[str, Any], list[int], Resolve], Out]
IOCTLS: dict[str, Command] = {
    "IOMMU_DESTROY": _destroy,
    "IOMMU_IOAS_ALLOC": _ioas_alloc,
    "IOMMU_IOAS_MAP": _ioas_map,
    "IOMMU_IOAS_UNMAP": _ioas_unmap,
    "IOMMU_HWPT_ALLOC": _hwpt_alloc,
    "IOMMU_IOAS_MAP_FILE": _ioas_map_file,
    "IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE": _mark_preserve,
}


class IommufdOps:
    """The file of an open ``/dev/iommu`` (``iommufd_fops``); ``posted``: the kernel has
    the posted series' extra command."""

    name = "iommufd"

    def __init__(self, posted: bool) -> None:
        self.table = tuple(c for c in (*du.IOMMUFD, du.MARK_PRESERVE)
                           if posted or c.name not in du.POSTED)

    def release(self, f: File) -> None:
        f.private.release()

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        entry, a = du.lookup(self.table, cmd, arg)
        out = IOCTLS[entry.name](f.private, a, fds, resolve)
        reply = entry.pack(**{**a, **out})
        return reply[: min(a["size"], entry.size)], []


def open_iommufd(tables: intel.Tables | None, posted: bool) -> File:
    """``iommufd_fops_open``: a new context."""
    return File(IommufdOps(posted), Ictx(tables))
