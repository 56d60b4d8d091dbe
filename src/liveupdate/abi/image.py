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
finalized and what debugfs shows (:mod:`liveupdate.kernel.kho_core`): ``6.16``, ``6.18``,
``6.19`` or ``7.1``; left empty it is the LUO generation's own (``7.1`` for 7.1, else
``6.19``). LUO generations fix their core: sessions need 6.19+ and LUO 7.1 the 7.1 core;
``v3`` runs on the 6.19 core (a deviation: the v3 series sat on 6.16's notifier core, where
LUO PREPARE was ``kho_finalize``); before 6.19 there is no LUO (``luo: "none"``). 512-byte
bitmaps exist only on the 6.16 core (6.17 without the stable fix).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass

from liveupdate.abi import formats
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError

MAGIC = b"LUKIMG01"
PREAMBLE = struct.Struct("<8sII")
MAX_HEADER = PAGE_SIZE - PREAMBLE.size
ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
KHO_FORMATS = ("kho-v1",)
KHO_CORES = ("6.16", "6.18", "6.19", "7.1")
LUO_GENERATIONS = formats.GENERATIONS
MEMFD_FORMATS = ("memfd-v1", "memfd-v2")


@dataclass(frozen=True)
class KernelImage:
    entry: str = "liveupdate.kernel.main"
    release: str = "6.19.0-lu"
    load_size: int = 32 << 20
    kho: str = "kho-v1"
    kho_bitmap_bytes: int = 4096
    luo: str = "6.19"
    memfd: str = "memfd-v1"
    kho_core: str = ""

    def __post_init__(self) -> None:
        if self.kho_core == "" and isinstance(self.luo, str):
            object.__setattr__(self, "kho_core", "7.1" if self.luo == "7.1" else "6.19")

    def validate(self) -> KernelImage:
        if not ENTRY_RE.match(self.entry) or not self.entry.startswith("liveupdate."):
            raise AbiError(msg=f"image entry {self.entry!r} is not a liveupdate module")
        if not 0 < self.load_size <= 1 << 32 or self.load_size % PAGE_SIZE:
            raise AbiError(msg=f"image load_size {self.load_size} is not a page multiple "
                           "up to 4 GiB")
        if self.kho not in KHO_FORMATS or self.kho_bitmap_bytes not in (4096, 512):
            raise AbiError(msg=f"image KHO format {self.kho}/{self.kho_bitmap_bytes} unsupported")
        if self.luo not in LUO_GENERATIONS or self.memfd not in MEMFD_FORMATS:
            raise AbiError(msg=f"image LUO generation {self.luo}/{self.memfd} unsupported")
        if self.kho_core not in KHO_CORES:
            raise AbiError(msg=f"image KHO core {self.kho_core!r} unsupported (known: "
                           f"{', '.join(KHO_CORES)})")
        cores = {"none": KHO_CORES, "v3": ("6.19",), "6.19": ("6.19",), "7.1": ("7.1",)}
        if self.kho_core not in cores[self.luo]:
            raise AbiError(msg=f"image LUO {self.luo} needs the KHO core of "
                           f"{' or '.join(cores[self.luo])}, not {self.kho_core}")
        if self.kho_bitmap_bytes == 512 and self.kho_core != "6.16":
            raise AbiError(msg=f"512-byte KHO bitmaps exist only on the 6.16 core, not "
                           f"{self.kho_core}")
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
                      ("kho_core", str)):
        if not isinstance(getattr(img, name), typ) or isinstance(getattr(img, name), bool):
            raise AbiError(msg=f"kernel image field {name} has the wrong type")
    return img.validate()
