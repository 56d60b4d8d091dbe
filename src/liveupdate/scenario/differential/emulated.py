"""The differential suite on the emulated machine: one machine, one kexec, every scenario.

:func:`run` boots a machine from the emulated generation's image with :data:`CMDLINE` (the
real kernel's switches: ``kho=on liveupdate=on``, ``transparent_hugepage_shmem=never``
because the real kernel's configuration has no shmem THP, so folio sizes match, and
``luo_flb=1`` for the selftest FLBs its configuration builds in), runs stage
1 of the batch as one userspace process (:mod:`liveupdate.userspace.differential`, which
holds its fds into the kexec), kexecs into the same image with the same command line, runs
stage 2, and returns each scenario's records of both stages and the handover as the next
kernel found it (:mod:`.handover`).
"""

from __future__ import annotations

import errno
import json
import re
import sys
from pathlib import Path
from typing import Any

from liveupdate.abi import image
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, RemoteRam, start
from liveupdate.scenario.differential import handover

# luo_flb=1 and test_kho=1: the real image builds lib/tests/liveupdate.c
# (CONFIG_LIVEUPDATE_TEST=y) and lib/test_kho.c (CONFIG_TEST_KEXEC_HANDOVER=y) in
CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=never luo_flb=1 test_kho=1"
PROGRAM = "liveupdate.userspace.differential"
EXEC_FROM = re.compile(r"KHO: exec from: \S+ \(count (\d+)\)")
Records = dict[str, dict[str, list[dict[str, Any]]]]


def _stage(m: MachineClient, stage: int, batch: Path) -> dict[str, Any]:
    r = m.run([sys.executable, "-m", PROGRAM, str(stage), str(batch)], timeout=300)
    lines = str(r["stdout"]).strip().splitlines()
    if r["status"] != 0 or not lines:
        why = str(r["stderr"]).strip().splitlines()[-1:] or ["no output"]
        raise LiveUpdateError(err=errno.EIO, msg=f"differential stage {stage} exited "
                              f"{r['status']}: {why[0]}")
    got: dict[str, Any] = json.loads(lines[-1])
    return got


def incoming_handover(m: MachineClient) -> handover.Stable:
    """The handover the running kernel booted with, read from RAM before anything of it is
    retrieved (the root FDT at the address its KHO reports, decoded through the debug
    port)."""
    mem = PhysMem(RemoteRam(m, int(m.status()["memory"])))
    root = int(m.kho_status()["in"]["root_fdt"], 16)
    got = handover.of_root(mem.read_fdt(root, "KHO root FDT"), mem)
    # the kexec-metadata page: the 7.3 core keeps it, as Linux; an older core frees it at
    # boot (kernel/boot.py), so the count is taken as the kernel read it at boot
    seen = EXEC_FROM.findall(m.console()[1].decode(errors="replace"))
    md = got["subtrees"].get("kexec-metadata")
    if md is not None and seen:
        md["kexec_count"] = int(seen[-1])
    return got


def run(batch: dict[str, list[dict[str, Any]]], folder: Path, gen: str = "7.3",
        memory: int = 1 << 30) -> tuple[Records, handover.Stable]:
    """Both stages of ``batch`` on an emulated ``gen`` machine in ``folder``, and the
    handover between them."""
    folder = folder.resolve()  # the stage programs run in the machine's userspace, in /
    folder.mkdir(parents=True, exist_ok=True)
    disk = folder / "machine" / "disk" / "images"
    disk.mkdir(parents=True, exist_ok=True)
    (disk / f"{gen}.img").write_bytes(image.KernelImage.of(gen).encode())
    path = folder / "batch.json"
    path.write_text(json.dumps(batch) + "\n")
    proc, m = start(str(folder / "machine"), memory=memory, cmdline=CMDLINE,
                    image=f"images/{gen}.img", log=str(folder / "machine.log"))
    try:
        m.booted(60)
        first = _stage(m, 1, path)
        m.kexec_load(f"images/{gen}.img", cmdline=CMDLINE)
        m.kexec_exec()
        jump = incoming_handover(m)
        second = _stage(m, 2, path)
    finally:
        m.shutdown()
        proc.wait(30)
    return {sid: {"stage1": first[sid], "stage2": second[sid]} for sid in batch}, jump
