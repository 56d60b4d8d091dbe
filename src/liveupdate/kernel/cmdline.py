"""The kernel command line: parameters as Linux parses them (kstrtobool, memparse,
``kho_scratch=``, ``reserve_mem=``)."""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

from liveupdate.errors import LiveUpdateError

_SUFFIX = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def kstrtobool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "y", "yes", "on", "true"):
        return True
    if v in ("0", "n", "no", "off", "false"):
        return False
    raise LiveUpdateError(err=errno.EINVAL, msg=f"{value!r} is not a boolean")


def memparse(value: str) -> int:
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)([KMGTPEkmgtpe]?)", value.strip())
    if not m:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"{value!r} is not a size")
    n = int(m.group(1), 0)
    return n << _SUFFIX[m.group(2).upper()] if m.group(2) else n


@dataclass(frozen=True)
class ScratchSizes:
    scale: int = 200  # percent; 0 when explicit sizes are given
    lowmem: int = 0
    global_: int = 0
    pernode: int = 0


def parse_kho_scratch(value: str) -> ScratchSizes:
    """``kho_scratch=N%`` or ``kho_scratch=lowmem,global,pernode`` (memparse sizes)."""
    if value.endswith("%"):
        digits = value[:-1]
        if not digits.isdigit() or len(digits) > 10:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: bad percentage")
        return ScratchSizes(scale=int(digits))
    parts = value.split(",")
    if len(parts) != 3:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: need L,G,P")
    lo, gl, pn = (memparse(p) for p in parts)
    if lo + gl + pn == 0:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: all sizes are zero")
    return ScratchSizes(0, lo, gl, pn)


@dataclass(frozen=True)
class ReserveMem:
    size: int
    align: int
    name: str


def parse_reserve_mem(value: str) -> ReserveMem:
    """``reserve_mem=size:align:name``."""
    parts = value.split(":")
    if len(parts) != 3 or not parts[2] or len(parts[2]) > 15:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"reserve_mem={value}: need size:align:name")
    size, align = memparse(parts[0]), memparse(parts[1])
    if size == 0 or align & (align - 1):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"reserve_mem={value}: bad size or alignment")
    return ReserveMem(size, max(align, 1), parts[2])


@dataclass
class Cmdline:
    raw: str
    params: dict[str, str] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str) -> Cmdline:
        c = cls(raw)
        for word in raw.split():
            key, _, value = word.partition("=")
            c.params[key] = value
            c.multi.setdefault(key, []).append(value)
        return c

    def flag(self, key: str, default: bool = False) -> bool:
        if key not in self.params:
            return default
        return kstrtobool(self.params[key] or "1")

    def get(self, key: str, default: str = "") -> str:
        return self.params.get(key, default)
