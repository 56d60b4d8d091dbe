"""``luoctl demo --real``'s real half: the demo's scenario on Linux 7.3 in QEMU (the
``liveupdate`` job, :mod:`.liveupdate_job`), its result read back in the demo's schema.

The guest writes the :class:`~liveupdate.scenario.report.UpdateResult` and its checks into
the shared results folder (``stage2.json``); this boots the image, follows the guest's
progress and reads them. A run that did not get that far is one error line saying why:
luod's refusal (``stage1.kexec-error``), a stage's traceback's last line, or the console's
last lines.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import Image
from liveupdate.realkernel.host import step
from liveupdate.realkernel.vm import Run, boot
from liveupdate.scenario.report import Check, UpdateResult

MEMORY_MIB = 1024  # the guest's: its kernel, the services and the VMM's 32 MiB guest
TIMEOUT = 1800.0  # unicorn inside TCG walks 32 MiB in minutes on a busy 2-core host


def real_update(image: Image, out: Path, echo: bool = False
                ) -> tuple[UpdateResult, list[Check], Run]:
    """One live update of ``image`` by our userspace, observed inside the guest."""
    with step(f"Linux {image.release} in QEMU (TCG): luod, VMM vm0 (32 MiB, unicorn) and "
              "the cache; the guest walks its memory, then luoctl update"):
        run = boot(image, {"job": "liveupdate", "kexec": False}, out,
                   memory_mib=MEMORY_MIB, timeout=TIMEOUT, echo=echo, progress=not echo)
    second = out / "stage2.json"
    if not second.exists():
        tb = sorted(out.glob("stage*.traceback"))
        why = run.kexec_error() or (tb[0].read_text().strip().splitlines()[-1] if tb else
                                    " | ".join(run.console[-3:]))
        raise LiveUpdateError(err=errno.EIO, msg=f"the real-kernel run ended early: {why} "
                              f"(console: {out / 'console.log'})")
    got = json.loads(second.read_text())
    return (UpdateResult.from_json(got["result"]), [Check(**c) for c in got["checks"]],
            run)
