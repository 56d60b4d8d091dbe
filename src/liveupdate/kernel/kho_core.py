"""What differs between the KHO cores of Linux 6.16, 6.18, 6.19 and 7.1: when the memory map
is finalized, who may finalize it, and what debugfs shows (spec/kho.md 0, 5.1, 6).

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
* **7.1/7.2** -- stateless: no finalize and no ``out/finalize``; the radix tree
  (:mod:`liveupdate.kernel.kho_radix`) is kept in RAM from boot, so what is in memory at the
  jump is the handover. The reboot path only closes the tracker (or, negotiated, writes an
  older kho-v1 map for an older kernel).

``out/fdt``: 6.16-6.18 only while finalized; 6.19+ only on cold boots, with the length it had
at ``kho_init`` (a debugfs blob's size is fixed at creation, so later subtrees are cut off).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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
    notifiers: bool  # root built at finalize by KEXEC_KHO_FINALIZE notifiers; abort exists
    fill_needs_finalize: bool  # kho_fill_kimage passes nothing unless finalized (6.18)
    debugfs: Debugfs
    at_reboot: AtReboot


CORES = {
    "6.16": KhoCore("6.16", True, False, Debugfs.TOGGLE, AtReboot.NOTHING),
    "6.18": KhoCore("6.18", True, True, Debugfs.TOGGLE, AtReboot.NOTHING),
    "6.19": KhoCore("6.19", False, False, Debugfs.SERIALIZE, AtReboot.LUO),
    "7.1": KhoCore("7.1", False, False, Debugfs.ABSENT, AtReboot.ALWAYS),
}
