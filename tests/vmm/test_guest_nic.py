"""The NIC guest's own code under each accelerator: it posts its buffers, and of what a device
writes into its ring it counts the intact packets, the damaged ones and the sequence numbers
skipped -- judged by the guest, read back from its memory -- and gives each descriptor back."""

from __future__ import annotations

import ctypes
import mmap
import shutil
import struct
from collections.abc import Iterator

import pytest

from liveupdate.machine.nic import DESC, packet
from liveupdate.vmm import cpu, guest, guest_nic
from tests.vmm.test_guest import ACCELS

SIZE, ENTRIES = 8 << 20, 16


@pytest.fixture
def ram() -> Iterator[tuple[mmap.mmap, int]]:
    buf = mmap.mmap(-1, SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    guest_nic.layout(memoryview(buf), SIZE, ENTRIES)
    yield buf, addr


def deliver(buf: mmap.mmap, index: int, raw: bytes) -> None:
    """What the device does: the packet into the descriptor's buffer, then length and done."""
    at = guest_nic.RING_AT + DESC.size * index
    addr, length, _, flags = DESC.unpack(buf[at : at + DESC.size])
    assert not flags & 1 and length == guest_nic.BUF  # posted by the guest
    buf[addr : addr + len(raw)] = raw
    buf[at : at + DESC.size] = DESC.pack(addr, length, len(raw), 1)


@pytest.mark.parametrize("make", ACCELS)
def test_the_guest_checks_what_the_device_wrote(ram: tuple[mmap.mmap, int], make: type
                                                ) -> None:
    buf, addr = ram
    a = make(addr, SIZE)
    a.load(cpu.fresh())
    a.run_to_exit()  # posted, then 4096 empty polls
    mem = memoryview(buf)
    assert guest_nic.counters(mem)["postings"] == 1
    damaged = bytearray(packet(13, 0))
    damaged[30] ^= 1
    for i, raw in enumerate((packet(10, 0), packet(11, 0), bytes(damaged), packet(13, 0),
                             packet(15, 0))):
        deliver(buf, i, raw)
    a.run_to_exit()
    c = guest_nic.counters(mem)
    assert (c["received"], c["bad"], c["gaps"], c["expected"], c["rx"]) == (4, 1, 2, 16, 5)
    assert c["last_seq"] == 15 and c["out_of_order"] == 0
    for i in range(5):  # given back
        at = guest_nic.RING_AT + DESC.size * i
        assert DESC.unpack(buf[at : at + DESC.size])[2:] == (0, 0)
    guest_nic.ask_repost(mem)
    a.run_to_exit()
    c = guest_nic.counters(mem)
    assert c["postings"] == 2 and c["rx"] == 0 and c["repost"] == 0
    assert guest.steps(mem) == 3 * guest.STEPS_PER_EXIT


def test_crc_table_is_zlibs() -> None:
    table = struct.unpack("<256I", guest_nic.crc_table())
    crc = 0xFFFFFFFF
    for b in b"liveupdate":
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    import zlib
    assert crc ^ 0xFFFFFFFF == zlib.crc32(b"liveupdate")


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU binutils not installed")
def test_checked_in_bytes_rebuild_from_source() -> None:
    import os
    src = os.path.join(os.path.dirname(guest_nic.__file__), "guest_nic.S")
    assert guest.assemble(src) == guest_nic.CODE
