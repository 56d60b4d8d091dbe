import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.abi import bootparams as bp
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from tests.conftest import FakeRam

u64 = st.integers(0, 2**64 - 1)


@given(u64, u64, u64, st.integers(0, 2**59).map(lambda n: n * 16))
def test_kho_data_round_trip(a: int, b: int, c: int, d: int) -> None:
    kd = bp.KhoData(a, b, c, d)
    raw = bp.kho_setup_data(kd)
    assert len(raw) == 16 + 32
    node, nxt = bp.decode_setup_data(raw)
    assert nxt == 0 and bp.decode_kho_setup_data(node) == kd


def test_kho_setup_data_golden() -> None:
    raw = bp.kho_setup_data(bp.KhoData(0x1000, 0x1000, 0x2000, 32), next_phys=0x9000)
    assert raw[:16] == struct.pack("<QII", 0x9000, 10, 32)
    assert raw[16:] == struct.pack("<4Q", 0x1000, 0x1000, 0x2000, 32)


def test_setup_data_rejects() -> None:
    with pytest.raises(AbiError, match="shorter than its 16-byte header"):
        bp.decode_setup_data(b"\0" * 8)
    with pytest.raises(AbiError, match="says 32 data bytes"):
        bp.decode_setup_data(bp.kho_setup_data(bp.KhoData(0, 0, 0, 0))[:-1])
    node, _ = bp.decode_setup_data(bp.encode_setup_data(2, b"x" * 32))
    with pytest.raises(AbiError, match="not SETUP_KEXEC_KHO"):
        bp.decode_kho_setup_data(node)
    with pytest.raises(AbiError, match="multiple of 16"):
        bp.KhoData.decode(struct.pack("<4Q", 0, 0, 0, 17))


def test_setup_chain_and_boot_params(ram: FakeRam) -> None:
    second = ram.alloc()
    first = ram.alloc()
    ram.put(second, bp.encode_setup_data(1, b"e820ext"))
    ram.put(first, bp.kho_setup_data(bp.KhoData(1, 2, 3, 16), next_phys=second))
    line = ram.alloc()
    ram.put(line, b"kho=on liveupdate=on\0")
    e820 = np.array([(0, 0x9F000, bp.E820_RAM), (0x100000, 1 << 30, bp.E820_RAM),
                     (0xFEE00000, 0x1000, bp.E820_RESERVED)], bp.E820_DTYPE)
    page = bp.BootParams(e820, line, 2048, first).encode()
    assert page[0x1FE:0x200] == b"\x55\xaa" and page[0x202:0x206] == b"HdrS"
    assert page[0x1E8] == 3 and struct.unpack_from("<Q", page, 0x250)[0] == first
    got = bp.BootParams.decode(page)
    assert got.ram_ranges() == [(0, 0x9F000), (0x100000, 1 << 30)]
    assert got.read_cmdline(ram.mem()) == "kho=on liveupdate=on"
    chain = bp.read_setup_chain(ram.mem(), got.setup_data)
    assert [n.type for n in chain] == [10, 1] and chain[1].data == b"e820ext"


def test_setup_chain_loop(ram: FakeRam) -> None:
    p = ram.alloc()
    ram.put(p, bp.encode_setup_data(1, b"", next_phys=p))
    with pytest.raises(AbiError, match="loops"):
        bp.read_setup_chain(ram.mem(), p)


def test_boot_params_rejects() -> None:
    with pytest.raises(AbiError, match="not 4096"):
        bp.BootParams.decode(b"\0" * 100)
    with pytest.raises(AbiError, match="HdrS"):
        bp.BootParams.decode(b"\0" * 4096)
    page = bytearray(bp.BootParams().encode())
    page[0x1E8] = 200
    with pytest.raises(AbiError, match="e820_entries 200"):
        bp.BootParams.decode(bytes(page))
    mem = PhysMem(bytearray(b"x" * 64))
    with pytest.raises(AbiError, match="NUL-terminated"):
        bp.BootParams(cmd_line_ptr=8).read_cmdline(mem)


def test_scratch_and_chosen() -> None:
    raw = bp.encode_scratch(np.array([0x1000000, 0x40000000]), np.array([0x4000000, 1 << 28]))
    arr = bp.decode_scratch(raw)
    assert arr["addr"].tolist() == [0x1000000, 0x40000000] and len(raw) == 32
    with pytest.raises(AbiError, match="whole number"):
        bp.decode_scratch(raw[:-1])
    cell = bp.encode_chosen_range(0x116BE4000, 0x1000)
    assert cell == bytes.fromhex("0000000116be4000" "0000000000001000")
    assert bp.decode_chosen_range(cell) == (0x116BE4000, 0x1000)
    with pytest.raises(AbiError, match="not 16"):
        bp.decode_chosen_range(cell[:12])
    assert bp.decode_chosen_range(bp.encode_chosen_range(5, 6, 1, 1), 1, 1) == (5, 6)
