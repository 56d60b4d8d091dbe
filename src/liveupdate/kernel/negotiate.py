"""Version negotiation between kernels -- a documented extension beyond Linux, off by default.

Linux has none: a live update works only when every ``compatible`` matches, otherwise the next
kernel boots cold, panics or answers EIO (spec/kho.md 8, spec/luo.md 7). Here, with
``liveupdate_negotiate=on`` on the running kernel's command line:

* ``kexec_file_load`` reads the next image's manifest (``KernelImage.manifest``: per component
  the formats it claims to read -- if the next command line also says
  ``liveupdate_negotiate=on``; otherwise only its native ones, as a plain kernel) and picks per
  component the newest format this kernel can write and the next one reads (QEMU's
  ``version_id``/``minimum_version_id``, per component). ``luo-v5`` needs a kho-v3+ root. No
  KHO format in common, or no LUO format while files are preserved: EINVAL, naming them.
* The outgoing kernel writes exactly that: ``KhoOut.out_format`` at finalize, the LUO root,
  FLB node and each memfd's struct at freeze; and adds the record :mod:`abi.negotiation`
  (subtree ``lu-negotiation``) so the handover says it was negotiated.
* Something preserved that the agreed formats cannot express -- a memfd with seals other than
  ``F_SEAL_SEAL`` for ``memfd-v1`` (which retrieves every memfd unsealable), no memfd format
  in common, more sessions or files than ``luo-v1``'s arrays hold, files for a kernel
  without LUO -- fails the load, or ``reboot()`` if it was preserved after the load, with
  EINVAL naming the session, token and format, before anything is frozen: nothing is lost.
* The next kernel reads what its *code* reads (``generations.capable``) when its own command
  line has ``liveupdate_negotiate=on``; a manifest that claims more is caught there by the
  same validation Linux does (a cold boot or a panic), never by silent corruption.

The 6.16/6.18 notifier cores finalize from userspace before the load, so they write their own
format and only check that the next kernel reads it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from liveupdate.abi import generations, negotiation
from liveupdate.abi.cmdline import Cmdline
from liveupdate.abi.image import KernelImage
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs import memfd
from liveupdate.kernel.fs.file import File

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

FLAG = "liveupdate_negotiate"
Reads = dict[str, tuple[str, ...]]


def enabled(cmdline: Cmdline) -> bool:
    return cmdline.flag(FLAG)


def code_reads(k: Kernel) -> Reads:
    """What this kernel's code reads from the previous one (its manifest is only a claim)."""
    return k.image.capable() if enabled(k.cmdline) else k.image.reads_for(False)


def claimed_reads(img: KernelImage, cmdline: str) -> Reads:
    """What the next kernel says it will read, booted with ``cmdline``."""
    return img.reads_for(enabled(Cmdline.parse(cmdline)))


@dataclass(frozen=True)
class Plan:
    formats: dict[str, str]  # per component, what this kernel will write
    mode: str  # native (both kernels' own formats: Linux would do the same) or negotiated
    reader: str  # the next image's release

    @property
    def native(self) -> bool:
        return self.mode == "native"

    def describe(self) -> str:
        return f"{self.mode}: {generations.describe(self.formats)}"


def plan(k: Kernel, img: KernelImage, cmdline: str) -> Plan:
    """Choose the formats for a handover to ``img`` booted with ``cmdline``; EINVAL when the
    two kernels share no KHO or LUO format."""
    nat = k.image.native()
    theirs = claimed_reads(img, cmdline)
    if k.kho_out is not None and k.kho_out.core.finalized_by_userspace:
        can: Reads = k.image.reads_for(False)  # finalized from userspace before the load
    else:
        can = k.image.capable()
    try:
        out = generations.agree(nat, can, theirs)
    except AbiError as e:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kexec_file_load: negotiation with "
                              f"{img.release}: {e.message}") from e
    return Plan(out, generations.mode(out, nat, img.native()), img.release)


def _files(k: Kernel) -> list[tuple[str, File, str]]:
    """Every outgoing file, how an error names it and its handler's component."""
    return [] if k.luo is None else k.luo.outgoing_files()


def check_files(k: Kernel, p: Plan, what: str) -> None:
    """EINVAL, naming the file and the format, if something preserved cannot be expressed
    in the agreed formats."""
    files = _files(k)
    if not files:
        return
    if "luo" not in p.formats:
        more = f" and {len(files) - 1} more files" if len(files) > 1 else ""
        raise LiveUpdateError(err=errno.EINVAL, msg=(
            f"{what}: negotiation: the next kernel ({p.reader}) has no LUO; {files[0][0]}"
            f"{more} would be unreachable"))
    for name, f, comp in files:
        fmt = p.formats.get(comp)
        if fmt is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=(
                f"{what}: negotiation: the next kernel ({p.reader}) reads no {comp} format "
                f"this kernel writes; {name} cannot cross"))
        seals = f.private.seals if isinstance(f.private, memfd.Memfd) else 0
        if fmt in generations.DROPS_SEALS and seals & ~memfd.F_SEAL_SEAL:
            raise LiveUpdateError(err=errno.EINVAL, msg=(
                f"{what}: negotiation: {name} is sealed ({seals:#x}) and the next kernel "
                f"({p.reader}) reads only {fmt}, which has no seals"))
    assert k.luo is not None
    k.luo.check_limits(p.formats["luo"], what)


def loaded_plan(k: Kernel) -> Plan | None:
    loaded = k.kexec_image
    return None if loaded is None else loaded.plan


def outgoing(k: Kernel) -> dict[str, str]:
    """Per component, what a reboot now writes: the loaded plan's formats over this
    kernel's own. The reboot path computes it once and passes it to every writer."""
    p = loaded_plan(k)
    return {**k.image.native(), **(p.formats if p is not None else {})}


def written(k: Kernel) -> dict[str, str]:
    """What a reboot now would hand over, per component (a file component only with a
    file of its kind)."""
    formats = outgoing(k)
    have = ("kho", "luo", "flb") if k.luo is not None else ("kho",)
    out = {c: formats[c] for c in have if c in formats}
    for comp in dict.fromkeys(c for _, _, c in _files(k)):
        if comp in formats:
            out[comp] = formats[comp]
    return out


def record(k: Kernel) -> None:
    """Add the ``lu-negotiation`` subtree for a negotiated handover (reboot path, before
    KHO finalizes)."""
    p, kout = loaded_plan(k), k.kho_out
    if p is None or p.native or kout is None:
        return
    blob = negotiation.encode(negotiation.Record(k.image.release, p.reader, p.formats))
    phys = kout.store(blob)
    kout.add_subtree(negotiation.NODE, phys, len(blob))


def incoming(k: Kernel) -> negotiation.Record | None:
    """Read (and give back) the previous kernel's record, if it left one."""
    kin = k.kho_in
    if kin is None or not any(n == negotiation.NODE for n, _ in kin.root.subtrees):
        return None
    phys = kin.retrieve_subtree(negotiation.NODE)
    try:
        rec = negotiation.decode(k.mem.read_fdt(phys, "lu-negotiation FDT"))
    except AbiError as e:
        k.printk(f"KHO: lu-negotiation: {e.message}; ignored")
        return None
    kin.restore_free(phys)
    k.printk(f"KHO: negotiated handover from {rec.writer}: "
             f"{generations.describe(rec.formats)}")
    return rec
