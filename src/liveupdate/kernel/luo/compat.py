"""Refuse a live update the next kernel cannot take -- a deliberate extension beyond Linux.

Linux checks nothing before the jump: a next kernel that cannot read the KHO root boots cold,
one that cannot read the LUO, session or FLB data panics, one without a file's handler answers
EIO on every open of /dev/liveupdate (spec/kho.md 8, spec/luo.md 7). Here the next image's
header names its formats, and the format table (:func:`liveupdate.abi.formats.
incompatibilities`) decides, for a kernel with LUO enabled:

* ``kexec_file_load`` refuses (EINVAL, with the reason) an image that cannot read the KHO and
  LUO formats this kernel writes, or that requires one this kernel never writes;
* ``reboot(KEXEC)`` checks again before anything is frozen, this time against what is
  actually in the handover, file handlers included, and fails with EINVAL -- nothing frozen,
  nothing lost -- instead of jumping into a cold boot, a panic or EIO.

``liveupdate_compat=off`` on the command line switches both checks off, to watch Linux's own
behaviour between generations. ``liveupdate_negotiate=on`` replaces them with negotiation
(:mod:`liveupdate.kernel.negotiate`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import formats, generations
from liveupdate.abi.image import KernelImage
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import negotiate

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def _enabled(k: Kernel) -> bool:
    return k.luo is not None and k.cmdline.flag("liveupdate_compat", True)


def check(k: Kernel, written: dict[str, str], img: KernelImage, cmdline: str,
          what: str) -> None:
    if not _enabled(k):
        return
    bad = formats.incompatibilities(written, negotiate.claimed_reads(img, cmdline))
    if bad:
        raise LiveUpdateError(err=errno.EINVAL, msg=(
            f"{what}: the next kernel ({img.release}) cannot take this handover: "
            f"{formats.describe(bad)} -- Linux would {bad[0].effect} "
            "(liveupdate_compat=off to go ahead as Linux would, liveupdate_negotiate=on to "
            "agree on formats)"))


def check_load(k: Kernel, img: KernelImage, cmdline: str) -> None:
    written = {c: f for c, f in k.image.native().items()
               if c not in generations.FILE_COMPONENTS}
    check(k, written, img, cmdline, "kexec_file_load")


def check_reboot(k: Kernel) -> None:
    loaded = k.kexec_image
    if loaded is None or k.luo is None:
        return
    if loaded.plan is not None:
        negotiate.check_files(k, loaded.plan, "reboot(KEXEC)")
        return
    check(k, negotiate.written(k), loaded.image, loaded.cmdline, "reboot(KEXEC)")
