"""Every handover format, once: what it is called, its ``compatible``, its decoder, and which
component and component format (:mod:`liveupdate.abi.generations`) it belongs to.

This is QEMU's ``VMStateDescription`` lesson: versioning is data. ``luoctl inspect`` (through
:mod:`liveupdate.tools.report`, which has one describer per name here), the fuzz runner, the
kernel's load-time check and negotiation, and luod's pre-flight all read this table.

:func:`incompatibilities` is Linux's behaviour between two kernels, component by component
(spec/kho.md 8, spec/luo.md 7), given what a handover holds and what the reader reads:

* a KHO root the reader does not take -> the whole handover is ignored: **cold boot**;
* a LUO root (``luo-v1`` FDT vs ``luo-v5`` struct vs v3's ``luo-v1`` with subsystems -- the
  same string, other content) or a missing required FLB node (7.0+ ``luo_flb_setup_incoming``:
  ENOENT) -> ``luo_restore_fail``: **panic**; a 6.19 reader ignores an FLB node [I];
* a file whose handler the reader lacks -> every open of /dev/liveupdate fails: **EIO**;
* a reader without LUO (before 6.19, or LUO off) never looks at the LUO subtree: the files'
  memory stays reserved and nobody can retrieve them: **unreachable**.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from liveupdate.abi import (
    bootparams,
    generations,
    iommufd,
    kexec_metadata,
    kho,
    khotest,
    luo_ser,
    luo_session,
    luo_v3,
    memblock,
    memfd,
    negotiation,
    vfio_pci,
)


@dataclass(frozen=True)
class Format:
    name: str  # the key, and the report's "kind"
    compatible: str  # what the blob carries ("" where the format has none)
    decode: Callable[[bytes], Any]  # the pure decoder of one blob of this format
    component: str = ""  # generations.COMPONENTS; "" = every generation's (KHO level)
    fmt: str = ""  # the component format it belongs to


def _setup_data(blob: bytes) -> bootparams.KhoData:
    node, _ = bootparams.decode_setup_data(blob)
    return bootparams.decode_kho_setup_data(node)


def _luo_session(blob: bytes) -> luo_session.LuoFdt:
    return luo_session.decode_luo_fdt(blob)


def _luo_flb(blob: bytes) -> luo_session.LuoFdt:
    return luo_session.decode_luo_fdt(blob, require_flb=True)


FORMATS: tuple[Format, ...] = (
    Format("setup_data", "SETUP_KEXEC_KHO", _setup_data),
    Format("kho-root", kho.KHO_FDT_COMPATIBLE, kho.decode_root, "kho"),
    Format("memblock", memblock.MEMBLOCK_COMPATIBLE, memblock.decode),
    Format("kho-test", khotest.KHO_TEST_COMPAT, khotest.decode),
    Format("luo-v3", luo_v3.LUO_COMPATIBLE, luo_v3.decode_luo_fdt, "luo", "luo-v3"),
    Format("files-fdt", luo_v3.FILES_COMPATIBLE, luo_v3.decode_files_fdt, "luo", "luo-v3"),
    Format("memfd-fdt", memfd.MEMFD_V1, memfd.decode_fdt, "memfd", "memfd-fdt"),
    Format("luo-session", luo_session.SESSION_COMPATIBLE, _luo_session, "luo", "luo-v1"),
    Format("luo-flb", luo_session.FLB_COMPATIBLE, _luo_flb, "flb", "luo-flb-v1"),
    Format("luo-v5", luo_ser.LUO_V5, luo_ser.decode, "luo", "luo-v5"),
    Format("lu-negotiation", negotiation.COMPATIBLE, negotiation.decode),
    Format("kexec-metadata", "", kexec_metadata.decode),
    Format("memfd-v1", memfd.MEMFD_V1, lambda raw: memfd.decode_ser(raw, memfd.MEMFD_V1),
           "memfd", "memfd-v1"),
    Format("memfd-v2", memfd.MEMFD_V2, lambda raw: memfd.decode_ser(raw, memfd.MEMFD_V2),
           "memfd", "memfd-v2"),
    Format("vfio-pci-v1", vfio_pci.COMPATIBLE, vfio_pci.decode, "vfio", "vfio-pci-v1"),
    Format("iommufd-v1", iommufd.COMPATIBLE, iommufd.decode, "iommufd", "iommufd-v1"),
)
COMPATIBLE_OF = {f.fmt: f.compatible for f in reversed(FORMATS) if f.fmt}  # first row wins


def compatible_of(fmt: str) -> str:
    """The ``compatible`` a component format's blobs carry (``memfd-fdt`` -> ``memfd-v1``)."""
    return COMPATIBLE_OF[fmt]


EFFECT = {"kho": "cold boot", "luo": "panic", "flb": "panic", "unreachable": "unreachable",
          **dict.fromkeys(generations.FILE_COMPONENTS, "EIO")}


@dataclass(frozen=True)
class Incompatibility:
    component: str
    format: str  # the component format at issue
    reason: str  # "cannot read", "requires", "has no LUO"

    @property
    def effect(self) -> str:
        return EFFECT["unreachable" if self.reason == "has no LUO" else self.component]

    def __str__(self) -> str:
        if self.reason == "has no LUO":
            return "it has no LUO: the preserved files would be unreachable"
        return f"it {self.reason} {self.format} ({self.component})"


def describe(bad: list[Incompatibility]) -> str:
    """One line: what the reader cannot take."""
    return "; ".join(str(i) for i in bad)


def incompatibilities(written: Mapping[str, str],
                      reads: Mapping[str, tuple[str, ...]]) -> list[Incompatibility]:
    """What stops a reader that reads ``reads`` (per component) from taking a handover that
    holds ``written`` (per component; a file component only when a file of it is preserved). Each
    entry's ``effect`` is what Linux does about it; a KHO mismatch hides everything else
    (the handover is ignored)."""
    kho_fmt = written.get("kho")
    if kho_fmt is not None and kho_fmt not in reads.get("kho", ()):
        return [Incompatibility("kho", kho_fmt, "cannot read")]
    luo = written.get("luo")
    if luo is None:
        return []
    if "luo" not in reads:
        files = generations.FILE_COMPONENTS & written.keys()
        return [Incompatibility("luo", luo, "has no LUO")] if files else []
    if luo not in reads["luo"]:
        return [Incompatibility("luo", luo, "cannot read")]
    bad = []
    flb, flb_reads = written.get("flb"), reads.get("flb", ("none",))
    if flb is not None and flb not in flb_reads and flb_reads != ("none",):
        bad.append(Incompatibility("flb", "luo-flb-v1", "requires" if flb == "none"
                                   else "cannot read"))
    for comp in generations.COMPONENTS:
        fmt = written.get(comp)
        if comp in generations.FILE_COMPONENTS and fmt is not None \
                and fmt not in reads.get(comp, ()):
            bad.append(Incompatibility(comp, fmt, "cannot read"))
    return bad
