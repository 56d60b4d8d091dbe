"""Moving VMs off a host that cannot take a live update: live migration to a host with room,
or eviction of what cannot migrate.

Where to: a host that is already updated (its kernel is the target: the VM will not need to
move again) or runs the target kernel anyway, with a free migration slot -- as KubeVirt's
scheduler picks a node for the target pod, and ``virsh migrate`` needs a destination
``-incoming`` QEMU. A VM with an assigned device (passthrough) cannot be live-migrated
(VFIO devices block migration in QEMU unless their driver supports it): the policy
``evict`` stops it with notice -- paused, judged by the checker, its state reported -- and
``skip`` leaves the whole host untouched.
"""

from __future__ import annotations

import errno
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.scenario import vms
from liveupdate.scenario.fleet import state
from liveupdate.scenario.fleet.state import HostSpec, VmSpec


def pick(fleet: state.Fleet, source: str, vm: VmSpec) -> tuple[HostSpec, str]:
    """A destination host and its free slot: updated hosts first, then untouched ones
    already on the target generation; ENOSPC when no host has room."""
    order = sorted((h for h in fleet.hosts.values() if h.name != source),
                   key=lambda h: (h.status != "updated", h.name))
    for h in order:
        fits = h.status == "updated" or (h.status == "untouched"
                                         and h.generation == fleet.target)
        if fits and h.free_slots():
            return h, h.free_slots()[0]
    raise LiveUpdateError(err=errno.ENOSPC, msg=f"no host has room for {source}/{vm.name} "
                          "(a free migration slot on a host running the target kernel)")


def migrate(fleet_dir: str, source: str, vm_name: str) -> dict[str, Any]:
    """Live-migrate ``source``'s VM to a host with room and record where it went. The slot is
    reserved in the fleet's state before the copy starts (parallel evacuations never pick
    the same one) and released if the migration fails."""
    with state.locked(fleet_dir) as fleet:
        src = fleet.host(source)
        vm = next((v for v in src.vms if v.name == vm_name), None)
        if vm is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no VM {vm_name} on {source}")
        if vm.assigned:  # QEMU: a VFIO device without migration support blocks migration
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"{source}/{vm_name} has an "
                                  "assigned device: it cannot be live-migrated")
        dst, slot = pick(fleet, source, vm)
        placed = VmSpec(f"{source}.{vm.name}", vm.memory, vm.assigned, vm.plant, slot,
                        f"{source}/{vm.name}")
        dst.vms.append(placed)
    src_sock = vms.sockets(src.folder(fleet_dir), (vm.slot or vm.name,))[vm.slot or vm.name]
    dst_sock = vms.sockets(dst.folder(fleet_dir), (slot,))[slot]
    try:
        to = ask(dst_sock, "incoming")["listening"]
        out = ask(src_sock, "migrate", timeout=300.0, to=to, origin=f"{source}/{vm.name}")
    except LiveUpdateError:
        with state.locked(fleet_dir) as fleet:
            d = fleet.host(dst.name)
            d.vms = [v for v in d.vms if v.slot != slot]
        raise
    with state.locked(fleet_dir) as fleet:
        s = fleet.host(source)
        s.vms = [v for v in s.vms if v.name != vm.name]
    verdict = vms.verify(dst.folder(fleet_dir), (slot,))[slot]
    down = out.get("downtime", {})
    return {"vm": vm.name, "to": dst.name, "slot": slot, "rounds": out["rounds"],
            "pages_sent": out["pages_sent"], "seconds": out["seconds"],
            "downtime_s": down.get("host_s"), "downtime_guest_s": down.get("guest_s"),
            "steps_at_pause": down.get("steps_before"),
            "steps_after_resume": down.get("steps_after"),
            "intact": verdict["ok"], "problem": verdict["problem"] or verdict["vcpu_problem"]}


def evict(fleet_dir: str, source: str, vm_name: str) -> dict[str, Any]:
    """Stop the VM with notice: judged by the checker, then paused for good (the host's
    reboot ends it); its last state reported."""
    with state.locked(fleet_dir) as fleet:
        src = fleet.host(source)
        vm = next(v for v in src.vms if v.name == vm_name)
        folder = src.folder(fleet_dir)
        src.vms = [v for v in src.vms if v.name != vm_name]
    name = vm.slot or vm.name
    verdict = vms.verify(folder, (name,))[name]
    ask(vms.sockets(folder, (name,))[name], "pause")
    return {"vm": vm.name, "evicted": True, "steps": verdict["steps"],
            "intact": verdict["ok"], "problem": verdict["problem"] or verdict["vcpu_problem"]}


def evacuate(fleet_dir: str, source: str, assigned: str) -> list[dict[str, Any]]:
    """Every VM off ``source``: migrated, or (assigned device) evicted; with ``assigned``
    ``skip``, EBUSY before anything moved when one has an assigned device."""
    host = state.load(fleet_dir).host(source)
    pinned = [v.name for v in host.vms if v.assigned]
    if pinned and assigned == "skip":
        raise LiveUpdateError(err=errno.EBUSY, msg=f"{', '.join(pinned)} has an assigned "
                              "device and cannot be migrated; the policy skips the host")
    return [evict(fleet_dir, source, v.name) if v.assigned else
            migrate(fleet_dir, source, v.name) for v in host.vms]
