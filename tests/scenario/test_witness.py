"""The witness checks in process (synthetic results): a blackout figure that was shrunk, a
pause that does not cover the machine's jump or a guest clock that disagrees is caught; the
measure of private memory sees a private copy."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from liveupdate.scenario import witness
from liveupdate.scenario.report import VmResult

S = 1_000_000_000
JUMP = {"request_ns": 100 * S, "start_ns": 100 * S + S // 100, "booted_ns": 100 * S + S // 20}
PAUSED, RESUMED = 100 * S - S // 50, 101 * S  # 20 ms before the jump request, 1 s after
# the same ends on CLOCK_REALTIME (another origin: MONOTONIC restarts with each kernel)
EPOCH = 1_800_000_000 * S
WALL = (EPOCH + PAUSED, EPOCH + RESUMED)
# luod's timeline around them: frozen 10 ms before the pause, reboot 10 ms after it, ...
TIMELINE = {"start": (EPOCH + PAUSED) / 1e9 - 0.5, "prepared": (EPOCH + PAUSED) / 1e9 - 0.1,
            "frozen": (EPOCH + PAUSED) / 1e9 - 0.01, "reboot": (EPOCH + PAUSED) / 1e9 + 0.01,
            "updated": (EPOCH + RESUMED) / 1e9 - 0.2, "normal": (EPOCH + RESUMED) / 1e9 + 0.05}


def _vm(**kw: object) -> VmResult:
    base = VmResult(accel="tcg", memory=64 << 20, steps_before_update=10,
                    steps_at_pause=20, steps_after_resume=40, resumed=True,
                    blackout_host_s=(RESUMED - PAUSED) / 1e9,
                    blackout_guest_s=(RESUMED - PAUSED) / 1e9 - 0.002, integrity=True,
                    problem="", pages_verified=4096, blackout_ns=(PAUSED, RESUMED),
                    blackout_wall_ns=WALL,
                    guest_tsc="host", zero_copy_problem="")
    return dataclasses.replace(base, **kw)


def test_an_honest_blackout_is_witnessed() -> None:
    assert witness.blackout_problem(_vm(), JUMP) == ""


@pytest.mark.parametrize("planted, problem", [
    # both figures divided by 10 (a planted bug of issue 20)
    ({"blackout_host_s": (RESUMED - PAUSED) / 1e10,
      "blackout_guest_s": (RESUMED - PAUSED) / 1e10}, "not its own ends"),
    # ends moved with the figure: the pause no longer covers the jump
    ({"blackout_host_s": 0.1, "blackout_ns": (RESUMED - S // 10, RESUMED)}, "does not cover"),
    ({"blackout_ns": (PAUSED, JUMP["booted_ns"] - 1)}, "does not cover"),
    # the guest's clock jumped (a TSC set wrong, or never set on a KVM that offsets)
    ({"blackout_guest_s": 0.5}, "guest's TSC says"),
    ({"blackout_guest_s": None}, "no figure"),
    ({"blackout_ns": None}, "no blackout"),
])
def test_a_blackout_the_machine_does_not_witness_fails(planted: dict, problem: str) -> None:
    assert problem in witness.blackout_problem(_vm(**planted), JUMP)


def test_no_jump_witnessed_fails() -> None:
    assert "witnessed no jump" in witness.blackout_problem(_vm(), {})


def test_the_guest_bound_is_stated_and_tight() -> None:
    assert witness.guest_bound(1.0) == pytest.approx(0.07)
    assert witness.blackout_problem(_vm(blackout_guest_s=(RESUMED - PAUSED) / 1e9 + 0.072),
                                    JUMP)
    assert not witness.blackout_problem(
        _vm(blackout_guest_s=(RESUMED - PAUSED) / 1e9 - 0.068), JUMP)


def test_the_host_figure_is_the_distance_of_its_realtime_ends() -> None:
    """The figure is REALTIME's distance (the clock that crosses a kexec), not MONOTONIC's:
    after a real kexec MONOTONIC's ends are in two kernels' clocks."""
    restarted = (PAUSED, S // 2)  # the next kernel's MONOTONIC, from its boot
    assert witness.timeline_problem(_vm(blackout_ns=restarted), TIMELINE) == ""
    assert "not its own ends" in witness.blackout_problem(
        _vm(blackout_wall_ns=(WALL[0], WALL[1] + S // 10)), JUMP)


def test_a_blackout_within_luods_timeline_is_witnessed() -> None:
    assert witness.timeline_problem(_vm(), TIMELINE) == ""


@pytest.mark.parametrize("planted, problem", [
    # a pause that began before luod asked to freeze (or after it rebooted)
    ({"blackout_wall_ns": (WALL[0] - S // 20, WALL[1])}, "not while luod was frozen"),
    ({"blackout_wall_ns": (WALL[0] + S // 20, WALL[1])}, "not while luod was frozen"),
    # a resume before the next luod was up, or after it FINISHed: a figure shrunk or grown
    ({"blackout_wall_ns": (WALL[0], WALL[1] - S // 2)}, "not while luod was updated"),
    ({"blackout_wall_ns": (WALL[0], WALL[1] + S // 10)}, "not while luod was updated"),
    ({"blackout_wall_ns": None}, "no REALTIME ends"),
])
def test_a_blackout_outside_luods_timeline_fails(planted: dict, problem: str) -> None:
    assert problem in witness.timeline_problem(_vm(**planted), TIMELINE)


def test_a_timeline_without_its_points_fails() -> None:
    short = {k: v for k, v in TIMELINE.items() if k != "updated"}
    assert "lacks a point" in witness.timeline_problem(_vm(), short)


def test_without_a_machine_the_guest_clock_bounds_the_host_figure() -> None:
    """A real kernel: no machine saw the jump; the host figure (REALTIME read back from the
    RTC in whole seconds by each kernel) must agree with the guest's TSC within the guest
    bound plus one second -- as seen on the real 7.3: 73.00 vs 74.06 s, 58.02 vs 57.81 s."""
    for host_s, guest_s in ((73.003688, 74.064336), (58.020, 57.813)):
        assert witness.clocks_problem(_vm(blackout_host_s=host_s,
                                          blackout_guest_s=guest_s)) == ""
    assert "guest's TSC says" in witness.clocks_problem(
        _vm(blackout_host_s=7.3, blackout_guest_s=74.06))  # a figure shrunk tenfold
    assert "no figure" in witness.clocks_problem(_vm(blackout_guest_s=None))


PRIVATE_COPY = r"""
import mmap, os
from liveupdate.scenario import witness
before = witness.private_bytes(os.getpid())
fd = os.memfd_create("shared")
os.ftruncate(fd, 64 << 20)
with mmap.mmap(fd, 64 << 20) as shared:
    for _ in range(64):  # touched, but shared memory: not private
        shared.write(b"\1" * (1 << 20))
    mapped = witness.private_bytes(os.getpid()) - before
    copy = bytearray(shared)  # a private copy of it
    print(mapped, witness.private_bytes(os.getpid()) - before)
"""


def test_private_memory_sees_a_private_copy() -> None:
    """What the zero-copy test measures grows by what a process copies into its own memory
    (the 64 MiB a VMM holding a 64 MiB guest privately would add), and not by what it maps
    of a shared file. In a fresh interpreter: a test worker's heap may already hold freed
    pages the copy would reuse."""
    out = subprocess.run([sys.executable, "-c", PRIVATE_COPY], capture_output=True,
                         text=True, check=True).stdout.split()
    mapped, copied = int(out[0]), int(out[1])
    assert mapped < 16 << 20
    assert copied >= 60 << 20
