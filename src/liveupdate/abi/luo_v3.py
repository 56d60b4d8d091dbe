"""LUO handover of the state-machine era (v2/v3/v4 postings; spec/luo.md 1.5 with errata).

KHO subtree ``LUO`` points at a one-page FDT that is never packed (totalsize stays 4096)::

    / { compatible = "luo-v1";
        subsystems { <name> = <u64 native>; ...; compatible = "subsystems-v1"; }; };

It is built with ``fdt_create_empty_tree`` + read-write edits, so each subsystem property is
inserted *before* ``compatible`` and subsystems appear in reverse registration order; a commit
rewrites values in place. The ``file-descriptors`` subsystem's value is the phys of a *separate*
files FDT, built sequentially (compact totalsize) in token order::

    file-descriptors { compatible = "file-descriptors-v1";
        "<token as %#0llx>" { compatible = "<handler, e.g. memfd-v1>"; data = <u64 native>; }; };

Sources read: ``luo_subsystems.c`` (d4d1b22) and ``luo_files.c`` (7b499d2) in the
kernelorg-mirror of Pratyush's tree, and the v3 ``luo_fdt_setup`` patch
(``fdt_create_empty_tree`` + ``fdt_setprop_string``); the orders above follow from them.
Its root node is literally named ``file-descriptors``, which ``fdt_check_full`` rejects and the
kernel accepts; so do we. Token names parse as ``kstrtou64(name, 0)``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import libfdt

from liveupdate.abi import fdt
from liveupdate.abi.consts import PAGE_SIZE, get_order
from liveupdate.errors import AbiError

LUO_KHO_ENTRY_NAME = "LUO"
LUO_COMPATIBLE = "luo-v1"
LUO_FDT_SIZE = PAGE_SIZE
SUBSYSTEMS_NODE = "subsystems"
SUBSYSTEMS_COMPATIBLE = "subsystems-v1"
FILES_NODE = "file-descriptors"
FILES_COMPATIBLE = "file-descriptors-v1"
FILES_SUBSYSTEM = FILES_NODE


def token_name(token: int) -> str:
    """C ``%#0llx``: ``0`` for zero, else ``0x`` + lowercase hex."""
    return "0" if token == 0 else f"{token:#x}"


def parse_token(name: str) -> int:
    """``kstrtou64(name, 0)``: 0x-prefixed hex, 0-prefixed octal, or decimal."""
    s = name
    base = 10
    if s[:2] in ("0x", "0X"):
        s, base = s[2:], 16
    elif len(s) > 1 and s[0] == "0":
        s, base = s[1:], 8
    digits = "0123456789abcdef"[:base]
    if not s or any(c not in digits for c in s.lower()):
        raise AbiError(msg=f"files FDT: node name {name!r} is not a token")
    value = int(s, base)
    if value >= 1 << 64:
        raise AbiError(msg=f"files FDT: token {name!r} overflows u64", err=errno.ERANGE)
    return value


def encode_luo_fdt(subsystems: list[tuple[str, int]]) -> bytes:
    """The LUO FDT after prepare: ``subsystems`` in registration order with their data."""
    try:
        empty = libfdt.Fdt.create_empty_tree(LUO_FDT_SIZE)
    except libfdt.FdtException as e:  # pragma: no cover - libfdt on a fixed size
        raise AbiError(msg=f"cannot create LUO FDT: {e}") from e
    tree = fdt.RwTree(bytes(empty.as_bytearray()), LUO_FDT_SIZE, pack=False)
    tree.setprop("/", "compatible", fdt.string(LUO_COMPATIBLE))
    tree.add_subnode("/", SUBSYSTEMS_NODE)
    path = "/" + SUBSYSTEMS_NODE
    tree.setprop(path, "compatible", fdt.string(SUBSYSTEMS_COMPATIBLE))
    names = [n for n, _ in subsystems]
    if len(set(names)) != len(names):
        raise AbiError(msg="duplicate subsystem name", err=errno.EEXIST)
    for name, _ in subsystems:  # registration: zero placeholders
        tree.setprop(path, name, fdt.u64(0))
    for name, data in subsystems:  # commit: values in place
        tree.setprop(path, name, fdt.u64(data))
    return tree.blob


@dataclass(frozen=True)
class LuoV3:
    subsystems: dict[str, int]

    @property
    def files_fdt(self) -> int | None:
        return self.subsystems.get(FILES_SUBSYSTEM)


def decode_luo_fdt(blob: bytes) -> LuoV3:
    tree = fdt.parse(blob, "LUO FDT")
    tree.root.check_compatible(LUO_COMPATIBLE, "LUO FDT")
    sub = tree.root.need_child(SUBSYSTEMS_NODE, "LUO FDT")
    sub.check_compatible(SUBSYSTEMS_COMPATIBLE, "LUO FDT")
    data = {name: sub.u64(name, "LUO FDT") for name in sub.props if name != "compatible"}
    return LuoV3(data)


@dataclass(frozen=True)
class FileEntry:
    token: int
    compatible: str
    data: int


def files_fdt_alloc_size(nfiles: int) -> int:
    """The kernel's buffer for the files FDT: ``PAGE_SIZE << get_order(1 KiB + 128 n)``."""
    return PAGE_SIZE << get_order(1024 + 128 * nfiles)


def encode_files_fdt(files: list[FileEntry]) -> bytes:
    tokens = [f.token for f in files]
    if len(set(tokens)) != len(tokens):
        raise AbiError(msg="duplicate token in files FDT", err=errno.EEXIST)
    b = fdt.SwBuilder().begin_node(FILES_NODE)
    b.prop("compatible", fdt.string(FILES_COMPATIBLE))
    for f in sorted(files, key=lambda f: f.token):
        b.begin_node(token_name(f.token))
        b.prop("compatible", fdt.string(f.compatible)).prop("data", fdt.u64(f.data))
        b.end_node()
    blob = b.end_node().finish()
    if len(blob) > files_fdt_alloc_size(len(files)):
        raise AbiError(msg="files FDT outgrew its allocation", err=errno.ENOSPC)
    return blob


def decode_files_fdt(blob: bytes) -> list[FileEntry]:
    """Every condition the kernel panics on is an AbiError here."""
    tree = fdt.parse(blob, "files FDT")
    tree.root.check_compatible(FILES_COMPATIBLE, "files FDT")
    out: list[FileEntry] = []
    seen: set[int] = set()
    for node in tree.root.children:
        token = parse_token(node.name)
        if token in seen:
            raise AbiError(msg=f"files FDT: duplicate token {token:#x}", err=errno.EEXIST)
        seen.add(token)
        out.append(FileEntry(token, node.string("compatible", "files FDT"),
                             node.u64("data", "files FDT")))
    return out
