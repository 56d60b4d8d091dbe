"""Kernel generations 6.16 to 7.3, and ``7.3+posted``: what each writes and reads,
component by component.

A handover has four versioned components, each with its formats oldest first:

========  ===================================================================================
``kho``   ``kho-v1-512`` (6.16/6.17: kho-v1 with 512-byte bitmaps -- the same compatible
          string, spec/kho.md 0), ``kho-v1`` (6.18-7.0), ``kho-v3`` (7.1: radix tree,
          ``blob-size``), ``kho-v4`` (7.2: + ``kho_block``)
``luo``   ``luo-v3`` (the seed's state machine; its own family), ``luo-v1`` (6.19-7.1: FDT +
          ``luo-session-v2`` arrays), ``luo-v5`` (7.2: raw ``luo_ser`` + ``kho_block`` chains)
``flb``   ``none`` (6.19 writes no FLB node and ignores one), ``luo-flb-v1`` (7.0+, required)
``memfd`` ``memfd-fdt`` (v3's FDT ``memfd-v1``), ``memfd-v1`` (6.19/7.0 struct), ``memfd-v2``
          (7.1+: seals)
``vfio``  ``vfio-pci-v1`` (the posted VFIO series; ``7.3+posted`` only)
``iommufd`` ``iommufd-v1`` (the posted IOMMU/iommufd series; ``7.3+posted`` only)
``huge-memfd`` ``huge-memfd-v1`` (the posted hugetlb RFC; ``7.3+posted`` only)
========  ===================================================================================

The last four are **file components**: a handover carries one only when a file of its kind
is preserved, and a reader without the handler answers every open of /dev/liveupdate with
EIO (``luo_file_deserialize``: no handler for a compatible). ``7.3+posted`` is Linux 7.3
plus the series in flight (docs/posted-series.md pins each by message-id): not a release;
its images say ``7.3.0-lu-posted``.

**Native** is Linux: a kernel writes exactly one format per component and reads only that one
(kho.md 8, luo.md 7). **Capable** is our negotiation extension (spec: none in Linux; QEMU's
``VMStateDescription`` ``version_id``/``minimum_version_id`` applied per component): a kernel
reads and writes every format of its family up to its own -- a newer kernel can still speak
an older kernel's formats, never the reverse (it cannot know formats invented after it).
An image's **manifest** is what its header *claims* it reads; by default it is the capable
set, but it is just data, and a kernel that lies is caught by the next kernel's validation.

``luo-v5`` stores its blob raw, so it needs a kho-v3+ root (``blob-size``); negotiation never
pairs it with kho-v1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from liveupdate.errors import AbiError

ORDER: dict[str, tuple[str, ...]] = {
    "kho": ("kho-v1-512", "kho-v1", "kho-v3", "kho-v4"),
    "luo": ("luo-v3", "luo-v1", "luo-v5"),
    "flb": ("none", "luo-flb-v1"),
    "memfd": ("memfd-fdt", "memfd-v1", "memfd-v2"),
    "vfio": ("vfio-pci-v1",),
    "iommufd": ("iommufd-v1",),
    "huge-memfd": ("huge-memfd-v1",),
}
COMPONENTS = tuple(ORDER)
# only files need them: nothing in common leaves one out, and it is written only with a file
FILE_COMPONENTS = frozenset({"memfd", "vfio", "iommufd", "huge-memfd"})
COMPONENT_OF = {f: c for c, fmts in ORDER.items() for f in fmts}
KHO_COMPATIBLE = {"kho-v1-512": "kho-v1", "kho-v1": "kho-v1", "kho-v3": "kho-v3",
                  "kho-v4": "kho-v4"}
FAMILY_OF_ONE = frozenset({"luo-v3", "memfd-fdt"})  # the v3 family: its own, no negotiation
NEEDS_SIZED_ROOT = frozenset({"luo-v5"})  # stored raw: the root must say its size
FLB_NODE = frozenset({"luo-flb-v1"})  # the FLB formats that write a node (7.0+ requires it)
DROPS_SEALS = frozenset({"memfd-v1"})  # 6.19's struct: every memfd retrieved unsealable


@dataclass(frozen=True)
class LuoGeneration:
    """One LUO generation, as data: what its kernel speaks and writes natively. The kernel
    builds its LUO from this row (front end, handover writer, file handlers, uAPI rules),
    userspace and the tools read it; nobody compares generation names."""

    name: str
    uapi: str  # abi.uapi.Gen value; "" without LUO
    frontend: str  # "v3" (global state machine) or "sessions"; "" without LUO
    luo: str  # native LUO handover format ("" without LUO)
    flb: str  # native FLB format; "" when the generation has no FLB component (v3)
    memfd: str  # native memfd format
    kho: str  # the KHO root format it needs; "" = whatever the KHO core has
    kho_core: str  # the KHO core it runs on; "" = any
    rules: str  # the uAPI behaviour rules of its kernel (kernel/luo/rules.py)
    files: tuple[str, ...] = ()  # native formats of its other file handlers (FILE_COMPONENTS)

    @property
    def enabled(self) -> bool:
        return bool(self.frontend)


LUO: dict[str, LuoGeneration] = {g.name: g for g in (
    LuoGeneration("none", "", "", "", "", "", "", "", ""),
    LuoGeneration("v3", "v3", "v3", "luo-v3", "", "memfd-fdt", "kho-v1", "6.19", "v3"),
    LuoGeneration("6.19", "6.19", "sessions", "luo-v1", "none", "memfd-v1", "kho-v1", "6.19",
                  "6.19"),
    LuoGeneration("7.0", "6.19", "sessions", "luo-v1", "luo-flb-v1", "memfd-v1", "kho-v1",
                  "6.19", "6.19"),
    LuoGeneration("7.1", "7.1", "sessions", "luo-v1", "luo-flb-v1", "memfd-v2", "kho-v3",
                  "7.1", "7.1"),
    LuoGeneration("7.2", "7.1", "sessions", "luo-v5", "luo-flb-v1", "memfd-v2", "kho-v4",
                  "7.1", "7.1"),
    LuoGeneration("7.3", "7.1", "sessions", "luo-v5", "luo-flb-v1", "memfd-v2", "kho-v4",
                  "7.3", "7.3"),  # its own rules (kernel/luo/rules.py Rules73)
    LuoGeneration("7.3+posted", "7.1", "sessions", "luo-v5", "luo-flb-v1", "memfd-v2",
                  "kho-v4", "7.3", "7.3", ("vfio-pci-v1", "iommufd-v1", "huge-memfd-v1")),
)}
LUO_GENERATIONS = tuple(LUO)
# what an image header's ``memfd`` field says for each memfd format (v3's FDT says memfd-v1)
MEMFD_COMPATIBLE = {"memfd-fdt": "memfd-v1", "memfd-v1": "memfd-v1", "memfd-v2": "memfd-v2"}


def luo_generation(name: str) -> LuoGeneration:
    try:
        return LUO[name]
    except KeyError:
        raise AbiError(msg=f"unknown LUO generation {name!r} (known: "
                       f"{', '.join(LUO)})") from None


@dataclass(frozen=True)
class Release:
    """A kernel generation as ``luoctl image create --generation`` makes it."""

    name: str
    release: str  # uname -r of our image
    kho: str  # root compatible
    bitmap_bytes: int
    kho_core: str
    luo: str  # LUO generation (:data:`LUO`)

    @property
    def memfd(self) -> str:
        """The image header's ``memfd`` field."""
        fmt = LUO[self.luo].memfd
        return MEMFD_COMPATIBLE[fmt] if fmt else ""

    @property
    def has_luo(self) -> bool:
        return LUO[self.luo].enabled


RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("6.16", "6.16.0-lu", "kho-v1", 512, "6.16", "none"),
    Release("6.18", "6.18.0-lu", "kho-v1", 4096, "6.18", "none"),
    Release("v3", "6.17.0-lu-v3", "kho-v1", 4096, "6.19", "v3"),
    Release("6.19", "6.19.0-lu", "kho-v1", 4096, "6.19", "6.19"),
    Release("7.0", "7.0.0-lu", "kho-v1", 4096, "6.19", "7.0"),
    Release("7.1", "7.1.0-lu", "kho-v3", 4096, "7.1", "7.1"),
    Release("7.2", "7.2.0-lu", "kho-v4", 4096, "7.1", "7.2"),
    Release("7.3", "7.3.0-lu", "kho-v4", 4096, "7.3", "7.3"),
    Release("7.3+posted", "7.3.0-lu-posted", "kho-v4", 4096, "7.3", "7.3+posted"),
)}
@dataclass(frozen=True)
class KhoCoreRow:
    """A KHO core as images name it (its behaviour is the kernel's ``kernel/kho/core.py``)."""

    name: str
    roots: tuple[str, ...]  # the root formats it writes (the stateless core's radix roots)
    bitmaps: tuple[int, ...]  # its bitmap widths, the default first
    release: str  # uname -r of an image of the bare core
    luo: str  # the LUO generation an image on this core gets unless told


KHO_CORES: dict[str, KhoCoreRow] = {c.name: c for c in (
    # 512-byte bitmaps only on 6.16: 6.17 without the stable fix
    KhoCoreRow("6.16", ("kho-v1",), (512, 4096), "6.16.0-lu", "none"),
    KhoCoreRow("6.18", ("kho-v1",), (4096,), "6.18.0-lu", "none"),
    KhoCoreRow("6.19", ("kho-v1",), (4096,), "6.19.0-lu", "6.19"),
    KhoCoreRow("7.1", ("kho-v3", "kho-v4"), (4096,), "7.1.0-lu", "6.19"),
    # 7.1's stateless core with 7.3.4's scratch sizing and test_kho (kernel/kho/core.py)
    KhoCoreRow("7.3", ("kho-v3", "kho-v4"), (4096,), "7.3.0-lu", "6.19"),
)}
# the core an image that names none runs on, by its root format and bitmap width
DEFAULT_CORE = {("kho-v1", 512): "6.16", ("kho-v1", 4096): "6.19", ("kho-v3", 4096): "7.1",
                ("kho-v4", 4096): "7.1"}


# the KHO formats whose root carries ``blob-size`` (a raw LUO blob needs it) and bitmap widths
SIZED_ROOTS = frozenset({"kho-v3", "kho-v4"})
SMALL_BITMAP = {"kho-v1": 512}  # the 6.16/6.17 bitmaps: a format of its own, same compatible


def kho_format(kho: str, bitmap_bytes: int) -> str:
    return f"{kho}-{bitmap_bytes}" if SMALL_BITMAP.get(kho) == bitmap_bytes else kho


def native(kho: str, bitmap_bytes: int, luo: str) -> dict[str, str]:
    """Per component, the one format a kernel writes and reads as Linux does; components the
    kernel has not (no LUO before 6.19, no FLB in v3) are absent."""
    g = luo_generation(luo)
    out = {"kho": kho_format(kho, bitmap_bytes)}
    out.update({c: f for c, f in (("luo", g.luo), ("flb", g.flb), ("memfd", g.memfd)) if f})
    out.update({COMPONENT_OF[f]: f for f in g.files})
    return out


def stands_alone(fmt: str) -> bool:
    """The v3 family (``luo-v3``, ``memfd-fdt``) shares nothing with mainline's formats."""
    return fmt in FAMILY_OF_ONE


def capable(kho: str, bitmap_bytes: int, luo: str) -> dict[str, tuple[str, ...]]:
    """Per component, every format the kernel's code reads and writes with negotiation on:
    its own and the older ones of its family."""
    nat = native(kho, bitmap_bytes, luo)
    out: dict[str, tuple[str, ...]] = {}
    for comp, fmt in nat.items():
        order = ORDER[comp]
        if stands_alone(fmt):
            out[comp] = (fmt,)
            continue
        low = sum(f in FAMILY_OF_ONE for f in order)
        out[comp] = order[low : order.index(fmt) + 1]
    return out


def newest(component: str, candidates: set[str] | frozenset[str]) -> str | None:
    order = ORDER[component]
    best = [f for f in order if f in candidates]
    return best[-1] if best else None


def check_manifest(reads: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """Validate a manifest from an image header (hostile bytes): known components, lists of
    known formats."""
    out: dict[str, tuple[str, ...]] = {}
    if not isinstance(reads, Mapping):
        raise AbiError(msg="image manifest 'reads' must be an object")
    for comp, fmts in reads.items():
        if comp not in ORDER:
            raise AbiError(msg=f"image manifest: unknown component {comp!r} (known: "
                           f"{', '.join(COMPONENTS)})")
        if not isinstance(fmts, list | tuple) or not all(isinstance(f, str) for f in fmts):
            raise AbiError(msg=f"image manifest: {comp} must list format names")
        bad = [f for f in fmts if f not in ORDER[comp]]
        if bad:
            raise AbiError(msg=f"image manifest: {comp} has unknown formats {bad} (known: "
                           f"{', '.join(ORDER[comp])})")
        out[comp] = tuple(fmts)
    return out


def agree(native: Mapping[str, str], can: Mapping[str, tuple[str, ...]],
          theirs: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Per component, the newest format the writer can write (``can``) and the reader reads
    (``theirs``), for the components the writer has (``native``) and the reader knows;
    ``luo-v5`` only over a kho-v3+ root. A component with nothing in common is left out for
    a file component (only files need it) and raises AbiError for ``kho`` and ``luo``."""
    out: dict[str, str] = {}
    for comp in COMPONENTS:
        if comp not in native or comp not in theirs:
            continue
        common = set(can[comp]) & set(theirs[comp])
        if KHO_COMPATIBLE.get(out.get("kho", "")) not in SIZED_ROOTS:
            common -= NEEDS_SIZED_ROOT  # a raw blob needs blob-size
        best = newest(comp, common)
        if best is None:
            if comp in FILE_COMPONENTS:
                continue
            raise AbiError(msg=f"the next kernel reads {'/'.join(theirs[comp]) or 'no'} "
                           f"{comp} format, this one writes {'/'.join(can[comp])}")
        out[comp] = best
    return out


def mode(agreed: Mapping[str, str], writer: Mapping[str, str],
         reader: Mapping[str, str]) -> str:
    """``native`` when every agreed format is both kernels' own (Linux would do the same),
    else ``negotiated``."""
    same = all(writer.get(c) == f == reader.get(c) for c, f in agreed.items())
    return "native" if same else "negotiated"


def describe(formats: Mapping[str, str]) -> str:
    """``kho kho-v1, luo luo-v1, ...``: how every tool shows a set of formats."""
    return ", ".join(f"{c} {f}" for c, f in formats.items())
