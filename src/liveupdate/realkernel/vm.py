"""Boot a built kernel under QEMU (TCG) through virtme-ng and run a plan inside it.

virtme-ng shares the host's root filesystem read-only over 9p, so the repository's ``.venv``
runs inside the guest unchanged; ``--rwdir`` gives the guest one writable folder, where the
plan and every result go. Flags: ``--disable-kvm`` (``/dev/kvm`` on these machines is a
nested software hypervisor that cannot boot this kernel: MSR and XRSTOR emulation fail),
``--disable-microvm`` (a PC with PCI: virtio-pci and ACPI), ``--force-9p`` (no virtiofsd),
``--verbose`` (the kernel's console, which is how we see the jump). ``liveupdate=on`` is on
the command line: without it there is no ``/dev/liveupdate``. virtme-ng exits 255 even when
the command succeeded, so a run is judged by the files the guest writes.

QEMU's monitor is connected to us (:mod:`.qmp`); with ``capture=True``, when the console
prints ``kexec_core: Starting new kernel`` the guest is stopped and its RAM saved twice --
``pmemsave`` (raw, offset == physical address) and ``dump-guest-memory`` (QEMU's ELF core)
-- then continued. The stop is not instantaneous: the line crosses virtme-ng's pipe and a
QMP round trip while TCG runs on, so the guest may be anywhere from ``machine_kexec`` to
the next kernel's early boot. The handover is the same throughout -- the KHO FDT and every
preserved page are final before that line, and the next kernel allocates only from the
scratch areas until it has read them -- but the kexec segments (the scratch array among
them) may be unwritten, mid-copy or in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.guest import PREFIX, STAGE
from liveupdate.realkernel.host import QEMU, ensure_tools, say
from liveupdate.realkernel.qmp import Listener, Qmp

JUMP = "kexec_core: Starting new kernel"
REPO = Path(__file__).resolve().parents[3]


@dataclass
class Run:
    out: Path
    console: list[str]
    seconds: float
    events: dict[str, float] = field(default_factory=dict)  # what happened when, from start
    captured: dict[str, Any] = field(default_factory=dict)

    def stage_rc(self, stage: int) -> int | None:
        """The exit status stage ``stage`` recorded, None if it never finished."""
        done = self.out / f"stage{stage}.done"
        if not done.exists():
            return None
        text = done.read_text().strip()
        if not text.lstrip("-").isdigit():
            raise LiveUpdateError(err=errno.EPROTO, msg=f"{done}: {text[:40]!r} is not an "
                                  "exit status")
        return int(text)

    def kexec_error(self) -> str | None:
        """Why stage 1 could not jump, as the guest recorded it."""
        path = self.out / "stage1.kexec-error"
        return path.read_text().strip() if path.exists() else None


def vng() -> str:
    exe = shutil.which("vng", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        raise LiveUpdateError(err=errno.ENOENT, msg="virtme-ng is not installed: "
                              f"{REPO}/.venv/bin/pip install -e '{REPO}[realkernel]'")
    return exe


# virtme-ng joins --rwdir, --cwd and --qemu-opts into a shell command line without quoting,
# and QEMU splits option values at commas: paths that reach it must be plain
_PLAIN = re.compile(r"[A-Za-z0-9._/+-]+")
# what a run leaves in its folder; cleared first, so a stale file is never read as this run's
_OUTPUTS = ("plan.json", "console.log", "stage*.done", "stage*.traceback", "stage*.json",
            "stage*.kexec-error", "*.ktap", "command.stage*", "*.stage*.log", "luoctl.stage*",
            "faults.json", "faults.unexpected-kexec", "junk.img",
            "ram.raw", "ram.elf")


def plain_path(path: Path, what: str) -> Path:
    path = path.resolve()
    if not _PLAIN.fullmatch(str(path)):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"{what} {str(path)!r}: virtme-ng passes "
                              "it through a shell and QEMU's option parser; use only letters, "
                              "digits and ._/+-")
    return path


def boot(image: Image, plan: dict[str, Any], out: Path, *, memory_mib: int = 512,
         append: str = "", capture: bool = False, timeout: float = 600.0,
         echo: bool = False, progress: bool = False) -> Run:
    """Boot ``image`` with ``plan`` (written to ``out/plan.json``) and wait for it to end;
    ``echo`` shows the whole console on standard error, ``progress`` the harness's lines
    (and the jump)."""
    ensure_tools(QEMU)
    out = plain_path(out, "results folder")
    plain_path(REPO, "repository")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _OUTPUTS:
        for old in out.glob(pattern):
            old.unlink()
    plan = {"kernel": str(image.bzimage), "selftests": str(image.selftests), **plan}
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    python = REPO / ".venv" / "bin" / "python"
    exe = python if python.exists() else Path(sys.executable)
    exe_vng = vng()
    # vng runs virtme-run from PATH: the venv's bin must be on it
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           "PATH": f"{Path(exe_vng).parent}:{os.environ.get('PATH', '')}"}
    listener = Listener()
    cmd = [exe_vng, "--run", str(image.bzimage), "--disable-kvm", "--disable-microvm",
           "--force-9p", "--verbose", "--cpus", "2", "--memory", f"{memory_mib}M",
           "--rwdir", str(out), "--cwd", str(REPO),
           "--append", f"liveupdate=on panic=-1 {append}".strip(),
           f"--qemu-opts={listener.qemu_args()}",
           "--exec", f"{exe} -m liveupdate.realkernel.guest {plan_path}"]
    t0 = time.monotonic()
    run = Run(out, [], 0.0)
    try:
        # its own process group: vng starts virtme-run through a shell, which forks QEMU;
        # killing vng alone would leave QEMU running, holding the console pipe open
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                start_new_session=True)
    except OSError:
        listener.close()
        raise
    expired = threading.Event()

    def expire() -> None:  # a guest that hangs prints nothing: only a timer can end it
        expired.set()
        _kill_group(proc)

    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    try:
        with open(out / "console.log", "w") as log:
            _watch(proc, listener, run, log, t0, capture=capture, echo=echo,
                   ram_bytes=memory_mib << 20, progress=progress)
    finally:
        watchdog.cancel()
        listener.close()
        _kill_group(proc)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    run.seconds = time.monotonic() - t0
    if expired.is_set():
        raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"guest killed after {timeout:.0f} s; "
                              f"console in {out / 'console.log'}")
    return run


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _watch(proc: subprocess.Popen[bytes], listener: Listener, run: Run, log: TextIO,
           t0: float, *, capture: bool, echo: bool, ram_bytes: int,
           progress: bool = False) -> None:
    """Follow the console to its end: note when each stage and the jump happen, and save
    RAM at the jump when asked."""
    assert proc.stdout is not None
    try:
        qmp = listener.accept(60.0, lambda: proc.poll() is None)
    except LiveUpdateError as e:
        _kill_group(proc)  # so reading what it said cannot block
        tail = proc.stdout.read().decode(errors="replace").strip().splitlines()[-5:]
        raise LiveUpdateError(err=e.errno, msg=f"{e.message}: " + " | ".join(tail)) from e
    run.events["qemu"] = time.monotonic() - t0
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            run.console.append(line)
            log.write(line + "\n")
            if echo:
                print(line, file=sys.stderr)
            now = time.monotonic() - t0
            if progress and (PREFIX in line or JUMP in line):
                say(f"{now:6.1f}s guest: {line.split(PREFIX)[-1] if PREFIX in line else JUMP}")
            for st in (1, 2):
                if PREFIX + STAGE.format(st) in line:
                    run.events.setdefault(f"stage{st}", now)
            if JUMP in line:
                run.events.setdefault("jump", now)
                if capture and not run.captured:
                    log.flush()
                    run.captured = _capture(qmp, run.out, ram_bytes)
    finally:
        qmp.close()


def _capture(qmp: Qmp, out: Path, size: int) -> dict[str, Any]:
    t0 = time.monotonic()
    qmp.execute("stop")
    raw, elf = out / "ram.raw", out / "ram.elf"
    qmp.execute("pmemsave", val=0, size=size, filename=str(raw))
    qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{elf}")
    qmp.execute("cont")
    elf.chmod(0o644)  # QEMU writes its core 0400
    stopped = time.monotonic() - t0
    # pmemsave writes every byte; keep only the pages that hold data
    subprocess.run(["fallocate", "--dig-holes", str(raw)], check=False)
    subprocess.run(["fallocate", "--dig-holes", str(elf)], check=False)
    say(f"saved RAM at the jump: {raw.name}, {elf.name} (guest stopped {stopped:.1f} s)")
    return {"ram_bytes": size, "stopped_seconds": stopped}
