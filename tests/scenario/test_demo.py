"""luoctl demo, run as a person would (small VMs): both uAPI generations come back intact,
repeated updates leak nothing, and guest memory or a vCPU broken on purpose fails the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from liveupdate.scenario import run, witness
from liveupdate.scenario.damage import Damage
from liveupdate.scenario.demo import Demo
from liveupdate.vmm import kvm
from liveupdate.vmm.tcg import Tcg
from tests.vmm import tsc

pytestmark = pytest.mark.xdist_group("vms")  # busy guests: one worker (scripts/test)

SMALL = ["--vms", "2", "--vm-memory", "64M", "--machine-memory", "1G"]


def demo(tmp_path: Path, *args: str) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "liveupdate.cli.luoctl", "demo", "--dir",
                        str(tmp_path / "m"), "--json", *SMALL, *args], capture_output=True,
                       text=True, timeout=600)
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


KVM_REASON = kvm.unusable()
ACCEL_CLASS = {"tcg": Tcg, "kvm": kvm.Kvm}


@pytest.mark.parametrize("generation, accel", [
    ("v3", "tcg"), ("6.19", "tcg"),
    pytest.param("6.19", "kvm", marks=pytest.mark.skipif(
        KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")),
])
def test_demo_is_intact(tmp_path: Path, generation: str, accel: str) -> None:
    rc, out = demo(tmp_path, "--generation", generation, "--accel", accel, "--plot",
                   str(tmp_path / "t.png"))
    # what the guest's clock does when a VMM sets its TSC, on this host (tests/vmm/tsc.py)
    clock = tsc.observed(ACCEL_CLASS[accel])[0]
    assert rc == 0 and out["integrity"] and not out["leak"], json.dumps(out)[-3000:]
    (u,) = out["updates"]
    assert set(u["vms"]) == {"vm0", "vm1"} and u["cache"] == {"keys": 64, "intact": True}
    for vm in u["vms"].values():
        assert vm["accel"] == accel
        assert vm["integrity"] and vm["resumed"] and vm["pages_verified"] > 0
        assert vm["vcpu_restored"], vm["vcpu_problem"]
        assert vm["steps_after_resume"] > vm["steps_at_pause"] >= vm["steps_before_update"]
        assert vm["blackout_guest_s"] is not None
        # the host figure (CLOCK_REALTIME) lies within what luod's own timeline allows: at
        # least reboot -> updated, at most frozen -> normal
        tl = u["timeline"]
        assert tl["updated"] - tl["reboot"] <= vm["blackout_host_s"] \
            <= tl["normal"] - tl["frozen"]
        w_paused, w_resumed = vm["blackout_wall_ns"]
        assert vm["blackout_host_s"] == pytest.approx((w_resumed - w_paused) / 1e9, abs=1e-6)
        # the machine witnessed the jump: the pause covers its request to the next kernel's
        # boot, the host figure is its own ends' distance, the guest's TSC agrees
        paused, resumed = vm["blackout_ns"]
        jump = u["machine_jump"]
        assert paused <= jump["request_ns"] < jump["start_ns"] < jump["booted_ns"] <= resumed
        assert vm["blackout_host_s"] == pytest.approx((resumed - paused) / 1e9, abs=5e-3)
        assert abs(vm["blackout_guest_s"] - vm["blackout_host_s"]) <= \
            witness.guest_bound(vm["blackout_host_s"])
        # restored or left on the host's TSC: as a guest run here shows it
        assert vm["guest_tsc"] == clock
        assert vm["zero_copy_problem"] == ""  # the same physical pages, per the kernel
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")


def test_rollback_and_roll_forward_keep_the_vms(tmp_path: Path) -> None:
    """luoctl demo --from 7.2 --to 6.19: rollback, roll-forward, rollback -- negotiated each
    time (kho-v1, luo-v1, memfd-v1), the guest never restarts, every page checked."""
    rc, out = demo(tmp_path, "--from", "7.2", "--to", "6.19", "--updates", "3", "--vms", "1",
                   "--accel", "tcg", "--no-cache")
    assert rc == 0 and out["integrity"] and not out["leak"], json.dumps(out)[-3000:]
    assert [u["to"] for u in out["updates"]] == ["6.19", "7.2", "6.19"]
    for u in out["updates"]:
        assert u["handover"] == {"mode": "negotiated", "formats": {
            "kho": "kho-v1", "luo": "luo-v1", "flb": "none", "memfd": "memfd-v1"}}
        vm = u["vms"]["vm0"]
        assert vm["integrity"] and vm["resumed"] and vm["pages_verified"] > 0
    steps = [u["vms"]["vm0"]["steps_at_pause"] for u in out["updates"]]
    assert steps == sorted(steps) and len(set(steps)) == 3


def test_updates_in_a_row_leak_nothing(tmp_path: Path) -> None:
    rc, out = demo(tmp_path, "--updates", "6", "--vms", "1", "--accel", "tcg")
    assert rc == 0 and not out["leak"]
    assert [u["update"] for u in out["updates"]] == [1, 2, 3, 4, 5, 6]
    steps = [u["vms"]["vm0"]["steps_at_pause"] for u in out["updates"]]
    assert steps == sorted(steps) and len(set(steps)) == 6  # one guest, never restarted
    assert len({(u["preserved_pages"], u["free_pages"]) for u in out["updates"]}) == 1
    soak = out["soak"]  # the short form of scripts/soak: update 3 against update 6
    assert soak["steps_strictly_increasing"] and not soak["leak"]
    figures = soak["figures"]
    assert figures["kernel_files"]["at"] == 3 and figures["kernel_files"]["to"] > 0
    for name in ("preserved_pages", "free_pages", "kernel_files", "luod_fds"):
        assert figures[name]["growth"] == 0, (name, figures[name])


def test_a_zeroed_page_tail_fails_the_demo(tmp_path: Path) -> None:
    """(Was: the first 16 bytes of a page zeroed -- the only bytes the old check read.)"""
    rc, out = demo(tmp_path, "--fault", "zero-tail", "--no-cache", "--accel", "tcg")
    assert rc == 1 and not out["integrity"]
    (u,) = out["updates"]
    vm0 = u["vms"]["vm0"]
    assert not vm0["integrity"] and "is not the page's fill" in vm0["problem"], vm0
    assert "zeroed from byte" in u["damage"][0] and u["vms"]["vm1"]["integrity"]


def test_every_kind_of_damage_fails_the_demo(tmp_path: Path) -> None:
    """One machine, five guests, each broken one way after the update (one byte at three
    offsets -- past the old 16 checked bytes, mid-page, the last byte of a page --, two pages
    swapped, a VMM that cold-starts its vCPU): the checker catches every one, by itself."""
    broken = (Damage("flip-byte", "vm0", page=5, offset=16),
              Damage("flip-byte", "vm1", page=777, offset=2049),
              Damage("flip-byte", "vm2", page=7000, offset=4095),
              Damage("swap-pages", "vm3", page=100),
              Damage("cold-vcpu", "vm4"))
    d = Demo(str(tmp_path / "m"), 5, 32 << 20, 1 << 30, "6.19", "tcg", False,
             lambda msg: None, damage=broken)
    report = run.updates(d, 1, "damage")
    assert not report.ok and not report.integrity
    (u,) = report.updates
    vms = u.vms
    for vm, off in (("vm0", 16), ("vm1", 2049), ("vm2", 4095)):
        assert not vms[vm].integrity and f"byte {off} is not the page's fill" in \
            vms[vm].problem, (vm, vms[vm])
        assert vms[vm].vcpu_restored, vms[vm]  # memory damage is not a vCPU failure
    assert not vms["vm3"].integrity and "another page's tag" in vms["vm3"].problem
    cold = vms["vm4"]
    assert not cold.vcpu_restored and "registers are not the saved ones" in \
        cold.vcpu_problem, cold
    assert not cold.integrity and "entered 2 times" in cold.problem
    assert cold.resumed  # what the step counters alone said: it "continued"
    failed = {c.name for c in report.checks if not c.passed}
    assert failed == {f"update 1: vm{i} intact" for i in range(5)} | {
        "update 1: vm4 vCPU restored"}


@pytest.mark.skipif(KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}")
def test_a_cold_started_kvm_vcpu_fails_the_demo(tmp_path: Path) -> None:
    rc, out = demo(tmp_path, "--fault", "cold-vcpu", "--no-cache", "--accel", "kvm", "--vms",
                   "1")
    assert rc == 1 and not out["integrity"]
    vm0 = out["updates"][0]["vms"]["vm0"]
    assert vm0["accel"] == "kvm" and vm0["resumed"]
    assert not vm0["vcpu_restored"] and "not the saved ones" in vm0["vcpu_problem"]
    assert not vm0["integrity"] and "entered 2 times" in vm0["problem"]
