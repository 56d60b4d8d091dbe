"""Checks that hold a VMM's claims against witnesses it does not control.

**Blackout.** The machine -- the hardware -- timestamps the old kernel's jump request, the
next kernel's start and its boot, on the host's CLOCK_MONOTONIC, the clock the VMMs read
(``luoctl machine status``: ``jump_request_ns``, ``kernel_start_ns``, ``kernel_booted_ns``).
A VM's pause must begin before the jump request and end after the next kernel booted; its
host figure must be the distance between its own two ends; and the guest's TSC must measure
the same pause within :func:`guest_bound`. A VMM that shrinks or invents a figure fails one
of the three. The machine is emulated; on both hosts luod's own timeline (CLOCK_REALTIME,
as the VMM's figure: :mod:`liveupdate.vmm.vmm` says why) witnesses the pause too
(:func:`timeline_problem`): it began while luod was Frozen and ended while it was Updated.

**Zero copy.** The kernel's record of the physical extents under each process's memfds (the
machine's ``maps`` request: ``/proc/PID/maps`` with ``/proc/PID/pagemap`` on Linux), taken
before and after the update: the guest's memory must lie on the same extents, and the host's
own ``/proc/PID/maps`` of the new VMM must map those RAM ranges -- the emulated kernel's
word held against the host's. A VMM that restores by copying into a fresh memfd maps other
pages (or two memfds of guest size) and fails. :func:`private_bytes` is the other half: a
process's anonymous memory, which must not grow with guest size.
"""

from __future__ import annotations

import re
from typing import Any

from liveupdate.scenario.report import Check, UpdateResult, VmResult

RAM_FILE = "/memfd:lu-ram"  # the machine's RAM, as the host names the memfd
# the host clock and the guest's TSC measure one pause: they agree within 50 ms plus 2 %
GUEST_AGREES_S, GUEST_AGREES_REL = 0.050, 0.02


def guest_bound(host_s: float) -> float:
    """How far the guest-TSC blackout may lie from the host figure. The guest's figure is
    its TSC gap between its last exit before the pause and its first after the resume, less
    the 4096 steps before that exit as the host timed them: the two clocks measure the same
    interval, so what separates them is the TSC frequency the VMM measured over the run
    before (well under 1 %) and when the vCPU thread stamped each exit: at once on an idle
    host (they agree within a millisecond), but on a busy one the thread may wait for a CPU
    (on this 2-core machine at load 5: once 27 ms). Failures worth catching are far larger:
    a guest TSC that was not restored jumps by the host's uptime, one restored without the
    time that passed shows no pause at all."""
    return GUEST_AGREES_S + GUEST_AGREES_REL * host_s


def blackout_problem(vm: VmResult, jump: dict[str, int]) -> str:
    """Why ``vm``'s blackout is not witnessed by the machine's jump timestamps ``jump``
    (request_ns, start_ns, booted_ns), or "" when it is."""
    if vm.blackout_ns is None or vm.blackout_host_s is None:
        return "the VMM reported no blackout"
    paused, resumed = vm.blackout_ns
    req, booted = jump.get("request_ns", 0), jump.get("booted_ns", 0)
    if not req or not booted:
        return "the machine witnessed no jump"
    if not paused <= req < booted <= resumed:
        return (f"the pause ({paused}..{resumed} ns) does not cover the machine's jump "
                f"request to the next kernel's boot ({req}..{booted} ns)")
    w_paused, w_resumed = vm.blackout_wall_ns or (paused, resumed)
    if abs(vm.blackout_host_s - (w_resumed - w_paused) / 1e9) > 1e-6:
        return (f"the host figure {vm.blackout_host_s:.6f} s is not its own ends' distance "
                f"{(w_resumed - w_paused) / 1e9:.6f} s")
    if vm.blackout_guest_s is None:
        return "the guest's TSC gave no figure"
    if abs(vm.blackout_guest_s - vm.blackout_host_s) > guest_bound(vm.blackout_host_s):
        return (f"the guest's TSC says {vm.blackout_guest_s:.4f} s, the host clock "
                f"{vm.blackout_host_s:.4f} s (bound {guest_bound(vm.blackout_host_s):.4f} s)")
    return ""


# across a real kexec each kernel reads the wall clock back from the x86 CMOS RTC in whole
# seconds (read_persistent_clock64() -> mach_get_cmos_time()): each REALTIME end may be up to
# a second behind, so their distance is off by less than one second either way
RTC_RESOLUTION_S = 1.0


def clocks_problem(vm: VmResult) -> str:
    """Where no machine witnessed the jump (a real kernel): why the host figure and the
    guest's TSC disagree by more than :func:`guest_bound` plus the RTC's resolution, or ""
    when they agree. Both measure the same pause; the host figure's ends are CLOCK_REALTIME
    of two kernels (see :data:`RTC_RESOLUTION_S`)."""
    if vm.blackout_host_s is None or vm.blackout_guest_s is None:
        return "the VMM or the guest's TSC gave no figure"
    bound = guest_bound(vm.blackout_host_s) + RTC_RESOLUTION_S
    if abs(vm.blackout_guest_s - vm.blackout_host_s) > bound:
        return (f"the guest's TSC says {vm.blackout_guest_s:.4f} s, the host clock "
                f"{vm.blackout_host_s:.4f} s (bound {bound:.4f} s)")
    return ""


def timeline_problem(vm: VmResult, timeline: dict[str, float]) -> str:
    """Why ``vm``'s blackout does not lie where luod's ``timeline`` (wall-clock points)
    says it must, or "" when it does: luod asks its clients to freeze after it records
    ``frozen`` and calls reboot after ``reboot``, so the pause began in between; the VMM
    resumes after the next luod recorded ``updated`` (it retrieves its memory through that
    luod) and before ``normal`` (luod FINISHes once the VMM said it is done, which it says
    after its first exit). So the figure lies within [updated - reboot, normal - frozen],
    bounds taken from the run itself, on the emulated machine and on a real kernel alike:
    each end is compared with luod's points of the same kernel."""
    if vm.blackout_wall_ns is None or vm.blackout_host_s is None:
        return "the VMM reported no REALTIME ends of its blackout"
    if any(k not in timeline for k in ("frozen", "reboot", "updated", "normal")):
        return f"luod's timeline lacks a point: {sorted(timeline)}"
    paused, resumed = (t / 1e9 for t in vm.blackout_wall_ns)
    if not timeline["frozen"] <= paused <= timeline["reboot"]:
        return (f"the pause began at {paused:.6f}, not while luod was frozen "
                f"({timeline['frozen']:.6f}..{timeline['reboot']:.6f})")
    if not timeline["updated"] <= resumed <= timeline["normal"]:
        return (f"the resume came at {resumed:.6f}, not while luod was updated "
                f"({timeline['updated']:.6f}..{timeline['normal']:.6f})")
    return ""


def guest_memory(procs: list[dict[str, Any]], vm: str, size: int
                 ) -> tuple[int, list[list[tuple[int, int]]]]:
    """From the kernel's ``maps``: the host pid of the process that runs ``vm`` (its name
    is an argument) and the extents of each memfd of guest size it has mapped."""
    mine = [p for p in procs if vm in p["argv"][1:]]
    if len(mine) != 1:
        return 0, []
    return int(mine[0]["pid"]), [[(int(a), int(n)) for a, n in f["extents"]]
                                 for f in mine[0]["memfds"] if f["size"] == size]


def host_ram_ranges(pid: int) -> list[tuple[int, int]]:
    """The ranges of the machine's RAM file ``pid`` maps now, as the host says
    (``/proc/PID/maps``: the offset into the RAM file is the physical address), merged."""
    spans = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                m = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) \S+ \d+\s+(.*)$", line)
                if m and m.group(4).startswith(RAM_FILE):
                    off = int(m.group(3), 16)
                    spans.append((off, off + int(m.group(2), 16) - int(m.group(1), 16)))
    except OSError:
        return []
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def zero_copy_problem(before: list[dict[str, Any]], after: list[dict[str, Any]], vm: str,
                      size: int) -> str:
    """Why ``vm``'s guest memory did not stay on its physical pages across the update
    (``before``/``after``: the kernel's ``maps``), or "" when it did."""
    _, old = guest_memory(before, vm, size)
    pid, new = guest_memory(after, vm, size)
    if len(old) != 1:
        return f"before the update the VMM mapped {len(old)} memfds of guest size"
    if len(new) != 1:
        return (f"after the update the VMM mapped {len(new)} memfds of guest size "
                "(a copy beside the preserved one?)")
    if new[0] != old[0]:
        moved = sum(n for _, n in set(new[0]) - set(old[0]))
        return (f"guest memory moved: {moved} of {size} bytes lie on other physical pages "
                "than before the update (copied, not preserved)")
    ranges = host_ram_ranges(pid)
    for a, n in new[0]:
        if not any(lo <= a and a + n <= hi for lo, hi in ranges):
            return (f"the host says the VMM (pid {pid}) does not map RAM {a:#x}+{n:#x}, "
                    "where the kernel says its guest memory lies")
    return ""


def private_bytes(pid: int) -> int:
    """Anonymous memory of host process ``pid`` (``RssAnon``): what it holds privately,
    as opposed to the machine's RAM it maps (shared memory, ``RssShmem``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise LookupError(f"no RssAnon for pid {pid}")


def checks(results: list[UpdateResult]) -> list[Check]:
    """Each VM of each update: blackout witnessed (by the machine, where one saw the jump;
    by luod's timeline always), guest memory on the same pages."""
    out = []
    for u in results:
        for name, vm in u.vms.items():
            if u.machine_jump:  # a machine that witnessed the jump (the emulated one)
                why = blackout_problem(vm, u.machine_jump)
                out.append(Check(f"update {u.update}: {name} blackout witnessed", "witness",
                                 not why, why))
            else:  # no such witness: the guest's clock against the host's, RTC and all
                why = clocks_problem(vm)
                out.append(Check(f"update {u.update}: {name} blackout agrees with the "
                                 "guest's TSC", "witness", not why, why))
            why = timeline_problem(vm, u.timeline)
            out.append(Check(f"update {u.update}: {name} blackout within luod's timeline",
                             "witness", not why, why))
            zc = "not checked" if vm.zero_copy_problem is None else vm.zero_copy_problem
            out.append(Check(f"update {u.update}: {name} guest memory on the same pages",
                             "witness", not zc, zc))
    return out
