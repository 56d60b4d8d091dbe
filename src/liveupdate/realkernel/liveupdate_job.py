"""The ``liveupdate`` job: our own userspace live-updates the real kernel (issue #23).

The harness plays init, as the emulated machine's init does with its service list
(:func:`liveupdate.scenario.demo._services`): in each kernel it starts luod
(``python -m liveupdate.cli.luod``, on its default socket ``/run/luod/luod.sock``: virtme-ng
mounts a fresh tmpfs on ``/run`` at every boot, as a distribution does), one VMM
(``python -m liveupdate.vmm vm0 --memory 32M --accel tcg``: unicorn inside the QEMU guest)
and the key-value cache (``python -m liveupdate.userspace.kvcache cache``), each with its
output in ``<service>.stage<N>.log``.

* Stage 1 waits until the guest has walked all of its memory once, puts
  :data:`CACHE_KEYS` keys, records what it sees (``stage1.json``), and runs ``luoctl update
  --image <this bzImage> --cmdline <this command line + lu_harness_stage=2> --release <uname
  -r> --json``: luod loads the image (``kexec_file_load``), prepares and freezes its clients
  and calls ``reboot(LINUX_REBOOT_CMD_KEXEC)`` -- this process ends with the kernel, as an
  administrator's shell does on a real host. ``luoctl``'s own output is kept in
  ``luoctl.stage1.out`` (empty when the jump happened).
* Stage 2 (after the real kexec) starts the same three services: luod finds its registry
  through LUO, the VMM retrieves its memory and saved state by token and resumes, the cache
  reads its table back, and luod FINISHes once every client is done. ``stage2.json`` holds
  luod's report (its phase timeline and the FINISH reason), the VMM's status and blackout,
  the integrity verdict and the cache's keys.

The integrity check: the emulated demo's checker (:mod:`liveupdate.scenario.guestcheck`)
reads guest memory from the emulated machine's RAM by physical extent; a real kernel gives
userspace no such view (no ``/dev/mem`` here), so the checker opens the VMM's guest-memory
and state memfds itself through ``/proc/<pid>/fd/<n>`` (the VMM's ``where`` names the fds),
maps them read-only and runs :func:`liveupdate.vmm.guest.verify` over every byte -- the
guest's own records (page counters, fill, checksum, state page, tables, code), and the
register-only secret against the saved vCPU state. What it cannot show on the real kernel is
zero copy (that the pages are the same physical pages before and after).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from liveupdate.client.update import luod_status, reconnect
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import endpoints
from liveupdate.ipc.service import ask
from liveupdate.realkernel.guest import STAGE_ARG
from liveupdate.scenario import guestcheck
from liveupdate.vmm import guest
from liveupdate.vmm.vmm import STATE_SIZE

VM, VM_MEMORY, CACHE = "vm0", 32 << 20, "cache"
CACHE_KEYS = 64
WALK_SECONDS = 600.0  # unicorn inside TCG inside QEMU: a walk of 32 MiB takes minutes

Log = Any  # the harness's log function (guest.log): one line to the console


def _service_argv(py: str) -> dict[str, list[str]]:
    return {"luod": [py, "-m", "liveupdate.cli.luod", "--finish-timeout", "120",
                     "--prepare-timeout", "60", "--freeze-timeout", "60"],
            "vmm": [py, "-m", "liveupdate.vmm", VM, "--memory", f"{VM_MEMORY >> 20}M",
                    "--accel", "tcg"],
            "kvcache": [py, "-m", "liveupdate.userspace.kvcache", CACHE]}


class Services:
    """The three services of one kernel, started as init starts them."""

    def __init__(self, out: Path, stage: int, log: Log) -> None:
        self.out, self.stage, self.log = out, stage, log
        self.luod = endpoints.socket_path(_cmdline())
        self.vmm = endpoints.service_socket(_cmdline(), f"vmm-{VM}")
        self.cache = endpoints.service_socket(_cmdline(), f"kvcache-{CACHE}")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        argv = _service_argv(sys.executable)[name]
        with open(self.out / f"{name}.stage{self.stage}.log", "wb") as f:
            self.procs[name] = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        self.log(f"started {name} (pid {self.procs[name].pid})")

    def wait_answer(self, name: str, sock: str, op: str, timeout: float = 300.0
                    ) -> dict[str, Any]:
        """The service's first answer on its control socket (it binds before it says so)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise LiveUpdateError(err=errno.ESRCH, msg=f"{name} exited {proc.returncode}"
                                      f" (see {name}.stage{self.stage}.log)")
            try:
                return ask(sock, op)
            except LiveUpdateError as e:
                if time.monotonic() > deadline or e.errno not in (
                        errno.ENOENT, errno.ECONNREFUSED):
                    raise
            time.sleep(0.2)

    def start_all(self) -> None:
        self.start("luod")
        reconnect(self.luod, 300.0).close()
        self.start("vmm")
        self.start("kvcache")
        self.wait_answer("vmm", self.vmm, "status")
        self.wait_answer("kvcache", self.cache, "stats")
        self.log("luod, the VMM and the cache answer")


def _cmdline() -> str:
    with open("/proc/cmdline") as f:
        return f.read().strip()


@contextlib.contextmanager
def _their_file(pid: int, fd: int, size: int) -> Iterator[memoryview]:
    """Another process's memfd, opened through procfs and mapped read-only (no copy)."""
    path = f"/proc/{pid}/fd/{fd}"
    own = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        m = mmap.mmap(own, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(own)
    try:
        view = memoryview(m)
        try:
            yield view
        finally:
            view.release()
    finally:
        m.close()


def check_vm(sock: str) -> dict[str, Any]:
    """The VM judged by the guest's own records, from its memfds (see the module doc): the
    emulated demo's judgement (:func:`liveupdate.scenario.guestcheck.judge`), its bytes
    read through procfs instead of by physical extent."""
    where = ask(sock, "where")
    pid, size, fds = int(ask(sock, "status")["pid"]), int(where["size"]), where["fds"]
    saved = None
    if where.get("restored_cpu") is not None:
        with _their_file(pid, int(fds["state"]), STATE_SIZE) as raw:
            saved = bytes(raw)
    v = guestcheck.judge(sock, where, saved, lambda: _their_file(pid, int(fds["ram"]), size))
    return {"intact": v.intact, "problem": v.problem, "steps": v.steps,
            "pages_touched": v.pages, "entries": v.entries, "saved_steps": v.saved_steps,
            "vcpu_problem": v.vcpu_problem}


def _cache_keys(sock: str) -> dict[str, Any]:
    got = [ask(sock, "get", key=f"key-{i}") for i in range(CACHE_KEYS)]
    intact = all(g["found"] and g["value"] == f"value-{i}" for i, g in enumerate(got))
    return {"keys": CACHE_KEYS, "intact": intact, "stats": ask(sock, "stats")}


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / name).write_text(json.dumps(data, indent=1, default=str) + "\n")


def stage1(out: Path, kernel: str, log: Log) -> int:
    t0 = time.time()
    svc = Services(out, 1, log)
    svc.start_all()
    pages = (VM_MEMORY - guest.DATA_AT) // guest.PAGE
    deadline = time.monotonic() + WALK_SECONDS
    while (steps := int(ask(svc.vmm, "status")["steps"])) < pages:
        if time.monotonic() > deadline:
            raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"the guest walked {steps} of "
                                  f"{pages} pages in {WALK_SECONDS:.0f} s")
        time.sleep(1.0)
    log(f"the guest walked all {pages} pages (step {steps})")
    for i in range(CACHE_KEYS):
        ask(svc.cache, "put", key=f"key-{i}", value=f"value-{i}")
    line = " ".join(w for w in _cmdline().split() if not w.startswith(f"{STAGE_ARG}="))
    line = f"{line} {STAGE_ARG}=2"
    seen = {"release": os.uname().release, "started": t0, "walked": time.time(),
            "vmm": ask(svc.vmm, "status"), "vm_check": check_vm(svc.vmm),
            "cache": _cache_keys(svc.cache), "luod": luod_status(svc.luod),
            "next_cmdline": line}
    _write(out, "stage1.json", seen)
    (out / "stage1.done").write_text("0\n")  # stage 1's own work; the jump is luod's
    log("luoctl update: luod prepares, freezes and kexecs")
    os.sync()
    luoctl = str(Path(sys.executable).parent / "luoctl")
    with open(out / "luoctl.stage1.out", "wb") as f:
        p = subprocess.run([luoctl, "update", "--image", kernel, "--cmdline", line,
                            "--release", os.uname().release, "--json"],
                           stdout=f, stderr=subprocess.STDOUT, check=False)
    # only a refused or cancelled update comes back here
    why = (out / "luoctl.stage1.out").read_text(errors="replace").strip()
    (out / "stage1.kexec-error").write_text(f"luoctl update exited {p.returncode}: {why}\n")
    log(f"luoctl update exited {p.returncode}: {why[-200:]}")
    return 1


def stage2(out: Path, log: Log) -> int:
    svc = Services(out, 2, log)
    svc.start_all()
    admin = reconnect(svc.luod, 60.0)
    try:
        st = admin.request("wait", timeout=300)[0]
    finally:
        admin.close()
    report = st["reports"][-1] if st.get("reports") else {}
    log(f"luod is {st['phase']}; FINISH: {report.get('finish')}")
    vmm = ask(svc.vmm, "status")
    chk, cache = check_vm(svc.vmm), _cache_keys(svc.cache)
    _write(out, "stage2.json", {"release": os.uname().release, "luod": st, "report": report,
                                "vmm": vmm, "vm_check": chk, "cache": cache})
    b = vmm["blackout"]
    ok = (st["phase"] == "normal" and report.get("finish") == "every client is done"
          and vmm["restored"] and b.get("steps_after", 0) > b.get("steps_before", 0) > 0
          and chk["intact"] and not chk["vcpu_problem"]
          and cache["intact"] and cache["stats"]["restored"])
    log(f"stage 2 verdict: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def run(stage: int, out: Path, plan: dict[str, Any], log: Log) -> int:
    return stage1(out, str(plan["kernel"]), log) if stage == 1 else stage2(out, log)
