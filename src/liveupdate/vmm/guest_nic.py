"""The guest that owns a NIC (source: guest_nic.S beside this file; issue #25): it posts its
receive buffers itself and checks every packet the device writes -- sequence number, CRC-32,
payload -- keeping its counters in its own memory (:func:`counters`). The VMM gives it the
memory-walking guest's page tables and state page (:func:`liveupdate.vmm.guest.layout`), then
this code, a ring, buffers and the CRC table (:func:`layout`); the device address of a guest
buffer is its guest-physical address (the IOAS maps guest memory at IOVA 0).

:data:`CODE` is GNU ``as --64`` + ``objcopy`` of guest_nic.S, checked in like the walking
guest's; ``python -m liveupdate.vmm.guest_nic`` prints it again.
"""

from __future__ import annotations

import os
import struct
import sys

from liveupdate.vmm import guest

CODE = bytes.fromhex(
    "49b8001000000000000049ff403049bb0060000000000000498bb84008000049"
    "8b8848080000498bb05008000048893748c74708400000004883c6404883c710"
    "48ffc975e849c780000800000000000049c780600800000000000049ff805808"
    "00004983b8600800000075ac498bb80008000048c1e7044903b840080000f647"
    "0c01751949ff803808000049f78038080000ff0f000075cae9f4000000488b1f"
    "0fb7470a83f83c0f85a6000000813b4c55504b0f859a000000b8ffffffff31c9"
    "0fb6140b31c20fb6d2c1e80841330493ffc183f93872e9f7d03b43387575488b"
    "430848394318756b48394320756548394328755f4839433075594983b8300800"
    "000075124989800808000049c7803008000001000000498b90080800004839d0"
    "730949ff8028080000eb184889c14829d149018820080000488d500149899008"
    "0800004989807008000049ff8010080000eb0749ff801808000048c747084000"
    "0000498b800008000048ffc0498b884808000048ffc94821c849898000080000"
    "49f78010080000ff0000000f85d1feffff498100001000000f3148c1e2204809"
    "d0498b48184883e13f498984c80001000049ff4018418b00e7e9e9a3feffff"
)
CRC_AT = 0x6000  # after the page directories of a guest of up to 2 GiB
RING_AT = guest.DATA_AT
BUFS_AT = guest.DATA_AT + (1 << 20)
BUF = 64
MAX_GUEST = 2 << 30
N = {"rx": 0x800, "expected": 0x808, "received": 0x810, "bad": 0x818, "gaps": 0x820,
     "out_of_order": 0x828, "first": 0x830, "polls": 0x838, "ring": 0x840, "entries": 0x848,
     "bufs": 0x850, "postings": 0x858, "repost": 0x860, "last_seq": 0x870,
     "drops_before_rx": 0x878}  # the last one the VMM's: the device's drops before RX on


def crc_table() -> bytes:
    """zlib's CRC-32 table (reflected 0xEDB88320), 256 little-endian u32."""
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        out.append(c)
    return struct.pack("<256I", *out)


def layout(mem: memoryview, size: int, entries: int) -> None:
    """The NIC guest in a fresh guest of ``size`` bytes with a ring of ``entries``."""
    if size > MAX_GUEST or entries & (entries - 1) or not 0 < entries <= 1 << 16 \
            or BUFS_AT + entries * BUF > size:
        raise ValueError("a NIC guest: up to 2 GiB, a power-of-two ring up to 65536 "
                         "entries whose buffers fit")
    guest.layout(mem, size)
    mem[guest.CODE_AT : guest.CODE_AT + len(CODE)] = CODE
    mem[CRC_AT : CRC_AT + 1024] = crc_table()
    for name, value in (("ring", RING_AT), ("entries", entries), ("bufs", BUFS_AT)):
        put(mem, name, value)


def put(mem: memoryview, name: str, value: int) -> None:
    at = guest.STATE_AT + N[name]
    mem[at : at + 8] = value.to_bytes(8, "little")


def counters(mem: memoryview) -> dict[str, int]:
    """The guest's own counters, read from its memory."""
    raw = bytes(mem[guest.STATE_AT + 0x800 : guest.STATE_AT + 0x880])
    return {name: int.from_bytes(raw[off - 0x800 : off - 0x7F8], "little")
            for name, off in N.items()}


def waiting(mem: memoryview) -> list[tuple[int, int]]:
    """(sequence number, send time) of every packet the device left done in the ring from
    the guest's next descriptor on, in ring order -- read while the guest does not run."""
    c = counters(mem)
    out = []
    for k in range(c["entries"]):
        at = c["ring"] + 16 * ((c["rx"] + k) % c["entries"])
        buf, _, length, flags = struct.unpack("<QHHB3x", bytes(mem[at : at + 16]))
        if not flags & 1 or length < 24 or buf + 24 > len(mem):
            break
        seq, sent = struct.unpack("<QQ", bytes(mem[buf + 8 : buf + 24]))
        out.append((seq, sent))
    return out


def ask_repost(mem: memoryview) -> None:
    """Tell the guest its device was reset: it posts every buffer again from descriptor 0."""
    put(mem, "repost", 1)



if __name__ == "__main__":
    sys.stdout.write(guest.assemble(os.path.join(os.path.dirname(__file__), "guest_nic.S"))
                     .hex() + "\n")
