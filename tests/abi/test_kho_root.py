import errno
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.abi import fdt, kho
from liveupdate.errors import AbiError
from tests.conftest import dtc_decompile, dtc_recompile, needs_dtc

# spec/kho.md 2.2: the 6.16 sequential build of the kernel documentation example.
GOLDEN_616 = bytes.fromhex("""
d00dfeed000000ec00000040000000c8 00000030000000110000001000000000
00000024000000880000000000000000 00000000000000000000000000000000
00000001000000000000000300000007 000000196b686f2d7631000000000003
00000008000000040040be1601000000 000000016d656d626c6f636b00000000
00000003000000080000000000001517 0100000000000002000000016b686f5f
74657374000000000000000300000008 00000000003020000100000000000002
00000002000000096664740070726573 65727665642d6d656d6f72792d6d6170
00636f6d70617469626c6500
""".replace(" ", "").replace("\n", ""))


def test_616_golden_bytes() -> None:
    blob = kho.encode_root_sequential(
        0x116BE4000, [("memblock", 0x117150000), ("kho_test", 0x100203000)])
    assert blob == GOLDEN_616


def _be(*words: int) -> bytes:
    return struct.pack(f">{len(words)}I", *words)


def _node(name: str) -> bytes:
    raw = name.encode() + b"\0"
    return _be(1) + raw + bytes(-len(raw) % 4)


def _prop(nameoff: int, value: bytes) -> bytes:
    return _be(3, len(value), nameoff) + value + bytes(-len(value) % 4)


def test_619_live_construction_bytes() -> None:
    """Children in reverse order of addition, packed header, "fdt" appended to the strings
    block after the sequential skeleton's reversed strings -- built by hand, not by libfdt."""
    live = kho.LiveRoot()
    live.add_subtree("memblock", 0x117150000)
    live.add_subtree("kho_test", 0x100203000)
    live.set_mem_map(0x116BE4000)
    strings = b"preserved-memory-map\0compatible\0fdt\0"
    off_pmm, off_compat, off_fdt = 0, 21, 32
    body = (_node("") + _prop(off_compat, b"kho-v1\0")
            + _prop(off_pmm, struct.pack("<Q", 0x116BE4000))
            + _node("kho_test") + _prop(off_fdt, struct.pack("<Q", 0x100203000)) + _be(2)
            + _node("memblock") + _prop(off_fdt, struct.pack("<Q", 0x117150000)) + _be(2)
            + _be(2) + _be(9))
    off_struct = 0x38
    off_strings = off_struct + len(body)
    total = off_strings + len(strings)
    header = _be(0xD00DFEED, total, off_struct, off_strings, 0x28, 17, 16, 0,
                 len(strings), len(body))
    assert live.blob == header + bytes(16) + body + strings


def test_619_remove_keeps_strings_and_other_children() -> None:
    live = kho.LiveRoot()
    live.add_subtree("a", 0x1000)
    live.add_subtree("b", 0x2000)
    assert live.remove_subtree(0x1000)
    assert not live.remove_subtree(0x9000)
    root = kho.decode_root(live.blob)
    assert root.subtrees == (("b", 0x2000),)
    assert b"fdt\0" in live.blob


def test_add_subtree_errors_leave_tree_unchanged() -> None:
    live = kho.LiveRoot()
    live.add_subtree("memblock", 0x1000)
    before = live.blob
    with pytest.raises(AbiError) as e:
        live.add_subtree("memblock", 0x2000)
    assert e.value.errno == errno.EEXIST and live.blob == before
    i = 0
    with pytest.raises(AbiError) as e:
        while True:
            live.add_subtree(f"subsystem-with-a-long-name-{i:04d}", 0x1000 * i)
            i += 1
    assert e.value.errno == errno.ENOMEM
    assert len(live.blob) <= kho.ROOT_FDT_SIZE and i > 50
    assert len(kho.decode_root(live.blob).subtrees) == i + 1


@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True),
                          st.integers(0, 2**64 - 1)), max_size=20, unique_by=lambda t: t[0]),
       st.integers(0, 2**64 - 1))
def test_round_trip_both_orders(subtrees: list[tuple[str, int]], mem_map: int) -> None:
    seq = kho.decode_root(kho.encode_root_sequential(mem_map, subtrees))
    assert seq.mem_map == mem_map and list(seq.subtrees) == subtrees
    live = kho.LiveRoot()
    for name, phys in subtrees:
        live.add_subtree(name, phys)
    live.set_mem_map(mem_map)
    got = kho.decode_root(live.blob)
    assert got.mem_map == mem_map and list(got.subtrees) == subtrees[::-1]


def test_decode_rejects() -> None:
    b = fdt.SwBuilder().begin_node("").prop("compatible", fdt.string("kho-v2"))
    with pytest.raises(AbiError, match="kho-v2"):
        kho.decode_root(b.prop("preserved-memory-map", fdt.u64(1)).end_node().finish())
    b = fdt.SwBuilder().begin_node("").prop("compatible", fdt.string("kho-v1"))
    with pytest.raises(AbiError, match="not 8"):
        kho.decode_root(b.prop("preserved-memory-map", fdt.u32(1)).end_node().finish())
    with pytest.raises(AbiError, match="never finalized"):
        kho.decode_root(kho.encode_root_sequential(0, []), require_map=True)
    with pytest.raises(AbiError) as e:
        kho.decode_root(GOLDEN_616).subtree("LUO")
    assert e.value.errno == errno.ENOENT


def test_a_broken_child_fails_only_its_own_retrieve() -> None:
    """kho_retrieve_subtree: a child whose ``fdt`` is missing, misshapen or (given RAM) out of
    it gives EINVAL for that name; the root and its other children decode."""
    b = fdt.SwBuilder().begin_node("").prop("compatible", fdt.string("kho-v1"))
    b.prop("preserved-memory-map", fdt.u64(1))
    b.begin_node("short").prop("fdt", b"1234").end_node()
    b.begin_node("none").prop("other", fdt.u64(0x3000)).end_node()
    b.begin_node("far").prop("fdt", fdt.u64(1 << 40)).end_node()
    b.begin_node("good").prop("fdt", fdt.u64(0x2000)).end_node()
    root = kho.decode_root(b.end_node().finish(), ram=lambda p, n: p + n <= 1 << 30)
    assert root.subtree("good") == 0x2000
    assert [n for n, _ in root.broken] == ["short", "none", "far"]
    for name, why in (("short", "short:fdt is 4 bytes"), ("none", "missing"),
                      ("far", "outside RAM")):
        with pytest.raises(AbiError, match=why) as e:
            root.subtree(name)
        assert e.value.errno == errno.EINVAL, name


@needs_dtc
def test_dtc_and_fdtdump_agree() -> None:
    dts = dtc_decompile(GOLDEN_616)
    assert 'compatible = "kho-v1";' in dts
    assert "preserved-memory-map = <0x40be16 0x1000000>;" in dts
    assert "memblock {\n\t\tfdt = <0x1517 0x1000000>;" in dts
    assert kho.decode_root(dtc_recompile(dts)) == kho.decode_root(GOLDEN_616)
    live = kho.LiveRoot()
    live.add_subtree("memblock", 0x117150000)
    live.add_subtree("kho_test", 0x100203000)
    dts = dtc_decompile(live.blob)
    assert dts.index("kho_test {") < dts.index("memblock {")
    dump = subprocess.run(["fdtdump", "/dev/stdin"], input=live.blob, capture_output=True,
                          check=True).stdout.decode()
    assert "// off_mem_rsvmap:\t0x28" in dump and "// off_dt_struct:\t0x38" in dump


def test_v3_root_is_built_the_6_19_way() -> None:
    """spec/kho.md 2.2: a kho-v3 tree with subtrees added kexec-metadata then memblock
    renders memblock first, each node blob-size before preserved-data, and the packed header
    (rsvmap 0x28, struct 0x38)."""
    live = kho.LiveRoot(kho.KHO_V3, 0x200000)
    live.add_subtree("kexec-metadata", 0x300000, 73)
    live.add_subtree("memblock", 0x301000, 0x1000)
    tree = fdt.parse(live.blob)
    assert [c.name for c in tree.root.children] == ["memblock", "kexec-metadata"]
    assert [list(c.props) for c in tree.root.children] == [["blob-size", "preserved-data"]] * 2
    assert struct.unpack_from(">I", live.blob, 8)[0] == 0x38  # off_dt_struct
    assert struct.unpack_from(">I", live.blob, 16)[0] == 0x28  # off_mem_rsvmap
    root = kho.decode_root(live.blob, accept=(kho.KHO_V3,))
    assert root.mem_map == 0x200000 and root.size("kexec-metadata") == 73
    with pytest.raises(AbiError, match="not kho-v1"):
        kho.decode_root(live.blob, accept=(kho.KHO_FDT_COMPATIBLE,))


def test_v3_child_without_blob_size_fails_only_itself() -> None:
    b = fdt.SwBuilder().begin_node("").prop("compatible", fdt.string(kho.KHO_V4))
    b.prop("preserved-memory-map", fdt.u64(0x1000))
    b.begin_node("LUO").prop("preserved-data", fdt.u64(0x2000)).end_node()
    b.begin_node("ok").prop("preserved-data", fdt.u64(0x3000))
    b.prop("blob-size", fdt.u64(32)).end_node()
    root = kho.decode_root(b.end_node().finish())
    assert root.subtrees == (("ok", 0x3000),)
    with pytest.raises(AbiError, match="broken KHO subnode 'LUO': missing or invalid blob-size"):
        root.subtree("LUO")
