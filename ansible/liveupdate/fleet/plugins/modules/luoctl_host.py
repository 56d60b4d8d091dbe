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
  - C(action=status) and C(action=verify) return each VM's state (C(luoctl vm status
    --json)) or the checker's verdict from the machine's RAM (C(luoctl vm verify --json)).
  - Emulated hosts run on the controller (C(ansible_connection=local)) and are named by
    their machine folder (O(machine)); the same playbook drives real hosts over SSH, where
    C(luoctl) talks to C(/run/luod/luod.sock).
  - The module changes nothing itself when C(action) is C(status) or C(verify).
options:
  action:
    description: What to do.
    type: str
    choices: [update, status, verify]
    default: status
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
      before the health gate fails.
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
  - Check mode is supported for C(status) and C(verify) only.
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
  description: Per VM, C(luoctl vm status --json) or C(luoctl vm verify --json).
  returned: action is status or verify
  type: dict
path:
  description: The path the host took (C(update)).
  returned: action is update
  type: str
gate:
  description: The health gate's findings (C(update)); empty when it passed.
  returned: action is update
  type: list
  elements: str
"""

import json  # noqa: E402 - after DOCUMENTATION, as Ansible modules are laid out
import os  # noqa: E402
import sys  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def _luoctl(module: AnsibleModule) -> str:
    given = module.params["luoctl"]
    if given:
        return str(given)
    beside = os.path.join(os.path.dirname(sys.executable), "luoctl")
    return beside if os.path.exists(beside) else module.get_bin_path("luoctl", required=True)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "choices": ["update", "status", "verify"],
                       "default": "status"},
            "host": {"type": "str"},
            "fleet": {"type": "path"},
            "machine": {"type": "path"},
            "vms": {"type": "list", "elements": "str", "default": []},
            "blackout_budget": {"type": "float", "default": 1.0},
            "assigned": {"type": "str", "choices": ["evict", "skip"], "default": "evict"},
            "batch": {"type": "list", "elements": "str", "default": []},
            "luoctl": {"type": "str"},
        },
        required_if=[("action", "update", ("host", "fleet"))],
        supports_check_mode=True,
    )
    p = module.params
    env = {"LIVEUPDATE_MACHINE": p["machine"]} if p["machine"] else {}
    luoctl = _luoctl(module)
    if p["action"] == "update":
        if module.check_mode:
            module.exit_json(changed=True, msg="check mode: the host would be updated")
        argv = [luoctl, "fleet", "host-update", p["host"], "--dir", p["fleet"], "--json",
                "--blackout-budget", str(p["blackout_budget"]), "--assigned", p["assigned"],
                "--batch", ",".join(p["batch"])]
    else:
        argv = [luoctl, "vm", p["action"], *p["vms"], "--json"]
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


if __name__ == "__main__":
    main()
