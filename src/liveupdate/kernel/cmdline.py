"""The options only the kernel parses, on top of :mod:`liveupdate.abi.cmdline` (Linux's
``kstrtobool``/``memparse`` rules and the :class:`~liveupdate.abi.cmdline.Cmdline` itself):
``kho_scratch=`` as upstream ``kho_parse_scratch_size`` (``N%`` through ``kstrtouint``: more
than 10 characters is EINVAL, overflow ERANGE; or three memparse sizes separated by commas),
``reserve_mem=size:align:name``. Every parser raises only LiveUpdateError; its caller logs it
as Linux's ``Malformed early option`` and keeps the default.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from liveupdate.abi.cmdline import memparse, size_option
from liveupdate.errors import LiveUpdateError


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
