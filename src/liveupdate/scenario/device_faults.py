"""The passthrough-device faults of issue #25: one table, how each is injected and the outcome
it is defined to end in, and the observed record each cell writes.

The cells are tests/e2e/test_device_vm.py's fault tests: a machine running luod and a VMM with
the NIC assigned (``7.3+posted``, continuous mode, the guest checking every packet), one live
update with the fault injected. Each test writes, once its checks passed, what it observed
(:func:`record`); :mod:`liveupdate.scenario.reliability` renders them as the devices section
of docs/reliability.md -- observed values only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORDS_ENV = "LIVEUPDATE_RELIABILITY_RECORDS"  # tests/conftest.py picks the folder
FOLDER = "devices"  # the device cells' records, under the matrix's folder


@dataclass(frozen=True)
class DeviceFault:
    name: str
    injected: str  # how
    expect: str  # the defined outcome


ROLLS_BACK = ("luod rolls back; init's new VMM reassigns the device; no IOMMU fault, no "
              "damaged packet, every DMA write in a VM's memory")
DEVICE_FAULTS: tuple[DeviceFault, ...] = (
    DeviceFault("device-not-preserved", "`vmm --plant no-device`: the VMM leaves iommufd and "
                "the device file out of its session",
                "`pci_device_shutdown` clears bus mastering at the kexec: DMA stops; the "
                "VMM finds tokens 3 and 4 missing, reassigns the device, the guest reposts "
                "and counts the gap; no IOMMU fault, no DMA outside guest memory"),
    DeviceFault("iommu-table-not-preserved", "`iommu_lu_drop_table=1`: the outgoing kernel "
                "leaves the deepest page-table page out of the IOMMU FLB",
                "the device's context entry is cleared at shutdown; its next DMA faults and "
                "is logged, never lands; iommufd's retrieve fails, the VM is told and the "
                "device reassigned over a new table"),
    DeviceFault("pci-flb-not-honoured", "`pci_lu_ignore_flb=1` on the next kernel's command "
                "line (reachable through a lying manifest or `liveupdate_compat=off`)",
                "the device is enumerated as new and reset at the VMM's bind; the VMM "
                "finds it reset and tells the guest, which reposts and sees the gap; every "
                "file crossed, nothing damaged, no DMA outside guest memory"),
    DeviceFault("kill-vmm@normal", "SIGKILL of the VMM with the device attached, before the "
                "update", "vfio-pci disables the device before unbinding: no DMA into freed "
                "memory; init's new VMM reassigns it; the update then goes through (no gap)"),
    *(DeviceFault(f"kill-vmm@{e}", f"SIGKILL of the VMM {when} (`client/faultpoint.py`)",
                  outcome)
      for e, when, outcome in (
          ("prepare", "inside prepare, before acknowledging", ROLLS_BACK),
          ("freeze", "inside freeze, before acknowledging", ROLLS_BACK),
          ("restore", "in the next kernel, before it retrieves anything",
           "init's new VMM retrieves everything, the update completes; no IOMMU fault, no "
           "damaged packet"))),
    DeviceFault("next-kernel-without-handlers", "`luoctl update` to a plain `7.3` image "
                "(no vfio-pci, iommufd or hugetlb handler)",
                "luod refuses after prepare, naming the VMM's iommufd and vfio files "
                "(Linux would EIO at every open of /dev/liveupdate): no kexec, the VM never "
                "paused and still receives"),
)
BY_NAME = {f.name: f for f in DEVICE_FAULTS}


def record(name: str, observed: dict[str, Any]) -> None:
    """Write the cell ``name``'s observed values (when the test session collects records)."""
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"fault": name, **observed}, indent=1))


def load(folder: Path) -> list[dict[str, Any]]:
    d = folder / FOLDER
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
