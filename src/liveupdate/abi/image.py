"""Kernel image files of the emulated machine (our own format; Linux has none to copy).

An image is what ``kexec_file_load`` reads and the firmware loads: a 16-byte preamble
``"LUKIMG01" | u32 header_len | u32 0`` then a UTF-8 JSON header::

    {"entry": "liveupdate.kernel.main", "release": "6.19.0-lu", "load_size": 33554432,
     "kho": "kho-v1", "kho_bitmap_bytes": 4096, "kho_core": "6.19", "luo": "6.19",
     "memfd": "memfd-v1"}

``entry`` names the Python module that is the kernel's code; ``load_size`` is the memory the
image occupies once loaded (its "text + data + bss"): the loader reserves that much, so scratch
sizing behaves as in Linux. At the jump the machine reads this header back *from RAM* at the
entry address, never from the file.

``kho_core`` is the Linux release whose KHO core the kernel follows -- when the memory map is
finalized and what debugfs shows (:mod:`liveupdate.kernel.kho.core`): ``6.16``, ``6.18``,
``6.19`` or ``7.1`` (stateless; 7.2 keeps it). ``kho`` is the root format: ``kho-v1`` on the
6.16-6.19 cores, ``kho-v3`` (7.1) or ``kho-v4`` (7.2) on the stateless one. Empty fields are
the LUO generation's own (:mod:`liveupdate.abi.generations`): LUO 6.19/7.0 and ``v3`` need
kho-v1 (``v3`` runs on the 6.19 core, a deviation: the v3 series sat on 6.16's notifier core,
where LUO PREPARE was ``kho_finalize``), 7.1 kho-v3, 7.2 kho-v4; before 6.19 there is no LUO
(``luo: "none"``). 512-byte bitmaps exist only on the 6.16 core (6.17 without the stable fix).

``reads`` is the image's manifest for negotiation (an extension, see
:mod:`liveupdate.kernel.negotiate`): per component the formats the kernel claims to read.
Empty means what its code reads (``generations.capable``); a header may claim anything, and
the next kernel's own validation catches a lie.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import TypeGuard

from liveupdate.abi import generations
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError

MAGIC = b"LUKIMG01"
PREAMBLE = struct.Struct("<8sII")
MAX_HEADER = PAGE_SIZE - PREAMBLE.size
ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_entry(entry: object) -> TypeGuard[str]:
    """A module name an image may give as its kernel's code: one of ours."""
    return isinstance(entry, str) and bool(ENTRY_RE.match(entry)) and \
        entry.startswith("liveupdate.")


KHO_FORMATS = ("kho-v1", "kho-v3", "kho-v4")
LUO_GENERATIONS = generations.LUO_GENERATIONS
MEMFD_FORMATS = tuple(dict.fromkeys(generations.MEMFD_COMPATIBLE.values()))


def _core_of(kho: str, bitmap_bytes: int) -> str:
    return generations.DEFAULT_CORE.get((kho, bitmap_bytes), "6.19")


@dataclass(frozen=True)
class KernelImage:
    entry: str = "liveupdate.kernel.main"
    release: str = "6.19.0-lu"
    load_size: int = 32 << 20
    kho: str = ""
    kho_bitmap_bytes: int = 4096
    luo: str = "6.19"
    memfd: str = ""
    kho_core: str = ""
    reads: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.luo, str) or not isinstance(self.kho_core, str):
            return  # decode() reports the wrong type
        g = generations.LUO.get(self.luo)
        if self.kho == "":
            core = generations.KHO_CORES.get(self.kho_core)
            object.__setattr__(self, "kho", (g.kho if g else "") or (
                core.roots[0] if core else "kho-v1"))
        if self.memfd == "":
            memfd = generations.MEMFD_COMPATIBLE.get(g.memfd, "") if g else ""
            object.__setattr__(self, "memfd", memfd)
        if self.kho_core == "":
            object.__setattr__(self, "kho_core", _core_of(self.kho, self.kho_bitmap_bytes))

    @classmethod
    def of(cls, generation: str, **over: object) -> KernelImage:
        """The image of a kernel generation (``generations.RELEASES``)."""
        try:
            r = generations.RELEASES[generation]
        except KeyError:
            raise AbiError(msg=f"unknown kernel generation {generation!r} (known: "
                           f"{', '.join(generations.RELEASES)})") from None
        base: dict[str, object] = {"release": r.release, "kho": r.kho,
                                   "kho_bitmap_bytes": r.bitmap_bytes, "kho_core": r.kho_core,
                                   "luo": r.luo, "memfd": r.memfd}
        return cls(**{**base, **over})  # type: ignore[arg-type]

    @property
    def generation(self) -> str:
        """The generation this image is, or "custom"."""
        for name, r in generations.RELEASES.items():
            if (r.kho, r.bitmap_bytes, r.kho_core, r.luo) == (
                    self.kho, self.kho_bitmap_bytes, self.kho_core, self.luo):
                return name
        return "custom"

    @property
    def luo_gen(self) -> generations.LuoGeneration:
        """The LUO generation row the kernel of this image builds its LUO from."""
        return generations.luo_generation(self.luo)

    def native(self) -> dict[str, str]:
        return generations.native(self.kho, self.kho_bitmap_bytes, self.luo)

    def capable(self) -> dict[str, tuple[str, ...]]:
        return generations.capable(self.kho, self.kho_bitmap_bytes, self.luo)

    def manifest(self) -> dict[str, tuple[str, ...]]:
        """What the image claims to read: its ``reads`` where given, else what it can -- for
        the components it has (a kernel without LUO claims no LUO format: its header says
        ``luo: none``)."""
        claims = generations.check_manifest(self.reads)
        return {c: claims.get(c, fmts) for c, fmts in self.capable().items()}

    def reads_for(self, negotiating: bool) -> dict[str, tuple[str, ...]]:
        """What the kernel says it will read: its manifest when booted with
        ``liveupdate_negotiate=on``, else its native formats only."""
        if negotiating:
            return self.manifest()
        return {c: (f,) for c, f in self.native().items()}

    def validate(self) -> KernelImage:
        if not is_entry(self.entry):
            raise AbiError(msg=f"image entry {self.entry!r} is not a liveupdate module")
        if not 0 < self.load_size <= 1 << 32 or self.load_size % PAGE_SIZE:
            raise AbiError(msg=f"image load_size {self.load_size} is not a page multiple "
                           "up to 4 GiB")
        if self.kho not in KHO_FORMATS or self.kho_bitmap_bytes not in (4096, 512):
            raise AbiError(msg=f"image KHO format {self.kho}/{self.kho_bitmap_bytes} unsupported")
        if self.luo not in LUO_GENERATIONS:
            raise AbiError(msg=f"image LUO generation {self.luo!r} unsupported (known: "
                           f"{', '.join(LUO_GENERATIONS)})")
        g = generations.LUO[self.luo]
        want_memfd = generations.MEMFD_COMPATIBLE.get(g.memfd)
        ok = self.memfd == want_memfd if want_memfd else self.memfd in ("", *MEMFD_FORMATS)
        if not ok:
            raise AbiError(msg=f"image LUO {self.luo} uses {want_memfd or 'no memfd format'},"
                           f" not {self.memfd!r}")
        if self.kho_core not in generations.KHO_CORES:
            raise AbiError(msg=f"image KHO core {self.kho_core!r} unsupported (known: "
                           f"{', '.join(generations.KHO_CORES)})")
        if g.kho and self.kho != g.kho:
            raise AbiError(msg=f"image LUO {self.luo} needs the KHO format {g.kho}, not "
                           f"{self.kho}")
        core = generations.KHO_CORES[self.kho_core]
        if self.kho not in core.roots:
            owner = _core_of(self.kho, 4096)
            raise AbiError(msg=f"image KHO format {self.kho} does not run on the "
                           f"{self.kho_core} core (only the {owner} core writes it)")
        if g.kho_core and self.kho_core != g.kho_core:
            raise AbiError(msg=f"image LUO {self.luo} needs the KHO core of {g.kho_core}, not "
                           f"{self.kho_core}")
        generations.check_manifest(self.reads)
        if self.kho_bitmap_bytes not in core.bitmaps:
            raise AbiError(msg=f"{self.kho_bitmap_bytes}-byte KHO bitmaps do not exist on the "
                           f"{self.kho_core} core")
        if not self.release or len(self.release) > 64:
            raise AbiError(msg="image release must be 1-64 characters")
        return self

    def encode(self) -> bytes:
        self.validate()
        head = json.dumps(asdict(self), sort_keys=True).encode()
        return PREAMBLE.pack(MAGIC, len(head), 0) + head


def decode(raw: bytes) -> KernelImage:
    if len(raw) < PREAMBLE.size:
        raise AbiError(msg="kernel image shorter than its preamble")
    magic, n, zero = PREAMBLE.unpack_from(raw)
    if magic != MAGIC or zero:
        raise AbiError(msg="not a liveupdate kernel image (bad magic)")
    if n > MAX_HEADER or PREAMBLE.size + n > len(raw):
        raise AbiError(msg=f"kernel image header length {n} is out of bounds")
    try:
        fields = json.loads(raw[PREAMBLE.size : PREAMBLE.size + n])
        img = KernelImage(**fields)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise AbiError(msg=f"kernel image header is malformed: {e}") from e
    for name, typ in (("entry", str), ("release", str), ("load_size", int), ("kho", str),
                      ("kho_bitmap_bytes", int), ("luo", str), ("memfd", str),
                      ("kho_core", str), ("reads", dict)):
        if not isinstance(getattr(img, name), typ) or isinstance(getattr(img, name), bool):
            raise AbiError(msg=f"kernel image field {name} has the wrong type")
    return img.validate()
