"""The role's real-host path end to end, without SSH (``./scripts/test-fleet``): one emulated
host in an inventory with no fleet folder and no machine, only luod's socket -- as a real
host's ``luoctl`` knows nothing but ``/run/luod/luod.sock`` -- reached through the
connection ``kexec_local`` (``local``, but a command during which the machine booted another
kernel fails as unreachable, as an SSH connection dies with the old kernel: see
``connection_plugins/kexec_local.py``).
The example playbook takes the real-host branch: the module's ``start`` (luod's pre-flight,
``luoctl update --detach``), ``wait_for_connection``, then ``wait`` (``luoctl wait --update
N``, each VM judged by its own VMM). The update must have happened (luod's count and boot
id), the VMs must be intact by the outside witness too (the machine's RAM), and each VM's
blackout reported; then the VMM's own check must catch a byte damaged behind its back."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdate.client.update import luod_status
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.scenario import damage, vms
from liveupdate.scenario.fleet import hosts
from tests.tools.cli import LUOCTL

pytestmark = [
    pytest.mark.skipif(not os.environ.get("LIVEUPDATE_FLEET_PLAYBOOK"),
                       reason="the playbook tests run in ./scripts/test-fleet"),
    pytest.mark.xdist_group("vms"),
]
ROOT = Path(__file__).resolve().parents[2]


def inventory(machine: str, state: str) -> str:
    """A real host as the inventory sees it: no lu_fleet, no lu_machine."""
    return "\n".join([
        "[fleet]",
        f"host1 lu_luod_socket={machine}/run/luod.sock lu_image=images/7.2.img",
        "", "[fleet:vars]", "ansible_connection=kexec_local",
        f"ansible_python_interpreter={sys.executable}", f"lu_state_dir={state}",
        "lu_reconnect_delay=0", "lu_reconnect_timeout=60", "lu_blackout_budget=10", ""])


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = str(tmp_path_factory.mktemp("realhost"))
    fleet = hosts.up(folder, 1, {"target": "7.2"}, lambda s: None)
    machine = fleet.hosts["host1"].folder(folder)
    sock = f"{machine}/run/luod.sock"
    try:
        before = luod_status(sock)
        with open(f"{folder}/real.ini", "w") as f:
            f.write(inventory(machine, f"{folder}/state"))
        env = {k: v for k, v in os.environ.items()
               if k not in ("LIVEUPDATE_MACHINE", "LUOD_SOCKET")}
        env["ANSIBLE_CONNECTION_PLUGINS"] = str(Path(__file__).parent / "connection_plugins")
        env["LU_KEXEC_MACHINE"] = machine  # the connection's view of the host, not luoctl's
        play = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i",
             f"{folder}/real.ini", "liveupdate.fleet.rolling_update",
             "-e", json.dumps({"lu_waves": [1]})],
            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        Path(folder, "play.log").write_text(play.stdout + play.stderr)  # for a failure
        yield {"folder": folder, "machine": machine, "sock": sock, "before": before,
               "play": play, "after": luod_status(sock)}
    finally:
        hosts.down(folder)


def test_the_real_host_branch_updates_the_host(played: dict[str, Any]) -> None:
    play, out = played["play"], played["play"].stdout
    assert play.returncode == 0, out[-3000:] + play.stderr[-2000:]
    # the real-host branch ran: start, wait_for_connection, wait -- not the fleet shortcut
    for task in ("Pre-flight, then start the live update detached",
                 "Wait for the host to answer again, in the next kernel",
                 "Follow the update to its end, then judge each VM"):
        assert f"TASK [liveupdate.fleet.live_update : {task}" in out
    assert "Update the host (pre-flight, then live update or migrate + reboot)" not in out
    before, after = played["before"], played["after"]
    n = before["update"] + 1
    assert after["update"] == n and after["phase"] == "normal"
    assert after["boot_id"] != before["boot_id"]  # a new kernel answers
    assert f"update {n}: live update" in out, out
    # the detached update's record and its log (on the emulated machine it outlived the
    # kexec: its JSON outcome is there)
    rec = json.loads(Path(played["folder"], "state", f"update-{n}.json").read_text())
    assert rec["update"] == n and rec["boot_id_before"] == before["boot_id"]
    assert rec["handover"]["mode"] == "native"
    log = json.loads(Path(rec["log"]).read_text())
    assert log["status"]["update"] == n


def test_vms_intact_and_their_blackout_reported(played: dict[str, Any]) -> None:
    out = played["play"].stdout
    # the outside witness: every guest byte from the machine's RAM
    verdicts = vms.verify(played["machine"])
    assert set(verdicts) == {"vm0", "vm1"}
    for name, v in verdicts.items():
        assert v["ok"] and v["vcpu_restored"], (name, v)
        b = v["status"]["blackout"]
        assert v["status"]["restored"] and b["host_s"] > 0
        assert f"{name} blackout {b['host_s']:.3f} s, intact" in out


def test_the_vmms_own_check_catches_damage(played: dict[str, Any]) -> None:
    machine = played["machine"]
    m = MachineClient(machine)
    try:
        said = damage.apply(damage.Damage("flip-byte", "vm0", page=3, offset=100), m,
                            f"{machine}/run/vmm-vm0.sock", hosts.VM_MEMORY,
                            random.Random(27))
    finally:
        m.close()
    r = subprocess.run([*LUOCTL, "vm", "verify", "--json"], capture_output=True, text=True,
                       timeout=120, env={"LUOD_SOCKET": played["sock"], "PATH": "/usr/bin"})
    got = json.loads(r.stdout)
    assert r.returncode == 1, said
    assert got["vm0"]["checked_by"] == "vmm" and not got["vm0"]["intact"], got["vm0"]
    assert got["vm1"]["ok"]
    assert not ask(f"{machine}/run/vmm-vm0.sock", "status")["paused"]  # resumed after
