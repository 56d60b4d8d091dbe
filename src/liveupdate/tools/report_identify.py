"""What a blob is, by content alone (:func:`identify`), for :mod:`liveupdate.tools.report`.

Sizes and prefixes are what Linux exports: a ``luo_ser`` starts with ``"luo-v5"``; sysfs
``setup_data/N/data`` is the bare 32-byte ``struct kho_data`` (arch/x86/kernel/ksysfs.c
``setup_data_data_read`` copies the payload, not the header); debugfs ``kexec-metadata`` is the
73-byte ``struct kho_kexec_metadata`` (kexec_handover.c ``kho_out_kexec_metadata``).
"""

from __future__ import annotations

import struct

from liveupdate.abi import (
    bootparams,
    fdt,
    kexec_metadata,
    kho,
    khotest,
    luo_ser,
    luo_v3,
    memblock,
    negotiation,
)
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError


def is_kho_data(blob: bytes) -> bool:
    """A bare ``struct kho_data`` as ``/sys/kernel/boot_params/setup_data/N/data`` exports
    it (arch/x86/kernel/ksysfs.c ``setup_data_data_read`` copies the payload, not the
    header): exactly 32 bytes holding a plausible page-aligned FDT and a scratch array.
    A ``luo_ser`` is 32 bytes too but starts with ``"luo-v5"`` (checked first)."""
    if len(blob) != bootparams.KHO_DATA_SIZE or blob.startswith(luo_ser.LUO_V5.encode()):
        return False
    fdt_addr, fdt_size, scratch_addr, scratch_size = bootparams.KHO_DATA.unpack(blob)
    return bool(fdt_addr != 0 and fdt_addr % PAGE_SIZE == 0 and 0 < fdt_size <= 1 << 24
            and scratch_addr != 0 and scratch_size != 0
            and scratch_size % bootparams.SCRATCH_DTYPE.itemsize == 0)


def is_kexec_metadata(blob: bytes) -> bool:
    """``kexec-metadata`` as debugfs exports it (its 73-byte blob-size): version 1 and a
    NUL-terminated printable release."""
    if not kexec_metadata.LAYOUT.size <= len(blob) <= PAGE_SIZE:
        return False
    version, rel, _ = kexec_metadata.LAYOUT.unpack_from(blob)
    name = rel.split(b"\0", 1)[0]
    return bool(version == kexec_metadata.VERSION and b"\0" in rel
                and all(0x20 <= c < 0x7F for c in name))


def identify(blob: bytes) -> str:
    """The kind of a blob: ``setup_data`` (a node with its header, or the bare
    ``kho_data`` payload), ``kho-root``, ``memblock``, ``kho-test``, ``luo-v3``,
    ``luo-session``, ``luo-v5``, ``files-fdt``, ``memfd-fdt``, ``lu-negotiation`` or
    ``kexec-metadata``. AbiError otherwise."""
    if blob[: luo_ser.COMPAT_LEN] == luo_ser.LUO_V5.encode().ljust(luo_ser.COMPAT_LEN, b"\0"):
        return "luo-v5"
    if is_kho_data(blob):
        return "setup_data"
    if len(blob) >= 4 and struct.unpack(">I", blob[:4])[0] == fdt.FDT_MAGIC:
        root = fdt.parse(blob).root
        compat = root.compatible()
        if set(kho.ROOT_FORMATS) & set(compat):
            return "kho-root"
        for name, kind in ((negotiation.COMPATIBLE, "lu-negotiation"),
                           (memblock.MEMBLOCK_COMPATIBLE, "memblock"),
                           (khotest.KHO_TEST_COMPAT, "kho-test"),
                           (luo_v3.FILES_COMPATIBLE, "files-fdt")):
            if name in compat:
                return kind
        if luo_v3.LUO_COMPATIBLE in compat:
            return "luo-v3" if root.child(luo_v3.SUBSYSTEMS_NODE) else "luo-session"
        if not compat and {"pos", "size", "folios"} <= set(root.props):
            return "memfd-fdt"
        raise AbiError(msg=f"unknown FDT (compatible: {compat or 'none'})")
    if len(blob) >= bootparams.SETUP_HDR_SIZE:
        _, type_, length = bootparams.SETUP_HDR.unpack_from(blob)
        if type_ == bootparams.SETUP_KEXEC_KHO and length == bootparams.KHO_DATA_SIZE:
            return "setup_data"
    if is_kexec_metadata(blob):
        return "kexec-metadata"
    raise AbiError(msg=f"{len(blob)} bytes: not a KHO root FDT, setup_data (node or kho_data "
                   "payload), luo_ser, kexec-metadata or known sub-FDT")
