"""Read what there is of a truncated FDT (one whose header's totalsize exceeds the bytes).

libfdt refuses such a blob outright, and so does :func:`liveupdate.abi.fdt.parse`. Debugfs
``out/fdt`` of Linux 7.3 is routinely one (see :mod:`liveupdate.tools.report_debugfs`), so
this walker reads the structure block token by token up to the cut and keeps everything
that is whole: nodes that end before the cut, properties whose value is all there. A
property's name lives in the strings block, which libfdt keeps last and so is the first
thing cut; a name whose bytes are gone is taken from a vocabulary -- the strings block the
writer is known to produce, in block order, chosen by the root's ``compatible`` (the root's
first property, whose value is in the structure block) -- and reported as inferred, and only
when the part of the strings block that survived matches that vocabulary.

Everything else is as hostile as ever: bad tokens, names that are not printable, nodes
nested too deep, property lengths that run past the structure block are AbiError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from liveupdate.abi import fdt
from liveupdate.errors import AbiError


@dataclass
class PNode:
    name: str
    path: str
    props: list[tuple[str, bytes]] = field(default_factory=list)  # fully known ones
    children: list[PNode] = field(default_factory=list)
    complete: bool = False  # its FDT_END_NODE was read


@dataclass
class PartialFdt:
    totalsize: int
    root: PNode | None = None
    root_compatible: str = ""
    read: list[str] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _vocab_for(strings: bytes, vocabs: dict[str, list[str]], compat: str) -> list[str] | None:
    """The known string table for this root compatible, if what survived agrees with it."""
    words = vocabs.get(compat)
    if words is None:
        return None
    table = b"".join(w.encode() + b"\0" for w in words)
    n = min(len(strings), len(table))
    return words if strings[:n] == table[:n] else None


def _name_at(table: bytes, off: int) -> str | None:
    end = table.find(b"\0", off) if off < len(table) else -1
    return table[off:end].decode("ascii", "replace") if end >= 0 else None


def walk(blob: bytes, vocabs: dict[str, list[str]]) -> PartialFdt:
    """Walk a (possibly truncated) FDT; ``vocabs`` maps a root compatible to the strings
    block its writer produces, in block order."""
    if len(blob) < fdt.FDT_HEADER_SIZE:
        raise AbiError(msg=f"truncated FDT: {len(blob)} bytes, not even a header")
    h = fdt.Header(*struct.unpack_from(">10I", blob))
    if h.magic != fdt.FDT_MAGIC or h.version < 17:
        raise AbiError(msg="truncated FDT: bad magic or version")
    part = PartialFdt(h.totalsize)
    have = len(blob)
    if h.off_dt_struct < fdt.FDT_HEADER_SIZE or h.off_dt_struct % 4:
        raise AbiError(msg=f"truncated FDT: structure block offset {h.off_dt_struct:#x} invalid")
    start, end = h.off_dt_struct, min(h.off_dt_struct + h.size_dt_struct, have)
    s_end = min(h.off_dt_strings + h.size_dt_strings, have)
    strings = blob[h.off_dt_strings:s_end] if h.off_dt_strings < have else b""
    if len(strings) < h.size_dt_strings:
        part.unreadable.append(f"strings block: {h.size_dt_strings - len(strings)} of "
                               f"{h.size_dt_strings} bytes cut")
    vocab: list[str] | None = None
    stack: list[PNode] = []
    off = start
    while True:
        if off + 4 > end:
            part.unreadable.append(f"structure block cut at offset {off - start:#x}: "
                                   + (f"node {stack[-1].path} and what follows it"
                                      if stack else "everything after it"))
            break
        (tag,) = struct.unpack_from(">I", blob, off)
        off += 4
        if tag == fdt.FDT_BEGIN_NODE:
            nul = blob.find(b"\0", off, end)
            if nul < 0:
                where = stack[-1].path.rstrip("/") if stack else ""
                seen = blob[off:end].decode("ascii", "replace")
                part.unreadable.append(f"node {where}/{seen}...: cut inside its name")
                break
            fdt._check_name(blob[off:nul], "truncated FDT", "node")
            node_name = blob[off:nul].decode()
            path = "/" if not stack else stack[-1].path.rstrip("/") + "/" + node_name
            node = PNode(node_name, path)
            if stack:
                stack[-1].children.append(node)
            elif part.root is None:
                part.root = node
            else:
                raise AbiError(msg="truncated FDT: a second root node")
            stack.append(node)
            if len(stack) > fdt.FDT_MAX_DEPTH:
                raise AbiError(msg="truncated FDT: nodes nested too deep")
            off = (nul + 4) & ~3
        elif tag == fdt.FDT_END_NODE:
            if not stack:
                raise AbiError(msg="truncated FDT: unbalanced end of node")
            stack.pop().complete = True
            if not stack:
                break
        elif tag == fdt.FDT_PROP:
            if not stack or off + 8 > end:
                if not stack:
                    raise AbiError(msg="truncated FDT: property outside any node")
                part.unreadable.append(f"{stack[-1].path}: a property header is cut")
                break
            length, nameoff = struct.unpack_from(">II", blob, off)
            off += 8
            node = stack[-1]
            name: str | None = _name_at(strings, nameoff)
            value = blob[off : off + length] if off + length <= end else None
            if vocab is None and part.root_compatible:
                vocab = _vocab_for(strings, vocabs, part.root_compatible)
            how = ""
            if name is None and vocab is not None:
                name = _infer(vocab, nameoff)
                how = " (name inferred)" if name is not None else ""
            if (node is part.root and not node.props and name in (None, "compatible")
                    and value and value.endswith(b"\0")):
                part.root_compatible = value[:-1].split(b"\0")[0].decode("ascii", "replace")
                if name is None:  # the root's first property: compatible, by construction
                    vocab = _vocab_for(strings, vocabs, part.root_compatible)
                    name = _infer(vocab, nameoff) if vocab is not None else None
                    how = " (name inferred)" if name is not None else ""
            label = f"{node.path}:{name if name is not None else f'<name at {nameoff:#x}>'}"
            if value is None:
                part.unreadable.append(f"{label}: value cut ({length} bytes)")
                break
            if name is None:
                part.unreadable.append(f"{label}: name cut from the strings block "
                                       f"({length}-byte value read)")
            else:
                node.props.append((name, value))
                (part.inferred if how else part.read).append(label)
            off = (off + length + 3) & ~3
        elif tag == fdt.FDT_NOP:
            continue
        elif tag == fdt.FDT_END:
            break
        else:
            raise AbiError(msg=f"truncated FDT: bad structure tag {tag:#x} at "
                           f"{off - 4 - start:#x}")
    for node in stack:
        part.unreadable.append(f"node {node.path}: not complete (its end is cut)")
    if stack and h.off_dt_struct + h.size_dt_struct > have:
        part.unreadable.append(f"structure block: {h.off_dt_struct + h.size_dt_struct - have} "
                               f"of {h.size_dt_struct} bytes cut (nodes in them are unknown)")
    return part


def _infer(vocab: list[str], nameoff: int) -> str | None:
    pos = 0
    for w in vocab:
        if pos == nameoff:
            return w
        pos += len(w) + 1
    return None
