"""Where a VM's blackout goes: its parts, from the records of everyone who saw a piece of it.

A VM's blackout runs from the guest's last exit before the pause to its first entry after the
resume (:mod:`liveupdate.vmm.vmm`, host CLOCK_MONOTONIC). Between them, in order:

* **freeze acknowledgement** -- to luod's ``reboot`` (every client acknowledged the freeze
  and luod calls ``reboot()``; luod's timeline is CLOCK_REALTIME, carried over by the VMM's
  own pair of clocks at the pause) -- waiting, too, for the other clients' pauses;
* **reboot path** -- luod's ``reboot()`` through the kernel's ordered steps to the jump
  request the machine records (``request_ns``);
* **jump** -- to the machine's "go" to the next kernel's process (``start_ns``);
* **next kernel boot** -- to its "booted" (``booted_ns``);
* **luod adoption** -- to the next luod's socket bound (``listening_ns``: a spare adopted by
  init, or a started Python without spares);
* **VMM restore** -- to the VMM's memory mapped and vCPU loaded (``restored_ns``);
* **vCPU resume** -- to the guest's first entry.

A point nobody recorded (a real kernel has no machine to witness the jump) merges its part
into the next one ("reboot path + jump + next kernel boot"). The parts add up to the blackout.
"""

from __future__ import annotations

from typing import Any

NS = 1e9


def parts(vm: dict[str, Any], timeline: dict[str, float], jump: dict[str, int],
          listening_ns: int | None) -> dict[str, float] | None:
    """The blackout of one VM (its VMM's ``blackout`` record) in parts, seconds each; None
    without the VMM's two ends."""
    paused, resumed = vm.get("paused_ns"), vm.get("resumed_ns")
    if not paused or not resumed:
        return None
    acked = None
    if "reboot" in timeline and vm.get("paused_wall_ns"):
        acked = int(timeline["reboot"] * NS) - (int(vm["paused_wall_ns"]) - int(paused))
    points = [("freeze acknowledgement", acked), ("reboot path", jump.get("request_ns")),
              ("jump", jump.get("start_ns")), ("next kernel boot", jump.get("booted_ns")),
              ("luod adoption", listening_ns), ("VMM restore", vm.get("restored_ns")),
              ("vCPU resume", resumed)]
    out: dict[str, float] = {}
    last, pending = int(paused), []
    for name, at in points:
        pending.append(name)
        if not at or not last <= int(at) <= int(resumed):
            continue  # not recorded (or out of order): its part joins the next one
        out[" + ".join(pending)] = (int(at) - last) / NS
        last, pending = int(at), []
    return out
