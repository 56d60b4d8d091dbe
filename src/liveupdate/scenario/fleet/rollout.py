"""One host's turn in a rolling update (``luoctl fleet host-update``, what the Ansible
module runs for each host of a wave): pre-flight, then the live update -- or, when the
pre-flight refuses, the fallback (VMs migrated away or evicted, a cold reboot into the new
image) -- then the health gate, and the result recorded in the fleet's state.

Paths a host takes, as the report names them: ``live update``; ``migrate + reboot``;
``skipped`` (an assigned device and the ``skip`` policy: the host is untouched); ``failed``
(the update or the gate failed: what happened is in ``why``); a host updated in an earlier
run is left alone (``already updated``, nothing changed: the play can be run again after a
halt, and picks up where it stopped). The gate passes when every VM
left on the host is intact (the checker's verdict), its step counter is rising, and its
blackout is within the budget; a migrated VM is gated on its destination the same way,
with its downtime against the same budget.
"""

from __future__ import annotations

import errno
import time
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.scenario.fleet import migrate, ops, state


def _gate(vms: dict[str, dict[str, Any]], moved: list[dict[str, Any]],
          budget: float) -> list[str]:
    why = []
    for n, v in vms.items():
        if not v["ok"]:
            why.append(f"{n}: integrity: {v['problem'] or 'broken'}")
        if not v["steps_rising"]:
            why.append(f"{n}: its step counter does not rise")
        b = v["blackout_s"]
        if v["restored"] and b is not None and b > budget:
            why.append(f"{n}: blackout {b:.3f} s over the {budget:.3f} s budget")
    for m in moved:
        if m.get("evicted"):
            continue
        if not m["intact"]:
            why.append(f"{m['vm']} on {m['to']}: integrity: {m['problem']}")
        if m["downtime_s"] is not None and m["downtime_s"] > budget:
            why.append(f"{m['vm']}: migration downtime {m['downtime_s']:.3f} s over budget")
    return why


def host_update(fleet_dir: str, name: str, *, budget: float = 1.0, assigned: str = "evict",
                batch: str = "") -> dict[str, Any]:
    """Update host ``name`` to the fleet's target; the result (also recorded)."""
    fleet = state.load(fleet_dir)
    h = fleet.host(name)
    folder = h.folder(fleet.folder)
    if h.status == "updated" and h.generation == fleet.target:  # a playbook run again
        return {**h.result, "path": "already updated", "ok": True,
                "why": f"already updated to {fleet.target} in an earlier run"}
    r: dict[str, Any] = {"host": name, "batch": batch, "started": time.time(),
                         "release_before": ops.release(folder), "target": fleet.target,
                         "moved": [], "vms": {}, "gate": []}
    t0 = time.monotonic()
    try:
        ok, why, handover = ops.preflight(folder, fleet.target)
        r["preflight"] = {"accepted": ok, "why": why, "handover": handover}
        if ok:
            r["path"], r["why"] = "live update", f"pre-flight accepted: {why}"
            r["update"] = ops.live_update(folder, h)
        else:
            r["path"], r["why"] = "migrate + reboot", f"pre-flight refused: {why}"
            r["moved"] = migrate.evacuate(fleet.folder, name, assigned)
            h = state.load(fleet.folder).host(name)
            r["reboot_s"] = ops.cold_reboot(folder, h, fleet.target)
        names = [v.slot or v.name for v in h.vms]
        r["vms"] = ops.health(folder, names)
        r["gate"] = _gate(r["vms"], r["moved"], budget)
        status = "failed" if r["gate"] else "updated"
        if r["gate"]:
            r["why"] += "; health gate: " + "; ".join(r["gate"])
    except LiveUpdateError as e:
        if r.get("path") == "migrate + reboot" and not r["moved"] and e.errno == errno.EBUSY:
            r["path"], status = "skipped", "skipped"  # EBUSY: the assigned-device policy
        else:
            r["path"], status = "failed", "failed"
        r["why"] = f"{r.get('why', '')}; {e}".lstrip("; ")
    r["release_after"] = ops.release(folder)
    r["seconds"], r["ok"] = time.monotonic() - t0, status in ("updated", "skipped")
    r["status"] = status
    with state.locked(fleet.folder) as f:
        f.host(name).status, f.host(name).result = status, r
        if status == "updated":
            f.host(name).generation = fleet.target
    return r
