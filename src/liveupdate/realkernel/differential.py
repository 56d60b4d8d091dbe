"""Record the differential suite's answers on the real kernel (issue #24).

:func:`record` boots the built image once with the ``differential`` job: stage 1 runs every
scenario's steps before the kexec (:func:`liveupdate.scenario.differential.cases.batch`),
the guest kexecs into the same kernel, stage 2 runs the rest; RAM is saved at the jump
(``capture=True``) so the handover can be decoded. :func:`answers` turns the run's folder
into the data kept in the repository (``tests/realkernel/data/differential-<release>.json``):
the kernel, the command line switches, and per scenario its steps and both stages' records.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.capture import kho_payload
from liveupdate.realkernel.vm import boot
from liveupdate.scenario.differential import cases, handover

# what vm.boot puts on the command line, and this run's own switches: no shmem THP is built
# in (CONFIG_TRANSPARENT_HUGEPAGE is not set) and KHO is on by default
# (CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT) -- the emulated run uses the same switches
SWITCHES = "kho=on liveupdate=on"


def record(image: Image, out: Path, *, timeout: float = 600.0) -> dict[str, Any]:
    """Run the batch on ``image`` in ``out``; the answers (see :func:`answers`)."""
    out.mkdir(parents=True, exist_ok=True)
    batch = cases.batch()
    path = out / "batch.json"
    path.write_text(json.dumps(batch) + "\n")
    run = boot(image, {"job": "differential", "batch": str(path.resolve()), "kexec": True},
               out, append="kho=on", capture=True, timeout=timeout)
    rc1, rc2 = run.stage_rc(1), run.stage_rc(2)
    if rc1 != 0 or rc2 != 0:
        tb = sorted(out.glob("stage*.traceback"))
        why = (tb[0].read_text().strip().splitlines()[-1] if tb
               else run.kexec_error() or "see the console log")
        raise LiveUpdateError(err=errno.EIO, msg=f"differential run failed (stage 1 exit {rc1},"
                              f" stage 2 exit {rc2}): {why}; console in {out / 'console.log'}")
    info = {"kernel_release": image.release,
            "debian_version": image.manifest["debian_version"],
            "seconds": round(run.seconds, 1), "captured": bool(run.captured)}
    (out / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    return answers(out)


def answers(out: Path) -> dict[str, Any]:
    """The kept form of a run's folder: kernel, switches, and each scenario's steps and
    records."""
    info = json.loads((out / "run.json").read_text())
    batch = json.loads((out / "batch.json").read_text())
    first = json.loads((out / "stage1.json").read_text())
    second = json.loads((out / "stage2.json").read_text())
    jump = (handover.of_capture(out, kho_payload(out / "setup_data"))
            if (out / "ram.raw").exists() else None)
    return {"kernel_release": info["kernel_release"], "debian_version": info["debian_version"],
            "switches": SWITCHES, "handover": jump,
            "scenarios": {sid: {"steps": steps, "stage1": first[sid], "stage2": second[sid]}
                          for sid, steps in batch.items()}}
