"""The KHO root FDT: ``kho-v1``, ``kho-v3`` and ``kho-v4`` (spec/kho.md sections 2.1, 2.2, 8).

Layout::

    / { compatible = "kho-v1";
        preserved-memory-map = <u64 native>;     // phys of the first chunk, 0 = none yet
        <name> { fdt = <u64 native>; }; ... }    // phys of each subsystem's own FDT

    / { compatible = "kho-v3";                   // 7.1; "kho-v4" in 7.2 (kho_block for LUO)
        preserved-memory-map = <u64 native>;     // phys of the radix root node, never 0
        <name> { blob-size = <u64>; preserved-data = <u64>; }; ... }  // any bytes

``kho-v2`` (radix tree without ``blob-size``) never reached a release and is not built. A
reader dispatches on the exact string it accepts and nothing else (``kho_populate``'s
``fdt_node_check_compatible``); in kho-v3+ a child without an 8-byte ``blob-size`` fails its
own ``kho_retrieve_subtree`` (EINVAL, "broken KHO subnode ... blob-size"), like a broken
``fdt`` in kho-v1.

Two construction orders produce different bytes and both are reproduced exactly:

* 6.16-6.18 (:func:`encode_root_sequential`): built once at finalize in sequential-write mode,
  children in notifier-registration order (the golden bytes of spec section 2.2).
* 6.19+ (:class:`LiveRoot`): the skeleton is built at boot with map 0, then every
  ``kho_add_subtree`` does open_into(PAGE_SIZE) / add_subnode / setprop / pack, so children
  appear in reverse order of addition; ``kho_remove_subtree`` deletes the node (its name stays in
  the strings block); ``kho_finalize`` patches the map pointer in place.

The root FDT always fits in one page; an addition that does not fit fails with ENOMEM.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from liveupdate.abi import fdt
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError

KHO_FDT_COMPATIBLE = "kho-v1"
KHO_V3 = "kho-v3"
KHO_V4 = "kho-v4"
ROOT_FORMATS = (KHO_FDT_COMPATIBLE, KHO_V3, KHO_V4)
MEM_MAP_PROP = "preserved-memory-map"
SUBTREE_PROP = "fdt"
DATA_PROP = "preserved-data"
SIZE_PROP = "blob-size"
ROOT_FDT_SIZE = PAGE_SIZE


def is_radix(compatible: str) -> bool:
    """kho-v3/v4: radix memory map, raw blobs with sizes."""
    return compatible in (KHO_V3, KHO_V4)


@dataclass(frozen=True)
class KhoRoot:
    compatible: str
    mem_map: int
    subtrees: tuple[tuple[str, int], ...]  # (name, phys) in byte-stream order
    broken: tuple[tuple[str, str], ...] = ()  # (name, why): children no one can retrieve
    sizes: tuple[tuple[str, int], ...] = ()  # kho-v3+: (name, blob-size)

    def size(self, name: str) -> int | None:
        return dict(self.sizes).get(name)

    def subtree(self, name: str) -> int:
        """kho_retrieve_subtree: the phys of a named subtree; ENOENT if absent, EINVAL if
        the child exists but its ``fdt`` property is unusable."""
        for n, phys in self.subtrees:
            if n == name:
                return phys
        for n, why in self.broken:
            if n == name:
                raise AbiError(msg=why)
        raise AbiError(msg=f"no KHO subtree {name!r}", err=errno.ENOENT)


def encode_root_sequential(mem_map: int, subtrees: list[tuple[str, int]]) -> bytes:
    """The 6.16-6.18 root FDT: one sequential build at finalize."""
    b = fdt.SwBuilder().begin_node("")
    b.prop("compatible", fdt.string(KHO_FDT_COMPATIBLE))
    b.prop(MEM_MAP_PROP, fdt.u64(mem_map))
    for name, phys in subtrees:
        b.begin_node(name).prop(SUBTREE_PROP, fdt.u64(phys)).end_node()
    blob = b.end_node().finish()
    if len(blob) > ROOT_FDT_SIZE:
        raise AbiError(
            msg=f"KHO root FDT needs {len(blob)} bytes, more than a page", err=errno.ENOMEM)
    return blob


def _skeleton(compatible: str, mem_map: int) -> bytes:
    b = fdt.SwBuilder().begin_node("")
    b.prop("compatible", fdt.string(compatible))
    b.prop(MEM_MAP_PROP, fdt.u64(mem_map))
    return b.end_node().finish()


class LiveRoot:
    """The 6.19+ live root FDT: built at boot (``kho_init``; kho-v3+ with the radix root
    already in ``preserved-memory-map``), edited as subtrees come and go."""

    def __init__(self, compatible: str = KHO_FDT_COMPATIBLE, mem_map: int = 0) -> None:
        if compatible not in ROOT_FORMATS:
            raise AbiError(msg=f"no KHO root format {compatible!r}")
        self.compatible = compatible
        self._tree = fdt.RwTree(_skeleton(compatible, mem_map), ROOT_FDT_SIZE)

    @property
    def blob(self) -> bytes:
        return self._tree.blob

    def add_subtree(self, name: str, phys: int, size: int = 0) -> None:
        """kho_add_subtree: EEXIST if the name is taken, ENOMEM when the page is full (the
        half-made node is deleted, as the newest upstream does). kho-v3+ sets
        ``preserved-data`` then ``blob-size``; libfdt puts the newer property first."""
        if not name or "/" in name or "@" in name:
            raise AbiError(msg=f"invalid KHO subtree name {name!r}")
        before = self._tree.blob
        self._tree.add_subnode("/", name)
        try:
            if is_radix(self.compatible):
                self._tree.setprop("/" + name, DATA_PROP, fdt.u64(phys))
                self._tree.setprop("/" + name, SIZE_PROP, fdt.u64(size))
            else:
                self._tree.setprop("/" + name, SUBTREE_PROP, fdt.u64(phys))
        except AbiError:
            self._tree = fdt.RwTree(before, ROOT_FDT_SIZE)
            raise

    def remove_subtree(self, phys: int) -> bool:
        """kho_remove_subtree: delete the first child whose blob is ``phys``."""
        for name, p in decode_root(self.blob).subtrees:
            if p == phys:
                self._tree.del_node("/" + name)
                return True
        return False

    def set_mem_map(self, phys: int) -> None:
        """kho_finalize: patch the map pointer in place (same bytes, new value)."""
        self._tree.setprop("/", MEM_MAP_PROP, fdt.u64(phys))


def decode_root(blob: bytes | bytearray | memoryview, *,
                accept: tuple[str, ...] = ROOT_FORMATS,
                require_map: bool = False,
                ram: Callable[[int, int], bool] | None = None) -> KhoRoot:
    """Decode and validate a root FDT as ``kho_populate`` does, plus every child.

    ``accept`` is what the reading kernel takes (a kernel takes exactly its own format; the
    default, every format, is for inspection). A child whose ``fdt`` (kho-v1) or
    ``preserved-data``/``blob-size`` (kho-v3+) is missing or not 8 bytes -- or, given ``ram``,
    points outside it -- is kept aside in ``broken``: as in Linux, only
    ``kho_retrieve_subtree`` of that name fails (EINVAL); the handover as a whole stays good.
    """
    tree = fdt.parse(blob, "KHO root FDT")
    root = tree.root
    have = root.compatible()
    match = [c for c in accept if c in have]
    if not match:
        raise AbiError(msg=f"KHO root FDT is compatible with {', '.join(have) or 'nothing'}, "
                       f"not {' or '.join(accept)}")
    mem_map = root.u64(MEM_MAP_PROP, "KHO root FDT")
    if require_map and mem_map == 0:
        raise AbiError(msg="KHO root FDT: preserved-memory-map is 0 (never finalized)",
                       err=errno.ENOENT)
    if is_radix(match[0]) and mem_map == 0:
        raise AbiError(msg="KHO root FDT: preserved-memory-map (radix root) is 0")
    subtrees: list[tuple[str, int]] = []
    broken: list[tuple[str, str]] = []
    sizes: list[tuple[str, int]] = []
    for child in root.children:
        try:
            if is_radix(match[0]):
                phys = child.u64(DATA_PROP, "KHO root FDT")
                try:
                    size = child.u64(SIZE_PROP, "KHO root FDT")
                except AbiError:
                    broken.append((child.name, f"broken KHO subnode '{child.name}': missing "
                                   "or invalid blob-size property"))
                    continue
            else:
                phys, size = child.u64(SUBTREE_PROP, "KHO root FDT"), 0
        except AbiError as e:
            broken.append((child.name, e.message))
            continue
        if ram is not None and not ram(phys, max(8, size)):
            broken.append((child.name, f"KHO subtree {child.name} at {phys:#x} is outside RAM"))
            continue
        subtrees.append((child.name, phys))
        if is_radix(match[0]):
            sizes.append((child.name, size))
    return KhoRoot(match[0], mem_map, tuple(subtrees), tuple(broken), tuple(sizes))
