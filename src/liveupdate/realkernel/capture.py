"""Capture a real kernel's handover: the material inspectors and the differential suite use.

:func:`capture` boots the image with the :mod:`.scenario` plan and ``capture=True``: the
scenario preserves its memfds, the guest kexecs, QEMU is stopped at the jump and its RAM
saved (``ram.raw``, ``ram.elf``), the next kernel's stage 2 records every preserved file as
it got it back. The folder then holds:

* ``ram.raw`` / ``ram.elf`` -- RAM at the jump, raw (offset == physical address, sparse) and
  as QEMU's ELF core;
* ``setup_data.payload`` -- the ``SETUP_KEXEC_KHO`` node's payload exactly as
  ``/sys/kernel/boot_params/setup_data/N/data`` exports it in the next kernel, and
  ``setup_data/`` with every node;
* ``debugfs-stage1/`` (before the kexec, sessions preserved) and ``debugfs-stage2/`` (after
  it) -- the KHO debugfs blobs byte for byte;
* ``stage1.json`` / ``stage2.json`` -- each file's size, position, seals, data pages and
  sha256, before and after;
* ``capture.json`` -- kernel release, Debian version, timings, and what QEMU saved.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

from liveupdate.abi.bootparams import SETUP_KEXEC_KHO
from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.vm import boot


def capture(image: Image, out: Path, *, memory_mib: int = 512, append: str = "",
            echo: bool = False) -> dict[str, Any]:
    """Capture into ``out``: a new or empty folder, or an earlier capture (replaced)."""
    if out.exists() and any(out.iterdir()):
        if not (out / "capture.json").exists() and not (out / "plan.json").exists():
            raise LiveUpdateError(err=errno.ENOTEMPTY, msg=f"{out} is not empty and holds no "
                                  "earlier capture: choose a new folder")
        shutil.rmtree(out)
    run = boot(image, {"job": "scenario", "kexec": True}, out, memory_mib=memory_mib,
               append=append, capture=True, echo=echo)
    rc1, rc2 = run.stage_rc(1), run.stage_rc(2)
    if rc1 != 0 or rc2 != 0 or not run.captured:
        tb = next(iter(sorted(out.glob("stage*.traceback"))), None)
        why = (tb.read_text().strip().splitlines()[-1] if tb
               else run.kexec_error() or ("the files came back changed: compare stage1.json "
                                          "and stage2.json" if rc2 == 1
                                          else "see the console log"))
        raise LiveUpdateError(err=errno.EIO, msg=f"capture failed (stage 1 exit {rc1}, stage "
                              f"2 exit {rc2}, RAM saved: {bool(run.captured)}): {why}; "
                              f"console in {out / 'console.log'}")
    payload = kho_payload(out / "setup_data")
    (out / "setup_data.payload").write_bytes(payload)
    info = {"kernel_release": image.release,
            "debian_version": image.manifest["debian_version"],
            "memory_mib": memory_mib, "append": append, "seconds": round(run.seconds, 1),
            "events": {k: round(v, 2) for k, v in run.events.items()},
            "ram": run.captured}
    (out / "capture.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def kho_payload(setup_dir: Path) -> bytes:
    """The payload of the one ``SETUP_KEXEC_KHO`` node the next kernel exported."""
    found = []
    for d in sorted(setup_dir.glob("*")):
        try:
            type_ = int((d / "type").read_text().strip(), 0)
        except (OSError, ValueError):
            continue  # not a node the guest copied whole
        if type_ == SETUP_KEXEC_KHO:
            found.append(d)
    if len(found) != 1:
        raise LiveUpdateError(err=errno.ENOENT, msg=f"{setup_dir}: {len(found)} "
                              "SETUP_KEXEC_KHO nodes, expected exactly one")
    return (found[0] / "data").read_bytes()
