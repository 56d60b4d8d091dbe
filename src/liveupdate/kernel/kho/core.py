"""What differs between the KHO cores of Linux 6.16, 6.18, 6.19 and 7.1: when the memory map
is finalized, who may finalize it, and what debugfs shows (spec/kho.md 0, 5.1, 6) -- one
:class:`KhoCore` per core, chosen once from the image (``KernelImage.kho_core``). Its fields
are compared only here and in the root strategies (:mod:`liveupdate.kernel.kho.roots`); the
rest of the kernel calls the behaviours below.

Read in upstream ``kernel/kexec_handover.c`` (6.16) and ``kernel/liveupdate/kexec_handover.c``:

* **6.16/6.17** -- the root FDT is written only by ``kho_finalize()``: a sequential build into
  the page ``kho_init`` allocated, then ``KEXEC_KHO_FINALIZE`` notifiers preserve their memory
  and add their subtrees, then the map is serialized. Only debugfs ``out/finalize`` runs it
  (1 finalizes, 0 aborts -- ``kho_abort`` destroys the whole tracker -- and the same value
  twice is EEXIST / ENOENT). While finalized ``kho_preserve_*`` is EBUSY. ``kho_fill_kimage``
  passes the FDT page whether or not it was finalized; an unfinalized page is no FDT, so the
  next kernel says "handover FDT ... is invalid" and boots cold.
* **6.18** -- as 6.16, but ``kho_fill_kimage`` returns early unless finalized: finalize must
  come *before* ``kexec_file_load``, or the image carries no handover at all.
* **6.19/7.0** -- the FDT is live (built at boot, edited by ``kho_add_subtree`` at any time);
  ``kho_finalize()`` only serializes the map (debugfs: non-zero finalizes, 0 is EINVAL) and
  ``liveupdate_reboot()`` calls it when LUO is enabled (``liveupdate=on``). Without either the
  root's ``preserved-memory-map`` stays 0 and the next kernel's ``kho_populate`` says
  "disabling KHO revival: -2".
* **7.1-7.3** -- stateless: no finalize and no ``out/finalize``; the radix tree
  (:mod:`liveupdate.kernel.kho.radix`) is kept in RAM from boot, so what is in memory at the
  jump is the handover. The reboot path only closes the tracker (or, negotiated, writes an
  older kho-v1 map for an older kernel).

``out/fdt``: 6.16-6.18 only while finalized; 6.19+ only on cold boots, with the length it had
at ``kho_init`` (a debugfs blob's size is fixed at creation, so later subtrees are cut off).
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.kho.roots import LiveRoot, Root, SequentialRoot, StatelessRoot

if TYPE_CHECKING:
    from liveupdate.kernel.kho.outgoing import KhoOut


class Debugfs(Enum):
    TOGGLE = "toggle"  # 6.16-6.18: 1 finalizes, 0 aborts, same value twice EEXIST/ENOENT
    SERIALIZE = "serialize"  # 6.19/7.0: non-zero serializes, 0 is EINVAL
    ABSENT = "absent"  # 7.1+


class AtReboot(Enum):
    NOTHING = "nothing"  # 6.16-6.18: only userspace finalizes
    LUO = "luo"  # 6.19/7.0: liveupdate_reboot() finalizes when LUO is enabled
    ALWAYS = "always"  # 7.1: stateless, the map is what is in memory


@dataclass(frozen=True)
class KhoCore:
    name: str
    root: Callable[[KhoOut], Root]  # how the root FDT comes to be (the strategy)
    fill_needs_finalize: bool  # kho_fill_kimage passes nothing unless finalized (6.18)
    debugfs: Debugfs
    at_reboot: AtReboot
    requires_map: bool  # 6.19+ kho_populate: a zero kho-v1 map is ENOENT (6.16-6.18: empty)
    restore_caps_order: bool  # kho_restore_page refuses order > MAX_PAGE_ORDER (not 7.1+)
    records_kexec_metadata: bool  # kho_init adds the ``kexec-metadata`` subtree (7.1+)
    off_in_kdump: bool = False  # kho_memory_init disables KHO in a kdump kernel (7.3.4)
    extends_scratch: bool = False  # kho_memory_init_early's kho_extend_scratch (7.3.4)
    keeps_kexec_metadata: bool = False  # kho_in_kexec_metadata never frees the page (7.3.4)

    @property
    def finalized_by_userspace(self) -> bool:
        """The map is finalized from userspace (debugfs) before ``kexec_file_load``, never by
        the reboot path: its formats are fixed before any handover is planned (6.16-6.18)."""
        return self.at_reboot is AtReboot.NOTHING

    @property
    def has_finalize_file(self) -> bool:
        """debugfs ``kho/out/finalize`` exists (not on the stateless 7.1+ core)."""
        return self.debugfs is not Debugfs.ABSENT

    def write_finalize(self, kout: KhoOut, on: int) -> None:
        """A write of ``on`` to ``kho/out/finalize`` (``kho_out_finalize_set``)."""
        if self.debugfs is Debugfs.TOGGLE:
            if bool(on) == kout.finalized:
                raise LiveUpdateError(err=errno.EEXIST if on else errno.ENOENT,
                                      msg="KHO is already " + ("finalized" if on else "aborted"))
            if on:
                kout.finalize()
            else:
                kout.abort()
            return
        if not on:
            raise LiveUpdateError(err=errno.EINVAL, msg="writing 0 to finalize is not supported")
        kout.finalize()

    def fill_kimage_passes(self, kout: KhoOut) -> bool:
        """``kho_fill_kimage`` gives a loaded image the handover (6.18: only if finalized;
        6.16 and 6.19+ pass the root page whatever its state)."""
        return kout.finalized or not self.fill_needs_finalize

    def finalize_at_reboot(self, kout: KhoOut, luo_enabled: bool) -> bool:
        """The reboot path's part; whether the map is finalized afterwards. 6.16-6.18 leave it
        to userspace; 6.19 ``liveupdate_reboot()`` runs ``kho_finalize()`` only when LUO is
        enabled, mapping its failure to EAGAIN; 7.1+ is stateless (the radix tree is the map;
        the tracker is closed)."""
        if self.at_reboot is AtReboot.ALWAYS:
            kout.finalize(freeze=True)
        elif self.at_reboot is AtReboot.LUO and luo_enabled:
            try:
                kout.finalize(freeze=True)
            except LiveUpdateError as e:
                raise LiveUpdateError(err=errno.EAGAIN, msg=f"kho_finalize failed: {e}") from e
        return kout.finalized


CORES = {
    "6.16": KhoCore("6.16", SequentialRoot, False, Debugfs.TOGGLE, AtReboot.NOTHING,
                    requires_map=False, restore_caps_order=True, records_kexec_metadata=False),
    "6.18": KhoCore("6.18", SequentialRoot, True, Debugfs.TOGGLE, AtReboot.NOTHING,
                    requires_map=False, restore_caps_order=True, records_kexec_metadata=False),
    "6.19": KhoCore("6.19", LiveRoot, False, Debugfs.SERIALIZE, AtReboot.LUO,
                    requires_map=True, restore_caps_order=True, records_kexec_metadata=False),
    "7.1": KhoCore("7.1", StatelessRoot, False, Debugfs.ABSENT, AtReboot.ALWAYS,
                   requires_map=True, restore_caps_order=False, records_kexec_metadata=True),
}
# 7.3.4: the 7.1 core's behaviour here; its scratch sizing (kernel/scratch_sizing.py) and
# test_kho (kernel/testmods/test_kho.py) are its own, keyed by the core's name there
CORES["7.3"] = dataclasses.replace(CORES["7.1"], name="7.3", off_in_kdump=True,
                                   extends_scratch=True, keeps_kexec_metadata=True)
