"""The ``kexec-metadata`` KHO subtree of kho-v3+ kernels (7.1+; spec/kho.md 2.3).

Read in upstream ``kernel/liveupdate/kexec_handover.c`` (7.1): at ``kho_init`` KHO itself
adds a raw blob, the packed ``struct kho_kexec_metadata { u32 version; char
previous_release[65]; u32 kexec_count; }`` -- 73 bytes -- naming the kernel that wrote it and
how many kexecs led here. The next kernel checks ``size >= 4``, ``version == 1`` and ``size >=
73`` and logs ``KHO: exec from: <release> (count N)``; it writes its own with ``kexec_count``
one more than the previous one's (0 after a cold boot).

The blob is raw bytes, so it exists only under kho-v3+ roots (``blob-size``); a negotiated
kho-v1 root leaves it out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from liveupdate.errors import AbiError

NODE = "kexec-metadata"
VERSION = 1
RELEASE_LEN = 65
LAYOUT = struct.Struct(f"<I{RELEASE_LEN}sI")
assert LAYOUT.size == 73


@dataclass(frozen=True)
class KexecMetadata:
    previous_release: str
    kexec_count: int


def encode(md: KexecMetadata) -> bytes:
    raw = md.previous_release.encode()[: RELEASE_LEN - 1]
    return LAYOUT.pack(VERSION, raw, md.kexec_count)


def decode(blob: bytes) -> KexecMetadata:
    if len(blob) < 4:
        raise AbiError(msg=f"kexec-metadata is {len(blob)} bytes, too short for a version")
    (version,) = struct.unpack_from("<I", blob)
    if version != VERSION:
        raise AbiError(msg=f"kexec-metadata version {version}, not {VERSION}")
    if len(blob) < LAYOUT.size:
        raise AbiError(msg=f"kexec-metadata is {len(blob)} bytes, less than {LAYOUT.size}")
    _, rel, count = LAYOUT.unpack_from(blob)
    rel = rel.split(b"\0", 1)[0]
    try:
        return KexecMetadata(rel.decode(), count)
    except UnicodeDecodeError as e:
        raise AbiError(msg="kexec-metadata release is not UTF-8") from e
