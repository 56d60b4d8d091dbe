"""The kernel command line, parsed as Linux parses it -- and never fatal.

``kstrtobool`` (the first character decides: y/Y/t/T/1, n/N/f/F/0, and o/O needs the second:
on/off), ``memparse`` (``simple_strtoull`` with base 0 -- ``0x`` hex, a leading ``0`` octal --
then one K/M/G/T/P/E suffix; it parses what it can and says how far it got),
``kho_scratch=`` as upstream ``kho_parse_scratch_size`` (``N%`` through ``kstrtouint``: more
than 10 characters is EINVAL, overflow ERANGE; or three memparse sizes separated by commas),
``reserve_mem=size:align:name``. Linux never dies on a malformed early option: it prints
``Malformed early option '<name>'`` and keeps the default -- so does :meth:`Cmdline.flag`,
and every parser here raises only LiveUpdateError, which its caller logs the same way. A bare
word (``kho`` without ``=``) gives the option's handler no value: malformed, default kept.
"""

from __future__ import annotations

import errno
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from liveupdate.errors import LiveUpdateError

_SUFFIX = {"K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def kstrtobool(value: str | None) -> bool | None:
    """Linux ``kstrtobool``: None where Linux returns -EINVAL."""
    if not value:
        return None
    c = value[0]
    if c in "yYtT1":
        return True
    if c in "nNfF0":
        return False
    if c in "oO" and len(value) > 1:
        if value[1] in "nN":
            return True
        if value[1] in "fF":
            return False
    return None


def memparse(value: str) -> tuple[int, int]:
    """Linux ``memparse``: (the number, how many characters it consumed; 0 = no number)."""
    i, base = 0, 10
    if value[:2].lower() == "0x" and len(value) > 2 and value[2] in string.hexdigits:
        i, base = 2, 16
    elif value[:1] == "0":
        base = 8
    digits = "0123456789abcdef"[:base]
    j = i
    while j < len(value) and value[j].lower() in digits:
        j += 1
    if j == i:
        return 0, 0
    n = int(value[i:j], base)
    shift = _SUFFIX.get(value[j : j + 1].upper())
    if shift is not None:
        n, j = n << shift, j + 1
    return n & ((1 << 64) - 1), j


def size_option(value: str, name: str) -> int:
    """A whole-value memparse size; EINVAL when anything is left over or nothing parsed."""
    n, used = memparse(value)
    if used == 0 or used != len(value):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"{name}={value}: not a size")
    return n


@dataclass(frozen=True)
class ScratchSizes:
    scale: int = 200  # percent; 0 when explicit sizes are given
    lowmem: int = 0
    global_: int = 0
    pernode: int = 0


def parse_kho_scratch(value: str) -> ScratchSizes:
    """``kho_scratch=N%`` or ``kho_scratch=lowmem,global,pernode``: upstream
    ``kho_parse_scratch_size``'s rules and errnos as of 6.19 (any one size may be 0, not all;
    the string must be consumed whole -- 6.16 refused each zero and ignored trailing text)."""
    if not value:
        raise LiveUpdateError(err=errno.EINVAL, msg="kho_scratch: no value")
    if value.endswith("%"):
        digits = value[:-1]
        if len(value) > 11 or not digits or not digits.isascii() or not digits.isdigit():
            raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: bad percentage")
        if int(digits) > 0xFFFFFFFF:
            raise LiveUpdateError(err=errno.ERANGE, msg=f"kho_scratch={value}: out of range")
        return ScratchSizes(scale=int(digits))
    sizes, pos = [], 0
    for i in range(3):
        if i:
            if value[pos : pos + 1] != ",":
                raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: need L,G,P")
            pos += 1
        n, used = memparse(value[pos:])
        if used == 0:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: need L,G,P")
        sizes.append(n)
        pos += used
    if not any(sizes) or pos != len(value):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_scratch={value}: need L,G,P, not all 0")
    return ScratchSizes(0, *sizes)


@dataclass(frozen=True)
class ReserveMem:
    size: int
    align: int
    name: str


def parse_reserve_mem(value: str) -> ReserveMem:
    """``reserve_mem=size:align:name`` as upstream ``reserve_mem`` parses it: the name is the
    rest of the string (1-15 characters, not all blank). Stricter where the allocator would
    misbehave: the alignment must be a power of two (or 0) and the size at most 2^48."""
    parts = value.split(":", 2)
    if len(parts) != 3 or not parts[2].strip() or len(parts[2]) > 15:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"reserve_mem={value}: need size:align:name")
    size, align = size_option(parts[0], "reserve_mem"), size_option(parts[1], "reserve_mem")
    if size == 0 or align & (align - 1) or size > 1 << 48:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"reserve_mem={value}: bad size or alignment")
    return ReserveMem(size, align, parts[2])


@dataclass
class Cmdline:
    raw: str
    params: dict[str, str] = field(default_factory=dict)
    multi: dict[str, list[str]] = field(default_factory=dict)
    bare: set[str] = field(default_factory=set)  # words without "=": no value
    warn: Callable[[str], None] | None = None
    malformed: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: str, warn: Callable[[str], None] | None = None) -> Cmdline:
        c = cls(raw, warn=warn)
        for word in raw.split():
            key, eq, value = word.partition("=")
            c.params[key] = value
            c.multi.setdefault(key, []).append(value)
            if not eq:
                c.bare.add(key)
        return c

    def malformed_option(self, key: str) -> None:
        """Linux's ``do_early_param``: say so once, keep the default."""
        if key not in self.malformed:
            self.malformed.append(key)
            if self.warn is not None:
                self.warn(f"Malformed early option '{key}'")

    def flag(self, key: str, default: bool = False) -> bool:
        if key not in self.params:
            return default
        value = None if key in self.bare else kstrtobool(self.params[key])
        if value is None:
            self.malformed_option(key)
            return default
        return value

    def get(self, key: str, default: str = "") -> str:
        return self.params.get(key, default)
