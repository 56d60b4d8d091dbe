"""One faulted live update of a booted demo machine, and what became of everything.

Kills inside a client's event use the one-shot fault points of
:mod:`liveupdate.client.faultpoint` (deterministic: before the acknowledgement); kills of luod
while a barrier is held use a helper client that never acknowledges, so the phase is certain.

The outcome is *observed*, not assumed: ``rolled back`` (no kexec; luod back to normal saying
why; every workload running), ``updated`` (the next kernel; everything restored) or ``cold
boot`` (a power loss: nothing restored). Each workload ends ``intact``, ``killed`` (the fault
killed it: it must come back fresh, never from stale state) or ``LOST`` (anything else -- a
broken guest page, a paused VM, a restore that should have happened and did not, or one that
should not have and did). The reliability matrix (docs/reliability.md) is this table.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
from collections.abc import Callable
from typing import Any

from liveupdate.client import faultpoint
from liveupdate.client.update import admin, luod_status, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.scenario import guestcheck
from liveupdate.scenario.demo import Demo
from liveupdate.scenario.faults import COLD_BOOT, HELPER, ROLLED_BACK, UPDATED, Fault
from liveupdate.scenario.report import FaultOutcome, Workload
from liveupdate.scenario.settle import settle


def _wait(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    return settle(what, check, timeout, step=0.02)


class FaultRun:
    """One faulted update of a booted :class:`Demo`."""

    def __init__(self, demo: Demo, fault: Fault) -> None:
        self.d, self.f = demo, fault
        assert demo.m is not None
        self.m = demo.m
        self.luod = demo.sock("luod.sock")
        self.m_error = ""  # a watcher thread's failure, reported with the outcome
        self.killed = False  # a kill (or squeeze) this run did itself
        self.limited: list[tuple[int, int, int]] = []  # (pid, soft, hard) to give back

    def _luod(self) -> dict[str, Any]:
        return luod_status(self.luod)

    def _clients(self) -> set[str]:
        return {str(c["name"]) for c in self._luod().get("clients", [])}

    def _workloads(self) -> list[str]:
        return [*self.d.vms, *(["cache"] if self.d.cache else [])]

    def _pid(self, target: str) -> int:
        if target == "vmm":
            return int(ask(self.d.sock("vmm-vm0.sock"), "status")["pid"])
        if target == "client":
            return int(ask(self.d.sock("kvcache-cache.sock"), "stats")["pid"])
        return int(self._luod()["pid"])

    def _victim(self) -> str:
        return {"vmm": "vm0", "client": "cache"}.get(self.f.target, "")

    def image(self) -> str:
        return {"bad-image@normal": "images/junk.img",
                "incompatible-image@normal": "images/v3.img"}.get(
                    self.f.name, f"images/{self.d.generation}.img")

    def _squeeze(self, pid: int, soft: int) -> None:
        """Lower ``pid``'s soft RLIMIT_NOFILE to ``soft`` (undone by :meth:`disarm`): the fds
        it has stay open, a new one past the limit is EMFILE."""
        old, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        self.limited.append((pid, old, hard))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        self.killed = True  # (for these faults the squeeze is the injection)

    def update(self, on_phase: Any) -> str:
        """Ask for the update with the fault in place; luod's refusal, or '' if it went on."""
        try:
            if self.f.name == "fds-luod@normal":
                c = admin(self.luod)  # connected first: luod then has no fd for anything new
                try:
                    self._squeeze(int(c.status()["pid"]), 3)
                    c.request("update", image=self.image())
                finally:
                    c.close()
                return "luod answered instead of rebooting"
            run_update(self.luod, image=self.image(), on_phase=on_phase)
            return ""
        except LiveUpdateError as e:
            return e.message
        finally:
            self.disarm()

    def disarm(self) -> None:
        """Give squeezed processes their fds back (the fault is over, the aftermath is not)."""
        for pid, soft, hard in self.limited:
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        self.limited.clear()

    def arm(self) -> None:
        """Everything that happens before the update is asked for."""
        f, m = self.f, self.m
        if f.name == "fds-kernel@prepare":
            kernel = int(m.status()["kernel_pid"])
            self._squeeze(kernel, _lowest_free_fd(kernel))
            return
        if f.name == "fds-luod@normal":
            return  # squeezed in update(), once the administrator's connection is accepted
        if f.helper:
            _wait("the helper client", lambda: HELPER in self._clients())
        if f.name == "kill-luod@updated":
            off = m.status()["console_bytes"]
            threading.Thread(target=self._kill_luod_when_updated, args=(off,),
                             daemon=True).start()
        if f.phase == "normal" and f.target in ("vmm", "client", "luod"):
            off = m.status()["console_bytes"]
            pid = self._pid(f.target)
            os.kill(pid, signal.SIGKILL)
            self.killed = True
            if f.target == "luod":
                m.wait("luod: LUO .* listening", offset=off, timeout=60)
                want = set(self._workloads())
                _wait("every client to reconnect", lambda: want <= self._clients())
            elif f.target == "vmm":
                m.wait("vmm vm0: .* started", offset=off, timeout=60)
            else:
                m.wait("kvcache cache: started", offset=off, timeout=60)
        elif f.target in ("vmm", "client") and f.phase != "normal":
            event = {"prepared": "prepare", "frozen": "freeze", "updated": "restore"}[f.phase]
            faultpoint.arm(self.luod, self._victim(), event)

    def during(self, ev: dict[str, Any]) -> None:
        """luod's phase events, as the update runs: kill luod where the barrier is held."""
        f = self.f
        if f.target != "luod" or f.phase not in ("prepared", "frozen"):
            return
        if ev.get("phase") != f.phase:
            return
        if f.phase == "prepared":  # every VMM limited: only the helper holds the barrier
            _wait("the VMMs to acknowledge prepare",
                  lambda: all(s["limited"] for s in self.d.statuses().values()))
        else:
            _wait("the VMs to pause", lambda: all(s["paused"] for s in
                                                  self.d.statuses().values()))
        os.kill(int(self._luod()["pid"]), signal.SIGKILL)
        self.killed = True

    def _kill_luod_when_updated(self, off: int) -> None:
        """In the next kernel, once every workload is back and luod still waits for the
        helper (which never restores) before FINISH: kill luod there."""
        m = MachineClient(self.d.folder)  # its own connection: this is another thread
        try:
            for vm in self.d.vms:
                m.wait(f"vmm {vm}: .* resumed", offset=off, timeout=120)
            if self.d.cache:
                m.wait("kvcache cache: restored", offset=off, timeout=120)
            luod = _wait("luod in the next kernel", lambda: (s := self._luod())["phase"]
                         == "updated" and s)
            os.kill(int(luod["pid"]), signal.SIGKILL)
            self.killed = True
        except LiveUpdateError as e:
            self.m_error = e.message
        finally:
            m.close()

    def injected(self, kind: str, err: str) -> bool:
        """Whether the fault demonstrably happened (a fault that never fired proves
        nothing): the kill was done, the fault point's file was consumed, the power went, the
        barrier timed out, the load or the reboot failed with the reason."""
        f = self.f
        if f.target == "power":
            return kind == COLD_BOOT
        if f.target in ("vmm", "client") and f.phase != "normal" and not f.helper:
            return not os.path.exists(faultpoint.path(self.luod, self._victim()))
        if f.name.startswith("fds-"):
            return self.killed and "Too many open files" in err
        if f.target in ("vmm", "client", "luod") and not f.name.startswith("no-ack"):
            return self.killed
        return bool(err)

    def outcome(self, boot_count: int, err: str) -> FaultOutcome:
        """Wait for the machine to settle, then observe what became of everything."""
        m = self.m
        st = _wait("the machine to run", lambda: (s := m.status())["state"] == "running"
                   and s)
        power = "power loss" in str(st.get("last_restart", ""))
        if power:
            kind = COLD_BOOT
        elif st["boot_count"] > boot_count and st["kernel"].get("kho_boot"):
            kind = UPDATED
        elif st["boot_count"] == boot_count:
            kind = ROLLED_BACK
        else:
            kind = f"unexpected reboot ({st.get('last_restart') or 'no handover'})"
        settled = ("normal", "updated") if kind == UPDATED else ("normal",)

        def luod_settled() -> dict[str, Any] | None:
            s = self._luod()
            return s if s["phase"] in settled else None
        luod = _wait("luod to settle", luod_settled)
        want = set(self._workloads())
        _wait("the workloads to come back", lambda: want <= self._clients())
        work = {name: self._workload(name, kind) for name in self._workloads()}
        lost = sorted(n for n, w in work.items() if w.state == "LOST")
        injected = self.injected(kind, err)
        return FaultOutcome(
            fault=self.f.name, target=self.f.target, phase=self.f.phase,
            generation=self.d.generation, what=self.f.what, expected=self.f.expect,
            outcome=kind, injected=injected,
            as_expected=injected and kind == self.f.expect and not lost,
            update_error=err or self.m_error, luod_phase=luod["phase"],
            why=luod.get("last_error") or "", workloads=work, lost=lost)

    def _workload(self, name: str, kind: str) -> Workload:
        """``fresh``: its state from before the fault is gone by right (the fault killed it
        before the update took it, or the power went); it must come back empty, restored
        only if an update took its fresh self. A kill in the next kernel loses nothing: the
        restarted workload retrieves again."""
        killed = name == self._victim() and self.f.phase != "updated"
        fresh = killed or kind == COLD_BOOT
        should = kind == UPDATED and (not killed or self.f.phase == "normal")
        if name == "cache":
            return self._cache(fresh, should, killed)
        sock = self.d.sock(f"vmm-{name}.sock")
        _wait(f"{name} to run", lambda: not (s := ask(sock, "status"))["paused"]
              and not s["limited"], timeout=30)
        s0 = ask(sock, "status")
        _wait(f"{name}'s guest to make progress",
              lambda: ask(sock, "status")["steps"] > s0["steps"], timeout=30)
        # judged from the machine's RAM by the checker, not by the VMM that restored it
        chk = guestcheck.check(self.m, sock)
        restored = bool(s0["restored"])
        if not chk.intact:
            return Workload("LOST", f"guest memory broken: {chk.problem}")
        if restored != should:
            return Workload("LOST", "restored" if restored else "not restored")
        if restored and not chk.vcpu_restored:
            return Workload("LOST", f"vCPU not restored: {chk.vcpu_problem}")
        return Workload("killed" if killed else "gone" if fresh else "intact",
                        f"{'restored, ' if restored else 'fresh, ' if fresh else ''}running, "
                        f"{chk.pages} pages verified")

    def _cache(self, fresh: bool, should: bool, killed: bool) -> Workload:
        sock = self.d.sock("kvcache-cache.sock")
        stats = _wait("the cache", lambda: (s := ask(sock, "stats")) and not s["limited"]
                      and s, timeout=30)
        got = [ask(sock, "get", key=f"key-{i}") for i in range(self.d.cache_keys)]
        if bool(stats["restored"]) != should:
            return Workload("LOST", "restored" if stats["restored"] else "not restored")
        if fresh:
            if any(g["found"] for g in got):
                return Workload("LOST", "came back with keys it should not have")
            return Workload("killed" if killed else "gone", "came back empty")
        if not all(g["found"] and g["value"] == f"value-{i}" for i, g in enumerate(got)):
            return Workload("LOST", "keys missing or wrong")
        return Workload("intact", f"{self.d.cache_keys} keys read back")


def faulted_update(demo: Demo, fault: Fault) -> FaultOutcome:
    """One update of the booted ``demo`` with ``fault`` injected; what became of everything,
    observed."""
    assert demo.m is not None
    run = FaultRun(demo, fault)
    demo.say(f"fault {fault.name}: {fault.what}")
    run.arm()
    boot_count = demo.m.status()["boot_count"]

    def phase(ev: dict[str, Any]) -> None:
        demo.say(f"  {ev['phase']}")
        run.during(ev)
    err = run.update(phase)
    if err:
        demo.say(f"  the update ended: {err}")
    return run.outcome(boot_count, err)


def _lowest_free_fd(pid: int) -> int:
    """The lowest fd number ``pid`` holds nothing long-lived at: a soft RLIMIT_NOFILE there
    makes every new fd EMFILE. The pidfds a kernel holds for a call it is serving come and
    go, so they count as free (counting them left a hole below the limit when one closed)."""
    held = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[pidfd]":
                held.add(int(name))
    return next(n for n in range(len(held) + 1) if n not in held)
