"""A small fleet of real emulated machines: per-VM status and verdicts for scripts (``luoctl
vm status|verify --json``), live migration of a VM under load between two hosts (memory
intact, step counter continuous, downtime measured as a blackout is), the migrated VM then
surviving a live update of its new host in its slot, and the fallback's policy for a VM with
an assigned device. Each under TCG (a unicorn write hook tracks the guest's writes) and under
KVM (its dirty log: :mod:`liveupdate.vmm.dirtylog`)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.scenario.fleet import hosts, migrate, ops, resources, rollout, state
from liveupdate.vmm import kvm
from tests.e2e.unix_diag import unix_peers
from tests.tools.cli import LUOCTL

pytestmark = pytest.mark.xdist_group("vms")  # busy guests: one worker (scripts/test)

CONFIG = {"target": "7.2", "duty": 1.0,  # guests under load: they never idle
          "hosts": {"host1": {"slots": 1, "vms": 1},
                    # 64 MiB: more than one burst of the guest's walk, so a round leaves part
                    # of its memory clean and tracking must find what it wrote
                    "host2": {"generation": "6.19", "assigned": ["vm1"],
                              "vm_memory": 64 << 20}}}


KVM_REASON = kvm.unusable()
ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.skipif(
    KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}"))]


@pytest.fixture(scope="module", params=ACCELS)
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[str]:
    folder = str(tmp_path_factory.mktemp(f"fleet-{request.param}"))
    hosts.up(folder, 2, {**CONFIG, "accel": request.param}, lambda s: None)
    try:
        yield folder
    finally:
        hosts.down(folder)


def luoctl(machine: str, *args: str, env: str = "LIVEUPDATE_MACHINE") -> tuple[int, Any]:
    """``luoctl ARGS --json`` with the machine's folder in $LIVEUPDATE_MACHINE, or (env
    ``LUOD_SOCKET``) only its luod's socket: as on a real host, no machine to look into."""
    where = machine if env == "LIVEUPDATE_MACHINE" else f"{machine}/run/luod.sock"
    r = subprocess.run([*LUOCTL, *args, "--json"], capture_output=True, text=True,
                       timeout=120, env={env: where, "PATH": "/usr/bin"})
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else r.stderr


def machine(fleet: str, host: str) -> str:
    return state.load(fleet).host(host).folder(fleet)


def sockets_of(folder: str) -> set[int]:
    """The socket inodes every process of the host (machine, kernel, userspace) holds."""
    m = MachineClient(folder)
    try:
        pids = resources.tree(int(m.status()["machine_pid"]), resources.parents())
    finally:
        m.close()
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    return out


def connected(a: str, b: str) -> list[tuple[int, int]]:
    """Unix connections between the processes of host folders ``a`` and ``b``."""
    peers, sa, sb = unix_peers(), sockets_of(a), sockets_of(b)
    return [(i, peers[i]) for i in sa if peers.get(i) in sb]


def test_vm_status_and_verify_report_each_vm_and_the_empty_slot(fleet: str) -> None:
    rc, st = luoctl(machine(fleet, "host1"), "vm", "status")
    assert rc == 0
    assert st["slot0"] == {**st["slot0"], "empty": True, "slot": True}
    assert st["vm0"]["steps"] > 0 and st["vm0"]["restored"] is False
    rc, verdicts = luoctl(machine(fleet, "host1"), "vm", "verify")
    assert rc == 0
    assert set(verdicts) == {"vm0"}  # an empty slot has nothing to judge
    assert verdicts["vm0"]["ok"] and verdicts["vm0"]["vcpu_restored"] is None
    assert verdicts["vm0"]["checked_by"] == "machine RAM"
    # no machine given (a real host): the VMMs beside luod's socket run the checker
    rc, own = luoctl(machine(fleet, "host1"), "vm", "verify", env="LUOD_SOCKET")
    assert rc == 0 and set(own) == {"vm0"}
    assert own["vm0"]["ok"] and own["vm0"]["checked_by"] == "vmm"
    assert own["vm0"]["steps"] >= verdicts["vm0"]["steps"]
    rc, st = luoctl(machine(fleet, "host1"), "vm", "status", env="LUOD_SOCKET")
    assert rc == 0 and set(st) == {"vm0", "slot0"}
    rc, err = luoctl(machine(fleet, "host1"), "vm", "status", "nope")
    assert rc == 1 and err.startswith("luoctl: error: no VM nope") and "ENOENT" in err


def test_a_vm_under_load_migrates_intact_and_then_survives_a_live_update(fleet: str) -> None:
    src = machine(fleet, "host2")
    before = ask(f"{src}/run/vmm-vm0.sock", "status")["steps"]
    moved = migrate.migrate(fleet, "host2", "vm0")
    assert moved["to"] == "host1" and moved["slot"] == "slot0"
    assert moved["intact"], moved["problem"]
    # pre-copy then stop-and-copy: the whole memory first, the last round while paused
    assert moved["rounds"][0] == (64 << 20) // 4096 and len(moved["rounds"]) >= 2
    # the guest continued on host1 from the step it was paused at (it never restarted)
    assert before <= moved["steps_at_pause"] < moved["steps_after_resume"]
    assert 0 < moved["downtime_s"] < 5
    gone = ask(f"{src}/run/vmm-vm0.sock", "status")
    assert gone["paused"] and gone["departed"]["to"].endswith("migrate-slot0.sock")
    accel = state.load(fleet).host("host2").accel  # tracked by the hook or by KVM's log
    assert gone["accel"] == accel == ask(f"{machine(fleet, 'host1')}/run/vmm-slot0.sock",
                                         "status")["accel"]
    assert gone["steps"] == moved["steps_at_pause"]  # the source stopped for good there
    dst = machine(fleet, "host1")
    # the "network" was a Unix socket between the two VMMs: closed when the copy is done,
    # so nothing of it is left for the destination's next kexec to carry
    assert connected(dst, src) == []
    assert connected(dst, dst)  # the probe sees connections: the kernel's to its userspace
    rc, verdicts = luoctl(dst, "vm", "verify", "slot0")
    assert rc == 0 and verdicts["slot0"]["vcpu_restored"] is True
    assert verdicts["slot0"]["saved_steps"] == moved["steps_at_pause"]
    rc, own = luoctl(dst, "vm", "verify", "slot0", env="LUOD_SOCKET")  # the VMM's check
    assert rc == 0 and own["slot0"]["vcpu_restored"] is True
    assert own["slot0"]["saved_steps"] == moved["steps_at_pause"]
    # host1 is live-updated with the migrated VM in its slot: preserved by LUO like any VM
    assert ops.preflight(dst, "7.2")[0]
    h1 = state.load(fleet).host("host1")
    ops.live_update(dst, h1)
    health = ops.health(dst, ["vm0", "slot0"])
    for name, v in health.items():
        assert v["ok"] and v["restored"] and v["steps_rising"], (name, v)
    st = ask(f"{dst}/run/vmm-slot0.sock", "status")
    # its blackout now is the live update's, from the step it was frozen at, not the
    # migration's: nothing of the migration channel crossed the kexec
    assert st["blackout"]["steps_before"] > moved["steps_after_resume"]


def test_assigned_device_with_skip_policy_leaves_the_host_untouched(fleet: str) -> None:
    with pytest.raises(LiveUpdateError) as e:
        migrate.migrate(fleet, "host2", "vm1")
    assert e.value.errno == errno.EOPNOTSUPP and "assigned device" in e.value.message
    with state.locked(fleet) as f:  # host2 has vm1 (assigned) left after the migration
        f.host("host2").vms = [v for v in f.host("host2").vms if v.name == "vm1"]
    r = rollout.host_update(fleet, "host2", assigned="skip")
    assert r["path"] == "skipped" and r["status"] == "skipped"
    assert "assigned device" in r["why"]
    assert r["release_before"] == r["release_after"] == "6.19.0-lu"
    st = ask(f"{machine(fleet, 'host2')}/run/vmm-vm1.sock", "status")
    assert not st["paused"] and not st["restored"]  # still running, never touched


def test_no_room_is_enospc(fleet: str) -> None:
    with pytest.raises(LiveUpdateError) as e:
        migrate.migrate(fleet, "host1", "vm0")  # host2 runs 6.19: not a target
    assert e.value.errno == errno.ENOSPC
