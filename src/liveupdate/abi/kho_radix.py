"""The kho-v3/kho-v4 memory map: Linux 7.1's radix tree (spec/kho.md 3.2).

Read in upstream ``kernel/liveupdate/kexec_handover.c`` and ``include/linux/kho_radix_tree.h``
(7.1): every preserved block is one *key*, ``(1 << (52 - order)) | (phys >> (12 + order))``
-- the marker bit makes the order recoverable, ``order = 52 - fls64(key) + 1``. The tree has
six levels of one page each: five levels of ``u64 table[512]`` nodes (child phys, 0 = empty)
indexed by 9 key bits each (bits 59:51 at the root down to 23:15), and a leaf bitmap of 32768
bits indexed by key bits 14:0. So order-0 keys sit under root slot 2, order 1 under slot 1,
every larger order under slot 0; a leaf covers the same 32768 blocks a kho-v1 PAGE_SIZE
bitmap does.

The tree *is* the handover (stateless KHO: nothing is serialized at reboot). The root FDT's
``preserved-memory-map`` holds the root node's phys. The next kernel walks it depth first,
slots ascending (``kho_radix_walk_tree``), so blocks come out by key: larger orders first,
then by address.

:func:`encode` lays out a tree for a set of blocks (the emulated kernel keeps its tree live
and rewrites only the pages a change touches, :mod:`liveupdate.kernel.kho.radix`);
:func:`decode` is the hostile-input walk: every node page-aligned and inside RAM, no node
reached twice (a shared or cyclic child is refused: upstream would walk it twice or forever),
at most :data:`MAX_NODES` nodes, every set bit a valid key, and with ``check_ram`` every
block inside RAM (EFAULT, naming the leaf and the block). Upstream's
``kho_preserved_memory_reserve`` (kernel/liveupdate/kexec_handover.c, 7.3) reserves whatever
a key says; the emulated kernel checks the blocks itself (``validate_handover``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np

from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.kho_memmap import MAX_MAP_ORDER, PreservedMemory
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

ORDER_0_LOG2 = 64 - PAGE_SHIFT  # 52
TABLE_SIZE_LOG2 = 9  # ilog2(PAGE_SIZE / 8)
BITMAP_SIZE_LOG2 = PAGE_SHIFT + 3  # 15
TREE_MAX_DEPTH = -(-(ORDER_0_LOG2 - BITMAP_SIZE_LOG2 + 1) // TABLE_SIZE_LOG2) + 1  # 6
SLOTS = 1 << TABLE_SIZE_LOG2
LEAF_BITS = 1 << BITMAP_SIZE_LOG2
ROOT_LEVEL = TREE_MAX_DEPTH - 1
# A tree holding every page of 1 TiB at every order needs far fewer; a bound stops a hostile
# tree from making the walk read gigabytes.
MAX_NODES = 1 << 18

assert TREE_MAX_DEPTH == 6


def key(phys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The radix key of each block (uint64)."""
    o = np.asarray(order, np.uint64)
    return (np.uint64(1) << (np.uint64(ORDER_0_LOG2) - o)) | (
        np.asarray(phys, np.uint64) >> (np.uint64(PAGE_SHIFT) + o))


def unkey(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phys, order) of each key; raises if a key has no marker bit in range."""
    keys = np.asarray(keys, np.uint64)
    if not len(keys):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint8)
    # fls64 without a loop over keys: float log2 is exact enough below 2**53 only, so
    # count leading bits by shifting
    fls = np.zeros(len(keys), np.int64)
    rest = keys.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        big = rest >= (np.uint64(1) << np.uint64(shift))
        fls[big] += shift
        rest[big] >>= np.uint64(shift)
    fls += (rest > 0).astype(np.int64)
    order = ORDER_0_LOG2 - fls + 1
    if np.any(keys == 0) or np.any(order < 0) or np.any(order > MAX_MAP_ORDER):
        bad = keys[(keys == 0) | (order < 0) | (order > MAX_MAP_ORDER)][0]
        raise AbiError(msg=f"KHO radix tree: key {int(bad):#x} encodes no valid order")
    o = order.astype(np.uint64)
    low = keys & ((np.uint64(1) << (np.uint64(ORDER_0_LOG2) - o)) - np.uint64(1))
    phys = low << (np.uint64(PAGE_SHIFT) + o)
    return phys, order.astype(np.uint8)


def index(keys: np.ndarray, level: int) -> np.ndarray:
    """The slot (level >= 1) or leaf bit (level 0) of each key."""
    keys = np.asarray(keys, np.uint64)
    if level == 0:
        return (keys & np.uint64(LEAF_BITS - 1)).astype(np.int64)
    shift = (level - 1) * TABLE_SIZE_LOG2 + BITMAP_SIZE_LOG2
    return ((keys >> np.uint64(shift)) & np.uint64(SLOTS - 1)).astype(np.int64)


def leaf_id(keys: np.ndarray) -> np.ndarray:
    """Which leaf each key lives in (key without its 15 leaf bits)."""
    return np.asarray(keys, np.uint64) >> np.uint64(BITMAP_SIZE_LOG2)


def path(leaf: int) -> list[int]:
    """The slots from the root (level 5) down to level 1 that lead to ``leaf``."""
    k = np.array([leaf << BITMAP_SIZE_LOG2], np.uint64)
    return [int(index(k, lvl)[0]) for lvl in range(ROOT_LEVEL, 0, -1)]


def encode(phys: np.ndarray, order: np.ndarray,
           alloc: Callable[[], int]) -> tuple[int, dict[int, bytes]]:
    """A tree holding exactly these blocks: (root phys, {page phys: 4096 bytes}).

    ``alloc`` hands out page addresses; nodes are allocated root first, then in key order
    (the order ``kho_radix_add_page`` would allocate them adding keys ascending)."""
    # sorted and deduplicated by hand: np.unique hashes uint64 (ten times slower here)
    keys = np.sort(key(phys, order))
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys
    root = alloc()
    tables: dict[int, np.ndarray] = {root: np.zeros(SLOTS, "<u8")}
    leaves: dict[int, np.ndarray] = {}
    ids = leaf_id(keys)  # sorted too: each leaf's keys are one slice
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1]))) if len(ids) \
        else np.zeros(0, np.int64)
    lids = ids[starts]
    ends = [*starts[1:].tolist(), len(keys)] if len(starts) else []
    for lid, lo, hi in zip(lids.tolist(), starts.tolist(), ends, strict=True):
        node = root
        slots = path(lid)
        for depth, slot in enumerate(slots):
            t = tables[node]
            if not t[slot]:
                child = alloc()
                t[slot] = child
                if depth == len(slots) - 1:
                    leaves[child] = np.zeros(LEAF_BITS, bool)
                else:
                    tables[child] = np.zeros(SLOTS, "<u8")
            node = int(t[slot])
        leaves[node][index(keys[lo:hi], 0)] = True
    pages = {p: t.tobytes() for p, t in tables.items()}
    pages.update({p: leaf_bytes(bits) for p, bits in leaves.items()})
    return root, pages


def leaf_bytes(bits: np.ndarray) -> bytes:
    """A leaf page: ``unsigned long bitmap[512]``, bit i of word i // 64 (little-endian)."""
    return np.packbits(bits, bitorder="little").tobytes()


def decode(mem: PhysMem, root_phys: int, *, check_ram: bool = False) -> PreservedMemory:
    """Walk the tree at ``root_phys`` as the next kernel does (``kho_mem_retrieve``): blocks
    in walk order, larger orders first. ``root_phys`` 0 is EINVAL (``kho_mem_retrieve``).
    With ``check_ram``, a block outside ``mem``'s RAM is EFAULT."""
    if root_phys == 0:
        raise AbiError(msg="KHO radix tree: preserved-memory-map is 0")
    seen: set[int] = set()
    leaves: list[tuple[int, np.ndarray, int]] = []  # (key prefix, set bits, leaf phys)

    def node(phys: int, level: int, prefix: int) -> None:
        if phys % PAGE_SIZE:
            raise AbiError(msg=f"KHO radix node {phys:#x} (level {level}) is not page aligned")
        if phys in seen:
            raise AbiError(msg=f"KHO radix node {phys:#x} is reached twice (a shared or "
                           "cyclic child)")
        if len(seen) >= MAX_NODES:
            raise AbiError(msg=f"KHO radix tree has more than {MAX_NODES} nodes")
        seen.add(phys)
        raw = mem.read(phys, PAGE_SIZE, f"KHO radix node (level {level})")
        if level == 0:
            bits = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8),
                                                bitorder="little"))
            if len(bits):
                leaves.append((prefix, bits, phys))
            return
        table = np.frombuffer(raw, "<u8")
        for slot in np.flatnonzero(table).tolist():
            node(int(table[slot]), level - 1, (prefix << TABLE_SIZE_LOG2) | slot)

    node(root_phys, ROOT_LEVEL, 0)
    phys: list[np.ndarray] = []
    orders: list[np.ndarray] = []
    for prefix, bits, leaf in leaves:  # one order per leaf: the marker bit is in the prefix
        first = np.array([prefix << BITMAP_SIZE_LOG2], np.uint64)
        _, o = unkey(first)
        high = (np.uint64(prefix << BITMAP_SIZE_LOG2) | bits.astype(np.uint64)) & np.uint64(
            (1 << (ORDER_0_LOG2 - int(o[0]))) - 1)
        phys.append(high << np.uint64(PAGE_SHIFT + int(o[0])))
        orders.append(np.full(len(bits), o[0], np.uint8))
        if check_ram:
            _check_in_ram(mem, leaf, phys[-1], int(o[0]))
    tables = np.array(sorted(seen), np.uint64)
    if not phys:
        return PreservedMemory(np.zeros(0, np.uint64), np.zeros(0, np.uint8), PAGE_SIZE, tables)
    return PreservedMemory(np.concatenate(phys), np.concatenate(orders), PAGE_SIZE, tables)


def _check_in_ram(mem: PhysMem, leaf: int, phys: np.ndarray, order: int) -> None:
    size = np.uint64(PAGE_SIZE << order)
    bad = np.flatnonzero(~mem.inside(phys, phys + size))
    if bad.size:
        raise AbiError(msg=f"KHO radix leaf {leaf:#x}: order-{order} block "
                       f"{int(phys[bad[0]]):#x}+{int(size):#x} lies outside RAM "
                       f"({bad.size} such blocks in this leaf)", err=errno.EFAULT)


def walk_order(phys: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(phys, order)`` sorted as the walk yields them: by key."""
    k = key(phys, order)
    idx = np.argsort(k, kind="stable")
    return np.asarray(phys, np.uint64)[idx], np.asarray(order, np.uint8)[idx]
