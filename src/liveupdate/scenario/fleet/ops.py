"""What the fleet does to one emulated host: pre-flight, live update, cold reboot, health.

Each step is what a script on that host would do with ``luoctl`` (``load``, ``update``,
``wait``, ``vm status|verify``), done here from the host side of the emulated machine, as
:class:`liveupdate.scenario.demo.Demo` does: luod's socket in the machine's run folder, the
console to follow the VMMs coming back, the checker's verdicts from the machine's RAM.
"""

from __future__ import annotations

import os
import time
from typing import Any

from liveupdate.client.update import load_image, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.scenario import vms
from liveupdate.scenario.demo import CMDLINE
from liveupdate.scenario.fleet.hosts import BOOT_TIMEOUT, wait_services, write_services
from liveupdate.scenario.fleet.state import HostSpec

UPDATE_TIMEOUT = 120.0


def luod(folder: str) -> str:
    return os.path.join(folder, "run", "luod.sock")


def preflight(folder: str, target: str) -> tuple[bool, str, dict[str, Any]]:
    """luod's pre-flight of the target image (``luoctl load``): (accepted, why, handover).
    A refusal loads nothing: the host is untouched."""
    try:
        loaded = load_image(luod(folder), f"images/{target}.img")
    except LiveUpdateError as e:
        return False, e.message, {}
    h = loaded["handover"]
    return True, f"{h['mode']} handover", h


def live_update(folder: str, h: HostSpec) -> dict[str, Any]:
    """The loaded update (``luoctl update``), followed to the next kernel: luod's report,
    and every VM (slots holding one included) back and resumed."""
    m = MachineClient(folder)
    try:
        off = m.status()["console_bytes"]
        t0 = time.monotonic()
        st, report = run_update(luod(folder))
        wait_services(m, h, offset=off, timeout=UPDATE_TIMEOUT)
        for vm in h.vms:
            m.wait(f"vmm {vm.slot or vm.name}: .*resumed", offset=off, timeout=UPDATE_TIMEOUT)
        jump = m.status().get("last_jump_seconds")
    finally:
        m.close()
    return {"update": st["update"], "seconds": time.monotonic() - t0, "jump_s": jump,
            "timeline": report.get("timeline", {}), "finish": report.get("finish")}


def cold_reboot(folder: str, h: HostSpec, target: str) -> float:
    """The ordinary update: a power cycle into the target image, VMs that left no longer in
    the host's services. Its VMs' lines go with them; the host rejoins with its slots empty
    (room for others). Returns the seconds it took until every service answered."""
    write_services(folder, h)
    m = MachineClient(folder)
    t0 = time.monotonic()
    try:
        m.power_cycle(image=f"images/{target}.img", cmdline=CMDLINE)
        m.booted(BOOT_TIMEOUT)
        wait_services(m, h)
    finally:
        m.close()
    return time.monotonic() - t0


def release(folder: str) -> str:
    """The kernel the host runs now (``uname -r`` of its kernel)."""
    m = MachineClient(folder)
    try:
        return str(m.status()["kernel"]["release"])
    finally:
        m.close()


def steps_rising(folder: str, names: list[str], timeout: float = 30.0) -> dict[str, bool]:
    """Whether each VM's step counter moves on (the guest runs), waiting up to ``timeout``
    for a change after the first reading (a duty-cycled guest idles between bursts)."""
    socks = vms.sockets(folder, tuple(names))
    first = {n: int(ask(s, "status")["steps"]) for n, s in socks.items()}
    rising = dict.fromkeys(names, False)
    deadline = time.monotonic() + timeout
    while not all(rising.values()) and time.monotonic() < deadline:
        for n, s in socks.items():
            rising[n] = rising[n] or int(ask(s, "status")["steps"]) > first[n]
        if not all(rising.values()):
            time.sleep(0.05)  # polling a guest's counter; nothing to wait on
    return rising


def health(folder: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each named VM: the checker's verdict, its last blackout (host clock), steps rising."""
    verdicts = vms.verify(folder, tuple(names)) if names else {}
    rising = steps_rising(folder, names) if names else {}
    out = {}
    for n in names:
        v, st = verdicts[n], verdicts[n]["status"]
        out[n] = {"ok": v["ok"], "intact": v["intact"], "vcpu_restored": v["vcpu_restored"],
                  "problem": v["problem"] or v["vcpu_problem"], "steps": v["steps"],
                  "steps_rising": rising[n], "restored": st["restored"],
                  "blackout_s": st.get("blackout", {}).get("host_s"),
                  "blackout_guest_s": st.get("blackout", {}).get("guest_s")}
    return out

