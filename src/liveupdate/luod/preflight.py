"""luod's pre-flight: what an update will do, decided before any client hears of it.

The next kernel's generation comes from its image header (a real bzImage names none: the
caller gives its release -- with Linux's own warning that nothing is guaranteed) and the
handover is ``native`` (every format matches), ``negotiated`` (this kernel runs with
``liveupdate_negotiate=on`` and both agree on older formats: which), or EINVAL with the
reason and what Linux would do (cold boot, panic, EIO, unreachable) -- read from the one
table of formats (:mod:`liveupdate.abi.formats`, :mod:`liveupdate.abi.generations`).
"""

from __future__ import annotations

import errno
from typing import Any

from liveupdate.abi import formats, generations, image
from liveupdate.abi.cmdline import Cmdline  # the Linux command line's own parsing rules
from liveupdate.client.generation import kernel_generation
from liveupdate.errors import AbiError, LiveUpdateError

NEGOTIATE = "liveupdate_negotiate"  # the kernel flag of kernel/negotiate.py


def plan(path: str, release: str | None, line: str, this_release: str, this_cmdline: str
         ) -> dict[str, Any]:
    """``{"generation", "handover": {"mode", "formats"}}`` for loading ``path`` with command
    line ``line`` from a kernel of ``this_release`` running ``this_cmdline``."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise LiveUpdateError(err=e.errno or errno.ENOENT, msg=f"{path}: {e.strerror}") \
            from e
    try:
        nxt = image.decode(head)
    except AbiError:
        if release is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"{path} names no LUO generation:"
                                  " give the next kernel's release (--release)") from None
        nxt = image.KernelImage.of(kernel_generation(release))
    this = image.KernelImage.of(kernel_generation(this_release))
    theirs = nxt.reads_for(Cmdline.parse(line).flag(NEGOTIATE))
    written = this.native()
    if Cmdline.parse(this_cmdline).flag(NEGOTIATE):
        try:
            agreed = generations.agree(written, this.capable(), theirs)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"negotiation with the next "
                                  f"kernel ({nxt.release}): {e.message}") from e
        missing = [c for c in ("luo", "memfd") if c not in agreed]
        if missing:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"negotiation with the next "
                                  f"kernel ({nxt.release}): no common {missing[0]} format "
                                  "-- the clients' files could not cross")
        handover: dict[str, Any] = {
            "mode": generations.mode(agreed, written, nxt.native()), "formats": agreed}
    else:
        bad = formats.incompatibilities(written, theirs)
        if bad:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"the next kernel ({nxt.release},"
                                  f" LUO {nxt.luo}) cannot take this handover: "
                                  f"{formats.describe(bad)} -- Linux would "
                                  f"{bad[0].effect}")
        handover = {"mode": "native", "formats": written}
    return {"generation": nxt.luo, "handover": handover}
