"""Our own userspace live-updates the real Linux 7.3 (issue #23): luod, ``luoctl update``,
one VMM and the cache, across a real kexec of the same bzImage under QEMU. Run by
./scripts/test-realkernel (skipped in the fast suite)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.demo_run import real_update
from liveupdate.scenario.report import UpdateResult
from tests.realkernel.conftest import ROOT

pytestmark = pytest.mark.realkernel

# kept after the run (pytest's tmp_path is not): stage<N>.json, the services' logs, console
OUT = Path(os.environ.get("LIVEUPDATE_REALLU", ROOT / "build" / "realkernel-liveupdate"))


def test_luod_vmm_and_cache_live_update_the_real_kernel(image: Image) -> None:
    """The run ``luoctl demo --real`` makes (:func:`real_update`), checked in detail."""
    try:
        u, checks, run = real_update(image, OUT)
    except LiveUpdateError as e:
        pytest.fail(e.message)
    assert run.stage_rc(1) == 0 and run.stage_rc(2) is not None
    # luoctl update ended with the kernel: no result, only its word on how to follow it
    said = (OUT / "luoctl.stage1.out").read_text()
    assert "`luoctl wait --update 1` in the next one" in said and "FINISH" not in said
    first = json.loads((OUT / "stage1.json").read_text())
    second = json.loads((OUT / "stage2.json").read_text())
    assert run.events["stage1"] < run.events["jump"] < run.events["stage2"]
    assert first["release"] == second["release"] == image.release
    # luod: UPDATED -> NORMAL, FINISH once every client was back, the phases in order
    assert second["luod"]["phase"] == "normal" and second["luod"]["update"] == first["update"]
    assert second["report"]["finish"] == "every client is done"
    tl = second["report"]["timeline"]
    assert tl["start"] <= tl["prepared"] <= tl["frozen"] <= tl["reboot"] <= tl["updated"] \
        <= tl["normal"]
    # the demo's result, in its schema: the VMM resumed its guest (the step counter
    # continues past the one at the pause), every byte checked, the cache's keys back
    assert u == UpdateResult.from_json(second["result"])
    assert [dataclasses.asdict(c) for c in checks] == second["checks"]
    vm = u.vms["vm0"]
    assert u.host == "real" and vm.accel == "tcg" and u.cache is not None and u.cache.intact
    assert first["vm_check"]["intact"], first["vm_check"]["problem"]
    assert vm.integrity and vm.resumed and vm.vcpu_restored, (vm.problem, vm.vcpu_problem)
    assert vm.steps_at_pause is not None and vm.steps_after_resume is not None
    assert vm.steps_after_resume > vm.steps_at_pause >= first["vmm"]["steps"] > 0
    # the blackout on CLOCK_REALTIME, which crosses the kexec: within luod's timeline
    # (each end against luod's points of the same kernel), so positive and below
    # frozen -> normal
    assert vm.blackout_host_s is not None and vm.blackout_wall_ns is not None
    assert tl["updated"] - tl["reboot"] <= vm.blackout_host_s <= tl["normal"] - tl["frozen"]
    # zero copy: the guest memfd's pages are on the same page frames after the kexec
    assert vm.zero_copy_problem == "" and len(set(first["pfns"])) == len(first["pfns"])
    # every check of the demo's verdict passed (integrity, blackout in the timeline, pages)
    assert all(c["passed"] for c in second["checks"]), second["checks"]
    assert {c["name"] for c in second["checks"]} >= {
        "update 1: vm0 intact", "update 1: vm0 blackout within luod's timeline",
        "update 1: vm0 guest memory on the same pages", "update 1: cache intact",
        "update 1: vm0 blackout agrees with the guest's TSC"}
    assert second["cache"]["stats"]["restored"]
    assert run.stage_rc(2) == 0
