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

When the machine starts a kernel's process ahead of a jump, that process confines itself
before "go" (:func:`early`), by the command line the machine read with the loaded image, so
that the userspace spares it starts then (:mod:`.spares`) are inside its Landlock domain and
mount namespace -- its own children, which its signals reach under ABI 6's scoping. At boot
it checks that line against the one in RAM (:func:`declare`). The other way -- spares made
outside, confining themselves at adoption with a ruleset the kernel sends -- would put each
spare in a domain of its own, beside the kernel's rather than in it: the kernel could signal
them only unscoped, and they would be the machine's children, not the kernel's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from liveupdate.abi.cmdline import Cmdline
from liveupdate.kernel import fsaudit, landlock, mountns

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


def run_dir(k: Kernel) -> str:
    base = k.cmdline.get("lu.run")
    return os.path.join(base, f"kernel-{k.boot_id}") if base else ""


@dataclass
class Early:
    """The confinement a kernel process took before its "go", from the command line the
    machine said the jump would carry (:func:`early`); what it says at boot."""

    cmdline: str
    lines: list[str] = field(default_factory=list)


def early(raw: str) -> Early:
    """Confine this process -- before "go", so the userspace spares it starts next are in
    its domain and mount namespace (:mod:`.spares`) -- by the command line ``raw`` that the
    machine read with the loaded image. At boot :func:`declare` checks it against the
    command line in RAM: the machine's word is a hint, RAM is the truth."""
    done = Early(raw)
    _apply(Cmdline.parse(raw), done.lines.append)
    return done


def declare(k: Kernel) -> None:
    """At boot: confine by the command line in RAM -- or check that the confinement taken
    before "go" (``k.early``) was for exactly this command line (else panic: the kernel
    would run under rules its command line does not say)."""
    if k.link is None:  # the in-process test rig: the host process is no kernel to confine
        return
    if k.early is None:
        _apply(k.cmdline, k.printk)
    else:
        if k.early.cmdline != k.cmdline.raw:
            k.panic("confine: this process was confined for another command line "
                    f"({k.early.cmdline!r}) than the one in RAM")
        for line in k.early.lines:
            k.printk(line)
    if k.cmdline.get("lu.run") and not _off(k.cmdline):
        fsaudit.declare([], [run_dir(k)])


def _off(c: Cmdline) -> bool:
    return c.get("lu.confine", "1") in ("0", "off", "n", "no")


def _apply(c: Cmdline, say: Callable[[str], None]) -> None:
    if _off(c):
        fsaudit.disable()
        say("confine: off (lu.confine=0)")
        return
    disk, base = c.get("lu.disk"), c.get("lu.run")
    faults = os.path.join(disk, "faults") if disk else ""
    # more tmpfs-like places (what a host mounts for its services, e.g. a socket folder):
    # declared on the command line, so a test that lets userspace write there says so
    extra = [p for p in c.get("lu.rw", "").split(",") if p]
    # the machine's folder, when disk/ and run/ share it: its own files are covered
    folder = os.path.dirname(disk) if disk and base and \
        os.path.dirname(disk) == os.path.dirname(base) else ""
    # read: the service list; the places Landlock's rules name, as themselves (O_PATH);
    # the runtime folder (read and write) at boot, when its name (the boot id) is known
    fsaudit.declare([os.path.join(disk, "services")] if disk else [], [],
                    [p for p in (base, faults, "/dev", folder, *extra) if p])
    if not folder:
        say("confine: lu.disk and lu.run are not in one folder: the machine's own files "
            "stay visible to userspace")
    else:
        try:
            covered, failed = mountns.hide(folder, (os.path.basename(disk),
                                                    os.path.basename(base)))
        except OSError as e:
            say(f"confine: the machine's own files stay visible to userspace ({e})")
        else:
            say(f"confine: {len(covered)} machine files out of userspace's sight")
            for why in failed:
                say(f"confine: not covered, visible to userspace: {why}")
    abi = landlock.abi_version()
    if not abi:
        say("confine: no Landlock in this host kernel; userspace may write anywhere")
        return
    acc = landlock.writes(abi)
    rules = [(base, acc), ("/dev", landlock.WRITE_FILE), ("/proc", landlock.WRITE_FILE)]
    rules += [(faults, landlock.REMOVE_FILE)]
    rules += [(p, acc) for p in extra]
    landlock.restrict_self(abi, [(p, a) for p, a in rules if p and os.path.isdir(p)])
    say(f"confine: Landlock ABI {abi}: userspace writes beneath {base or 'nothing'} only")
