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
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.machine import pci
from liveupdate.machine.iommu import Iommu
from liveupdate.machine.nic import REGS, Nic
from liveupdate.machine.ram import Ram

KINDS = ("nic",)
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

    def _function(self, h: dict[str, Any]) -> Nic | None:
        bdf = h.get("bdf")
        return self.functions.get(bdf) if isinstance(bdf, int) else None

    # -- link operations: the kernel's access to the hardware ----------------------------
    def access(self, h: dict[str, Any]) -> dict[str, Any]:
        """One ``pci_*``/``bar_*``/``iommu_*`` request of a kernel: its reply (``value``, or
        ``errno`` and ``message``)."""
        op = h.get("op")
        try:
            f = self._function(h)
            if op in ("pci_read", "pci_write"):
                offset, size = int(h["offset"]), int(h["size"])
                pci.check(offset, size)
            if op == "pci_read":
                if f is None:  # an empty slot: the read completes with all ones
                    return {"value": (1 << 8 * size) - 1}
                return {"value": f.config_read(offset, size)}
            if op == "pci_write":
                if f is not None:
                    f.config_write(offset, size, int(h["value"]))
                return {}
            if op in ("bar_read", "bar_write"):
                if f is None or not f.command & pci.PCI_COMMAND_MEMORY:
                    raise LiveUpdateError(err=errno.EIO, msg="BAR access to a function "
                                          "without memory space enabled")
                name = str(h["reg"])
                if name not in REGS:
                    raise ValueError(f"no register {name}")
                if op == "bar_read":
                    return {"value": f.reg_read(name)}
                f.reg_write(name, int(h["value"]))
                return {}
            if op == "iommu_read":
                return {"value": self.iommu.read_reg(int(h["offset"]))}
            if op == "iommu_write":
                self.iommu.write_reg(int(h["offset"]), int(h["value"]))
                return {}
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            return {"errno": errno.EINVAL, "message": f"{op}: {e}"}
        except LiveUpdateError as e:
            return {"errno": e.errno, "message": e.message}
        return {"errno": errno.EINVAL, "message": f"no device operation {op!r}"}

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
