"""The reboot path of ``reboot(LINUX_REBOOT_CMD_KEXEC)``, as one ordered list of steps.

Linux's ``kernel_kexec()`` runs, in order: ``liveupdate_reboot()`` (LUO freeze; 6.19 also
finalizes KHO from there), ``kernel_restart_prepare()`` (the reboot notifier chain), then
``migrate_to_reboot_cpu()``/``machine_shutdown()`` and ``machine_kexec()``. Here the same
order, with what an emulated machine needs in between:

0. ``luo_check`` -- beyond Linux (``kernel/luo/compat.py``, ``kernel/negotiate.py``): the next
   kernel must be able to read what this handover holds (or the agreed formats express every
   preserved file), else EINVAL before anything is frozen.
1. ``luo_freeze`` -- ``liveupdate_reboot()``: LUO freezes what it prepared; a failure has
   already cancelled everything (back to NORMAL) and ``reboot()`` fails with its errno --
   nothing irreversible has happened yet.
2. ``finalize`` -- KHO finalize as the image's KHO core does it at reboot: 6.19 through LUO
   when enabled, 7.1+ always (closing the live radix tracker), 6.16-6.18 never (userspace
   wrote ``out/finalize``, or nothing crosses); skipped with ``kho=off``. A negotiated
   handover is written in the agreed format here, with its record.
3. ``notifiers`` -- reboot notifiers registered by kernel components (test components that
   act after finalize, e.g. ``kho_corrupt``).
3a. ``device_shutdown`` -- ``device_shutdown()`` at the end of ``kernel_restart_prepare()``:
   PCI clears bus mastering of its devices (``pci_device_shutdown``,
   :mod:`liveupdate.kernel.drivers.pci`), then the IOMMU turns translation off
   (``intel_iommu_shutdown``, :mod:`liveupdate.kernel.drivers.iommu`).
4. ``end_userspace`` -- every userspace process is stopped, its output forwarded, then
   SIGKILLed (subreaper + pidfds; the host's teardown of its memory is not waited for: the
   machine reaps those processes). KHO was finalized for the reboot by then, which refuses
   every unpreserve with EBUSY (``KhoOut.frozen``), so the hang-ups of ended processes cannot
   change what crosses.
5. ``sanitize`` -- everything outside the kept set is punched (``kho_sanitize=off`` skips it).
6. ``machine_kexec`` -- the segments' staged bytes are copied to their destinations, as
   ``machine_kexec``'s relocation does (``kernel/kexec.py``).

then the jump, which only the real kernel process does (:func:`kernel_kexec`); the in-process
test rig runs :func:`prepare_jump` and boots the next kernel object on the same RAM. There is
no second copy of this order anywhere.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from liveupdate.abi.cmdline import size_option
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import kexec, negotiate
from liveupdate.kernel.drivers import iommu, iommu_flb, pci, pci_flb
from liveupdate.kernel.luo import compat

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel
    from liveupdate.kernel.kexec import Loaded


Formats = dict[str, str]


def _luo_check(k: Kernel, formats: Formats) -> None:
    compat.check_reboot(k)


def _luo_freeze(k: Kernel, formats: Formats) -> None:
    if k.luo is not None:
        k.luo.freeze(formats)


def _finalize(k: Kernel, formats: Formats) -> None:
    """Per KHO core (:meth:`liveupdate.kernel.kho.core.KhoCore.finalize_at_reboot`): 6.16-6.18
    leave it to userspace; 6.19 ``liveupdate_reboot()`` runs ``kho_finalize()`` only when LUO
    is enabled, mapping its failure to EAGAIN; 7.1+ is stateless (the radix tree is the map;
    the tracker is closed). Negotiated (:mod:`liveupdate.kernel.negotiate`), live cores first
    switch to the agreed KHO format and add the ``lu-negotiation`` record."""
    kout = k.kho_out
    if kout is None:  # kho=off: nothing to hand over, the image boots cold
        return
    if not kout.core.finalized_by_userspace:  # negotiated: the agreed format, and its record
        kout.out_format = formats.get("kho") or kout.format
        negotiate.record(k)
    if not kout.core.finalize_at_reboot(kout, luo_enabled=k.luo is not None):
        k.printk("KHO: the memory map was not finalized; the next kernel gets no preserved "
                 "memory")


def _notifiers(k: Kernel, formats: Formats) -> None:
    for notifier in k.reboot_notifiers:
        notifier(k)


def _device_shutdown(k: Kernel, formats: Formats) -> None:
    """``kernel_restart_prepare`` -> ``device_shutdown`` (after the reboot notifiers), then
    the IOMMU's shutdown (``intel_iommu_shutdown``, translation off)."""
    kept = pci_flb.kept(k)
    pci.shutdown(k, kept)
    iommu.kernel_shutdown(k, kept - iommu_flb.blocked(k) if kept else None)


# lu.keep_stopped=SIZE|off (default 64M): a process with this much shmem resident is left
# stopped at the jump, for the machine to end after the next kernel's update settles
# (Userspace.stop_for_kexec). Its teardown costs ~4 ms per GiB of 4 KiB PTEs here (28-39 ms
# at 8 GiB, 350 ms once the guest was fully written), all of it beside the next kernel if it
# is killed at the jump: at 1G, a restored 8 GiB VMM (what its guest touched since, < 1 GiB)
# was killed, and its teardown added 3-5 ms to the next luod's adoption and VMM restore.
# 64 MiB of PTEs is a quarter of a millisecond; below it a process is killed at the jump and
# closes its sockets then, as a kexec does. The settle needs every incoming session
# released: a client closes its handle when it says done (client/luod.LuodClient.done); one
# kept open would end a kept VMM only at the next jump, its larger teardown then beside that
# kernel (8 GiB: VMM restore 15-19 ms, not 7-9).
KEEP_STOPPED = "64M"


def _end_userspace(k: Kernel, formats: Formats) -> None:
    if k.userspace is not None:
        t0 = time.monotonic()
        value = k.cmdline.get("lu.keep_stopped", KEEP_STOPPED)
        try:
            keep = None if value == "off" else size_option(value, "lu.keep_stopped")
        except LiveUpdateError as e:
            k.printk(f"kexec: {e.message}; {KEEP_STOPPED}")
            keep = size_option(KEEP_STOPPED, "lu.keep_stopped")
        stopped, kept = k.userspace.stop_for_kexec(keep)
        k.printk(f"kexec: stopped {stopped} userspace processes in "
                 f"{(time.monotonic() - t0) * 1e3:.0f} ms, {kept} left stopped")


def _sanitize(k: Kernel, formats: Formats) -> None:
    if k.cmdline.flag("kho_sanitize", True):
        t0 = time.monotonic()
        punched = kexec.sanitize(k)
        k.printk(f"kexec: sanitizer punched {punched >> 20} MiB of unpreserved RAM in "
                 f"{(time.monotonic() - t0) * 1e3:.0f} ms")


def _machine_kexec(k: Kernel, formats: Formats) -> None:
    t0 = time.monotonic()
    copied = kexec.copy_segments(k)
    k.printk(f"kexec: copied {copied} bytes of segment data in "
             f"{(time.monotonic() - t0) * 1e3:.1f} ms")


STEPS: tuple[tuple[str, Callable[[Kernel, Formats], None]], ...] = (
    ("luo_check", _luo_check),
    ("luo_freeze", _luo_freeze),
    ("finalize", _finalize),
    ("notifiers", _notifiers),
    ("device_shutdown", _device_shutdown),
    ("end_userspace", _end_userspace),
    ("sanitize", _sanitize),
    ("machine_kexec", _machine_kexec),
)


def prepare_jump(k: Kernel) -> Loaded:
    """Every step before the jump, in order; returns the image to jump to."""
    loaded = k.kexec_image
    if loaded is None:
        raise LiveUpdateError(err=errno.EINVAL, msg="reboot(KEXEC): no kexec image loaded")
    formats = negotiate.outgoing(k)  # decided once: every writer gets it
    for _name, step in STEPS:
        step(k, formats)
    return loaded


def kernel_kexec(k: Kernel) -> NoReturn:
    loaded = prepare_jump(k)
    k.printk(f"kexec: jumping to {loaded.release} at {loaded.entry:#x}")
    try:
        k.link.send({"op": "jump", "entry": loaded.entry, "boot_params": loaded.boot_params})
    finally:
        os._exit(0)
