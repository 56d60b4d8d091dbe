#!/usr/bin/python
# GNU General Public License v2.0 only (see the repository)
"""Ansible module: drive ``luoctl`` on one host and return its JSON."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: luoctl_host
short_description: Live-update one host with luod, or report its VMs, through luoctl
version_added: "0.1.0"
description:
  - Runs C(luoctl) on the target host and returns what it printed as JSON.
  - C(action=update) updates the host to the fleet's target kernel with
    C(luoctl fleet host-update) -- luod's pre-flight, then a live update (KHO + LUO, the VMs
    keep their memory across the kexec) or, when the pre-flight refuses, the fallback (VMs
    live-migrated to a host with room or evicted, a cold reboot into the new image) -- and
    returns the path taken, each VM's blackout and integrity, and the health-gate findings.
    This is the emulated fleet's path, the update driven from outside the machine.
  - On a real host the kexec ends the kernel, and with it this module and the SSH
    connection. C(action=start) runs luod's pre-flight (loading O(image)) and starts
    C(luoctl update --detach) -- in a session of its own, its output in
    O(state_dir)C(/update-N.log) -- and returns the update's number N (luod's count + 1).
    After C(ansible.builtin.wait_for_connection), C(action=wait) runs C(luoctl wait
    --update N) in the next kernel and returns each VM's blackout and integrity (each VMM
    runs the checker on its own guest memory, there being no machine to look through) and the
    health gate's findings, as C(action=update) does.
  - C(action=status) and C(action=verify) return each VM's state (C(luoctl vm status
    --json)) or the checker's verdict (C(luoctl vm verify --json), from the machine's RAM
    when O(machine) is given, else by each VMM).
  - Emulated hosts run on the controller (C(ansible_connection=local)) and are named by
    their machine folder (O(machine)); the same playbook drives real hosts over SSH, where
    C(luoctl) talks to C(/run/luod/luod.sock) (or O(socket)).
  - The module changes nothing itself when C(action) is C(status), C(verify) or C(wait).
options:
  action:
    description: What to do.
    type: str
    choices: [update, start, wait, status, verify]
    default: status
  image:
    description: C(start) -- the next kernel's image, as luod sees it (on the emulated
      machine, relative to its C(disk/)); luod's pre-flight loads and checks it. Default
      the image already loaded (C(luoctl load)).
    type: str
  cmdline:
    description: C(start) -- the next kernel's command line (default this kernel's).
    type: str
  release:
    description: C(start) -- the next kernel's release, for an image that names no LUO
      generation (a real bzImage).
    type: str
  state_dir:
    description: C(start), C(wait) -- where the detached update keeps its record
      (C(update-N.json)) and its output (C(update-N.log)); on a disk that survives the
      kexec, to read after it.
    type: path
    default: /var/lib/liveupdate/updates
  socket:
    description: luod's socket (C(luoctl --socket)); the VMMs' control sockets are beside
      it. Default C($LUOD_SOCKET), else C(/run/luod/luod.sock).
    type: path
  update:
    description: C(wait) -- the update's number, as C(start) returned it (RV(number)).
    type: int
  timeout:
    description: C(wait) -- seconds for luod to listen in the next kernel, and as long for
      it to finish the update (FINISH).
    type: float
    default: 300
  host:
    description: The host's name in the fleet (its inventory name). Required for C(update).
    type: str
  fleet:
    description: The emulated fleet's folder (C(luoctl fleet up) wrote it). Required for
      C(update), which needs the other hosts as migration targets.
    type: path
  machine:
    description: The emulated machine's folder (C(LIVEUPDATE_MACHINE)); omit on a real host.
    type: path
  vms:
    description: Only these VMs (C(status), C(verify)); all by default.
    type: list
    elements: str
    default: []
  blackout_budget:
    description: Seconds a VM may be paused (live-update blackout or migration downtime)
      before the health gate fails (C(update), C(wait)).
    type: float
    default: 1.0
  assigned:
    description: When the host must be evacuated and a VM has an assigned device (it
      cannot be live-migrated) -- C(evict) stops it with notice, C(skip) leaves the host
      untouched.
    type: str
    choices: [evict, skip]
    default: evict
  batch:
    description: The hosts of the current wave (C(ansible_play_batch)); the fleet report
      groups hosts into waves by it.
    type: list
    elements: str
    default: []
  luoctl:
    description: The luoctl program; by default the one beside the module's Python
      interpreter, else C(luoctl) on PATH.
    type: str
notes:
  - Check mode is supported for C(status), C(verify) and C(wait); C(start) and C(update)
    report that they would change the host.
author:
  - liveupdate
"""

EXAMPLES = r"""
- name: Live-update this host, with migration as the fallback
  liveupdate.fleet.luoctl_host:
    action: update
    host: "{{ inventory_hostname }}"
    fleet: "{{ lu_fleet }}"
    machine: "{{ lu_machine }}"
    blackout_budget: 2.0
    assigned: evict
    batch: "{{ ansible_play_batch }}"
  register: lu

- name: Every VM intact?
  liveupdate.fleet.luoctl_host:
    action: verify
    machine: "{{ lu_machine }}"
  register: verdicts

# a real host: the update outlives the SSH connection its kexec ends
- name: Pre-flight, then the live update, detached
  liveupdate.fleet.luoctl_host:
    action: start
    image: /boot/vmlinuz-7.3.0
  register: lu_start

- name: Wait for the next kernel
  ansible.builtin.wait_for_connection:
    delay: 10
    timeout: 600

- name: The update's outcome, each VM's blackout and integrity
  liveupdate.fleet.luoctl_host:
    action: wait
    update: "{{ lu_start.number }}"
    blackout_budget: 2.0
  register: lu_update
"""

RETURN = r"""
result:
  description: C(luoctl fleet host-update --json) for C(update).
  returned: action is update
  type: dict
  contains:
    path:
      description: C(live update), C(migrate + reboot), C(skipped), C(failed), or
        C(already updated) (an earlier run updated it; nothing changed).
      type: str
    status:
      description: The host's state in the rollout, C(updated), C(failed) or C(skipped).
      type: str
    why:
      description: Why this path (the pre-flight's verdict), and what failed.
      type: str
    release_before:
      description: The kernel release before.
      type: str
    release_after:
      description: The kernel release after.
      type: str
    vms:
      description: Each VM left on the host -- C(ok), C(intact), C(blackout_s),
        C(steps_rising), C(problem).
      type: dict
    moved:
      description: Each VM migrated (C(to), C(downtime_s), C(rounds), C(intact)) or evicted
        (C(evicted), C(steps), C(intact)).
      type: list
      elements: dict
    gate:
      description: The health gate's findings; empty when it passed.
      type: list
      elements: str
vms:
  description: Per VM, C(luoctl vm status --json) or C(luoctl vm verify --json); for
    C(wait), each VM as C(update) reports it -- C(ok), C(intact), C(vcpu_restored),
    C(problem), C(steps), C(steps_rising) (steps taken since the resume), C(restored),
    C(blackout_s) (host clock, CLOCK_REALTIME across the kexec, so the RTC's resolution on
    a real host), C(blackout_guest_s) (the guest's TSC), C(checked_by) (C(vmm)).
  returned: action is status, verify or wait
  type: dict
path:
  description: The path the host took (C(update); C(live update) for C(wait)).
  returned: action is update or wait
  type: str
gate:
  description: The health gate's findings (C(update), C(wait)); empty when it passed.
  returned: action is update or wait
  type: list
  elements: str
number:
  description: The update's number N (luod's count before, plus one) -- C(start) started
    it, C(wait) followed it. (Not C(update), which Jinja would read as the dict method.)
  returned: action is start or wait
  type: int
  sample: 4
pid:
  description: The detached C(luoctl update)'s process id (it ends with the old kernel).
  returned: action is start
  type: int
log:
  description: Its output, O(state_dir)C(/update-N.log).
  returned: action is start
  type: str
record:
  description: Its record, O(state_dir)C(/update-N.json).
  returned: action is start
  type: str
handover:
  description: luod's pre-flight verdict on O(image) -- C(mode) (C(native) or
    C(negotiated)) and the C(formats).
  returned: action is start and image was given
  type: dict
boot_id_before:
  description: The boot id of the kernel the update started on.
  returned: action is start
  type: str
boot_id:
  description: The boot id of the kernel luod runs on after the update.
  returned: action is wait
  type: str
generation:
  description: The LUO generation luod speaks after the update.
  returned: action is wait
  type: str
result:
  description: For C(wait), C(luoctl wait --json) -- luod's C(status) and the update's
    C(report) (its phase timeline and how FINISH went).
  returned: action is update or wait
  type: dict
"""

import json  # noqa: E402 - after DOCUMENTATION, as Ansible modules are laid out
import os  # noqa: E402
import sys  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.liveupdate.fleet.plugins.module_utils import realhost  # noqa: E402


def _luoctl(module: AnsibleModule) -> str:
    given = module.params["luoctl"]
    if given:
        return str(given)
    beside = os.path.join(os.path.dirname(sys.executable), "luoctl")
    return beside if os.path.exists(beside) else module.get_bin_path("luoctl", required=True)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "default": "status",
                       "choices": ["update", "start", "wait", "status", "verify"]},
            "image": {"type": "str"},
            "cmdline": {"type": "str"},
            "release": {"type": "str"},
            "state_dir": {"type": "path", "default": "/var/lib/liveupdate/updates"},
            "socket": {"type": "path"},
            "update": {"type": "int"},
            "timeout": {"type": "float", "default": 300.0},
            "host": {"type": "str"},
            "fleet": {"type": "path"},
            "machine": {"type": "path"},
            "vms": {"type": "list", "elements": "str", "default": []},
            "blackout_budget": {"type": "float", "default": 1.0},
            "assigned": {"type": "str", "choices": ["evict", "skip"], "default": "evict"},
            "batch": {"type": "list", "elements": "str", "default": []},
            "luoctl": {"type": "str"},
        },
        required_if=[("action", "update", ("host", "fleet")), ("action", "wait", ("update",))],
        supports_check_mode=True,
    )
    p = module.params
    env = {"LIVEUPDATE_MACHINE": p["machine"]} if p["machine"] else {}
    luoctl = _luoctl(module)
    if p["action"] in ("start", "wait"):
        _real_host(module, luoctl, env)
    if p["action"] == "update":
        if module.check_mode:
            module.exit_json(changed=True, msg="check mode: the host would be updated")
        argv = [luoctl, "fleet", "host-update", p["host"], "--dir", p["fleet"], "--json",
                "--blackout-budget", str(p["blackout_budget"]), "--assigned", p["assigned"],
                "--batch", ",".join(p["batch"])]
    else:
        argv = [luoctl, "vm", p["action"], *p["vms"], "--json", *realhost.socket(p)]
    rc, out, err = module.run_command(argv, environ_update=env)
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    if data is None:  # luoctl failed before it could answer: its one-line error
        module.fail_json(msg=err.strip() or f"luoctl exited {rc}", rc=rc, cmd=argv)
    if p["action"] == "update":
        failed = data["status"] == "failed" and not data.get("gate")
        module.exit_json(changed=data["path"] not in ("skipped", "already updated"),
                         failed=failed, result=data,
                         path=data["path"], gate=data.get("gate", []),
                         msg=f"{p['host']}: {data['path']}: {data['why']}")
    module.exit_json(changed=False, vms=data, failed=rc != 0 and p["action"] != "verify",
                     ok=rc == 0)


def _real_host(module: AnsibleModule, luoctl: str, env: dict[str, str]) -> None:
    """``start`` and ``wait`` (module_utils/realhost.py); exits the module."""
    p = module.params

    def run(argv: list[str]) -> tuple[int, str, str]:
        rc, out, err = module.run_command(argv, environ_update=env)
        return rc, out, err

    if p["action"] == "start" and module.check_mode:
        module.exit_json(changed=True, msg="check mode: a live update would start")
    try:
        if p["action"] == "start":
            rec = realhost.start(run, luoctl, p)
            rec["number"] = rec.pop("update")
            module.exit_json(changed=True, **rec,
                             msg=f"update {rec['number']} started (pid {rec['pid']}, log "
                                 f"{rec['log']}): the kexec follows")
        got = realhost.wait(run, luoctl, p)
    except realhost.Failed as e:
        module.fail_json(msg=e.msg, rc=e.rc, cmd=e.argv)
    module.exit_json(changed=False, **got)


if __name__ == "__main__":
    main()
