import errno

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.abi import fdt, luo_session, luo_v3
from liveupdate.errors import AbiError
from tests.conftest import FakeRam, dtc_decompile, needs_dtc

tokens = st.integers(0, 2**64 - 1)


def test_v3_luo_fdt_layout() -> None:
    blob = luo_v3.encode_luo_fdt([("file-descriptors", 0x1234000), ("iommu", 7)])
    assert len(blob) == 4096  # never packed
    tree = fdt.parse(blob)
    sub = tree.root.need_child("subsystems", "t")
    # libfdt inserts new properties first: last registered first, compatible last
    assert list(sub.props) == ["iommu", "file-descriptors", "compatible"]
    got = luo_v3.decode_luo_fdt(blob)
    assert got.subsystems == {"iommu": 7, "file-descriptors": 0x1234000}
    assert got.files_fdt == 0x1234000


@given(st.lists(st.tuples(tokens, st.integers(0, 2**64 - 1)), max_size=40,
                unique_by=lambda t: t[0]))
def test_files_fdt_round_trip(entries: list[tuple[int, int]]) -> None:
    files = [luo_v3.FileEntry(t, "memfd-v1", d) for t, d in entries]
    got = luo_v3.decode_files_fdt(luo_v3.encode_files_fdt(files))
    assert got == sorted(files, key=lambda f: f.token)


def test_files_fdt_names_and_root() -> None:
    blob = luo_v3.encode_files_fdt([luo_v3.FileEntry(0x1A, "memfd-v1", 1),
                                    luo_v3.FileEntry(0, "memfd-v1", 2)])
    tree = fdt.parse(blob)
    assert tree.root.name == "file-descriptors"
    assert [c.name for c in tree.root.children] == ["0", "0x1a"]
    assert luo_v3.files_fdt_alloc_size(0) == 4096 and luo_v3.files_fdt_alloc_size(30) == 8192


@pytest.mark.parametrize("name, value", [("0x1a", 26), ("0", 0), ("010", 8), ("42", 42),
                                         ("0XfF", 255)])
def test_parse_token(name: str, value: int) -> None:
    assert luo_v3.parse_token(name) == value


@pytest.mark.parametrize("name", ["", "0x", "09", "abc", "-1", "0x1g", "18446744073709551616"])
def test_parse_token_rejects(name: str) -> None:
    with pytest.raises(AbiError):
        luo_v3.parse_token(name)


def test_files_fdt_duplicate_token_is_refused() -> None:
    b = fdt.SwBuilder().begin_node("file-descriptors")
    b.prop("compatible", fdt.string("file-descriptors-v1"))
    for name in ("0x10", "16"):
        b.begin_node(name).prop("compatible", fdt.string("memfd-v1"))
        b.prop("data", fdt.u64(0)).end_node()
    with pytest.raises(AbiError) as e:
        luo_v3.decode_files_fdt(b.end_node().finish())
    assert e.value.errno == errno.EEXIST


@needs_dtc
def test_dtc_reads_files_fdt() -> None:
    blob = luo_v3.encode_files_fdt([luo_v3.FileEntry(0x1A, "memfd-v1", 0x1000)])
    dts = dtc_decompile(blob)
    assert "0x1a {" in dts and 'compatible = "file-descriptors-v1";' in dts


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.none() | st.integers(0, 2**64 - 1))
def test_session_luo_fdt_round_trip(num: int, header: int, flb: int | None) -> None:
    got = luo_session.decode_luo_fdt(luo_session.encode_luo_fdt(num, header, flb))
    assert (got.liveupdate_number, got.session_header, got.flb_header) == (num, header, flb)


def test_session_luo_fdt_requires_flb_when_asked() -> None:
    with pytest.raises(AbiError) as e:
        luo_session.decode_luo_fdt(luo_session.encode_luo_fdt(1, 2), require_flb=True)
    assert e.value.errno == errno.ENOENT


names = st.text(st.characters(codec="ascii", min_codepoint=33, max_codepoint=126),
                min_size=1, max_size=63)


@given(st.lists(st.tuples(names, st.lists(st.tuples(tokens, st.integers(0, 2**64 - 1)),
                                          max_size=5, unique_by=lambda t: t[0])),
                max_size=6, unique_by=lambda t: t[0]))
def test_sessions_round_trip(sessions: list[tuple[str, list[tuple[int, int]]]]) -> None:
    ram = FakeRam(pages=40)
    rows = []
    for name, files in sessions:
        fphys = 0
        if files:
            fphys = ram.alloc(2)
            ram.put(fphys, luo_session.encode_files(
                [luo_session.FileSer("memfd-v1", d, t) for t, d in files]))
        rows.append((name, fphys, len(files)))
    header = ram.alloc(16)
    ram.put(header, luo_session.encode_sessions(rows))
    got = luo_session.decode_sessions(ram.mem(), header)
    assert [s.name for s in got] == [n for n, _ in sessions]
    assert [[(f.token, f.data) for f in s.files] for s in got] == [f for _, f in sessions]


def test_session_limits() -> None:
    assert luo_session.SESSION_MAX == 819 and luo_session.FILE_MAX == 128
    with pytest.raises(AbiError) as e:
        luo_session.encode_sessions([(f"s{i}", 0, 0) for i in range(820)])
    assert e.value.errno == errno.ENOMEM
    with pytest.raises(AbiError) as e:
        luo_session.encode_files([luo_session.FileSer("memfd-v1", 0, i) for i in range(129)])
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(AbiError, match="does not fit 63"):
        luo_session.encode_sessions([("A" * 64, 0, 0)])


def test_sessions_reject_hostile_headers(ram: FakeRam) -> None:
    header = ram.alloc(16)
    ram.put(header, np.uint64(820).tobytes())
    with pytest.raises(AbiError, match="count 820"):
        luo_session.decode_sessions(ram.mem(), header)
    ram.put(header, np.uint64(1).tobytes() + b"A" * 64 + np.array([0, 0], "<u8").tobytes())
    with pytest.raises(AbiError, match="not NUL-terminated"):
        luo_session.decode_sessions(ram.mem(), header)
    ram.put(header, luo_session.encode_sessions([("vm", 0, 3)]))
    with pytest.raises(AbiError, match="no file array"):
        luo_session.decode_sessions(ram.mem(), header)
    ram.put(header, luo_session.encode_sessions([("vm", 0xDEAD0000, 3)]))
    with pytest.raises(AbiError, match="outside RAM"):
        luo_session.decode_sessions(ram.mem(), header)


def test_flb_round_trip(ram: FakeRam) -> None:
    p = ram.alloc()
    flbs = [luo_session.FlbSer("iommu-core-v1", 0x5000, 2)]
    ram.put(p, luo_session.encode_flbs(flbs))
    assert luo_session.decode_flbs(ram.mem(), p) == flbs
