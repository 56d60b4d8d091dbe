"""The harness inside the real kernel: run a stage, kexec into the same kernel, run the next.

``python -m liveupdate.realkernel.guest PLAN`` is the command virtme-ng runs after boot.
``PLAN`` (JSON, in the shared results folder) names the job and the kernel image. Which
stage runs is read from the command line: stage 1 loads the next kernel with
``kexec_file_load`` and the current command line plus ``lu_harness_stage=2`` -- as
upstream's ``tools/testing/selftests/liveupdate/init.c`` appends ``luo_stage=2`` -- then
``reboot(LINUX_REBOOT_CMD_KEXEC)``; the reused command line makes virtme-ng's init start
this same command again, now as stage 2. A job that needs no kexec runs once.

Jobs:

* ``selftest``: one of upstream's liveupdate selftests. ``liveupdate`` (the kselftest
  harness) runs once; the kexec tests run with no argument before the kexec (they fork a
  child that holds their sessions, as ``daemonize_and_wait`` does) and with ``-s 2`` after.
  Their KTAP output goes to ``<name>.stage<N>.ktap``.
* ``command``: any command (``argv``), its output in ``command.stage<N>.out``/``.err``; with
  ``kexec`` it runs again in the next kernel.
* ``liveupdate``: :mod:`.liveupdate_job` -- our luod, a VMM and the cache live-update this
  kernel: luod itself does the kexec (the plan says ``"kexec": false``), stage 2 checks.
* ``differential``: :mod:`liveupdate.userspace.differential` runs the differential suite's
  batch (``plan["batch"]``), one stage per kernel, its records in ``stage<N>.json``.
* ``faults``: :mod:`.faults_job` -- faults of the emulated fault matrix injected into our
  userspace's live updates of this kernel, each observed to end as the matrix defines
  (``faults.json``); all roll back, so no kexec happens.
* ``scenario``: :mod:`.scenario` preserves memfds of chosen sizes, holes, positions and seals
  in LUO sessions; each stage writes what it sees of every file (``stage<N>.json``), the
  debugfs KHO blobs (``debugfs-stage<N>/``) and, in stage 2, every ``setup_data`` node the
  kernel exports (``setup_data/``).

Every stage writes ``stage<N>.done`` last, with its exit status, and a failed kexec writes
``stage1.kexec-error``: the host judges a run by these files (virtme-ng's own exit status is
255 even on success).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError

STAGE_ARG = "lu_harness_stage"
PREFIX = "lu-harness: "  # on every line the harness writes to the console
STAGE = "stage {} of"  # how a stage announces itself: the host times the stages by it
DEBUGFS = Path("/sys/kernel/debug")


def stage() -> int:
    words = Path("/proc/cmdline").read_text().split()
    for w in words:
        if w.startswith(f"{STAGE_ARG}="):
            return int(w.split("=", 1)[1])
    return 1


def log(msg: str) -> None:
    # /dev/kmsg puts our steps in the console log, in order with the kernel's own lines
    try:
        with open("/dev/kmsg", "w") as k:
            k.write(f"{PREFIX}{msg}\n")
    except OSError:
        print(f"{PREFIX}{msg}", flush=True)


def kexec(kernel: str, next_stage: int) -> None:
    """Load the same kernel with this command line plus the next stage, and jump."""
    from liveupdate.client.backends import RealBackend

    be = RealBackend()
    line = " ".join(w for w in be.cmdline().split() if not w.startswith(f"{STAGE_ARG}="))
    be.kexec_file_load(kernel, f"{line} {STAGE_ARG}={next_stage}")
    log(f"kexec_file_load done; jumping to stage {next_stage}")
    os.sync()
    be.reboot_kexec()


def dump_debugfs(out: Path) -> None:
    """Copy every file under debugfs ``kho/`` byte for byte (blobs and text)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (DEBUGFS / "kho").exists():
        p = subprocess.run(["mount", "-t", "debugfs", "debugfs", str(DEBUGFS)],
                           capture_output=True, text=True, check=False)
        if p.returncode:
            (out / "mount.error").write_text(p.stderr)
    src = DEBUGFS / "kho"
    if not src.is_dir():
        (out / "missing").write_text(f"{src} does not exist (CONFIG_KEXEC_HANDOVER_DEBUGFS?)\n")
        return
    for path in sorted(src.rglob("*")):
        if path.is_file():
            dst = out / path.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                dst.write_bytes(path.read_bytes())
            except OSError as e:
                dst.with_name(dst.name + ".error").write_text(f"{e}\n")


def dump_setup_data(out: Path) -> None:
    """Every ``/sys/kernel/boot_params/setup_data/N``: its type and payload."""
    root = Path("/sys/kernel/boot_params/setup_data")
    if not root.exists():
        return
    for node in sorted(root.iterdir()):
        dst = out / node.name
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("type", "data"):
            if (node / name).exists():
                shutil.copyfile(node / name, dst / name)


def run_selftest(plan: dict[str, Any], st: int, out: Path) -> int:
    binary = Path(plan["selftests"]) / plan["test"]
    args = [] if st == 1 else ["-s", str(st)]
    log(f"running {binary.name} {' '.join(args)}".rstrip())
    p = subprocess.run([str(binary), *args], capture_output=True, text=True, check=False)
    (out / f"{plan['test']}.stage{st}.ktap").write_text(p.stdout + p.stderr)
    log(f"{binary.name} stage {st} exited {p.returncode}")
    return p.returncode


def main(argv: list[str]) -> int:
    plan_path = Path(argv[0])
    plan = json.loads(plan_path.read_text())
    out = plan_path.parent
    st = stage()
    kexecs = plan.get("kexec", True)
    log(f"{STAGE.format(st)} {plan['job']} ({plan.get('test', '')}) in {os.uname().release}")
    rc = 1
    try:
        if plan["job"] == "selftest":
            rc = run_selftest(plan, st, out)
        elif plan["job"] == "scenario":
            from liveupdate.realkernel import scenario

            rc = scenario.run(st, out, DEBUGFS, dump_debugfs, dump_setup_data)
        elif plan["job"] == "differential":
            from liveupdate.userspace import differential

            rc = differential.real_stage(st, Path(plan["batch"]), out)
            if st == 2:
                dump_setup_data(out / "setup_data")
        elif plan["job"] == "liveupdate":
            from liveupdate.realkernel import liveupdate_job

            rc = liveupdate_job.run(st, out, plan, log)
        elif plan["job"] == "faults":
            from liveupdate.realkernel import faults_job

            rc = faults_job.run(st, out, plan, log)
        elif plan["job"] == "command":
            p = subprocess.run(plan["argv"], capture_output=True, check=False)
            (out / f"command.stage{st}.out").write_bytes(p.stdout)
            (out / f"command.stage{st}.err").write_bytes(p.stderr)
            rc = p.returncode
        else:
            raise ValueError(f"unknown job {plan['job']!r}")
    except Exception:
        (out / f"stage{st}.traceback").write_text(traceback.format_exc())
        log(f"stage {st} raised: {traceback.format_exc().splitlines()[-1]}")
        rc = 1
    (out / f"stage{st}.done").write_text(f"{rc}\n")
    if rc == 0 and kexecs and st == 1:
        try:
            kexec(plan["kernel"], 2)
            raise OSError(errno.EIO, "reboot(LINUX_REBOOT_CMD_KEXEC) returned")
        except (OSError, LiveUpdateError) as e:
            (out / "stage1.kexec-error").write_text(f"{e}\n")
            log(f"kexec failed: {e}")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
