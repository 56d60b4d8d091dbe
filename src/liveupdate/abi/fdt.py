"""Flattened device tree helpers on top of pylibfdt (the kernel's own libfdt).

**libfdt trusts its header.** ``fdt_check_header`` cannot know the real buffer length, so a
blob whose ``totalsize`` lies makes libfdt read past the buffer (pylibfdt 1.7.2 segfaults on
``totalsize = 0x7fffffff, off_dt_strings = 0x40000000``). :func:`check_header` therefore checks
every header field and block against the real length in Python before libfdt sees a byte, and
libfdt only ever gets a copy cut to ``totalsize``.

**pylibfdt crashes on a bad structure block too.** Its wrappers turn the ``NULL`` that libfdt
returns for a property name offset outside the strings block into a string, and segfault (found
by our fuzz test). :func:`check_struct` therefore walks the structure block's tokens once in
Python -- names terminated inside the block, property lengths inside the block, name offsets
inside the strings block and terminated there, nodes balanced, ``FDT_END`` last -- before libfdt
parses anything.

``fdt_check_full`` is deliberately *not* the gate: it rejects the v3 LUO files FDT, whose root
node is named ``file-descriptors`` (spec/luo.md section 1.5 errata), which dtc and the kernel
accept. Instead :func:`parse` walks the whole structure block once and returns a plain tree.

KHO writes integer properties in CPU-native order (little-endian here) inside the big-endian
FDT container; :func:`u64` / :func:`u32` encode and :meth:`Node.u64` decodes that, with exact
length checks as the kernel's readers do.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libfdt

from liveupdate.errors import AbiError

FDT_MAGIC = 0xD00DFEED
FDT_HEADER_SIZE = 40
FDT_MAX_DEPTH = 32
_HEADER = struct.Struct(">10I")


def u64(value: int) -> bytes:
    """A KHO u64 property value: 8 bytes, CPU-native (little-endian)."""
    return struct.pack("<Q", value)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def string(value: str) -> bytes:
    return value.encode() + b"\0"


@dataclass(frozen=True)
class Header:
    magic: int
    totalsize: int
    off_dt_struct: int
    off_dt_strings: int
    off_mem_rsvmap: int
    version: int
    last_comp_version: int
    boot_cpuid_phys: int
    size_dt_strings: int
    size_dt_struct: int


def _block(what: str, off: int, size: int, total: int) -> None:
    if off < FDT_HEADER_SIZE or off + size > total:
        raise AbiError(msg=f"{what}: FDT block {off:#x}+{size:#x} outside totalsize {total:#x}")


def check_header(blob: bytes | bytearray | memoryview, what: str = "FDT") -> Header:
    """Validate the header against the real buffer; return it. Raises AbiError."""
    if len(blob) < FDT_HEADER_SIZE:
        raise AbiError(msg=f"{what}: {len(blob)} bytes is shorter than an FDT header")
    hdr = Header(*_HEADER.unpack_from(bytes(blob[:FDT_HEADER_SIZE])))
    if hdr.magic != FDT_MAGIC:
        raise AbiError(msg=f"{what}: bad FDT magic {hdr.magic:#010x}")
    if hdr.version < 17 or hdr.last_comp_version > 17:
        raise AbiError(
            msg=f"{what}: unsupported FDT version {hdr.version} (last compatible "
            f"{hdr.last_comp_version}); need version 17"
        )
    if not FDT_HEADER_SIZE <= hdr.totalsize <= len(blob):
        raise AbiError(
            msg=f"{what}: header totalsize {hdr.totalsize:#x} exceeds the "
            f"{len(blob):#x}-byte buffer" if hdr.totalsize > len(blob)
            else f"{what}: header totalsize {hdr.totalsize:#x} is too small"
        )
    total = hdr.totalsize
    if hdr.off_mem_rsvmap % 8 or hdr.off_dt_struct % 4 or hdr.size_dt_struct % 4:
        raise AbiError(msg=f"{what}: misaligned FDT block")
    _block(what + " memory reservation map", hdr.off_mem_rsvmap, 16, total)
    _block(what + " structure block", hdr.off_dt_struct, hdr.size_dt_struct, total)
    _block(what + " strings block", hdr.off_dt_strings, hdr.size_dt_strings, total)
    if hdr.size_dt_struct < 8:
        raise AbiError(msg=f"{what}: empty structure block")
    # The reservation map runs until an all-zero entry; it must end inside the blob.
    off = hdr.off_mem_rsvmap
    while True:
        if off + 16 > total:
            raise AbiError(msg=f"{what}: memory reservation map is not terminated")
        if bytes(blob[off : off + 16]) == bytes(16):
            break
        off += 16
    return hdr


FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_NOP, FDT_END = 1, 2, 3, 4, 9


def _check_name(raw: bytes, what: str, kind: str) -> None:
    # Printable ASCII only: pylibfdt cannot return other names without failing inside C.
    if any(c < 0x21 or c > 0x7E or c == 0x2F for c in raw):
        raise AbiError(msg=f"{what}: {kind} name {raw[:32]!r} has characters outside printable "
                       "ASCII")


def check_struct(data: bytes, hdr: Header, what: str = "FDT") -> None:
    """Walk every token of the structure block; raise AbiError on anything libfdt could
    misread. ``data`` is the blob cut to totalsize and ``hdr`` its checked header."""
    start, end = hdr.off_dt_struct, hdr.off_dt_struct + hdr.size_dt_struct
    strings = data[hdr.off_dt_strings : hdr.off_dt_strings + hdr.size_dt_strings]
    off, depth, seen_root = start, 0, False

    def need(n: int) -> None:
        if off + n > end:
            raise AbiError(msg=f"{what}: structure block truncated at {off - start:#x}")

    while True:
        need(4)
        (tag,) = struct.unpack_from(">I", data, off)
        off += 4
        if tag == FDT_BEGIN_NODE:
            if depth == 0 and seen_root:
                raise AbiError(msg=f"{what}: a second root node")
            nul = data.find(b"\0", off, end)
            if nul < 0:
                raise AbiError(msg=f"{what}: node name not terminated in the structure block")
            _check_name(data[off:nul], what, "node")
            off = (nul + 4) & ~3
            depth, seen_root = depth + 1, True
            if depth > FDT_MAX_DEPTH:
                raise AbiError(msg=f"{what}: nodes nested deeper than {FDT_MAX_DEPTH}")
        elif tag == FDT_END_NODE:
            if depth == 0:
                raise AbiError(msg=f"{what}: unbalanced end of node")
            depth -= 1
        elif tag == FDT_PROP:
            if depth == 0:
                raise AbiError(msg=f"{what}: property outside any node")
            need(8)
            length, nameoff = struct.unpack_from(">II", data, off)
            off += 8
            need(length)
            off = (off + length + 3) & ~3
            name_end = strings.find(b"\0", nameoff) if nameoff < len(strings) else -1
            if name_end < 0:
                raise AbiError(msg=f"{what}: property name offset {nameoff:#x} outside the "
                               "strings block")
            _check_name(strings[nameoff:name_end], what, "property")
        elif tag == FDT_NOP:
            continue
        elif tag == FDT_END:
            if depth or not seen_root:
                raise AbiError(msg=f"{what}: structure block ends inside a node or has no root")
            return
        else:
            raise AbiError(msg=f"{what}: bad structure tag {tag:#x} at {off - 4 - start:#x}")
        if off > end:
            raise AbiError(msg=f"{what}: structure block overrun")


@dataclass
class Node:
    """A decoded FDT node: properties in byte-stream order, children in byte-stream order."""

    name: str
    path: str
    props: dict[str, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def child(self, name: str) -> Node | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    def need_child(self, name: str, what: str) -> Node:
        c = self.child(name)
        if c is None:
            raise AbiError(
                msg=f"{what}: node {self.path.rstrip('/')}/{name} missing", err=errno.ENOENT)
        return c

    def need(self, name: str, what: str) -> bytes:
        if name not in self.props:
            raise AbiError(msg=f"{what}: property {self.path}:{name} missing", err=errno.ENOENT)
        return self.props[name]

    def u64(self, name: str, what: str) -> int:
        value = self.need(name, what)
        if len(value) != 8:
            raise AbiError(msg=f"{what}: property {self.path}:{name} is {len(value)} bytes, not 8")
        return int(struct.unpack("<Q", value)[0])

    def u32(self, name: str, what: str) -> int:
        value = self.need(name, what)
        if len(value) != 4:
            raise AbiError(msg=f"{what}: property {self.path}:{name} is {len(value)} bytes, not 4")
        return int(struct.unpack("<I", value)[0])

    def string(self, name: str, what: str) -> str:
        return _one_string(self.need(name, what), f"{what}: property {self.path}:{name}")

    def compatible(self) -> list[str]:
        """The compatible string list, or [] when absent or malformed."""
        value = self.props.get("compatible")
        if not value or value[-1:] != b"\0":
            return []
        try:
            return [s.decode() for s in value[:-1].split(b"\0")]
        except UnicodeDecodeError:
            return []

    def check_compatible(self, want: str, what: str) -> None:
        """As fdt_node_check_compatible: ``want`` must be one string of the list."""
        have = self.compatible()
        if want not in have:
            shown = ", ".join(have) if have else "none"
            raise AbiError(msg=f"{what}: {self.path} is compatible with {shown}, not {want}")


def _one_string(value: bytes, what: str) -> str:
    if not value or value[-1:] != b"\0" or b"\0" in value[:-1]:
        raise AbiError(msg=f"{what} is not one NUL-terminated string")
    try:
        return value[:-1].decode()
    except UnicodeDecodeError as e:
        raise AbiError(msg=f"{what} is not valid UTF-8") from e


@dataclass
class Tree:
    header: Header
    root: Node
    blob: bytes


def _check(ret: int, what: str) -> int:
    if ret < 0 and ret != -libfdt.NOTFOUND:
        raise AbiError(msg=f"{what}: libfdt: {libfdt.fdt_strerror(ret)}")
    return ret


def parse(blob: bytes | bytearray | memoryview, what: str = "FDT") -> Tree:
    """Validate and fully decode an FDT. The only error raised is AbiError."""
    hdr = check_header(blob, what)
    data = bytes(blob[: hdr.totalsize])
    check_struct(data, hdr, what)
    try:
        fdt = libfdt.Fdt(data)
        quiet = (libfdt.NOTFOUND,)

        def walk(offset: int, path: str, depth: int) -> Node:
            if depth > FDT_MAX_DEPTH:
                raise AbiError(msg=f"{what}: nodes nested deeper than {FDT_MAX_DEPTH}")
            name = fdt.get_name(offset)
            node = Node(name, path)
            poff = _check(fdt.first_property_offset(offset, quiet), what)
            while poff >= 0:
                prop = fdt.get_property_by_offset(poff)
                if prop.name in node.props:
                    raise AbiError(msg=f"{what}: duplicate property {path}:{prop.name}")
                node.props[prop.name] = bytes(prop)
                poff = _check(fdt.next_property_offset(poff, quiet), what)
            coff = _check(fdt.first_subnode(offset, quiet), what)
            while coff >= 0:
                cname = fdt.get_name(coff)
                node.children.append(walk(coff, path.rstrip("/") + "/" + cname, depth + 1))
                coff = _check(fdt.next_subnode(coff, quiet), what)
            return node

        root = walk(0, "/", 0)
    except libfdt.FdtException as e:
        raise AbiError(msg=f"{what}: libfdt: {libfdt.fdt_strerror(-abs(e.err))}") from e
    except UnicodeDecodeError as e:
        raise AbiError(msg=f"{what}: node or property name is not valid UTF-8") from e
    return Tree(hdr, root, data)


class SwBuilder:
    """Sequential-write FDT construction, as the kernel's fdt_create()...fdt_finish().

    libfdt errors (a bad name, say) become AbiError."""

    def __init__(self) -> None:
        self._sw = libfdt.FdtSw()
        self._sw.finish_reservemap()

    def _do(self, what: str, op: Callable[[], object]) -> SwBuilder:
        try:
            op()
        except libfdt.FdtException as e:
            raise AbiError(msg=f"FDT build: {what}: {libfdt.fdt_strerror(-abs(e.err))}") from e
        return self

    def begin_node(self, name: str) -> SwBuilder:
        return self._do(f"node {name!r}", lambda: self._sw.begin_node(name))

    def end_node(self) -> SwBuilder:
        return self._do("end of node", self._sw.end_node)

    def prop(self, name: str, value: bytes) -> SwBuilder:
        return self._do(f"property {name!r}", lambda: self._sw.property(name, value))

    def finish(self) -> bytes:
        """fdt_finish: the compact blob (totalsize bytes)."""
        while True:
            try:
                fdt = self._sw.as_fdt()
                return bytes(fdt.as_bytearray()[: fdt.totalsize()])
            except libfdt.FdtException as e:
                # pylibfdt grows the buffer for every call but fdt_finish's FDT_END tag
                if e.err not in (-libfdt.NOSPACE, libfdt.NOSPACE):
                    raise AbiError(msg=f"FDT build: {libfdt.fdt_strerror(-abs(e.err))}") from e
                self._sw.resize(len(self._sw.as_bytearray()) + self._sw.INC_SIZE)


class RwTree:
    """Read-write FDT editing with libfdt semantics (new nodes and properties go first).

    Every edit is done as the 6.19+ kernel does it: ``fdt_open_into`` the blob into a buffer
    of ``capacity`` bytes, edit, then ``fdt_pack``. An edit that does not fit raises AbiError
    with ENOMEM and leaves the tree unchanged.
    """

    def __init__(self, blob: bytes, capacity: int, *, pack: bool = True) -> None:
        parse(blob)  # hostile-input gate; RwTree only edits trees that parse
        self._blob = bytes(blob)
        self.capacity = capacity
        self._pack = pack

    @property
    def blob(self) -> bytes:
        return self._blob

    def _edit(self, what: str, op: Callable[[Any], object]) -> int:
        try:
            fdt = libfdt.Fdt(self._blob)
            fdt.resize(self.capacity)
            ret = op(fdt)
            if self._pack:
                fdt.pack()
            data = fdt.as_bytearray()
            self._blob = bytes(data[: fdt.totalsize()])
            return int(ret) if isinstance(ret, int) else 0
        except libfdt.FdtException as e:
            if e.err in (-libfdt.NOSPACE, libfdt.NOSPACE):
                raise AbiError(
                    msg=f"{what}: FDT full ({self.capacity} bytes)", err=errno.ENOMEM) from e
            if e.err in (-libfdt.EXISTS, libfdt.EXISTS):
                raise AbiError(msg=f"{what}: already exists", err=errno.EEXIST) from e
            raise AbiError(msg=f"{what}: libfdt: {libfdt.fdt_strerror(-abs(e.err))}") from e

    def path_offset(self, path: str) -> int:
        try:
            return int(libfdt.Fdt(self._blob).path_offset(path))
        except libfdt.FdtException as e:
            raise AbiError(msg=f"no node {path}", err=errno.ENOENT) from e

    def add_subnode(self, parent: str, name: str) -> None:
        self._edit(f"add node {name}",
                   lambda f: f.add_subnode(f.path_offset(parent), name))

    def setprop(self, path: str, name: str, value: bytes) -> None:
        self._edit(f"set {path}:{name}", lambda f: f.setprop(f.path_offset(path), name, value))

    def del_node(self, path: str) -> None:
        self._edit(f"delete {path}", lambda f: f.del_node(f.path_offset(path)))
