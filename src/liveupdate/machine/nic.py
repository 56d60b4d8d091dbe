"""A receive-only PCI NIC with a DMA engine: hardware that outlives kernels (invariant 5).

A traffic source outside the machine sends a deterministic stream at a fixed rate R: packet
``n`` (from 0) carries its sequence number, the source's send time and a payload derived
from ``n``, closed by a CRC32 (:func:`packet`). The NIC receives it into a ring of
descriptors in memory that its driver (a VM's, through the IOMMU) owns, the way e1000-class
NICs do:

* registers in BAR0 (:data:`REGS`): ``CTRL`` (bit 0 receive enable), the ring's DMA address
  (``RING_LO``/``RING_HI``) and entry count (``RING_SIZE``, a power of two), the device's
  next descriptor (``HEAD``) and its counters (``DELIVERED``, ``DROPS``, ``DMA_ERRORS``);
* a descriptor is 16 bytes: buffer DMA address (u64), buffer length (u16), written length
  (u16), flags (u8; bit 0 ``DD``, descriptor done), 3 reserved bytes. The device owns a
  descriptor whose ``DD`` is clear: it writes the packet into the buffer, then the length and
  ``DD``; the driver consumes it and clears ``DD`` to give it back. No doorbell: the device
  reads the next descriptor's flags for every packet (descriptors in memory it polls), so the
  guest needs no BAR mapped -- the access path the devices issue chose.

A packet that finds the next descriptor still done (the ring full), the device not receiving
(receive off, bus mastering off, reset) or a buffer too small is dropped and counted, as a
real NIC counts missed packets: the source does not wait. A DMA the IOMMU refuses, or one no
RAM answers, aborts that packet (``DMA_ERRORS``; a refusal is in the IOMMU's fault log).
Only a reset or bus master off stops the device; a kexec does not touch it.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib

from liveupdate.machine.iommu import DmaError, Iommu
from liveupdate.machine.pci import PciFunction

VENDOR, DEVICE = 0x1B36, 0x11B0  # QEMU's vendor id for emulated devices; a device id of ours
CLASS_ETHERNET = 0x020000
BAR_SIZE = 0x1000
REGS = {"CTRL": 0x00, "RING_LO": 0x08, "RING_HI": 0x0C, "RING_SIZE": 0x10, "HEAD": 0x14,
        "DELIVERED": 0x18, "DROPS": 0x1C, "DMA_ERRORS": 0x20}
WRITABLE = {"CTRL", "RING_LO", "RING_HI", "RING_SIZE"}
CTRL_RX = 1
DESC = struct.Struct("<QHHB3x")
DD = 1
PACKET = struct.Struct("<4sIQQ32sI")  # magic, reserved, seq, sent ns, payload, crc32
PACKET_MAGIC = b"LUPK"
MAX_BURST = 4096  # packets delivered in one go when the engine fell behind


def packet(seq: int, sent_ns: int) -> bytes:
    payload = (seq.to_bytes(8, "little") * 4)[:32]
    body = PACKET.pack(PACKET_MAGIC, 0, seq, sent_ns, payload, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def check_packet(raw: bytes) -> int:
    """The sequence number of an intact packet; ValueError naming what is wrong otherwise."""
    if len(raw) != PACKET.size:
        raise ValueError(f"packet of {len(raw)} bytes, not {PACKET.size}")
    magic, _, seq, _, payload, crc = PACKET.unpack(raw)
    if magic != PACKET_MAGIC or zlib.crc32(raw[:-4]) != crc:
        raise ValueError("bad magic or checksum")
    if payload != (seq.to_bytes(8, "little") * 4)[:32]:
        raise ValueError(f"packet {seq}: payload is not its own")
    return int(seq)


class Nic(PciFunction):
    def __init__(self, source: int, iommu: Iommu, rate: float) -> None:
        if rate <= 0:
            raise ValueError("the packet rate must be positive")
        self.iommu = iommu
        self.rate = rate
        self.regs = dict.fromkeys(REGS, 0)
        self.sent = 0  # packets the source has sent, delivered or not
        super().__init__(source, VENDOR, DEVICE, CLASS_ETHERNET, BAR_SIZE)
        self.arrived = threading.Condition(self.lock)  # notified after each packet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    # -- registers (BAR0) -----------------------------------------------------------------
    def reg_read(self, name: str) -> int:
        with self.lock:
            return self.regs[name]

    def reg_write(self, name: str, value: int) -> None:
        if name not in WRITABLE:
            raise ValueError(f"NIC register {name} is read-only")
        if name == "RING_SIZE" and (value <= 0 or value & (value - 1) or value > 1 << 16):
            raise ValueError("RING_SIZE must be a power of two up to 65536")
        with self.lock:
            self.regs[name] = value & 0xFFFFFFFF
            if name in ("RING_LO", "RING_HI", "RING_SIZE"):
                self.regs["HEAD"] = 0

    def reset_device(self) -> None:
        self.regs = dict.fromkeys(REGS, 0)

    # -- the wire and the DMA engine ------------------------------------------------------
    def receive(self, count: int) -> None:
        """``count`` more packets arrive from the source, each delivered or dropped."""
        for _ in range(count):
            with self.lock:
                seq, self.sent = self.sent, self.sent + 1
                self._deliver(packet(seq, time.monotonic_ns()))
                self.arrived.notify_all()

    def wait_sent(self, count: int, timeout: float) -> bool:
        """Whether the source has sent ``count`` packets within ``timeout`` seconds."""
        with self.arrived:
            return self.arrived.wait_for(lambda: self.sent >= count, timeout)

    def _deliver(self, pkt: bytes) -> None:
        r = self.regs
        if not (self.bus_master and r["CTRL"] & CTRL_RX and r["RING_SIZE"]):
            r["DROPS"] += 1
            return
        ring = r["RING_HI"] << 32 | r["RING_LO"]
        at = ring + DESC.size * r["HEAD"]
        try:
            buf, length, _, flags = DESC.unpack(self.iommu.dma_read(self.source, at, DESC.size))
            if flags & DD or length < len(pkt):
                r["DROPS"] += 1
                return
            self.iommu.dma_write(self.source, buf, pkt)
            self.iommu.dma_write(self.source, at, DESC.pack(buf, length, len(pkt), DD))
        except DmaError:  # refused by the IOMMU, or no RAM there: the packet is lost
            r["DMA_ERRORS"] += 1
            return
        r["HEAD"] = (r["HEAD"] + 1) % r["RING_SIZE"]
        r["DELIVERED"] += 1

    def start(self) -> None:
        """The source starts sending at :attr:`rate` packets per second."""
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="nic")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        period = 1.0 / self.rate
        while not self._stop.wait(period):  # pacing of the source, not synchronization
            due = int((time.monotonic() - self._t0) * self.rate) - self.sent
            self.receive(min(max(due, 0), MAX_BURST))
