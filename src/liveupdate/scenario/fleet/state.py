"""A fleet of emulated hosts, as one folder: ``fleet.json`` (every host's spec, where its VMs
are now, what happened to it), ``inventory.ini`` (Ansible's), ``hosts/<name>/`` (each
machine's folder).

The state file is the fleet's controller-side record, what a real operator keeps in its
inventory and CMDB: which host runs which VMs (a VM that migrated is listed on the host it
went to), which image each host runs, and each host's result in the current rollout. Hosts
are updated in parallel by separate ``luoctl`` processes (one per Ansible fork), so every
change is a read-modify-write under an exclusive ``flock`` of the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from liveupdate import jsonfile
from liveupdate.errors import LiveUpdateError

STATE = "fleet.json"


@dataclass
class VmSpec:
    """One VM of a host. ``assigned``: it has a device assigned (passthrough), so it cannot
    be live-migrated -- for now a flag of the spec; issue #25's assigned NIC sets it for
    real. ``plant``: a planted VMM bug (``cold-start``: the saved vCPU state thrown away at
    restore), the fleet's planted fault. ``slot``: the migration slot it lives in, when it
    migrated here; ``origin``: where it came from."""

    name: str
    memory: int
    assigned: bool = False
    plant: str = ""
    slot: str = ""
    origin: str = ""

    @property
    def sock(self) -> str:
        return f"vmm-{self.slot or self.name}.sock"


@dataclass
class HostSpec:
    name: str
    generation: str
    memory: int
    vms: list[VmSpec]
    slots: int = 1  # empty migration slots booted with the host: its room for VMs
    duty: float = 0.01
    accel: str = "tcg"
    status: str = "untouched"  # untouched, updated, failed, skipped
    result: dict[str, Any] = field(default_factory=dict)

    def folder(self, fleet: str) -> str:
        return os.path.join(fleet, "hosts", self.name)

    def free_slots(self) -> list[str]:
        taken = {vm.slot for vm in self.vms if vm.slot}
        return [s for s in (f"slot{i}" for i in range(self.slots)) if s not in taken]

    @staticmethod
    def from_json(d: dict[str, Any]) -> HostSpec:
        vms = [VmSpec(**v) for v in d.get("vms", [])]
        return HostSpec(**{**d, "vms": vms})


@dataclass
class Fleet:
    folder: str
    target: str
    hosts: dict[str, HostSpec]
    rollout: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "rollout": self.rollout,
                "hosts": {n: asdict(h) for n, h in self.hosts.items()}}

    def host(self, name: str) -> HostSpec:
        try:
            return self.hosts[name]
        except KeyError:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no host {name!r} in the fleet "
                                  f"at {self.folder}") from None


def load(folder: str) -> Fleet:
    path = os.path.join(folder, STATE)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"no fleet at {folder} (luoctl fleet "
                              "up makes one)") from None
    return Fleet(os.path.abspath(folder), d["target"],
                 {n: HostSpec.from_json(h) for n, h in d["hosts"].items()},
                 d.get("rollout", {}))


def save(fleet: Fleet) -> None:
    jsonfile.dump(os.path.join(fleet.folder, STATE), fleet.to_json(), indent=1)


@contextlib.contextmanager
def locked(folder: str) -> Iterator[Fleet]:
    """The fleet's state for a read-modify-write: saved when the block ends normally."""
    with open(os.path.join(folder, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fleet = load(folder)
        yield fleet
        save(fleet)
