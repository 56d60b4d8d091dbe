"""The demo's report: one schema for what a live update of the demo machine cost and whether
anything was lost.

``luoctl demo --json`` prints :meth:`DemoReport.to_json` and the text report renders the same
objects, so the two never disagree. A report holds the updates (each with its phases, one
:class:`VmResult` per VM -- blackout, integrity, step counters -- the cache and the machine's
resource figures), the soak analysis of a run of several updates, a faulted update's observed
:class:`FaultOutcome`, and the :class:`Check` list the verdict is made of. Later work (devices,
a blackout breakdown, real-kernel runs, fleets) extends these classes and adds checks instead
of bringing a report of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# luod's timeline points, in order, and the phase between each pair
PHASE_NAMES = [("start", "prepared", "Normal: luod loads the next kernel, asks to prepare"),
               ("prepared", "frozen", "Prepared: clients preserve, VMs keep running"),
               ("frozen", "reboot", "Frozen: VMs paused, last state written"),
               ("reboot", "updated", "kexec + next kernel boot + luod"),
               ("updated", "normal", "Updated: VMMs and cache restore, FINISH")]


@dataclass(frozen=True)
class Phase:
    phase: str
    start_s: float  # since luod started the update
    duration_s: float


def phases(timeline: dict[str, float]) -> list[Phase]:
    """luod's timeline (wall-clock points) as phases with durations; a point luod did not
    reach leaves its phases out."""
    base = timeline.get("start", 0.0)
    return [Phase(label, timeline[a] - base, timeline[b] - timeline[a])
            for a, b, label in PHASE_NAMES if a in timeline and b in timeline]


@dataclass(frozen=True)
class VmResult:
    """One VM across one update: the VMM's blackout measurement (host clock from the guest's
    last instruction before the pause to its first after the resume, as CLOCK_REALTIME --
    the host clock that continues across a kexec: :mod:`liveupdate.vmm.vmm` -- and both ends
    as CLOCK_REALTIME and CLOCK_MONOTONIC ns; the guest's own TSC, and whether the guest's
    TSC was ``restored`` or is the ``host``'s), its step counter, and the guest's own check
    of every page it touched."""

    accel: str
    memory: int
    steps_before_update: int
    steps_at_pause: int | None
    steps_after_resume: int | None
    resumed: bool  # restored, not restarted: its counter went on
    blackout_host_s: float | None
    blackout_guest_s: float | None
    integrity: bool
    problem: str
    pages_verified: int
    # the restored registers are the saved ones, and the guest agrees (entered once, its
    # register-only secret unchanged): judged by the checker from RAM
    vcpu_restored: bool = True
    vcpu_problem: str = ""
    blackout_ns: tuple[int, int] | None = None  # (paused, resumed): CLOCK_MONOTONIC
    blackout_wall_ns: tuple[int, int] | None = None  # (paused, resumed): CLOCK_REALTIME
    guest_tsc: str = ""
    zero_copy_problem: str | None = None  # "": on the same physical pages; None: unchecked
    # the host-clock blackout in its parts, in order (liveupdate.scenario.blackout), seconds
    blackout_parts: dict[str, float] | None = None


@dataclass(frozen=True)
class CacheResult:
    keys: int
    intact: bool


@dataclass(frozen=True)
class Check:
    """One thing the verdict depends on. ``group`` says which verdict: ``integrity`` (nothing
    lost), ``leak`` (nothing grew), ``fault`` (the fault ended as defined) or ``witness``
    (a VMM's claim -- its blackout, zero copy -- held against the machine's and the kernel's
    own records: :mod:`liveupdate.scenario.witness`)."""

    name: str
    group: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class UpdateResult:
    update: int
    to: str  # the generation this update went to
    handover: dict[str, Any]  # mode and formats, as the load decided
    timeline: dict[str, float]
    kernel_files: int
    luod_fds: int | None
    machine_rss: int
    ram_resident: int
    finish: str | None
    jump_s: float | None
    vms: dict[str, VmResult]
    cache: CacheResult | None
    damage: list[str]  # what was broken on purpose (luoctl demo --fault DAMAGE)
    preserved_pages: int
    free_pages: int
    # the machine's timestamps of the jump (host CLOCK_MONOTONIC ns): request_ns, start_ns,
    # booted_ns
    machine_jump: dict[str, int] = field(default_factory=dict)
    # where it ran (liveupdate.scenario.host): "emulated", or "real" -- a real kernel in QEMU,
    # whose resource figures above are not observed (0) and whose jump has no machine witness
    host: str = "emulated"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UpdateResult:
        """An update as :meth:`DemoReport.to_json` wrote it (a real-kernel run's result
        crosses from the QEMU guest to ``luoctl demo --real`` this way)."""
        names = {f.name for f in dataclasses.fields(cls)}
        vm_names = {f.name for f in dataclasses.fields(VmResult)}
        args = {k: v for k, v in d.items() if k in names}
        vms: dict[str, VmResult] = {}
        for name, vm in d["vms"].items():
            kw: dict[str, Any] = {k: v for k, v in vm.items() if k in vm_names}
            for k in ("blackout_ns", "blackout_wall_ns"):  # JSON made the pairs lists
                if kw.get(k) is not None:
                    kw[k] = tuple(kw[k])
            vms[name] = VmResult(**kw)
        args["vms"] = vms
        args["cache"] = CacheResult(**d["cache"]) if d.get("cache") else None
        return cls(**args)

    @property
    def phases(self) -> list[Phase]:
        return phases(self.timeline)

    def figure(self, name: str) -> int:
        """One of :data:`liveupdate.scenario.soak.FIGURES`."""
        return int(getattr(self, name))

    def checks(self) -> list[Check]:
        out = []
        for name, vm in self.vms.items():
            out.append(Check(f"update {self.update}: {name} intact", "integrity",
                             vm.integrity, vm.problem))
            out.append(Check(f"update {self.update}: {name} resumed", "integrity", vm.resumed,
                             "" if vm.resumed else "restarted"))
            out.append(Check(f"update {self.update}: {name} vCPU restored", "integrity",
                             vm.vcpu_restored, vm.vcpu_problem))
        if self.cache is not None:
            out.append(Check(f"update {self.update}: cache intact", "integrity",
                             self.cache.intact, f"{self.cache.keys} keys"))
        return out


@dataclass(frozen=True)
class SoakFigure:
    at: int  # the update the figure is compared from
    start: int
    end: int

    @property
    def growth(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SoakResult:
    figures: dict[str, SoakFigure]
    steps_strictly_increasing: bool
    leak: bool


@dataclass(frozen=True)
class Workload:
    state: str  # intact, killed, gone, LOST
    why: str


@dataclass(frozen=True)
class FaultOutcome:
    """What one faulted update became (a record of docs/reliability.md)."""

    fault: str
    target: str
    phase: str
    generation: str
    what: str
    expected: str
    outcome: str
    injected: bool
    as_expected: bool
    update_error: str
    luod_phase: str
    why: str
    workloads: dict[str, Workload]
    lost: list[str]


@dataclass
class DemoReport:
    updates: list[UpdateResult] = field(default_factory=list)
    soak: SoakResult | None = None
    fault: FaultOutcome | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def integrity(self) -> bool:
        return all(c.passed for c in self.checks if c.group == "integrity")

    @property
    def leak(self) -> bool:
        return not all(c.passed for c in self.checks if c.group == "leak")

    @property
    def ok(self) -> bool:
        """The demo's exit status: every check passed."""
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The report as ``luoctl demo --json`` prints it. A faulted run is its outcome
        (``{"fault": ...}``, the reliability matrix's record); a plain run is its verdicts,
        the soak, every update and the checks."""
        checks = [dataclasses.asdict(c) for c in self.checks]
        if self.fault is not None:
            return {"fault": dataclasses.asdict(self.fault), "checks": checks}
        return {"integrity": self.integrity, "leak": self.leak,
                "soak": None if self.soak is None else _soak_json(self.soak),
                "updates": [_update_json(u) for u in self.updates], "checks": checks}


def _update_json(u: UpdateResult) -> dict[str, Any]:
    out = dataclasses.asdict(u)
    out["phases"] = [dataclasses.asdict(p) for p in u.phases]
    return out


def _soak_json(s: SoakResult) -> dict[str, Any]:
    return {"figures": {k: {"at": f.at, "from": f.start, "to": f.end, "growth": f.growth}
                        for k, f in s.figures.items()},
            "steps_strictly_increasing": s.steps_strictly_increasing, "leak": s.leak}
