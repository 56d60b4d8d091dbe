"""The ``memblock`` KHO subtree of ``reserve_mem=`` (spec/kho.md 2.3).

::

    / { compatible = "memblock-v1";
        <name> { compatible = "reserve-mem-v1"; start = <u64 native>; size = <u64 native>; }; };

Revival in the next kernel requires the same name, compatible, 8-byte properties, ``start``
aligned to the requested alignment and the same size. Linux (``reserve_mem_kho_revive``)
looks each region up by name, so one malformed child fails only itself: :func:`lookup`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from liveupdate.abi import fdt
from liveupdate.errors import AbiError

MEMBLOCK_KHO_NODE = "memblock"
MEMBLOCK_COMPATIBLE = "memblock-v1"
RESERVE_MEM_COMPATIBLE = "reserve-mem-v1"


@dataclass(frozen=True)
class ReserveMem:
    name: str
    start: int
    size: int


def encode(regions: list[ReserveMem]) -> bytes:
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise AbiError(msg="duplicate reserve_mem name", err=errno.EEXIST)
    b = fdt.SwBuilder().begin_node("").prop("compatible", fdt.string(MEMBLOCK_COMPATIBLE))
    for r in regions:
        b.begin_node(r.name).prop("compatible", fdt.string(RESERVE_MEM_COMPATIBLE))
        b.prop("start", fdt.u64(r.start)).prop("size", fdt.u64(r.size)).end_node()
    return b.end_node().finish()


def decode(blob: bytes) -> list[ReserveMem]:
    """Every region; any malformed child is an error (for tools, not for revival)."""
    root = open_subtree(blob)
    return [lookup(root, node.name) for node in root.children]


def open_subtree(blob: bytes) -> fdt.Node:
    """``reserve_mem_kho_retrieve_fdt``: the root, if it parses and is ``memblock-v1``."""
    what = "memblock FDT"
    root = fdt.parse(blob, what).root
    root.check_compatible(MEMBLOCK_COMPATIBLE, what)
    return root


def lookup(root: fdt.Node, name: str) -> ReserveMem:
    """One region by name; ENOENT if absent, EINVAL if that child is malformed."""
    what = "memblock FDT"
    node = root.need_child(name, what)
    node.check_compatible(RESERVE_MEM_COMPATIBLE, what)
    return ReserveMem(name, node.u64("start", what), node.u64("size", what))
