"""The VMM's saved state, described as data: QEMU's ``VMStateDescription`` (name, version,
minimum version, fields) in small.

What the VMM writes into its preserved state memfd at freeze -- and what live migration and
device state (coming) will write the same way -- is a list of **sections**, each described
once by a :class:`Section`: its name, the version this VMM writes, the oldest version it can
still read (``minimum_version``, as QEMU's ``minimum_version_id``), its fields with their
kinds, and whether a reader must understand it (``required``; a device section is required:
a VM whose device state is dropped is not the same VM). The record is::

    b"LUVMSTAT"  u16 format version  u16 0  u32 payload length  u32 CRC-32 of the payload
    payload: UTF-8 JSON {"sections": [{"name", "version", "required", "fields": {...}}, ...]}

zero-padded to the memfd's size. The reader treats it as hostile: every mismatch is one
AbiError naming the section and field -- a bad magic, a newer format, a section newer than
this VMM or older than its minimum, an unknown section that is required, a field of the
wrong kind. An unknown optional section is skipped (like QEMU's ``needed`` subsections).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from liveupdate.errors import AbiError

MAGIC = b"LUVMSTAT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHII")

_U64 = 1 << 64


def _u64(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _U64


KINDS: dict[str, Callable[[Any], bool]] = {  # a field's kind -> its check
    "u64": _u64,
    "f64": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "u64[]": lambda v: isinstance(v, list) and all(_u64(x) for x in v),
    "u64{}": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _u64(x)
                                                   for k, x in v.items()),
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # a key of KINDS
    since: int = 1  # the section version that added it: older records lack it


@dataclass(frozen=True)
class Section:
    name: str
    version: int
    minimum_version: int
    fields: tuple[Field, ...]
    required: bool = True

    def encode(self, values: dict[str, Any]) -> dict[str, Any]:
        missing = [f.name for f in self.fields if f.name not in values]
        if missing:
            raise AbiError(msg=f"vm state: section {self.name} lacks {', '.join(missing)}")
        return {"name": self.name, "version": self.version, "required": self.required,
                "fields": {f.name: values[f.name] for f in self.fields}}

    def decode(self, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        if version > self.version:
            raise AbiError(msg=f"vm state: section {self.name} version {version} is newer "
                           f"than this VMM's {self.version}")
        if version < self.minimum_version:
            raise AbiError(msg=f"vm state: section {self.name} version {version} is older "
                           f"than the oldest this VMM reads ({self.minimum_version})")
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.since > version:
                continue
            if f.name not in fields or not KINDS[f.kind](fields[f.name]):
                raise AbiError(msg=f"vm state: section {self.name} field {f.name} is not "
                               f"a {f.kind}")
            out[f.name] = fields[f.name]
        return out


@dataclass(frozen=True)
class Description:
    """The sections one kind of VM saves (a device adds its section here)."""

    sections: tuple[Section, ...]

    def encode(self, values: dict[str, dict[str, Any]], size: int) -> bytes:
        payload = json.dumps({"sections": [s.encode(values[s.name]) for s in self.sections
                                           if s.name in values or s.required]},
                             separators=(",", ":")).encode()
        if HEADER.size + len(payload) > size:
            raise AbiError(msg=f"vm state of {len(payload)} bytes does not fit {size}")
        return (HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), zlib.crc32(payload))
                + payload).ljust(size, b"\0")

    def decode(self, raw: bytes) -> dict[str, dict[str, Any]]:
        """Section name -> its fields; AbiError (EINVAL) for anything this VMM cannot use."""
        if len(raw) < HEADER.size:
            raise AbiError(msg="vm state: shorter than its header")
        magic, version, _zero, n, crc = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise AbiError(msg="vm state: bad magic (not a saved VM state)")
        if version != FORMAT_VERSION:
            raise AbiError(msg=f"vm state: format version {version}, this VMM reads "
                           f"{FORMAT_VERSION}")
        payload = raw[HEADER.size : HEADER.size + n]
        if len(payload) != n or zlib.crc32(payload) != crc:
            raise AbiError(msg="vm state: length or checksum mismatch")
        try:
            entries = json.loads(payload)["sections"]
            if not isinstance(entries, list):
                raise TypeError("sections is not a list")
            known = {s.name: s for s in self.sections}
            out: dict[str, dict[str, Any]] = {}
            for e in entries:
                name, ver, fields = str(e["name"]), e["version"], e["fields"]
                if not _u64(ver) or not isinstance(fields, dict):
                    raise TypeError(f"section {name}: bad version or fields")
                section = known.get(name)
                if section is None:
                    if e.get("required", True):
                        raise AbiError(msg=f"vm state: required section {name!r} (version "
                                       f"{ver}) is unknown to this VMM")
                    continue
                out[name] = section.decode(ver, fields)
        except (ValueError, KeyError, TypeError) as e:
            raise AbiError(msg=f"vm state: malformed payload ({e})") from e
        absent = [s.name for s in self.sections if s.required and s.name not in out]
        if absent:
            raise AbiError(msg=f"vm state: required section {absent[0]} is missing")
        return out


CPU_FIELDS = (Field("regs", "u64{}"), *(Field(n, "u64") for n in
                                        ("cr0", "cr3", "cr4", "efer", "tsc")))
# version 2 adds last_exit_wall_ns: the pause as CLOCK_REALTIME, the host clock that
# continues across a real kexec (CLOCK_MONOTONIC restarts; see liveupdate.vmm.vmm); a
# version 1 record still reads (its paused_wall stands in)
VM = Section("vm", 2, 1, (
    Field("size", "u64"), Field("accel", "str"), Field("steps", "u64"),
    Field("tsc_hz", "f64"), Field("last_exit_ns", "u64"), Field("paused_wall", "f64"),
    Field("ring", "u64[]"), Field("last_exit_wall_ns", "u64", since=2)))
CPU0 = Section("cpu0", 1, 1, CPU_FIELDS)
VM_STATE = Description((VM, CPU0))  # device sections (vfio, virtio) are added here
