"""``luoctl fleet up N``: boot N emulated hosts on this machine, each with luod, its VMs and
its empty migration slots, and write the fleet's state and Ansible inventory.

Each host is the demo's machine (:mod:`liveupdate.scenario.demo`: the same command line,
images and services), made small: guests of a few MiB under TCG (``"accel": "kvm"``: under
KVM; either migrates) that walk their memory and then idle (``--duty``: the share of time a
vCPU runs), no spares, 1 GiB of sparse RAM.
Hosts differ by their spec (:class:`liveupdate.scenario.fleet.state.HostSpec`): the kernel
generation they boot, a VM with an assigned device, a planted fault, their slots.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, start
from liveupdate.scenario.demo import CMDLINE, IMAGES
from liveupdate.scenario.fleet.state import Fleet, HostSpec, VmSpec, save

VM_MEMORY = 16 << 20
HOST_MEMORY = 1 << 30
BOOT_TIMEOUT = 300.0
Say = Callable[[str], None]


def services(h: HostSpec, py: str = sys.executable) -> str:
    """The host's init services: luod, a VMM per VM that is not in a slot, every slot."""
    vmm = f"@restart {py} -m liveupdate.vmm"
    tail = f"--accel {h.accel} --duty {h.duty}"
    lines = [f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60"]
    lines += [f"{vmm} {vm.name} --memory {vm.memory} {tail}"
              + (f" --plant {vm.plant}" if vm.plant else "") for vm in h.vms if not vm.slot]
    lines += [f"{vmm} slot{i} --incoming {tail}" for i in range(h.slots)]
    return "\n".join(lines) + "\n"


def specs(n: int, config: dict[str, Any]) -> dict[str, HostSpec]:
    """``host1`` .. ``hostN`` from ``config``: ``{"target", "generation", "vms", "vm_memory",
    "slots", "duty", "hosts": {"host2": {"generation": "6.19", "assigned": ["vm1"],
    "plant": {"vm0": "cold-start"}, "slots": 2}}}``."""
    out = {}
    for i in range(1, n + 1):
        name = f"host{i}"
        own: dict[str, Any] = config.get("hosts", {}).get(name, {})

        def get(k: str, d: Any, own: dict[str, Any] = own) -> Any:
            return own.get(k, config.get(k, d))

        vms = [VmSpec(f"vm{j}", int(get("vm_memory", VM_MEMORY)),
                      assigned=f"vm{j}" in get("assigned", []),
                      plant=get("plant", {}).get(f"vm{j}", ""))
               for j in range(int(get("vms", 2)))]
        out[name] = HostSpec(name, str(get("generation", config.get("target", "7.2"))),
                             int(get("memory", HOST_MEMORY)), vms, int(get("slots", 1)),
                             float(get("duty", 0.01)), str(get("accel", "tcg")))
    return out


def prepare_disk(folder: str, h: HostSpec) -> None:
    disk = os.path.join(folder, "disk")
    os.makedirs(os.path.join(disk, "images"), exist_ok=True)
    for name, img in IMAGES.items():
        with open(os.path.join(disk, "images", f"{name}.img"), "wb") as f:
            f.write(img.encode())
    write_services(folder, h)


def write_services(folder: str, h: HostSpec) -> None:
    with open(os.path.join(folder, "disk", "services"), "w") as f:
        f.write(services(h))


def wait_services(m: MachineClient, h: HostSpec, offset: int = 0,
                  timeout: float = BOOT_TIMEOUT) -> None:
    """luod listens and every VMM and slot said it started (or resumed)."""
    m.wait("luod: LUO .* listening", offset=offset, timeout=timeout)
    for vm in h.vms:
        if not vm.slot:
            m.wait(f"vmm {vm.name}: .* (started|resumed)", offset=offset, timeout=timeout)
    for i in range(h.slots):
        m.wait(f"vmm slot{i}: .* (started|resumed)", offset=offset, timeout=timeout)


def boot(fleet: str, h: HostSpec) -> None:
    folder = h.folder(fleet)
    shutil.rmtree(folder, ignore_errors=True)
    prepare_disk(folder, h)
    _, m = start(folder, memory=h.memory, cmdline=f"{CMDLINE} lu.spares=0",  # no spares
                 image=f"images/{h.generation}.img",
                 detach=True, log=os.path.join(folder, "machine.log"))
    try:
        m.booted(BOOT_TIMEOUT)
        wait_services(m, h)
    finally:
        m.close()


def inventory(fleet: Fleet) -> str:
    """Ansible's INI inventory: every host local (``ansible_connection=local``), its
    machine folder as ``lu_machine``, the fleet folder as ``lu_fleet`` -- the module's
    options (:doc:`ansible/liveupdate/fleet`)."""
    lines = ["[fleet]"]
    lines += [f"{n} lu_machine={h.folder(fleet.folder)}" for n, h in fleet.hosts.items()]
    lines += ["", "[fleet:vars]", "ansible_connection=local",
              f"ansible_python_interpreter={sys.executable}", f"lu_fleet={fleet.folder}",
              f"lu_target={fleet.target}", ""]
    return "\n".join(lines)


def up(folder: str, n: int, config: dict[str, Any], say: Say, parallel: int = 4) -> Fleet:
    """Boot the fleet (``parallel`` hosts at a time: each boot is a few CPU seconds), then
    write ``fleet.json`` and ``inventory.ini``. A host that fails to boot fails the lot."""
    down(folder)
    os.makedirs(os.path.join(folder, "hosts"), exist_ok=True)
    fleet = Fleet(os.path.abspath(folder), str(config.get("target", "7.2")),
                  specs(n, config))
    errors: list[str] = []
    todo = list(fleet.hosts.values())
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                h = todo.pop(0)
            try:
                boot(fleet.folder, h)
                say(f"{h.name}: Linux {h.generation}, {len(h.vms)} VMs, {h.slots} slots")
            except Exception as e:  # reported below, with the host's name
                with lock:
                    errors.append(f"{h.name}: {e}")

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    save(fleet)
    with open(os.path.join(folder, "inventory.ini"), "w") as f:
        f.write(inventory(fleet))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "n": n, "specs": [asdict(h) for h in fleet.hosts.values()]}, f,
                  indent=1)
    if errors:
        raise LiveUpdateError(err=errno.EIO, msg="; ".join(errors))
    return fleet


def down(folder: str) -> int:
    """Power every host of the fleet at ``folder`` off for good; how many answered."""
    hosts = os.path.join(folder, "hosts")
    n = 0
    for name in sorted(os.listdir(hosts)) if os.path.isdir(hosts) else []:
        m = MachineClient(os.path.join(hosts, name))
        try:
            m.shutdown()
            n += 1
        except OSError:
            pass
    return n
