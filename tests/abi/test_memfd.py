import errno
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.abi import memfd
from liveupdate.abi.vmalloc import KhoVmalloc
from liveupdate.errors import AbiError


def folios(n: int) -> memfd.Folios:
    return memfd.Folios(np.arange(0x1000, 0x1000 + n, dtype=np.uint64),
                        np.full(n, 3, np.uint16), np.arange(n, dtype=np.uint64))


def test_fdt_era_places_pfn_above_flags() -> None:
    st_ = memfd.MemfdState(5, 3 * 4096, folios(3))
    blob = memfd.encode_fdt(st_)
    raw = blob[blob.index(struct.pack("<QQ", (0x1000 << 12) | 3, 0)):][:16]
    assert struct.unpack("<QQ", raw) == ((0x1000 << 12) | 3, 0)
    got = memfd.decode_fdt(blob)
    assert (got.pos, got.size) == (5, 3 * 4096)
    assert got.folios.pfn.tolist() == [0x1000, 0x1001, 0x1002]
    assert memfd.fdt_alloc_size(0) == 4096 and memfd.fdt_alloc_size(256) == 8192
    assert memfd.fdt_alloc_size(257) == 16384


def test_struct_era_places_flags_above_pfn() -> None:
    raw = memfd.encode_folio_array(folios(1))
    assert struct.unpack("<QQ", raw) == (0x1000 | (3 << 52), 0)
    got = memfd.decode_folio_array(raw, 1, 4096)
    assert got.pfn.tolist() == [0x1000] and got.flags.tolist() == [3]


def test_ser_sizes_and_golden() -> None:
    v = KhoVmalloc(0x2000, 1, 1, 0)
    v1 = memfd.encode_ser(memfd.MemfdSer(1, 2, 3, v))
    assert len(v1) == 40 and v1[:24] == struct.pack("<QQQ", 1, 2, 3)
    v2 = memfd.encode_ser(memfd.MemfdSer(1, 2, 3, v, seals=0x21, compatible=memfd.MEMFD_V2))
    assert len(v2) == 48 and v2[:32] == struct.pack("<QQIIQ", 1, 2, 0x21, 0, 3)
    assert memfd.decode_ser(v2, memfd.MEMFD_V2).seals == 0x21
    assert memfd.decode_ser(v1, memfd.MEMFD_V1).folios == v


def test_ser_rejects() -> None:
    v = KhoVmalloc(0, 0, 0, 0).encode()
    with pytest.raises(AbiError) as e:
        memfd.decode_ser(struct.pack("<QQIIQ", 0, 0, 0x40, 0, 0) + v, memfd.MEMFD_V2)
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(AbiError, match="must be 0"):
        memfd.decode_ser(struct.pack("<QQIIQ", 0, 0, 0, 1, 0) + v, memfd.MEMFD_V2)
    with pytest.raises(AbiError, match="not 40"):
        memfd.decode_ser(b"\0" * 48, memfd.MEMFD_V1)
    with pytest.raises(AbiError) as e:
        memfd.decode_ser(b"\0" * 40, "memfd-v9")
    assert e.value.errno == errno.ENOENT


def test_folio_array_rejects() -> None:
    raw = memfd.encode_folio_array(folios(2))
    with pytest.raises(AbiError, match="beyond the file size"):
        memfd.decode_folio_array(raw, 2, 4096)
    with pytest.raises(AbiError, match="do not fit"):
        memfd.decode_folio_array(raw, 3, 1 << 20)
    bad = struct.pack("<QQ", 1 | (4 << 52), 0)
    with pytest.raises(AbiError, match="unknown flag"):
        memfd.decode_folio_array(bad, 1, 4096)
    dup = struct.pack("<QQQQ", 1, 0, 2, 0)
    with pytest.raises(AbiError, match="same file index"):
        memfd.decode_folio_array(dup, 2, 8192)


@given(st.lists(st.tuples(st.integers(0, (1 << 52) - 1), st.integers(0, 3)),
                max_size=50), st.integers(0, memfd.MAX_LFS_FILESIZE))
def test_round_trips(entries: list[tuple[int, int]], pos: int) -> None:
    n = len(entries)
    f = memfd.Folios(np.array([p for p, _ in entries], np.uint64),
                     np.array([fl for _, fl in entries], np.uint16),
                     np.arange(n, dtype=np.uint64))
    got = memfd.decode_folio_array(memfd.encode_folio_array(f), n, n * 4096)
    kept = [(p, fl) for p, fl in entries if p]  # struct era: pfn 0 entries are skipped
    assert list(zip(got.pfn.tolist(), got.flags.tolist(), strict=True)) == kept
    nz = [(p, fl) for p, fl in entries if p or fl]  # FDT era: foliodesc 0 entries are skipped
    if len(nz) == n:
        st_ = memfd.decode_fdt(memfd.encode_fdt(memfd.MemfdState(pos, n * 4096, f)))
        assert st_.pos == pos and st_.folios.pfn.tolist() == f.pfn.tolist()


def test_struct_era_skips_pfn_zero_entries() -> None:
    """mm/memfd_luo.c skips folio entries with pfn == 0 on retrieve, finish and unpreserve."""
    f = memfd.Folios(np.array([0x300, 0x301], np.uint64),
                     np.array([memfd.FOLIO_UPTODATE, memfd.FOLIO_DIRTY], np.uint16),
                     np.array([0, 2], np.uint64))
    hole = np.zeros(1, memfd.FOLIO_DTYPE).tobytes()  # an entry never filled: desc 0, index 0
    raw = memfd.encode_folio_array(f)[:16] + hole + memfd.encode_folio_array(f)[16:]
    got = memfd.decode_folio_array(raw, 3, 3 * 4096)
    assert got.pfn.tolist() == [0x300, 0x301] and got.index.tolist() == [0, 2]
