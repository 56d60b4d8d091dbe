# GNU General Public License v2.0 only (see the repository)
"""A real host's live update, as the module ``luoctl_host`` runs it: ``start`` (the update
detached, so it outlives the connection its kexec ends) and ``wait`` (in the next kernel:
the outcome, then each VM judged by its VMM), with the health gate the emulated fleet's
``luoctl fleet host-update`` applies (:mod:`liveupdate.scenario.fleet.rollout`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

Run = Callable[[list[str]], tuple[int, str, str]]


class Failed(Exception):
    """luoctl failed: its one-line error (and what it ran)."""

    def __init__(self, msg: str, argv: list[str], rc: int) -> None:
        super().__init__(msg)
        self.msg, self.argv, self.rc = msg, argv, rc


def luoctl_json(run: Run, argv: list[str], ok_rc: tuple[int, ...] = (0,)) -> Any:
    rc, out, err = run(argv)
    try:
        data = json.loads(out) if out.strip() and rc in ok_rc else None
    except ValueError:
        data = None
    if data is None:
        raise Failed(err.strip() or f"luoctl exited {rc}", argv, rc)
    return data


def start(run: Run, luoctl: str, p: dict[str, Any]) -> dict[str, Any]:
    """``luoctl update --detach STATE_DIR``: luod's pre-flight (``image`` loaded and
    checked), then the update detached; its record (``update`` is N)."""
    # the update waits for this module's process to end: its answer is on its way back
    # over the connection before the kexec ends that
    argv = [luoctl, "update", "--detach", p["state_dir"], "--after-exit",
            str(os.getpid()), "--json", *socket(p)]
    for opt in ("image", "cmdline", "release"):
        if p.get(opt):
            argv += [f"--{opt}", str(p[opt])]
    rec: dict[str, Any] = luoctl_json(run, argv)
    return rec


def socket(p: dict[str, Any]) -> list[str]:
    return ["--socket", p["socket"]] if p.get("socket") else []


def _vm(v: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    """One VM as the emulated path reports it (``liveupdate.scenario.fleet.ops.health``).
    ``steps_rising``: the guest took steps since its resume (the checker paused it later
    than the resume's own reading)."""
    b = st.get("blackout") or {}
    since = b.get("steps_before")
    return {"ok": v["ok"], "intact": v["intact"], "vcpu_restored": v["vcpu_restored"],
            "problem": v["problem"] or v["vcpu_problem"], "steps": v["steps"],
            "steps_rising": v["steps"] > (since if since is not None else 0),
            "restored": st["restored"], "blackout_s": b.get("host_s"),
            "blackout_guest_s": b.get("guest_s"), "checked_by": v.get("checked_by")}


def gate(vms: dict[str, dict[str, Any]], budget: float) -> list[str]:
    """The health gate's findings (empty: it passed): every VM intact, its step counter
    risen, its blackout within ``budget`` -- the emulated fleet's gate, VM for VM."""
    why = []
    for n, v in vms.items():
        if not v["ok"]:
            why.append(f"{n}: integrity: {v['problem'] or 'broken'}")
        if not v["steps_rising"]:
            why.append(f"{n}: its step counter does not rise")
        b = v["blackout_s"]
        if v["restored"] and b is not None and b > budget:
            why.append(f"{n}: blackout {b:.3f} s over the {budget:.3f} s budget")
    return why


def wait(run: Run, luoctl: str, p: dict[str, Any]) -> dict[str, Any]:
    """In the next kernel: ``luoctl wait --update N --detached STATE_DIR``, then ``luoctl
    vm status`` and ``luoctl vm verify`` (each VMM runs the checker), and the gate."""
    n = str(p["update"])
    out: dict[str, Any] = luoctl_json(run, [
        luoctl, "wait", "--update", n, "--detached", p["state_dir"], "--timeout",
        str(p["timeout"]), "--json", *socket(p)])
    st = luoctl_json(run, [luoctl, "vm", "status", "--json", *socket(p)])
    verdicts = luoctl_json(run, [luoctl, "vm", "verify", "--json", *socket(p)],
                           ok_rc=(0, 1))  # 1: a VM is not intact, judged by the gate
    vms = {name: _vm(v, st[name]) for name, v in verdicts.items()}
    found = gate(vms, float(p["blackout_budget"]))
    status, report = out["status"], out["report"]
    parts = [f"{name} " + (f"blackout {v['blackout_s']:.3f} s, "
                           if v["blackout_s"] is not None else "")
             + ("intact" if v["ok"] else "BROKEN") for name, v in vms.items()]
    return {"number": int(n), "path": "live update", "vms": vms, "gate": found,
            "result": {"status": status, "report": report},
            "boot_id": status.get("boot_id"), "generation": status.get("generation"),
            "msg": f"update {n}: live update, luod {status.get('generation')}"
                   + (": " + ", ".join(parts) if parts else ": no VMs")}
