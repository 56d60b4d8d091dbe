"""The demo's scenario against a host: one interface for an emulated machine and for a real
kernel in QEMU, so the same scenario code drives both.

A :class:`Host` is where the demo's services run -- luod, the VMMs, the key-value cache --
seen from a controller that can reach their sockets: the emulated machine from the host
side (:class:`liveupdate.scenario.demo.Demo`, whose init starts the services from its
service list), or the real kernel from inside the QEMU guest
(:class:`liveupdate.realkernel.demo_host.RealHost`, where the harness's stage script plays
init). The scenario's steps are the functions below, written once against that interface:

1. :func:`ready` -- every guest has walked all of its memory once; the cache holds its keys;
   what each VMM says before the update.
2. :func:`load` -- luod loads the next kernel and says what the handover will be.
3. ``host.kexec()`` -- luod prepares, freezes and kexecs. The emulated machine follows the
   update to the next kernel in the same call; on a real kernel this process ends with the
   kernel (the harness's next stage carries on, with ``host.kexec`` never returning).
4. :func:`outcome` -- in the next kernel: luod's report of the update (``luoctl wait``'s
   :func:`liveupdate.client.update.wait_update`), and :func:`observe` -- each VM judged by
   the checker from its memory (``host.verdicts``), its blackout and step counters, the
   cache's keys read back, and the host's own witnesses (``host.figures``: the emulated
   machine's resource figures and jump timestamps; none on a real kernel).

What differs between the hosts lives in their classes; nothing here asks which one it is.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any, Protocol

from liveupdate.client.update import load_image, wait_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.scenario import blackout
from liveupdate.scenario.guestcheck import Verdict
from liveupdate.scenario.report import CacheResult, UpdateResult, VmResult
from liveupdate.vmm import guest

Say = Callable[[str], None]
LUOD, CACHE = "luod.sock", "kvcache-cache.sock"


def vmm_sock(vm: str) -> str:
    return f"vmm-{vm}.sock"


class Host(Protocol):
    """Where the scenario runs (see the module docstring)."""

    kind: str  # "emulated" or "real": recorded in the result, never branched on here
    vms: list[str]
    vm_memory: int
    cache_keys: int  # 0: no cache

    def sock(self, name: str) -> str:
        """The path of a service's socket (``luod.sock``, ``vmm-vm0.sock``, ...)."""

    def kexec(self, say: Say) -> None:
        """Ask luod for the loaded update. Returns once the next kernel's services answer
        again, or never (the process ends with the kernel); LiveUpdateError when refused."""

    def verdicts(self) -> dict[str, Verdict]:
        """Each VM judged by the checker from its memory, not by its VMM."""

    def settled(self) -> None:
        """The update is over: take the host's after-update records (called once)."""

    def zero_copy_problem(self, vm: str) -> str | None:
        """Why ``vm``'s memory did not stay on its pages, "" if it did, None: unchecked."""

    def figures(self, luod: dict[str, Any]) -> dict[str, Any]:
        """The host's own figures for :class:`UpdateResult` (resources, jump times)."""


def statuses(h: Host) -> dict[str, dict[str, Any]]:
    return {vm: ask(h.sock(vmm_sock(vm)), "status") for vm in h.vms}


def ready(h: Host, timeout: float, poll: float = 0.1) -> dict[str, dict[str, Any]]:
    """Wait until every guest has walked all of its memory once (a CLI watching guests
    run), put the cache's keys, and return what the VMMs say."""
    pages = (h.vm_memory - guest.DATA_AT) // guest.PAGE
    deadline = time.monotonic() + timeout
    while any((low := s)["steps"] < pages for s in statuses(h).values()):
        if time.monotonic() > deadline:
            raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"the guests walked "
                                  f"{low['steps']} of {pages} pages in {timeout:.0f} s")
        time.sleep(poll)
    for i in range(h.cache_keys):
        ask(h.sock(CACHE), "put", key=f"key-{i}", value=f"value-{i}")
    return statuses(h)


def load(h: Host, image: str, say: Say, cmdline: str | None = None,
         release: str | None = None) -> dict[str, Any]:
    """luod loads the next kernel: the handover it will write (mode and formats)."""
    from liveupdate.abi import generations

    handover: dict[str, Any] = load_image(h.sock(LUOD), image, cmdline, release)["handover"]
    say(f"{handover['mode']} handover (" + generations.describe(handover["formats"])
        + "); prepare, freeze, kexec")
    return handover


def outcome(h: Host, update: int, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """luod's status and its report of update ``update``, once it FINISHed."""
    return wait_update(h.sock(LUOD), update, timeout)


def cache_result(h: Host) -> CacheResult | None:
    if not h.cache_keys:
        return None
    got = [ask(h.sock(CACHE), "get", key=f"key-{i}") for i in range(h.cache_keys)]
    return CacheResult(h.cache_keys, all(g["found"] and g["value"] == f"value-{i}"
                                         for i, g in enumerate(got)))


def vm_result(h: Host, vm: str, before: dict[str, Any], after: dict[str, Any],
              chk: Verdict, parts: dict[str, float] | None = None) -> VmResult:
    b = after["blackout"]
    return VmResult(
        accel=after["accel"], memory=h.vm_memory, steps_before_update=before["steps"],
        steps_at_pause=b.get("steps_before"), steps_after_resume=b.get("steps_after"),
        resumed=bool(after["restored"])
        and b.get("steps_after", 0) > b.get("steps_before", 0) > 0,
        blackout_host_s=b.get("host_s"), blackout_guest_s=b.get("guest_s"),
        integrity=chk.intact, problem=chk.problem, pages_verified=chk.pages,
        vcpu_restored=chk.vcpu_restored, vcpu_problem=chk.vcpu_problem,
        blackout_ns=(b["paused_ns"], b["resumed_ns"]) if "paused_ns" in b else None,
        blackout_wall_ns=(b["paused_wall_ns"], b["resumed_wall_ns"])
        if "paused_wall_ns" in b else None,
        guest_tsc=b.get("tsc", ""), zero_copy_problem=h.zero_copy_problem(vm),
        blackout_parts=parts)


def observe(h: Host, to: str, handover: dict[str, Any], before: dict[str, dict[str, Any]],
            luod: dict[str, Any], report: dict[str, Any], damage: list[str] | None = None
            ) -> UpdateResult:
    """The update as it came out: every VM and the cache checked, luod's timeline, the
    host's figures."""
    after = statuses(h)
    h.settled()
    verdicts = h.verdicts()
    figures = h.figures(luod)
    timeline = report.get("timeline", {})
    vms = {vm: vm_result(h, vm, before[vm], after[vm], verdicts[vm],
                         blackout.parts(after[vm]["blackout"] or {}, timeline,
                                        figures.get("machine_jump") or {},
                                        luod.get("listening_ns")))
           for vm in h.vms}
    return UpdateResult(
        update=luod["update"], to=to, handover=handover,
        timeline=timeline, finish=report.get("finish"), vms=vms,
        cache=cache_result(h), damage=damage or [], host=h.kind, **figures)
