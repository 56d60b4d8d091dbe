"""Refuse a live update the next kernel cannot take -- a deliberate extension beyond Linux.

Linux checks nothing before the jump: a next kernel that cannot read the LUO, session or FLB
data panics, one without a file's handler answers EIO on every open of /dev/liveupdate
(spec/luo.md 7). Here the next image's header names its LUO generation, and the format table
(:mod:`liveupdate.abi.formats`) decides:

* ``kexec_file_load`` refuses (EINVAL, with the reason) an image that cannot read the LUO-level
  formats this kernel writes, or that requires one this kernel never writes;
* ``reboot(KEXEC)`` checks again before anything is frozen, this time against what is
  actually in the handover, file handlers included, and fails with EINVAL -- nothing frozen,
  nothing lost -- instead of jumping into a panic.

``liveupdate_compat=off`` on the command line switches both checks off, to watch Linux's own
behaviour between generations.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import formats
from liveupdate.errors import LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def _enabled(k: Kernel) -> bool:
    return k.luo is not None and k.cmdline.flag("liveupdate_compat", True)


def check(k: Kernel, reader: str, written: list[formats.Format], what: str) -> None:
    if not _enabled(k):
        return
    bad = formats.incompatibilities(k.image.luo, reader, written)
    if bad:
        raise LiveUpdateError(err=errno.EINVAL, msg=(
            f"{what}: a LUO {reader} kernel cannot take this LUO {k.image.luo} kernel's "
            f"handover: {formats.describe(bad)} (liveupdate_compat=off to go ahead as Linux "
            "would)"))


def check_load(k: Kernel, reader: str) -> None:
    check(k, reader, formats.written_by(k.image.luo, handlers=False), "kexec_file_load")


def check_reboot(k: Kernel) -> None:
    loaded, luo = k.kexec_image, k.luo
    if loaded is None or luo is None:
        return
    kho_level = {f.name for f in formats.FORMATS if f.writers == formats.ALL}
    written = [formats.get(n) for n in sorted(kho_level | luo.written_formats())]
    check(k, loaded.luo, written, "reboot(KEXEC)")
