"""kho-v3/v4 radix tree and kho-v4 block chains: golden layouts, walk order, hostile trees;
and what rides on them: 7.2's luo_ser, kexec-metadata, the negotiation record."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveupdate.abi import kexec_metadata, kho_block, kho_radix, luo_ser, luo_session, negotiation
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError
from tests.conftest import FakeRam


def lay_out(ram: FakeRam, phys: list[int], order: list[int]) -> int:
    root, pages = kho_radix.encode(np.array(phys, np.uint64), np.array(order, np.uint8),
                                   ram.alloc)
    for p, page in pages.items():
        ram.put(p, page)
    return root


def test_keys_and_levels_by_hand() -> None:
    # spec/kho.md 3.2, worked by hand: order 0 at 0x1000 -> marker 2**52 | pfn 1
    assert int(kho_radix.key(np.array([0x1000]), np.array([0]))[0]) == (1 << 52) | 1
    # order 9 (2 MiB) at 0x40000000: marker 2**43 | (0x40000000 >> 21 = 512)
    k = kho_radix.key(np.array([0x40000000]), np.array([9]))
    assert int(k[0]) == (1 << 43) | 512
    # order-0 keys under root slot 2, order 1 under slot 1, larger orders under slot 0
    for order, slot in ((0, 2), (1, 1), (2, 0), (10, 0)):
        kk = kho_radix.key(np.array([0]), np.array([order]))
        assert int(kho_radix.index(kk, kho_radix.ROOT_LEVEL)[0]) == slot
    # leaf bit = low 15 bits of pfn >> order; level 1 = the next 9
    kk = kho_radix.key(np.array([(40000 << 12)]), np.array([0]))
    assert int(kho_radix.index(kk, 0)[0]) == 40000 & 32767
    assert int(kho_radix.index(kk, 1)[0]) == (40000 >> 15) & 511
    phys, order = kho_radix.unkey(np.concatenate([k, kk]))
    assert phys.tolist() == [0x40000000, 40000 << 12] and order.tolist() == [9, 0]


def test_golden_tree_pages() -> None:
    """One order-0 page at 0x1000: root slot 2 -> four single-slot nodes -> a leaf with bit
    1; every node one page, allocated root first."""
    ram = FakeRam(pages=16, base=0x100000)
    root = lay_out(ram, [0x1000], [0])
    assert root == 0x100000
    mem = ram.mem()
    p, level = root, kho_radix.ROOT_LEVEL
    want_slots = {5: 2, 4: 0, 3: 0, 2: 0, 1: 0}
    while level:
        table = np.frombuffer(mem.read(p, PAGE_SIZE), "<u8")
        assert np.flatnonzero(table).tolist() == [want_slots[level]]
        p, level = int(table[want_slots[level]]), level - 1
    leaf = np.frombuffer(mem.read(p, PAGE_SIZE), "<u8")
    assert leaf[0] == 0b10 and not leaf[1:].any()
    assert ram.next - ram.base == 6 * PAGE_SIZE  # six levels, one page each


def test_walk_yields_larger_orders_first_then_addresses() -> None:
    ram = FakeRam(pages=64, base=0x100000)
    phys = [0x5000, 0x200000, 0x3000, 0x40000000, 0x2000, 0x400000]
    order = [0, 9, 0, 18, 1, 10]
    got = kho_radix.decode(ram.mem(), lay_out(ram, phys, order))
    pairs = list(zip(got.order.tolist(), got.phys.tolist(), strict=True))
    assert pairs == [(18, 0x40000000), (10, 0x400000), (9, 0x200000), (1, 0x2000),
                     (0, 0x3000), (0, 0x5000)]


blocks = st.lists(st.tuples(st.integers(0, 12), st.integers(0, (1 << 24) - 1)).map(
    lambda t: ((t[1] >> t[0]) << (t[0] + 12), t[0])), max_size=200)


@settings(max_examples=60, deadline=None)
@given(blocks)
def test_round_trip(bl: list[tuple[int, int]]) -> None:
    ram = FakeRam(pages=2048, base=0x100000)
    root = lay_out(ram, [p for p, _ in bl], [o for _, o in bl])
    got = kho_radix.decode(ram.mem(), root)
    assert set(zip(got.phys.tolist(), got.order.tolist(), strict=True)) == set(bl)
    want_p, want_o = kho_radix.walk_order(np.array([p for p, _ in set(bl)], np.uint64),
                                          np.array([o for _, o in set(bl)], np.uint8))
    assert got.phys.tolist() == want_p.tolist() and got.order.tolist() == want_o.tolist()


def _corrupt_slot(ram: FakeRam, root: int, value: int, level: int = 5) -> None:
    p = root
    for _ in range(kho_radix.ROOT_LEVEL - level):
        table = np.frombuffer(ram.mem().read(p, PAGE_SIZE), "<u8")
        p = int(table[np.flatnonzero(table)[0]])
    table = np.frombuffer(ram.mem().read(p, PAGE_SIZE), "<u8").copy()
    table[np.flatnonzero(table)[0]] = value
    ram.put(p, table.tobytes())


@pytest.mark.parametrize("case, message", [
    ("root0", "is 0"),
    ("outside", "outside RAM"),
    ("unaligned", "not page aligned"),
    ("cycle", "reached twice"),
    ("badkey", "no valid order"),
])
def test_hostile_trees_are_refused(case: str, message: str) -> None:
    ram = FakeRam(pages=16, base=0x100000)
    root = lay_out(ram, [0x1000], [0])
    if case == "root0":
        root = 0
    elif case == "outside":
        _corrupt_slot(ram, root, 0x7F000000, level=3)
    elif case == "unaligned":
        _corrupt_slot(ram, root, 0x100008, level=2)
    elif case == "cycle":
        _corrupt_slot(ram, root, root, level=1)
    elif case == "badkey":  # a subtree under root slot 200: keys with bits above the marker
        table = np.frombuffer(ram.mem().read(root, PAGE_SIZE), "<u8").copy()
        table[200], table[2] = table[2], 0
        ram.put(root, table.tobytes())
    with pytest.raises(AbiError) as e:
        kho_radix.decode(ram.mem(), root)
    assert message in e.value.message


# -- kho_block ----------------------------------------------------------------------------

def test_block_chain_golden() -> None:
    ram = FakeRam(pages=8, base=0x100000)
    entries = b"".join(i.to_bytes(8, "little") * 8 for i in range(70))  # 70 x 64 bytes
    first, pages = kho_block.encode(entries, 64, ram.alloc)
    assert kho_block.per_block(64) == 63 and kho_block.per_block(80) == 51
    assert first == 0x100000 and sorted(pages) == [0x100000, 0x101000]
    head0 = np.frombuffer(pages[0x100000][:16], "<u8").tolist()
    head1 = np.frombuffer(pages[0x101000][:16], "<u8").tolist()
    assert head0 == [0x101000, 63] and head1 == [0, 7]
    for p, page in pages.items():
        ram.put(p, page)
    got, seen = kho_block.decode(ram.mem(), first, 64, "test")
    assert got == entries and seen == [0x100000, 0x101000]
    assert kho_block.encode(b"", 64, ram.alloc) == (0, {})


@pytest.mark.parametrize("case, message", [
    ("count0", "holds 0 entries"),
    ("count_big", "holds 64 entries"),
    ("cycle", "loops back"),
    ("unaligned", "not page aligned"),
    ("outside", "outside RAM"),
])
def test_block_chain_hostile(case: str, message: str) -> None:
    ram = FakeRam(pages=8, base=0x100000)
    first, pages = kho_block.encode(bytes(64 * 100), 64, ram.alloc)
    for p, page in pages.items():
        ram.put(p, page)
    second = 0x101000
    head = {"count0": (second, 0), "count_big": (second, 64), "cycle": (second, 63),
            "unaligned": (second + 8, 63), "outside": (0x9000000, 63)}[case]
    ram.put(first, np.array(head, "<u8").tobytes())
    if case == "cycle":
        ram.put(second, np.array([first, 37], "<u8").tobytes())
    with pytest.raises(AbiError) as e:
        kho_block.decode(ram.mem(), first, 64, "test")
    assert message in e.value.message and e.value.errno in (errno.EINVAL, errno.EFAULT)


def test_block_chain_length_limit() -> None:
    n = kho_block.KHO_MAX_BLOCKS + 1
    ram = FakeRam(pages=n + 1, base=0x100000)
    for i in range(n):  # a chain of n one-entry blocks, built by hand
        nxt = 0x100000 + (i + 1) * PAGE_SIZE if i + 1 < n else 0
        ram.put(0x100000 + i * PAGE_SIZE, np.array([nxt, 1], "<u8").tobytes())
    with pytest.raises(AbiError, match="longer than 10000"):
        kho_block.decode(ram.mem(), 0x100000, 64, "test")
    with pytest.raises(AbiError, match="more than 10000"):
        kho_block.encode(bytes(64 * 63 * 10000 + 64), 64, ram.alloc)


# -- what rides on them: luo_ser (7.2), kexec-metadata (7.1+), the negotiation record -----

@pytest.mark.parametrize("blob, message", [
    (b"luo-v5\0\0" + bytes(16), "less than 32"),
    (b"luo-v4\0\0" + bytes(24), "not 'luo-v5'"),
    (b"luo-v5x\0" + bytes(24), "not 'luo-v5'"),
])
def test_luo_ser_refusals(blob: bytes, message: str) -> None:
    with pytest.raises(AbiError, match=message):
        luo_ser.decode(blob)


def test_luo_ser_compatible_is_compared_as_a_c_string() -> None:
    """strncmp stops at the NUL: 7.3.4's luo_early_startup takes "luo-v5\0" followed by
    any byte."""
    assert luo_ser.decode(b"luo-v5\0x" + (7).to_bytes(8, "little") + bytes(16)) \
        .liveupdate_number == 7


def test_luo_ser_sessions_round_trip_and_duplicates() -> None:
    ram = FakeRam(pages=16, base=0x100000)
    files = [luo_session.FileSer("memfd-v2", 0x5000 + i, i) for i in range(70)]
    first, pages = luo_ser.encode_sessions([("a", files), ("b", [])], ram.alloc)
    for p, page in pages.items():
        ram.put(p, page)
    got, blocks = luo_ser.decode_sessions(ram.mem(), first)
    assert [s.name for s in got] == ["a", "b"] and got[0].files == tuple(files)
    assert len(blocks) == 3 and got[1].files_phys == 0  # two file blocks, one session block
    dup = [("a", []), ("a", [])]
    first, pages = luo_ser.encode_sessions(dup, ram.alloc)
    for p, page in pages.items():
        ram.put(p, page)
    with pytest.raises(AbiError, match="duplicate session name") as e:
        luo_ser.decode_sessions(ram.mem(), first)
    assert e.value.errno == errno.EEXIST


def test_kexec_metadata_and_negotiation_record() -> None:
    md = kexec_metadata.KexecMetadata("7.1.0-lu", 4)
    raw = kexec_metadata.encode(md)
    assert len(raw) == 73 and kexec_metadata.decode(raw) == md
    with pytest.raises(AbiError, match="version 2"):
        kexec_metadata.decode(b"\x02" + raw[1:])
    with pytest.raises(AbiError, match="less than 73"):
        kexec_metadata.decode(raw[:40])
    rec = negotiation.Record("7.2.0-lu", "6.19.0-lu", {"kho": "kho-v1", "luo": "luo-v1"})
    assert negotiation.decode(negotiation.encode(rec)) == rec
    bad = negotiation.encode(negotiation.Record("x", "y", {"kho": "kho-v1"})).replace(
        b"kho-v1", b"kho-v9")
    with pytest.raises(AbiError, match="is no kho format"):
        negotiation.decode(bad)
