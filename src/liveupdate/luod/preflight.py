"""luod's pre-flight: what an update will do, decided before any client hears of it.

The next kernel's generation comes from its image header (a real bzImage names none: the
caller gives its release -- with Linux's own warning that nothing is guaranteed) and the
handover is ``native`` (every format matches), ``negotiated`` (this kernel runs with
``liveupdate_negotiate=on`` and both agree on older formats: which), or EINVAL with the
reason and what Linux would do (cold boot, panic, EIO, unreachable) -- read from the one
table of formats (:mod:`liveupdate.abi.formats`, :mod:`liveupdate.abi.generations`).

A file component other than memfd (``vfio``, ``iommufd``, ``huge-memfd``: what
``7.3+posted`` adds) counts only if a client actually preserves a file of it, as in
``formats.incompatibilities``' own rule ("a file component only when a file of it is
preserved") and the kernel's ``reboot(KEXEC)`` check. At load nothing of this update is
preserved yet, so the plan names them (``lacks``: component -> format the next kernel cannot
read) and luod refuses after prepare, with every client's files known and nothing paused
(:meth:`liveupdate.luod.orchestrator.Orchestrator.check_files`). memfd is always counted:
luod's own registry is a memfd. Linux itself checks none of this (the next kernel's
``luo_file_deserialize`` finds no handler: EIO at every open of /dev/liveupdate).
"""

from __future__ import annotations

import errno
from typing import Any

from liveupdate.abi import formats, generations, image
from liveupdate.abi.cmdline import Cmdline  # the Linux command line's own parsing rules
from liveupdate.client.generation import kernel_generation
from liveupdate.errors import AbiError, LiveUpdateError

NEGOTIATE = "liveupdate_negotiate"  # the kernel flag of kernel/negotiate.py
# counted only when a client preserves a file of it (memfd: luod's registry always is one)
WHEN_PRESERVED = generations.FILE_COMPONENTS - {"memfd"}


def plan(path: str, release: str | None, line: str, this_release: str, this_cmdline: str
         ) -> dict[str, Any]:
    """``{"generation", "handover": {"mode", "formats"}, "lacks"}`` for loading ``path``
    with command line ``line`` from a kernel of ``this_release`` running ``this_cmdline``;
    ``lacks``: the file components (not memfd) the next kernel cannot take, refused only
    if a client preserves a file of one."""
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
    native = this.native()
    written = {c: f for c, f in native.items() if c not in WHEN_PRESERVED}
    if Cmdline.parse(this_cmdline).flag(NEGOTIATE):
        try:
            agreed = generations.agree(native, this.capable(), theirs)
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"negotiation with the next "
                                  f"kernel ({nxt.release}): {e.message}") from e
        missing = [c for c in ("luo", "memfd") if c not in agreed]
        if missing:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"negotiation with the next "
                                  f"kernel ({nxt.release}): no common {missing[0]} format "
                                  "-- the clients' files could not cross")
        lacks = {c: native[c] for c in sorted(WHEN_PRESERVED & native.keys())
                 if c not in agreed}
        handover: dict[str, Any] = {
            "mode": generations.mode(agreed, native, nxt.native()), "formats": agreed}
    else:
        bad = formats.incompatibilities(written, theirs)
        if bad:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"the next kernel ({nxt.release},"
                                  f" LUO {nxt.luo}) cannot take this handover: "
                                  f"{formats.describe(bad)} -- Linux would "
                                  f"{bad[0].effect}")
        lacks = {c: native[c] for c in sorted(WHEN_PRESERVED & native.keys())
                 if native[c] not in theirs.get(c, ())}
        handover = {"mode": "native",
                    "formats": {c: f for c, f in native.items() if c not in lacks}}
    return {"generation": nxt.luo, "handover": handover, "lacks": lacks}
