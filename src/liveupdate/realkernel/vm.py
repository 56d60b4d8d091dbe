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
-- then continued. At that instant the KHO FDT and every preserved page are final; the
kexec segments may be mid-copy.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.host import ensure_tools, say
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
        done = self.out / f"stage{stage}.done"
        return int(done.read_text()) if done.exists() else None


def vng() -> str:
    exe = shutil.which("vng", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if exe is None:
        raise LiveUpdateError(err=errno.ENOENT, msg="virtme-ng is not installed: "
                              f"{REPO}/.venv/bin/pip install -e '{REPO}[realkernel]'")
    return exe


def boot(image: Image, plan: dict[str, Any], out: Path, *, memory_mib: int = 512,
         append: str = "", capture: bool = False, timeout: float = 600.0,
         echo: bool = False) -> Run:
    """Boot ``image`` with ``plan`` (written to ``out/plan.json``) and wait for it to end."""
    ensure_tools({"qemu-system-x86_64": "qemu-system-x86"})
    out.mkdir(parents=True, exist_ok=True)
    plan = {"kernel": str(image.bzimage), "selftests": str(image.selftests), **plan}
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    qmp_listener = Listener(out / "qmp.sock")
    python = REPO / ".venv" / "bin" / "python"
    exe = python if python.exists() else Path(sys.executable)
    cmd = [vng(), "--run", str(image.bzimage), "--disable-kvm", "--disable-microvm",
           "--force-9p", "--verbose", "--cpus", "2", "--memory", f"{memory_mib}M",
           "--rwdir", str(out), "--cwd", str(REPO),
           "--append", f"liveupdate=on panic=-1 {append}".strip(),
           f"--qemu-opts={qmp_listener.qemu_args()}",
           "--exec", f"{exe} -m liveupdate.realkernel.guest {plan_path}"]
    # vng runs virtme-run from PATH: the venv's bin must be on it
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           "PATH": f"{Path(vng()).parent}:{os.environ.get('PATH', '')}"}
    t0 = time.monotonic()
    run = Run(out, [], 0.0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    # a guest that hangs prints nothing: only a timer can end it
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        with open(out / "console.log", "w") as log:
            _watch(proc, qmp_listener, run, log, t0, capture=capture, echo=echo,
                   ram_bytes=memory_mib << 20)
    finally:
        watchdog.cancel()
        qmp_listener.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    run.seconds = time.monotonic() - t0
    if run.seconds >= timeout:
        raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"guest killed after {timeout:.0f} s; "
                              f"console in {out / 'console.log'}")
    return run


def _watch(proc: subprocess.Popen[bytes], listener: Listener, run: Run, log: TextIO,
           t0: float, *, capture: bool, echo: bool, ram_bytes: int) -> None:
    """Follow the console to its end: note when each stage and the jump happen, and save
    RAM at the jump when asked."""
    assert proc.stdout is not None
    try:
        qmp = listener.accept(60.0, lambda: proc.poll() is None)
    except LiveUpdateError as e:
        tail = proc.stdout.read().decode(errors="replace").strip().splitlines()[-5:]
        raise LiveUpdateError(err=e.errno, msg=f"{e.message}: " + " | ".join(tail)) from e
    run.events["qemu"] = time.monotonic() - t0
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip("\r\n")
        run.console.append(line)
        log.write(line + "\n")
        if echo:
            print(line, file=sys.stderr)
        now = time.monotonic() - t0
        for st in (1, 2):
            if f"lu-harness: stage {st} of" in line:
                run.events.setdefault(f"stage{st}", now)
        if JUMP in line:
            run.events.setdefault("jump", now)
            if capture and not run.captured:
                log.flush()
                run.captured = _capture(qmp, run.out, ram_bytes)
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
    return {"ram_raw": str(raw), "ram_elf": str(elf), "ram_bytes": size,
            "stopped_seconds": stopped}
