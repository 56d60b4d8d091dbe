"""The incoming handover, validated before any of it is used: root FDT, scratch array, every
chunk and bitmap pointer, every preserved block inside RAM and outside scratch, every subtree
pointer inside RAM. This is stricter than Linux, which checks the map only while reserving it;
any failure makes the caller boot cold.
"""

from __future__ import annotations

import numpy as np

from liveupdate.abi import bootparams, generations, kho, kho_memmap, kho_radix
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError
from liveupdate.kernel.kho.core import KhoCore
from liveupdate.kernel.kho.incoming import KhoIn
from liveupdate.kernel.kho.mmops import MmOps
from liveupdate.kernel.kho.tracker import overlaps_scratch


def validate_handover(mm: MmOps, kd: bootparams.KhoData, reads: tuple[str, ...],
                      core: KhoCore) -> KhoIn:
    """Everything kho_populate and kho_mem_deserialize would meet, checked up front.

    ``reads`` are the KHO formats this kernel takes (``generations``: its own, or with
    negotiation every older one): the root's ``compatible`` must be one of them, exactly as
    ``kho_populate`` checks it. kho-v1 maps of the other bitmap size carry the same string; a
    Linux reader would misread them silently (spec/kho.md 0), we detect the size (3.1.4) and
    refuse one we do not read -- a deliberate deviation: a cold boot instead of corruption.

    Stricter than Linux where it protects memory: scratch areas inside RAM, page aligned and
    disjoint; every preserved block inside RAM and outside scratch; the chunk list and radix
    tree bounded. Never stricter where Linux's own output would be refused: zero-size
    scratch entries (``kho_reserve_scratch`` allocates them), FDT sizes other than a page,
    and children whose blob property is missing, misshapen or outside RAM -- those fail only
    their own ``kho_retrieve_subtree`` (EINVAL), as in Linux, and only if someone asks.
    ``core`` is this kernel's: 6.19+ ``kho_populate`` refuses a zero kho-v1
    ``preserved-memory-map`` (ENOENT); 6.16-6.18 take it as an empty map.
    """
    mem = mm.mem
    # kho_populate maps fdt_len bytes and checks the header; any fdt_len will do (6.16 passes
    # a page, later kernels may not), but no more than it and the FDT's own totalsize is read
    blob = mem.read_fdt(kd.fdt_addr, "KHO root FDT", limit=kd.fdt_size)
    accept = tuple(dict.fromkeys(generations.KHO_COMPATIBLE[f] for f in reads))
    root = kho.decode_root(blob, accept=accept, require_map=core.requires_map,
                           ram=mem.contains)
    scratch = bootparams.decode_scratch(mem.read(kd.scratch_addr, kd.scratch_size,
                                                 "KHO scratch array"))
    for a, s in bootparams.scratch_areas(scratch):
        if s == 0:
            continue
        if a % PAGE_SIZE or s % PAGE_SIZE:
            raise AbiError(msg=f"scratch area {a:#x}+{s:#x} is not page aligned")
        mem.check(a, s, "KHO scratch area")
    used = scratch[scratch["size"] > 0]
    order = np.argsort(used["addr"])
    sa, ss = used["addr"][order], used["size"][order]
    if np.any(sa[1:] < sa[:-1] + ss[:-1]):
        raise AbiError(msg="KHO scratch areas overlap")
    if len(used) == 0:
        raise AbiError(msg="KHO scratch array has no non-empty area")
    if kho.is_radix(root.compatible):  # what the previous kernel wrote decides the decoder
        pm = kho_radix.decode(mem, root.mem_map)
    else:
        pm = kho_memmap.decode_mem_map(mem, root.mem_map)  # the bitmap size detected
        fmt = generations.kho_format(kho.KHO_FDT_COMPATIBLE, pm.bitmap_bytes)
        if fmt not in reads:
            raise AbiError(msg=f"kho-v1 map with {pm.bitmap_bytes}-byte bitmaps ({fmt}); this "
                           f"kernel reads {', '.join(reads)} (Linux would misread it "
                           "silently)")
    ends = pm.phys + (np.uint64(PAGE_SIZE) << pm.order.astype(np.uint64))
    inside = np.zeros(len(pm), bool)
    for s, n in mem.ranges:
        inside |= (pm.phys >= np.uint64(s)) & (ends <= np.uint64(s + n))
    if not np.all(inside):
        bad = int(pm.phys[~inside][0])
        raise AbiError(msg=f"preserved block {bad:#x} lies outside RAM")
    hit = overlaps_scratch(pm.phys, ends, scratch)
    if np.any(hit):
        raise AbiError(msg=f"preserved block {int(pm.phys[hit][0]):#x} overlaps scratch")
    return KhoIn.of(mm, core, kd, blob, root, scratch, pm)
