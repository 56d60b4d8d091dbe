"""The machine's I/O hardware: one IOMMU and the PCI functions behind it on bus 0, made at
power on from the configuration's ``devices`` and running until power off -- across every
kexec, since a jump replaces the kernel process, not the hardware (invariant 5).

The kernel reaches them through its existing link (no new fd, so invariant 1's honesty test
is unchanged): ``pci_read`` / ``pci_write`` (config space, as the ECAM window would),
``bar_read`` / ``bar_write`` (a function's BAR0 registers), ``iommu_read`` / ``iommu_write``
(the remapping unit's registers). An absent function reads as all ones, as config reads of
an empty slot complete. The host sees their state in the machine's status.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from liveupdate.abi import wire
from liveupdate.abi.wire import Message, arg
from liveupdate.errors import LiveUpdateError
from liveupdate.machine import pci
from liveupdate.machine.iommu import Iommu
from liveupdate.machine.nic import REGS, Nic
from liveupdate.machine.ram import Ram

KINDS = ("nic",)
Handler = Callable[["Bus", Message], Message]
DMA_LOG_PIECE = 1 << 16  # records per dma_log answer (1 MiB)
MAX_RATE = 1e6  # packets per second a source may send


class Bus:
    def __init__(self, ram: Ram, devices: object) -> None:
        """``devices``: ``[{"kind": "nic", "bdf": "00:03.0", "rate": packets per second}]``;
        anything else is EINVAL, and nothing is made."""
        if not isinstance(devices, list):
            raise LiveUpdateError(err=errno.EINVAL, msg="devices must be a list")
        self.iommu = Iommu(ram)
        self.functions: dict[int, Nic] = {}
        for d in devices:
            if not isinstance(d, dict) or d.get("kind") not in KINDS:
                raise LiveUpdateError(err=errno.EINVAL,
                                      msg=f"device {d!r}: kind must be one of {KINDS}")
            try:
                source = pci.bdf(str(d.get("bdf", "")))
                rate = float(d.get("rate", 1000))
                if not 0 < rate <= MAX_RATE:
                    raise ValueError(f"rate must be in (0, {MAX_RATE:g}] packets per second")
                if source >> 8 or source & 7 or source in self.functions:
                    raise ValueError("bus 0, function 0 only, one device per slot")
                self.functions[source] = Nic(source, self.iommu, rate)
            except ValueError as e:
                raise LiveUpdateError(err=errno.EINVAL, msg=f"device {d!r}: {e}") from e

    def start(self) -> None:
        for f in self.functions.values():
            f.start()

    def stop(self) -> None:
        for f in self.functions.values():
            f.stop()

    def access(self, h: dict[str, Any], on_bug: Callable[[str], None]) -> dict[str, Any]:
        """One ``pci_*``/``bar_*``/``iommu_*`` request of a kernel, through the request
        helper every server uses (:func:`liveupdate.abi.wire.dispatch`): its reply
        (``value``, or ``errno`` and ``message``)."""
        return wire.dispatch(HARDWARE, self, Message(h), server="hardware",
                             on_bug=on_bug).header

    def function(self, m: Message) -> Nic | None:
        """The function a request names by requester id (None: an empty slot)."""
        return self.functions.get(arg(m, "bdf", int))

    # -- the host's view ---------------------------------------------------------------------
    def wait_sent(self, bdf: str, count: int, timeout: float) -> dict[str, Any]:
        """Wait until the source of the NIC at ``bdf`` has sent ``count`` packets."""
        try:
            f = self.functions[pci.bdf(bdf)]
        except (KeyError, ValueError) as e:
            raise LiveUpdateError(err=errno.ENODEV, msg=f"no device at {bdf}") from e
        if not f.wait_sent(count, timeout):
            raise LiveUpdateError(err=errno.ETIMEDOUT,
                                  msg=f"{bdf} sent {f.sent} packets, not {count}, in {timeout}s")
        return self.status()

    def dma_log(self, since: int, limit: int = DMA_LOG_PIECE) -> bytes:
        """DMA writes from record ``since``: (physical address, length) as little-endian
        u64 pairs, at most ``limit`` records."""
        with self.iommu.lock:
            return self.iommu.writes[2 * since : 2 * (since + limit)].tobytes()

    def status(self) -> dict[str, Any]:
        u = self.iommu
        return {
            "iommu": {"enabled": u.enabled, "root": f"{u.root:#x}", "faults": u.fault_count,
                      "overflowed": u.overflowed, "dma_writes": u.write_count,
                      "last_faults": [f.describe() for f in list(u.faults)[-8:]]},
            "functions": [_snapshot(s, f) for s, f in sorted(self.functions.items())]}


def _snapshot(source: int, f: Nic) -> dict[str, Any]:
    """One consistent view: a packet counts in ``sent`` and in one counter, or in none."""
    with f.lock:
        return {"bdf": pci.bdf_text(source),
                "bus_master": f.bus_master, "sent": f.sent,
                **{k.lower(): v for k, v in f.regs.items()}}


def _einval(fn: Handler) -> Handler:
    """A value the hardware refuses (the parts raise ValueError) is the kernel's EINVAL."""
    def run(bus: Bus, m: Message) -> Message:
        try:
            return fn(bus, m)
        except (ValueError, ArithmeticError) as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"{m.header.get('op')}: {e}") from e
    return run


def _config(m: Message) -> tuple[int, int]:
    offset, size = arg(m, "offset", int), arg(m, "size", int)
    pci.check(offset, size)
    return offset, size


def _pci_read(bus: Bus, m: Message) -> Message:
    offset, size = _config(m)
    f = bus.function(m)
    if f is None:  # an empty slot: the read completes with all ones
        return Message({"value": (1 << 8 * size) - 1})
    return Message({"value": f.config_read(offset, size)})


SCAN_MAX = 256  # reads in one pci_scan: a bus's 32 slots x 8 functions


def _pci_scan(bus: Bus, m: Message) -> Message:
    """Config reads sent together (``reads``: [bdf, offset, size] each), answered in order
    as one :func:`_pci_read` each: the reads a bus scan makes, in one link round trip (on
    hardware each is an ECAM load of nanoseconds; here a round trip is ~0.5 ms)."""
    reads = m.header.get("reads")
    if not isinstance(reads, list) or len(reads) > SCAN_MAX or not all(
            isinstance(r, list) and len(r) == 3 and all(type(x) is int for x in r)
            for r in reads):
        raise ValueError(f"reads must be at most {SCAN_MAX} [bdf, offset, size] lists")
    return Message({"values": [
        _pci_read(bus, Message({"bdf": b, "offset": o, "size": n})).header["value"]
        for b, o, n in reads]})


def _pci_write(bus: Bus, m: Message) -> Message:
    offset, size = _config(m)
    f = bus.function(m)
    if f is not None:
        f.config_write(offset, size, arg(m, "value", int))
    return Message({})


def _bar(bus: Bus, m: Message) -> tuple[Nic, str]:
    """The register a BAR access names, by ``reg`` (its name) or ``offset`` (in BAR0, as a
    mapping of the BAR addresses it: 32-bit registers, naturally aligned)."""
    f = bus.function(m)
    if f is None or not f.command & pci.PCI_COMMAND_MEMORY:
        raise LiveUpdateError(err=errno.EIO, msg="BAR access to a function without memory "
                              "space enabled")
    if "offset" in m.header:
        offset = arg(m, "offset", int)
        name = next((n for n, at in REGS.items() if at == offset), "")
        if not name:
            raise ValueError(f"no register at BAR0 offset {offset:#x}")
        return f, name
    name = arg(m, "reg", str)
    if name not in REGS:
        raise ValueError(f"no register {name}")
    return f, name


def _bar_read(bus: Bus, m: Message) -> Message:
    f, name = _bar(bus, m)
    return Message({"value": f.reg_read(name)})


def _bar_write(bus: Bus, m: Message) -> Message:
    f, name = _bar(bus, m)
    f.reg_write(name, arg(m, "value", int))
    return Message({})


def _pci_flr(bus: Bus, m: Message) -> Message:
    """A function-level reset (``pcie_flr``'s write of ``PCI_EXP_DEVCTL_BCR_FLR``; the
    functions have no capability list, so the link carries the reset itself): the header as
    at power on, the device's registers cleared. An empty slot: ENODEV."""
    f = bus.function(m)
    if f is None:
        raise LiveUpdateError(err=errno.ENODEV, msg="FLR of an empty slot")
    f.reset()
    return Message({})


def _iommu_read(bus: Bus, m: Message) -> Message:
    return Message({"value": bus.iommu.read_reg(arg(m, "offset", int))})


def _iommu_write(bus: Bus, m: Message) -> Message:
    bus.iommu.write_reg(arg(m, "offset", int), arg(m, "value", int))
    return Message({})


# what a kernel may ask of its hardware over the link, by op
HARDWARE: dict[str, Handler] = {op: _einval(fn) for op, fn in (
    ("pci_read", _pci_read), ("pci_scan", _pci_scan), ("pci_write", _pci_write),
    ("bar_read", _bar_read),
    ("bar_write", _bar_write), ("pci_flr", _pci_flr), ("iommu_read", _iommu_read),
    ("iommu_write", _iommu_write))}
