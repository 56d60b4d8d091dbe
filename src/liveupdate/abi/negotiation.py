"""The record of a negotiated handover -- our extension, not a Linux format.

When two kernels negotiated formats (:mod:`liveupdate.kernel.negotiate`), the outgoing one
adds a KHO subtree ``lu-negotiation``, an FDT::

    / { compatible = "lu-negotiation-v1";
        writer = "7.2.0-lu"; reader = "6.19.0-lu";      // uname -r of both images
        kho = "kho-v1"; luo = "luo-v1"; flb = "none"; memfd = "memfd-v1"; };  // agreed

Only the components the handover carries appear. A reader that does not know the node
ignores it (KHO readers look subtrees up by name), so a negotiated handover stays readable
by a plain Linux of the agreed formats; ``luoctl inspect`` shows it, which is how a
negotiated handover is told from a native one.
"""

from __future__ import annotations

from dataclasses import dataclass

from liveupdate.abi import fdt, generations
from liveupdate.errors import AbiError

NODE = "lu-negotiation"
COMPATIBLE = "lu-negotiation-v1"


@dataclass(frozen=True)
class Record:
    writer: str
    reader: str
    formats: dict[str, str]


def encode(rec: Record) -> bytes:
    b = fdt.SwBuilder().begin_node("").prop("compatible", fdt.string(COMPATIBLE))
    b.prop("writer", fdt.string(rec.writer)).prop("reader", fdt.string(rec.reader))
    for comp in generations.COMPONENTS:
        if comp in rec.formats:
            b.prop(comp, fdt.string(rec.formats[comp]))
    return b.end_node().finish()


def decode(blob: bytes) -> Record:
    what = "lu-negotiation FDT"
    root = fdt.parse(blob, what).root
    root.check_compatible(COMPATIBLE, what)
    formats: dict[str, str] = {}
    for comp in generations.COMPONENTS:
        if comp not in root.props:
            continue
        value = root.string(comp, what)
        if value not in generations.ORDER[comp]:
            raise AbiError(msg=f"{what}: {comp} = {value!r} is no {comp} format")
        formats[comp] = value
    return Record(root.string("writer", what), root.string("reader", what), formats)
