"""The ``liveupdate`` job: our own userspace live-updates the real kernel (issue #23) -- the
demo's scenario (:mod:`liveupdate.scenario.host`, the same steps the emulated demo takes)
on :class:`liveupdate.realkernel.demo_host.RealHost`.

* Stage 1 starts luod, the VMM and the cache as init would, waits until the guest has walked
  all of its memory once and the cache holds its keys (``host.ready``), has luod load this
  bzImage with this command line plus ``lu_harness_stage=2`` (``host.load``), records what
  it sees (``stage1.json``: the VMMs' status, the checker's verdict, the guest memfd's page
  frames) and runs ``luoctl update`` (``host.kexec``): luod prepares and freezes its
  clients and calls ``reboot(LINUX_REBOOT_CMD_KEXEC)`` -- this process ends with the kernel,
  as an administrator's shell does on a real host. ``luoctl``'s own output is kept in
  ``luoctl.stage1.out`` (when the jump happened: only its note on following the update
  with ``luoctl wait --update N``).
* Stage 2 (after the real kexec) starts the same services: luod finds its registry through
  LUO, the VMM retrieves its memory and saved state by token and resumes, the cache reads
  its table back, and luod FINISHes once every client is done. Stage 2 follows the update
  as ``luoctl wait --update N`` does (``host.outcome``) and observes it (``host.observe``):
  ``stage2.json`` holds luod's status and report, the :class:`UpdateResult` in the demo's
  JSON schema (``result``: what ``luoctl demo --real`` prints) and its checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from liveupdate.client.update import luod_status
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask
from liveupdate.realkernel.demo_host import VM, RealHost, Services, cmdline
from liveupdate.realkernel.guest import STAGE_ARG
from liveupdate.scenario import host, witness
from liveupdate.scenario.host import CACHE, LUOD, vmm_sock
from liveupdate.scenario.report import DemoReport

WALK_SECONDS = 600.0  # unicorn inside TCG inside QEMU: a walk of 32 MiB takes minutes

Log = Any  # the harness's log function (guest.log): one line to the console


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    (out / name).write_text(json.dumps(data, indent=1, default=str) + "\n")


def _cache_stats(h: RealHost) -> dict[str, Any]:
    return ask(h.sock(CACHE), "stats")


def stage1(out: Path, kernel: str, log: Log) -> int:
    t0 = time.time()
    h = RealHost(Services(out, 1, log))
    h.start()
    before = host.ready(h, WALK_SECONDS, poll=1.0)
    log(f"the guest walked all of its pages (step {before[VM]['steps']}); "
        f"{h.cache_keys} keys put")
    line = " ".join(w for w in cmdline().split() if not w.startswith(f"{STAGE_ARG}="))
    line = f"{line} {STAGE_ARG}=2"
    luod = luod_status(h.sock(LUOD))
    handover = host.load(h, kernel, log, line, os.uname().release)
    seen = {"release": os.uname().release, "started": t0, "walked": time.time(),
            "before": before, "vmm": before[VM],
            "vm_check": dataclasses.asdict(h.verdicts()[VM]),
            "cache": {"keys": h.cache_keys, "stats": _cache_stats(h)}, "luod": luod,
            "update": int(luod["update"]) + 1, "handover": handover, "next_cmdline": line,
            "pfns": h.pfns()}
    _write(out, "stage1.json", seen)
    (out / "stage1.done").write_text("0\n")  # stage 1's own work; the jump is luod's
    log("luoctl update: luod prepares, freezes and kexecs")
    try:
        h.kexec(log)
    except LiveUpdateError as e:  # only a refused or cancelled update comes back here
        (out / "stage1.kexec-error").write_text(f"{e}\n")
        log(f"{e}"[-200:])
    return 1


def stage2(out: Path, log: Log) -> int:
    first = json.loads((out / "stage1.json").read_text())
    h = RealHost(Services(out, 2, log), pfns_before=first["pfns"])
    h.start()
    st, report = host.outcome(h, int(first["update"]), 300)
    log(f"luod is {st['phase']}; FINISH: {report.get('finish')}")
    result = host.observe(h, os.uname().release, first["handover"], first["before"], st,
                          report)
    checks = result.checks() + witness.checks([result])
    _write(out, "stage2.json", {
        "release": os.uname().release, "luod": st, "report": report,
        "vmm": ask(h.sock(vmm_sock(VM)), "status"), "cache": {"stats": _cache_stats(h)},
        "result": DemoReport([result]).to_json()["updates"][0],
        "checks": [dataclasses.asdict(c) for c in checks]})
    failed = [c.name for c in checks if not c.passed]
    ok = st["phase"] == "normal" and report.get("finish") == "every client is done" \
        and not failed
    log(f"stage 2 verdict: {'ok' if ok else 'FAILED: ' + ', '.join(failed)}")
    return 0 if ok else 1


def run(stage: int, out: Path, plan: dict[str, Any], log: Log) -> int:
    return stage1(out, str(plan["kernel"]), log) if stage == 1 else stage2(out, log)
