"""KVM's dirty log: which guest pages the guest wrote, for live migration under KVM.

As QEMU does it (``accel/kvm/kvm-all.c``): when migration starts, every memory slot is
declared again with ``KVM_MEM_LOG_DIRTY_PAGES`` (``kvm_log_start`` -> ``kvm_slot_update_flags``
-> ``KVM_SET_USER_MEMORY_REGION``; in Linux a ``KVM_MR_FLAGS_ONLY`` change,
``kvm_set_memslot``, which write-protects the slot -- ``kvm_mmu_slot_remove_write_access``
or, with PML, clears the D bits -- so that the next guest write to each page is logged).
Each round asks each slot for its log (``kvm_physical_sync_dirty_bitmap`` ->
``kvm_slot_get_dirty_log``: ``KVM_GET_DIRTY_LOG``, in Linux ``kvm_vm_ioctl_get_dirty_log``
-> ``kvm_get_dirty_log_protect``, which swaps each word of the slot's bitmap for zero and
write-protects the pages it reported, under ``mmu_lock``, then flushes the TLBs). A write is
therefore in the bitmap one GET returns, or in the next one: a page reported is read after
the GET, so it is read with that write in it. When migration ends or is cancelled the slots
are declared once more without the flag (``kvm_log_stop``).

uAPI (``include/uapi/linux/kvm.h``)::

    #define KVM_MEM_LOG_DIRTY_PAGES (1UL << 0)
    struct kvm_userspace_memory_region { __u32 slot; __u32 flags; __u64 guest_phys_addr;
                                         __u64 memory_size; __u64 userspace_addr; };
    struct kvm_dirty_log { __u32 slot; __u32 padding1;
                           union { void __user *dirty_bitmap; __u64 padding2; }; };
    #define KVMIO 0xAE
    #define KVM_GET_DIRTY_LOG _IOW(KVMIO, 0x42, struct kvm_dirty_log)   /* 0x4010AE42 */

The bitmap is one bit per page **of the slot** (bit ``i`` is the slot's page ``i``, in
``unsigned long`` words, little-endian on x86: ``kvm_dirty_bitmap_bytes`` =
``ALIGN(npages, 64) / 8``); a guest larger than 3 GiB has two slots (:func:`guest.regions`),
and the second's page ``i`` is page ``HOLE_AT / PAGE + i`` of the memory file -- which is
what the migration stream numbers (guest-physical there is 4 GiB + ...).

Clear on GET: ``kvm_get_dirty_log_protect`` clears what it returns unless
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` is enabled, which takes ``KVM_ENABLE_CAP`` on the VM
(then ``KVM_CLEAR_DIRTY_LOG`` re-protects, and with ``KVM_DIRTY_LOG_INITIALLY_SET`` the first
log is all ones). This VMM never issues ``KVM_ENABLE_CAP``, nor enables the dirty ring
(``KVM_CAP_DIRTY_LOG_RING``, under which ``KVM_GET_DIRTY_LOG`` is refused): each GET returns
the pages written since the previous one (tests/vmm/test_dirtylog.py checks a second GET
with no guest run in between is empty).

What KVM does not log is the VMM's own writes to guest memory (and the CPU's accessed and
dirty bits in the guest's page tables, set by the page walker -- logged by EPT hardware,
not by every MMU): the low area they land in is re-sent with the VM state
(:data:`liveupdate.vmm.migration.LOW_PAGES`), under KVM as under TCG.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import guest
from liveupdate.vmm.kvm import Kvm, ioctl

if TYPE_CHECKING:
    from liveupdate.vmm.vmm import Vmm

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
DIRTY_LOG = struct.Struct("<IIQ")  # slot, padding1, dirty_bitmap: 16 bytes
IOC_WRITE, KVMIO = 1, 0xAE  # include/uapi/asm-generic/ioctl.h: _IOW's direction
KVM_GET_DIRTY_LOG = IOC_WRITE << 30 | DIRTY_LOG.size << 16 | KVMIO << 8 | 0x42  # 0x4010AE42
PAGE = guest.PAGE


class DirtyLog:
    """The dirty log of a :class:`~liveupdate.vmm.kvm.Kvm`'s slots: :meth:`start`, then
    :meth:`get` each round, :meth:`stop` at the end (also after a failure)."""

    def __init__(self, vm: Kvm) -> None:
        self.vm = vm
        # per slot: its first page in the memory file, its pages, its bitmap (u64 words)
        self.slots = [(offset // PAGE, length // PAGE, np.zeros(-(-length // PAGE // 64),
                                                                 np.uint64))
                      for _gpa, offset, length in guest.regions(vm.size)]
        self.on = False

    def start(self) -> None:
        """``kvm_log_start``: every slot with ``KVM_MEM_LOG_DIRTY_PAGES``, the guest running
        on (a flags-only change of a live slot)."""
        self.vm.set_slots(KVM_MEM_LOG_DIRTY_PAGES)
        self.on = True

    def get(self) -> np.ndarray:
        """``kvm_physical_sync_dirty_bitmap``: ``KVM_GET_DIRTY_LOG`` on each slot; the pages
        written since the last GET (or :meth:`start`) as sorted page numbers of the memory
        file (u32)."""
        if not self.on:
            raise LiveUpdateError(err=errno.EINVAL, msg="dirty log: not started")
        out = []
        for slot, (first, n, bitmap) in enumerate(self.slots):
            arg = bytearray(DIRTY_LOG.pack(slot, 0, bitmap.ctypes.data))
            ioctl(self.vm.vm, KVM_GET_DIRTY_LOG, arg, "GET_DIRTY_LOG")
            bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little", count=n)
            out.append(np.flatnonzero(bits).astype(np.uint32) + np.uint32(first))
        return np.concatenate(out)

    def stop(self) -> None:
        """``kvm_log_stop``: the slots without the flag again (idempotent)."""
        if self.on:
            self.on = False
            self.vm.set_slots(0)


class KvmTracker:
    """Migration's write tracking under KVM (the TCG one is a unicorn write hook:
    :class:`liveupdate.vmm.migration.TcgTracker`)."""

    def __init__(self, vmm: Vmm, accel: Kvm) -> None:
        self.log = DirtyLog(accel)

    def start(self) -> None:
        self.log.start()

    def collect(self, running: bool) -> np.ndarray:
        """The pages written since the last call. Unlike the TCG hook, no wait for an exit
        while the guest runs: the GET write-protects before it returns, so a write it did
        not report faults into the next bitmap."""
        return self.log.get()

    def stop(self) -> None:
        self.log.stop()
