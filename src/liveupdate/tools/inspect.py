"""``luoctl inspect``: from whatever the user holds to a report (and the KHO root it reached).

The inputs, in every combination the command takes:

* FILE alone: a blob decoded by content (:func:`report_debugfs.describe_file`: setup_data
  with or without its header, the KHO root, sub-FDTs, raw ``luo_ser`` and
  ``kexec-metadata``, debugfs blobs however Linux cut them);
* FILE with RAM: the same, following every pointer through RAM;
* RAM alone: the KHO root found by scanning (:mod:`liveupdate.tools.report_ram`), or the one
  at ``--root ADDR``.

RAM is a raw image or a QEMU ELF core (:mod:`liveupdate.tools.ramfile`).
"""

from __future__ import annotations

import errno
from pathlib import Path

from liveupdate.abi import bootparams
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.tools import inputfile, report, report_debugfs, report_ram
from liveupdate.tools.ramfile import RamInfo
from liveupdate.tools.report import Report, hx


def _root_of_file(blob: bytes, rep: Report, mem: PhysMem) -> bytes | None:
    """The KHO root blob a decoded FILE leads to, if any."""
    kind = rep.get("kind")
    if kind == "kho-root":
        return blob
    if kind == "setup_data":
        kd = bootparams.KhoData.decode(blob if report.is_kho_data(blob)
                                       else bootparams.decode_setup_data(blob)[0].data)
        return mem.read_fdt(kd.fdt_addr, "KHO root FDT", limit=kd.fdt_size)
    if kind == "truncated-fdt" and "root" in rep:
        return report_debugfs.rebuilt_root(blob)
    return None


def run(path: Path | None, mem: PhysMem | None, info: RamInfo | None, bb: int | None,
        root_addr: int | None = None) -> tuple[Report, bytes | None]:
    """The report, and the KHO root blob it was decoded from (None when there is none or no
    RAM to follow it in)."""
    root: bytes | None = None
    if path is not None:
        blob = inputfile.read_capped(path)
        rep = report_debugfs.describe_file(path, blob, mem, bb)
        if mem is not None:
            try:
                root = _root_of_file(blob, rep, mem)
            except LiveUpdateError:
                root = None  # the report already says why
    elif mem is None:
        raise LiveUpdateError(err=errno.EINVAL, msg="nothing to inspect: give FILE or --ram")
    elif root_addr is not None:
        root = mem.read_fdt(root_addr, "KHO root FDT", limit=report_ram.ROOT_LIMIT)
        rep = {"kind": "ram", "chosen": hx(root_addr), "why": "given with --root",
               "root": report.describe_root(root, mem, bb, at=root_addr)}
    else:
        rep, root = report_ram.describe_ram(mem, bb, info.data_extents if info else None)
    if info is not None:
        rep["ram"] = info.report()
    return rep, root
