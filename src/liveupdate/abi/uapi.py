"""The LUO userspace ABI of every generation (spec/luo.md sections 1, 2).

All ioctls are ``_IO(0xBA, nr)`` -- no size or direction bits -- so numbers collide across
generations (0xBA00 is FD_PRESERVE in v3, GET_STATE in v4, CREATE_SESSION in 6.19). A kernel
speaks exactly one :class:`Gen`; userspace must know which before its first ioctl.

Every struct starts with ``u32 size``. The size rules are one helper,
:func:`copy_struct_from_user`: shorter than the minimum is EINVAL, bytes past what the kernel
knows must be zero (E2BIG), a shorter struct is zero-extended. :func:`lookup` applies the
dispatcher's checks in the kernel's order: number out of the table (EINVAL, not ENOTTY), then
a number that is in range but not exactly the table's (ENOTTY), then the size rules.

v3's ``GET_FD_STATE`` is coded as first posted, read in the v3 patch mail and its review (``{u32
size; u8 incoming; u64 token; u32 state}`` with natural alignment = 24 bytes); review asked for
explicit zero-checked padding, so we require the padding bytes to be zero (EINVAL) -- a
deliberate, documented difference.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from liveupdate.errors import AbiError

LIVEUPDATE_IOCTL_TYPE = 0xBA
SESSION_NAME_LENGTH = 64
V4_CREATE_NAME_LENGTH = 56
SESSION_CMD_BASE = 0x40


def _io(nr: int, type_: int = LIVEUPDATE_IOCTL_TYPE) -> int:
    return (type_ << 8) | nr


class Gen(StrEnum):
    """A uAPI generation; a kernel speaks exactly one."""

    V3 = "v3"
    V4 = "v4"
    V6_19 = "6.19"
    V7_1 = "7.1"


class State(IntEnum):
    UNDEFINED = 0
    NORMAL = 1
    PREPARED = 2
    FROZEN = 3
    UPDATED = 4


class Event(IntEnum):
    PREPARE = 0
    FREEZE = 1
    FINISH = 2
    CANCEL = 3


class Target(StrEnum):
    DEVICE = "/dev/liveupdate"
    SESSION = "session"


@dataclass(frozen=True)
class Ioctl:
    name: str
    nr: int
    target: Target
    layout: str  # struct format after "<"
    fields: tuple[str, ...]  # one name per non-pad item, "size" first
    fd_in: tuple[str, ...] = ()
    fd_out: tuple[str, ...] = ()
    zero_pad: bool = False  # padding bytes must be zero (EINVAL)
    min_end: str = ""  # the field whose end is min_size (offsetofend); "" = the whole struct

    @property
    def number(self) -> int:
        return _io(self.nr)

    @property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + self.layout)

    @property
    def size(self) -> int:
        return self.struct.size

    @property
    def min_size(self) -> int:
        """The dispatcher table's ``min_size``: ``offsetofend(last mandatory field)``."""
        if not self.min_end:
            return self.size
        layout, n = "", 0
        for code in self._codes_with_pad():
            layout += code
            if not code.endswith("x"):
                n += 1
                if self.fields[n - 1] == self.min_end:
                    return struct.calcsize("<" + layout)
        raise AbiError(msg=f"{self.name}: no field {self.min_end}")

    def _codes_with_pad(self) -> list[str]:
        out, num = [], ""
        for ch in self.layout:
            if ch.isdigit():
                num += ch
                continue
            out.append(num + ch)
            num = ""
        return out

    def _field_span(self, name: str) -> tuple[int, str]:
        """(offset, struct code) of a field."""
        pos, n = 0, 0
        for code in self._codes_with_pad():
            if not code.endswith("x"):
                if self.fields[n] == name:
                    return pos, code
                n += 1
            pos += struct.calcsize("<" + code)
        raise AbiError(msg=f"{self.name}: no field {name}")

    def field(self, raw: bytes, name: str) -> int:
        """An integer field read from user bytes (0 where the bytes are too short)."""
        off, code = self._field_span(name)
        size = struct.calcsize("<" + code)
        if len(raw) < off + size:
            return 0
        value: int = struct.unpack_from("<" + code, raw, off)[0]
        return value

    def field_end(self, name: str) -> int:
        off, code = self._field_span(name)
        return off + struct.calcsize("<" + code)

    def set_field(self, buf: bytearray, name: str, value: int) -> None:
        off, code = self._field_span(name)
        struct.pack_into("<" + code, buf, off, value)

    def pack(self, **values: Any) -> bytes:
        values.setdefault("size", self.size)
        unknown = set(values) - set(self.fields)
        if unknown:
            raise AbiError(msg=f"{self.name}: no field {sorted(unknown)[0]}")
        args = []
        for f in self.fields:
            v = values.get(f, b"" if self._is_bytes(f) else 0)
            if isinstance(v, str):
                v = v.encode()
            args.append(v)
        try:
            return self.struct.pack(*args)
        except struct.error as e:
            raise AbiError(msg=f"{self.name}: {e}") from e

    def unpack(self, raw: bytes) -> dict[str, Any]:
        if len(raw) != self.size:
            raise AbiError(msg=f"{self.name}: {len(raw)} bytes, not {self.size}")
        if self.zero_pad and any(raw[i] for i in self._pad_offsets()):
            raise AbiError(msg=f"{self.name}: padding bytes must be zero")
        return dict(zip(self.fields, self.struct.unpack(raw), strict=True))

    def _is_bytes(self, field: str) -> bool:
        return self._codes()[self.fields.index(field)].endswith("s")

    def _codes(self) -> list[str]:
        return [c for c in self._codes_with_pad() if not c.endswith("x")]

    def _pad_offsets(self) -> list[int]:
        offsets: list[int] = []
        pos = 0
        for code in self._codes_with_pad():
            width = struct.calcsize("<" + code)
            if code.endswith("x"):
                offsets.extend(range(pos, pos + width))
            pos += width
        return offsets

D, S = Target.DEVICE, Target.SESSION
_V3 = (
    Ioctl("FD_PRESERVE", 0x00, D, "IiQ", ("size", "fd", "token"), fd_in=("fd",)),
    Ioctl("FD_UNPRESERVE", 0x01, D, "I4xQ", ("size", "token")),
    Ioctl("FD_RESTORE", 0x02, D, "IiQ", ("size", "fd", "token"), fd_out=("fd",)),
    Ioctl("GET_STATE", 0x03, D, "II", ("size", "state")),
    Ioctl("SET_EVENT", 0x04, D, "II", ("size", "event")),
    Ioctl("GET_FD_STATE", 0x05, D, "IB3xQI4x", ("size", "incoming", "token", "state"),
          zero_pad=True, min_end="token"),  # v3 table: offsetofend(..., token) = 16
    Ioctl("SET_FD_EVENT", 0x06, D, "IIQ", ("size", "event", "token")),
)
_V4 = (
    Ioctl("GET_STATE", 0x00, D, "II", ("size", "state")),
    Ioctl("SET_EVENT", 0x01, D, "II", ("size", "event")),
    Ioctl("CREATE_SESSION", 0x02, D, f"Ii{V4_CREATE_NAME_LENGTH}s", ("size", "fd", "name"),
          fd_out=("fd",)),
    Ioctl("RETRIEVE_SESSION", 0x03, D, "Ii64s", ("size", "fd", "name"), fd_out=("fd",)),
    Ioctl("SESSION_PRESERVE_FD", 0x40, S, "IiQ", ("size", "fd", "token"), fd_in=("fd",)),
    Ioctl("SESSION_UNPRESERVE_FD", 0x41, S, "IIQ", ("size", "reserved", "token")),
    Ioctl("SESSION_RESTORE_FD", 0x42, S, "IiQ", ("size", "fd", "token"), fd_out=("fd",)),
    Ioctl("SESSION_GET_STATE", 0x43, S, "IB3sI", ("size", "incoming", "reserved", "state")),
    Ioctl("SESSION_SET_EVENT", 0x44, S, "II", ("size", "event")),
)
_MAINLINE = (
    Ioctl("CREATE_SESSION", 0x00, D, "Ii64s", ("size", "fd", "name"), fd_out=("fd",)),
    Ioctl("RETRIEVE_SESSION", 0x01, D, "Ii64s", ("size", "fd", "name"), fd_out=("fd",)),
    Ioctl("SESSION_PRESERVE_FD", 0x40, S, "IiQ", ("size", "fd", "token"), fd_in=("fd",)),
    Ioctl("SESSION_RETRIEVE_FD", 0x41, S, "IiQ", ("size", "fd", "token"), fd_out=("fd",)),
    Ioctl("SESSION_FINISH", 0x42, S, "II", ("size", "reserved")),
)
_GET_NAME = Ioctl("SESSION_GET_NAME", 0x43, S, "II64s", ("size", "reserved", "name"))
TABLES: dict[Gen, tuple[Ioctl, ...]] = {
    Gen.V3: _V3,
    Gen.V4: _V4,
    Gen.V6_19: _MAINLINE,
    Gen.V7_1: (*_MAINLINE, _GET_NAME),
}


def table(gen: Gen, target: Target) -> tuple[Ioctl, ...]:
    return tuple(i for i in TABLES[gen] if i.target == target)


def ioctl(gen: Gen, name: str) -> Ioctl:
    for i in TABLES[gen]:
        if i.name == name:
            return i
    raise AbiError(msg=f"generation {gen} has no ioctl {name}", err=errno.ENOTTY)


def entry_for(gen: Gen, cmd: int) -> Ioctl | None:
    """The table entry whose number is exactly ``cmd`` (for userspace fd translation)."""
    return next((i for i in TABLES[gen] if i.number == cmd), None)


def copy_struct_from_user(ksize: int, min_size: int, user: bytes) -> bytes:
    """The kernel's size rules: EINVAL below ``min_size``, E2BIG for a non-zero tail past
    ``ksize``, zero-extension of a shorter struct."""
    if len(user) < min_size:
        raise AbiError(msg=f"struct of {len(user)} bytes is shorter than {min_size}")
    if len(user) > ksize:
        if any(user[ksize:]):
            raise AbiError(msg=f"non-zero bytes past the {ksize} the kernel knows", err=errno.E2BIG)
        return bytes(user[:ksize])
    return bytes(user) + bytes(ksize - len(user))


def lookup(gen: Gen, target: Target, cmd: int, arg: bytes,
           before_size: Callable[[Ioctl], None] | None = None,
           ) -> tuple[Ioctl, dict[str, Any]]:
    """Resolve an ioctl as the LUO dispatcher does and decode its argument struct.

    ``arg`` is what userspace passed (its first u32 is the size it claims). Returns the table
    entry and the decoded kernel-sized struct. ``before_size`` runs once the number is known
    to be the table's, before the size rules (7.3's session direction check).
    """
    tab = table(gen, target)
    nr = cmd & 0xFF
    entry = next((i for i in tab if i.nr == nr), None)
    if entry is None:
        raise AbiError(msg=f"ioctl nr {nr:#x} is not a {target} command of LUO {gen}")
    if len(arg) < 4:
        raise AbiError(msg="ioctl argument too short to hold its size", err=errno.EFAULT)
    if cmd != entry.number:
        raise AbiError(
            msg=f"ioctl {cmd:#x} is not {entry.name} ({entry.number:#x})", err=errno.ENOTTY)
    if before_size is not None:
        before_size(entry)
    (size,) = struct.unpack_from("<I", arg)
    if size > len(arg):
        raise AbiError(msg=f"size {size} exceeds the {len(arg)}-byte buffer", err=errno.EFAULT)
    data = copy_struct_from_user(entry.size, entry.min_size, arg[:size])
    return entry, entry.unpack(data)


NAME_ERRORS = "surrogateescape"  # a name's bytes as a str and back, whatever they are


def session_name(raw: bytes, *, strict: bool) -> str:
    """A session name field. ``strict`` is 7.3 (EINVAL for empty or unterminated); otherwise
    6.19's ``strscpy`` truncation to 63 bytes. Names are bytes to Linux (any byte but NUL):
    bytes that are not UTF-8 are kept through ``surrogateescape`` (:data:`NAME_ERRORS`), so
    the name written to the handover and returned by GET_NAME is the same bytes."""
    if b"\0" in raw:
        raw = raw[: raw.index(b"\0")]
    elif strict:
        raise AbiError(msg="session name is not NUL-terminated")
    else:
        raw = raw[: SESSION_NAME_LENGTH - 1]
    if strict and not raw:
        raise AbiError(msg="session name is empty")
    return raw.decode("utf-8", NAME_ERRORS)
