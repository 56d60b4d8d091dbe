"""The demo's report schema in process: what the checks make of results, the soak's
comparison, the JSON luoctl demo --json prints, and the text report rendered from it (no
machine: synthetic results)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from liveupdate.cli import demo as cli_demo
from liveupdate.cli import demo_real
from liveupdate.scenario import faults, run, soak
from liveupdate.scenario.report import (
    CacheResult,
    DemoReport,
    FaultOutcome,
    Phase,
    UpdateResult,
    VmResult,
    Workload,
    phases,
)

TIMELINE = {"start": 100.0, "prepared": 100.5, "frozen": 101.0, "reboot": 101.25,
            "updated": 102.0, "normal": 103.0}


def _vm(steps: int, **kw: object) -> VmResult:
    base = VmResult(accel="tcg", memory=64 << 20, steps_before_update=steps - 10,
                    steps_at_pause=steps, steps_after_resume=steps + 100, resumed=True,
                    blackout_host_s=0.4, blackout_guest_s=0.39, integrity=True, problem="",
                    pages_verified=4096)
    return dataclasses.replace(base, **kw)


def _update(n: int, to: str = "6.19", **kw: object) -> UpdateResult:
    base = UpdateResult(update=n, to=to, handover={"mode": "native", "formats": {
        "kho": "kho-v1", "luo": "luo-v1", "flb": "none", "memfd": "memfd-v1"}},
        timeline=TIMELINE, kernel_files=12, luod_fds=20, machine_rss=100 << 20,
        ram_resident=50 << 20, finish="every client is done", jump_s=0.01,
        vms={"vm0": _vm(1000 * n)}, cache=CacheResult(64, True), damage=[],
        preserved_pages=18, free_pages=200000)
    return dataclasses.replace(base, **kw)


def _report(results: list[UpdateResult]) -> DemoReport:
    soaked = soak.soak(results) if len(results) > 1 else None
    return DemoReport(results, soaked, None,
                      [c for r in results for c in r.checks()] + soak.checks(results, soaked))


def test_phases_are_the_timeline_between_luods_points() -> None:
    got = phases(TIMELINE)
    assert [p.duration_s for p in got] == [0.5, 0.5, 0.25, 0.75, 1.0]
    assert got[3] == Phase("kexec + next kernel boot + luod", 1.25, 0.75)
    # a point luod never reached leaves its phases out
    assert phases({"start": 1.0, "prepared": 2.0}) == [Phase(got[0].phase, 0.0, 1.0)]


def test_an_intact_update_passes_every_check() -> None:
    r = _report([_update(1)])
    assert r.integrity and not r.leak and r.ok
    names = [c.name for c in r.checks]
    assert names == ["update 1: vm0 intact", "update 1: vm0 resumed",
                     "update 1: vm0 vCPU restored", "update 1: cache intact",
                     "handover pages into 6.19 constant"]


@pytest.mark.parametrize("broken", [
    {"vms": {"vm0": _vm(1000, integrity=False, problem="page 7 does not sum to ...")}},
    {"vms": {"vm0": _vm(1000, resumed=False)}},
    {"vms": {"vm0": _vm(1000, vcpu_restored=False, vcpu_problem="entered 2 times")}},
    {"cache": CacheResult(64, False)},
])
def test_anything_lost_fails_integrity(broken: dict[str, object]) -> None:
    r = _report([_update(1, **broken)])
    assert not r.integrity and not r.ok and not r.leak


def test_handover_structures_are_compared_per_generation() -> None:
    same = _report([_update(1, to="6.19"), _update(2, to="7.2", preserved_pages=30),
                    _update(3, to="6.19")])
    assert not same.leak
    grew = _report([_update(1), _update(2, free_pages=199999)])
    assert grew.leak and grew.integrity and not grew.ok


def test_soak_compares_update_10_with_the_last() -> None:
    results = [_update(n) for n in range(1, 31)]
    results[-1] = dataclasses.replace(results[-1], kernel_files=13)
    s = soak.soak(results)
    assert s.figures["kernel_files"].at == 10 and s.figures["kernel_files"].growth == 1
    assert s.leak and s.steps_strictly_increasing
    short = soak.soak([_update(n) for n in range(1, 7)])  # half-way for fewer than 20
    assert short.figures["luod_fds"].at == 3 and not short.leak


def test_soak_allows_5_percent_of_host_rss_and_catches_a_restart() -> None:
    results = [_update(n) for n in range(1, 5)]
    results[-1] = dataclasses.replace(results[-1], machine_rss=(100 << 20) * 104 // 100,
                                      vms={"vm0": _vm(1)})
    s = soak.soak(results)
    assert not s.leak and not s.steps_strictly_increasing
    assert _report(results).leak  # a guest that restarted fails the soak


def test_json_keeps_the_fields_the_tests_and_tools_read() -> None:
    out = json.loads(json.dumps(_report([_update(1), _update(2)]).to_json()))
    assert out["integrity"] is True and out["leak"] is False
    assert set(out["soak"]["figures"]["kernel_files"]) == {"at", "from", "to", "growth"}
    u = out["updates"][0]
    assert u["vms"]["vm0"]["blackout_host_s"] == 0.4 and u["cache"] == {"keys": 64,
                                                                         "intact": True}
    assert len(u["phases"]) == 5 and u["phases"][0]["phase"].startswith("Normal")
    assert all(set(c) == {"name", "group", "passed", "detail"} for c in out["checks"])


def _outcome(**kw: object) -> FaultOutcome:
    base = FaultOutcome(fault="kill-vmm@prepare", target="vmm", phase="prepared",
                        generation="6.19", what="w", expected=faults.ROLLED_BACK,
                        outcome=faults.ROLLED_BACK, injected=True, as_expected=True,
                        update_error="", luod_phase="normal", why="vm0 went away",
                        workloads={"vm0": Workload("killed", "fresh"),
                                   "cache": Workload("intact", "64 keys read back")},
                        lost=[])
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("kw", [{}, {"injected": False}, {"outcome": faults.UPDATED},
                                {"lost": ["cache"]}])
def test_fault_checks_are_as_expected_in_parts(kw: dict[str, object]) -> None:
    o = _outcome(**kw)
    o = dataclasses.replace(o, as_expected=o.injected and o.outcome == o.expected
                            and not o.lost)
    r = DemoReport(fault=o, checks=run.fault_checks(o))
    assert r.ok == o.as_expected
    out = r.to_json()
    assert out["fault"]["workloads"]["vm0"] == {"state": "killed", "why": "fresh"}
    assert out["fault"]["as_expected"] == o.as_expected


def test_fault_table_names_are_unique_and_known() -> None:
    assert len(faults.BY_NAME) == len(faults.FAULTS)
    assert {f.expect for f in faults.FAULTS} == {faults.ROLLED_BACK, faults.UPDATED,
                                                 faults.COLD_BOOT}


def test_the_text_report_renders_from_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    results = [_update(1), _update(2)]
    cli_demo.render(results, True)
    cli_demo.render_soak(soak.soak(results), 2)
    cli_demo.render_fault(_outcome())
    text = capsys.readouterr().out
    for want in ("update 1: to Linux 6.19, native handover", "cache: 64 keys intact",
                 "kexec jump (machine): 0.010 s; FINISH: every client is done",
                 "integrity: intact", "resources after update 1 and after update 2",
                 "strictly increasing across every update", "outcome: rolled back (defined: "
                 "rolled back); luod normal, says: vm0 went away", "as defined, nothing lost"):
        assert want in text, want


def test_an_update_reads_back_from_its_json() -> None:
    """A real-kernel run's result crosses from the QEMU guest as JSON: it reads back to the
    same result (pairs that JSON made lists are pairs again), and a cache-less one too."""
    u = _update(1, vms={"vm0": _vm(1000, blackout_ns=(5, 9), blackout_wall_ns=(7, 11))},
                host="real")
    back = UpdateResult.from_json(json.loads(json.dumps(DemoReport([u]).to_json()))
                                  ["updates"][0])
    assert back == u and back.vms["vm0"].blackout_wall_ns == (7, 11)
    bare = _update(2, cache=None)
    assert UpdateResult.from_json(json.loads(json.dumps(dataclasses.asdict(bare)))) == bare


def test_real_and_emulated_phases_are_compared_by_name_and_order(
        capsys: pytest.CaptureFixture[str]) -> None:
    """luoctl demo --real: the phases side by side (times differ, that is expected), the same
    phases in the same order pass; a real run that stopped short of a phase does not. A real
    kernel's result renders without the emulated machine's figures."""
    emulated = _update(1)
    slow = {k: 100.0 + (v - 100.0) * 40 for k, v in TIMELINE.items()}  # TCG in QEMU: slow
    real = _update(1, to="7.3.4", timeline=slow, jump_s=None, host="real")
    got = demo_real.compare(emulated, real)
    assert got["same_phases_in_order"] and len(got["phases"]) == 5
    assert got["phases"][3]["real_s"] == pytest.approx(30.0)
    short = _update(1, timeline={k: v for k, v in slow.items() if k != "normal"})
    got = demo_real.compare(emulated, short)
    assert not got["same_phases_in_order"] and got["phases"][4]["real_s"] is None
    cli_demo.render([real], True)
    demo_real.render_compare(demo_real.compare(emulated, real), emulated, real)
    text = capsys.readouterr().out
    assert "FINISH: every client is done" in text and "kexec jump (machine)" not in text
    assert "phases and their order: the same" in text
