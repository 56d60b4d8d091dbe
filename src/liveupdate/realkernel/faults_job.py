"""The ``faults`` job: faults of the emulated fault matrix (:mod:`liveupdate.scenario.faults`)
injected into live updates of the real kernel, one after another in one boot (each ends
rolled back, so no kexec happens and the next starts from a running system).

The services are the demo's (:class:`~liveupdate.realkernel.demo_host.RealHost`: luod, VMM
vm0, the cache), started by this stage as init would -- and restarted by it when a fault
killed one, as init's ``@restart`` does. Each fault is injected for real and its outcome is
observed, as :mod:`liveupdate.scenario.faultrun` does on the emulated machine, into the same
record (:class:`~liveupdate.scenario.report.FaultOutcome`, in ``faults.json``):

* ``bad-image@normal``: ``luoctl update --image`` a file that is not a kernel, with a
  release so that luod's pre-flight lets it through: the real ``kexec_file_load`` refuses it
  (``kexec_image_probe_default`` finds no loader that accepts it: ENOEXEC) before any
  client hears of the update.
* ``kill-client@prepare``: the cache SIGKILLs itself inside prepare, before acknowledging
  (its one-shot fault point, :mod:`liveupdate.client.faultpoint`); luod's barrier fails and
  it cancels: the VM resumes, the cache comes back (restarted) empty.
* ``kill-luod@prepared``: a helper client that never acknowledges prepare holds the
  barrier; once the VMM and the cache are limited (preserving), luod is SIGKILLed. Its
  fds close with it: ``/dev/liveupdate`` (Linux's ``luo_release()`` lets the device be
  opened again -- the restarted luod opens it) and luod's copies of the sessions it
  created; the clients close theirs when the restarted luod tells them the update did not
  happen in this kernel, and the last close of a session runs Linux's
  ``luo_session_release()``, which unpreserves its files (``luo_file_unpreserve_files()``).
  The clients resume; the restarted luod says why from its state file.

Workloads are judged as the emulated matrix judges them: a VM ``intact`` when it runs (not
paused, not limited, its steps going on) and the checker finds every page it touched
intact; the cache ``intact`` with its keys, or ``killed`` when the fault killed it and it came
back empty.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from liveupdate.client import faultpoint
from liveupdate.client.update import luod_status
from liveupdate.ipc.service import ask
from liveupdate.realkernel.demo_host import VM, RealHost, Services, cmdline
from liveupdate.realkernel.guest import STAGE_ARG
from liveupdate.scenario.faults import BY_NAME, HELPER, ROLLED_BACK
from liveupdate.scenario.host import CACHE, LUOD, vmm_sock
from liveupdate.scenario.report import FaultOutcome, Workload
from liveupdate.scenario.settle import settle

Log = Any
FAULTS = ("bad-image@normal", "kill-client@prepare", "kill-luod@prepared")


def _wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    return settle(what, check, timeout, step=0.2)


class RealFaults:
    def __init__(self, out: Path, kernel: str, log: Log) -> None:
        self.out, self.kernel, self.log = out, kernel, log
        self.svc = Services(out, 1, log)
        self.h = RealHost(self.svc)
        self.luod = self.h.sock(LUOD)
        self.boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    def luoctl(self, *args: str) -> subprocess.Popen[bytes]:
        luoctl = str(Path(sys.executable).parent / "luoctl")
        return subprocess.Popen([luoctl, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def update(self, image: str | None = None) -> subprocess.Popen[bytes]:
        """``luoctl update`` of ``image`` (this kernel's bzImage by default), with this
        command line plus ``lu_harness_stage=2``: should a fault fail to stop the update,
        the next kernel runs stage 2, which says so instead of starting over."""
        line = " ".join(w for w in cmdline().split() if not w.startswith(f"{STAGE_ARG}="))
        return self.luoctl("update", "--json", "--image", image or self.kernel,
                           "--release", os.uname().release, "--cmdline",
                           f"{line} {STAGE_ARG}=2")

    def clients(self) -> set[str]:
        return {str(c["name"]) for c in luod_status(self.luod)["clients"]}

    def start(self) -> None:
        self.h.start()
        _wait("the VMM and the cache to be luod's clients",
              lambda: {VM, "cache"} <= self.clients())
        self.put_keys()

    def put_keys(self) -> None:
        for i in range(self.h.cache_keys):
            ask(self.h.sock(CACHE), "put", key=f"key-{i}", value=f"value-{i}")

    def restart(self, name: str, sock: str, op: str) -> None:
        """init's ``@restart``: the service a fault killed starts again."""
        self.svc.start(name)
        self.svc.wait_answer(name, sock, op)

    # -- the faults ---------------------------------------------------------------------
    def bad_image(self) -> tuple[bool, str]:
        junk = self.out / "junk.img"
        junk.write_bytes(b"not a kernel image\n" * 256)
        p = self.update(str(junk))
        _, err = p.communicate(timeout=300)
        why = err.decode(errors="replace").strip()
        return p.returncode == 1 and "ENOEXEC" in why, why

    def kill_client(self) -> tuple[bool, str]:
        point = faultpoint.arm(self.luod, "cache", "prepare")
        pid = int(ask(self.h.sock(CACHE), "stats")["pid"])
        p = self.update()
        _, err = p.communicate(timeout=300)
        why = err.decode(errors="replace").strip()
        try:
            self.svc.procs["kvcache"].wait(60)  # it killed itself: init reaps, restarts
        except subprocess.TimeoutExpired:
            return False, f"the cache did not die in prepare; luoctl update: {why}"
        self.restart("kvcache", self.h.sock(CACHE), "stats")
        gone = not os.path.exists(point)
        return gone and p.returncode == 1 and pid != int(
            ask(self.h.sock(CACHE), "stats")["pid"]), why

    def kill_luod(self) -> tuple[bool, str]:
        # the helper's daemon says its pid once luod has registered it, and lives on
        held = subprocess.run([sys.executable, "-m", "liveupdate.userspace.luod_client",
                               "hold", HELPER, "0x1:65536", "--fault", "no-prepare-ack"],
                              capture_output=True, text=True, timeout=300, check=True)
        helper = int(json.loads(held.stdout)["pid"])
        _wait("the helper client", lambda: HELPER in self.clients())
        p = self.update()
        vmm, cache = self.h.sock(vmm_sock(VM)), self.h.sock(CACHE)
        _wait("luod to be prepared, the VMM and the cache limited",
              lambda: luod_status(self.luod)["phase"] == "prepared"
              and ask(vmm, "status")["limited"] and ask(cache, "stats")["limited"])
        luod = self.svc.procs["luod"]
        luod.send_signal(signal.SIGKILL)
        luod.wait(60)
        self.svc.start("luod")  # init's @restart (luoctl update waits for it to say why)
        _wait("luod to listen again", lambda: luod_status(self.luod))
        _, err = p.communicate(timeout=300)
        why = err.decode(errors="replace").strip()
        os.kill(helper, signal.SIGKILL)  # it has done its part
        _wait("the VMM and the cache to reconnect", lambda: {VM, "cache"} <= self.clients())
        return p.returncode == 1, why

    # -- the outcome --------------------------------------------------------------------
    def vm(self) -> Workload:
        sock = self.h.sock(vmm_sock(VM))
        _wait("vm0 to run", lambda: not (s := ask(sock, "status"))["paused"]
              and not s["limited"])
        s0 = ask(sock, "status")
        _wait("vm0's guest to make progress",
              lambda: ask(sock, "status")["steps"] > s0["steps"])
        chk = self.h.verdicts()[VM]
        if not chk.intact:
            return Workload("LOST", f"guest memory broken: {chk.problem}")
        if s0["restored"]:
            return Workload("LOST", "restored (no update happened)")
        return Workload("intact", f"running, {chk.pages} pages verified")

    def cache(self, killed: bool) -> Workload:
        sock = self.h.sock(CACHE)
        stats = _wait("the cache", lambda: (s := ask(sock, "stats")) and not s["limited"]
                      and s)
        got = [ask(sock, "get", key=f"key-{i}") for i in range(self.h.cache_keys)]
        if stats["restored"]:
            return Workload("LOST", "restored (no update happened)")
        if killed:
            if any(g["found"] for g in got):
                return Workload("LOST", "came back with keys it should not have")
            return Workload("killed", "came back empty")
        if not all(g["found"] and g["value"] == f"value-{i}" for i, g in enumerate(got)):
            return Workload("LOST", "keys missing or wrong")
        return Workload("intact", f"{self.h.cache_keys} keys read back")

    def outcome(self, name: str, injected: bool, err: str) -> FaultOutcome:
        f = BY_NAME[name]
        same_boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip() == \
            self.boot_id
        luod = _wait("luod to settle", lambda: (s := luod_status(self.luod))["phase"]
                     == "normal" and s)
        kind = ROLLED_BACK if same_boot else "updated"
        work = {VM: self.vm(), "cache": self.cache(killed=f.target == "client")}
        lost = sorted(n for n, w in work.items() if w.state == "LOST")
        return FaultOutcome(
            fault=name, target=f.target, phase=f.phase, generation=os.uname().release,
            what=f.what, expected=f.expect, outcome=kind, injected=injected,
            as_expected=injected and kind == f.expect and not lost, update_error=err,
            luod_phase=luod["phase"], why=luod.get("last_error") or "", workloads=work,
            lost=lost)

    def run(self) -> list[FaultOutcome]:
        self.start()
        inject = {"bad-image@normal": self.bad_image, "kill-client@prepare": self.kill_client,
                  "kill-luod@prepared": self.kill_luod}
        results = []
        for name in FAULTS:
            self.log(f"fault {name}: {BY_NAME[name].what}")
            injected, err = inject[name]()
            o = self.outcome(name, injected, err)
            self.log(f"fault {name}: {o.outcome}, as defined: {o.as_expected} "
                     f"({'; '.join(f'{k} {w.state}' for k, w in o.workloads.items())})")
            results.append(o)
            if o.workloads["cache"].state == "killed":
                self.put_keys()  # the next fault starts from a full cache again
        return results


def run(stage: int, out: Path, plan: dict[str, Any], log: Log) -> int:
    if stage != 1:  # every fault rolls back: a second stage means a kexec happened
        (out / "faults.unexpected-kexec").write_text(f"stage {stage} started\n")
        return 1
    faults = RealFaults(out, str(plan["kernel"]), log)
    try:
        results = faults.run()
    finally:
        faults.svc.stop()
    (out / "faults.json").write_text(json.dumps(
        [dataclasses.asdict(o) for o in results], indent=1) + "\n")
    return 0 if all(o.as_expected for o in results) else 1
