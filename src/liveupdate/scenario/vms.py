"""Each VM of an emulated machine, as a script or an Ansible module asks for it (``luoctl vm
status|verify``): what its VMM says (accelerator, step counter, paused, the blackout of its
last live update -- or the downtime of the migration that brought it -- and where it went if
it migrated away), and the checker's verdict from the machine's RAM
(:mod:`liveupdate.scenario.guestcheck`, the demo's own judge: every guest byte against the
guest's records, the restored vCPU against the saved state).

Where there is no emulated machine -- a real host -- the VMs are found beside luod's socket
(``/run/luod/vmm-NAME.sock``, the folder of ``$LUOD_SOCKET``), and each VMM runs the same
judgement on its own mapping of guest memory on request (:func:`verify_by_vmm`; its
control request ``verify``): no outside witness, but the same checks.

The VMs are found as the demo finds them: by their control sockets in the machine's run
folder (``vmm-NAME.sock``), migration slots included (an empty one is listed as such).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.scenario import guestcheck

PREFIX, SUFFIX = "vmm-", ".sock"


def sockets(machine: str, names: tuple[str, ...] = ()) -> dict[str, str]:
    """VM name -> its VMM's control socket; ENOENT for a name that has none."""
    return sockets_in(os.path.join(os.path.abspath(machine), "run"), names,
                      f"no machine at {machine}")


def sockets_in(run: str, names: tuple[str, ...] = (), missing_folder: str = ""
               ) -> dict[str, str]:
    """The VMMs' control sockets in folder ``run`` (a machine's run folder, or luod's
    socket folder on a real host)."""
    try:
        found = {f[len(PREFIX) : -len(SUFFIX)]: os.path.join(run, f)
                 for f in sorted(os.listdir(run)) if f.startswith(PREFIX) and f.endswith(SUFFIX)}
    except FileNotFoundError:
        raise LiveUpdateError(err=errno.ENOENT, msg=missing_folder
                              or f"no folder {run} (luod's sockets)") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"no VM {', '.join(missing)} in {run} "
                              f"(it has {', '.join(found) or 'none'})")
    return {n: found[n] for n in names} if names else found


def one_status(sock: str) -> dict[str, Any]:
    st = ask(sock, "status")
    for k in ("id", "ok"):
        st.pop(k, None)
    return st


def status(machine: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    return status_in(sockets(machine, names))


def status_in(socks: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {n: one_status(s) for n, s in socks.items()}


def _finish(d: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    if not st["restored"] and d["saved_steps"] is None:  # a fresh VM: no saved vCPU
        d["vcpu_restored"], d["vcpu_problem"] = None, ""
    d["ok"] = d["intact"] and d["vcpu_restored"] is not False and d["entries"] <= 1
    return {**d, "status": st}


def verify(machine: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Each VM's verdict (empty slots are left out): ``intact`` (every byte), ``vcpu_restored``
    (None for a VM that never was: a fresh start has nothing to compare), ``steps``, and its
    status; ``ok`` when both hold."""
    m = MachineClient(machine)
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, sock in sockets(machine, names).items():
            st = one_status(sock)
            if st.get("empty"):
                continue
            d = dataclasses.asdict(guestcheck.check(m, sock))
            out[name] = _finish({**d, "checked_by": "machine RAM"}, st)
    finally:
        m.close()
    return out


def verify_by_vmm(run: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """:func:`verify` where there is no machine (a real host): each VMM in folder ``run``
    runs the checker on its own mapping (control request ``verify``), its vCPU paused at an
    exit for the check. ``checked_by`` says ``vmm``."""
    out: dict[str, dict[str, Any]] = {}
    for name, sock in sockets_in(run, names).items():
        st = one_status(sock)
        if st.get("empty"):
            continue
        d = ask(sock, "verify")
        for k in ("id", "ok"):
            d.pop(k, None)
        out[name] = _finish(d, st)
    return out
