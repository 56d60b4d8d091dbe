"""What a kernel and its userspace may touch on the host, declared once from the command line.

The kernel process (:mod:`.fsaudit`): its code, ``/proc``, ``/dev/null``, the service list
(``<lu.disk>/services``) and its runtime folder (``<lu.run>/kernel-<boot id>``); anything
else is a panic. Its userspace -- and the kernel itself -- through a Landlock domain made
here, inherited by every process it starts: the filesystem changes only beneath ``lu.run``
(a tmpfs the machine empties at every boot, so nothing written there reaches the next kernel),
device and ``/proc`` files may be written, host-armed fault points on the disk
(``<lu.disk>/faults``) may be consumed (removed, never created or written); the disk and the
rest of the host are read-only (``lu.rw=DIR[,DIR]`` declares more writable places). No TCP;
no abstract unix socket and no signal reaches outside the domain (ABI 6), so the next
kernel's userspace cannot reach the previous kernel's, whose domain is another. Before that,
the machine's own files (its console log above all) are covered in a mount namespace of the
kernel's own (:mod:`.mountns`).
``lu.confine=0`` turns both off, to show what the other checks catch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from liveupdate.kernel import fsaudit, landlock, mountns

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def run_dir(k: Kernel) -> str:
    base = k.cmdline.get("lu.run")
    return os.path.join(base, f"kernel-{k.boot_id}") if base else ""


def declare(k: Kernel) -> None:
    if k.link is None:  # the in-process test rig: the host process is no kernel to confine
        return
    if k.cmdline.get("lu.confine", "1") in ("0", "off", "n", "no"):
        fsaudit.disable()
        k.printk("confine: off (lu.confine=0)")
        return
    disk, base = k.disk_dir, k.cmdline.get("lu.run")
    faults = os.path.join(disk, "faults") if disk else ""
    # more tmpfs-like places (what a host mounts for its services, e.g. a socket folder):
    # declared on the command line, so a test that lets userspace write there says so
    extra = [p for p in k.cmdline.get("lu.rw", "").split(",") if p]
    # the machine's folder, when disk/ and run/ share it: its own files are covered
    folder = os.path.dirname(disk) if disk and base and \
        os.path.dirname(disk) == os.path.dirname(base) else ""
    # read: the service list; the places Landlock's rules name, as themselves (O_PATH)
    fsaudit.declare([os.path.join(disk, "services")] if disk else [],
                    [run_dir(k)] if base else [],
                    [p for p in (base, faults, "/dev", folder, *extra) if p])
    if not folder:
        k.printk("confine: lu.disk and lu.run are not in one folder: the machine's own files "
                 "stay visible to userspace")
    else:
        try:
            covered, failed = mountns.hide(folder, (os.path.basename(disk),
                                                    os.path.basename(base)))
        except OSError as e:
            k.printk(f"confine: the machine's own files stay visible to userspace ({e})")
        else:
            k.printk(f"confine: {len(covered)} machine files out of userspace's sight")
            for why in failed:
                k.printk(f"confine: not covered, visible to userspace: {why}")
    abi = landlock.abi_version()
    if not abi:
        k.printk("confine: no Landlock in this host kernel; userspace may write anywhere")
        return
    acc = landlock.writes(abi)
    rules = [(base, acc), ("/dev", landlock.WRITE_FILE), ("/proc", landlock.WRITE_FILE)]
    rules += [(faults, landlock.REMOVE_FILE)]
    rules += [(p, acc) for p in extra]
    landlock.restrict_self(abi, [(p, a) for p, a in rules if p and os.path.isdir(p)])
    k.printk(f"confine: Landlock ABI {abi}: userspace writes beneath {base or 'nothing'} only")
