"""The kernel command line, parsed as Linux parses it -- and never fatal.

``kstrtobool`` (the first character decides: y/Y/t/T/1, n/N/f/F/0, and o/O needs the second:
on/off), ``memparse`` (``simple_strtoull`` with base 0 -- ``0x`` hex, a leading ``0`` octal --
then one K/M/G/T/P/E suffix; it parses what it can and says how far it got). Linux never dies
on a malformed early option: it prints ``Malformed early option '<name>'`` and keeps the
default -- so does :meth:`Cmdline.flag`, and every parser here raises only LiveUpdateError,
which its caller logs the same way. A bare word (``kho`` without ``=``) gives the option's
handler no value: malformed, default kept.

Pure rules, no state: the emulated kernel (:mod:`liveupdate.kernel.cmdline` adds the
options only it parses) and userspace reading ``/proc/cmdline`` (luod) share them.
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
