"""The KVM accelerator: the guest runs on the host CPU through ``/dev/kvm`` (ioctls as in
``include/uapi/linux/kvm.h``, x86-64).

One VM, one memory slot over the VMM's mapping of the guest memfd (a contiguous virtual range
built from ``MAP_FIXED`` mappings of scattered RAM extents -- KVM takes it as one region), one
vCPU in 64-bit mode: flat code and data segments, paging on the VMM's identity map. The
guest's ``out`` to port 0xE9 is a ``KVM_EXIT_IO`` exit: :meth:`Kvm.run_to_exit` returns there.
The guest TSC is an MSR here: it is saved with the registers and set on load, so a VMM that
restores adds the host time that passed and the guest's clock keeps real time -- where KVM
applies TSC offsets. Not every KVM does: under PVM (``kvm_pvm``, the pagetable-based KVM of
nested hosts without VMX/SVM, as on the machine this was built on) the guest runs in host
ring 3 with ``RDTSC`` untrapped and there is no hardware TSC offset to program, so the guest
reads the host's TSC; ``KVM_SET_MSRS(MSR_IA32_TSC)`` and the ``KVM_VCPU_TSC_OFFSET``
attribute succeed and change nothing (the MSR reads back as the host's TSC), and
``KVM_SET_TSC_KHZ`` is EINVAL (no ``KVM_CAP_TSC_CONTROL``). :func:`tsc_applies` asks a
guest, and :attr:`Kvm.tsc_settable` says which: a VMM reports an unrestorable
guest clock instead of claiming it set one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import struct

from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import guest
from liveupdate.vmm.cpu import GPRS, MSR_IA32_TSC, CpuState, fresh

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
KVM_GET_MSRS, KVM_SET_MSRS = 0xC008AE88, 0x4008AE89
KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN = 2, 5, 8
KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR = 9, 17
API_VERSION = 12

# kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags
REGS_ORDER = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
REGS = struct.Struct("<18Q")
# kvm_segment: base limit selector type present dpl db s l g avl unusable (+1 pad)
SEGMENT = struct.Struct("<QIHBBBBBBBBBx")
SREGS_SIZE = 312
SREGS_CR = struct.Struct("<7Q")  # cr0 cr2 cr3 cr4 cr8 efer apic_base, at 224
MSRS_HEAD = struct.Struct("<II")
MSR_ENTRY = struct.Struct("<IIQ")
assert set(REGS_ORDER) == set(GPRS)


def unusable() -> str | None:
    """Why /dev/kvm cannot run our guest here, or None when it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"KVM_GET_API_VERSION: {e.strerror}"
    finally:
        os.close(fd)
    return None if version == API_VERSION else f"KVM API version {version}, not 12"


def ioctl(fd: int, cmd: int, arg: int | bytearray = 0, what: str = "") -> int:
    try:
        return fcntl.ioctl(fd, cmd, arg, True) if isinstance(arg, bytearray) else \
            fcntl.ioctl(fd, cmd, arg)
    except OSError as e:
        raise LiveUpdateError(err=e.errno or errno.EIO, msg=f"KVM {what or hex(cmd)}: "
                              f"{e.strerror}") from e


TSC_PROBE = 1 << 62  # a TSC far above any host's (49 years at 3 GHz; the host counts from boot)
PROBE_CODE = bytes.fromhex("0f31e6e9")  # rdtsc; out %al, $0xe9


@functools.cache
def tsc_applies() -> bool:
    """Whether this host's KVM shows a guest the TSC its VMM sets. Asked of a guest, not
    of KVM: a throwaway VM (one 2 MiB page, the guest's page-table layout) is given TSC
    :data:`TSC_PROBE`, runs ``rdtsc`` and exits; the guest read about that, or the host's
    TSC. (``KVM_GET_MSRS`` is no witness: under PVM it returns a value just written, or
    KVM's own offset model, while the guest's ``rdtsc`` reads the host.) The probe lies
    above the host's TSC, not below it: a host booted minutes ago reads below any small
    threshold too (its TSC passes 2**40 only after 6-8 minutes), and was taken for a restored
    clock. Once per process, a few ms."""
    size = 2 << 20
    buf = mmap.mmap(-1, size)
    try:
        words = memoryview(buf).cast("Q")
        words[guest.PML4_AT // 8] = guest.PDPT_AT | 3
        words[guest.PDPT_AT // 8] = guest.PD_AT | 3
        words[guest.PD_AT // 8] = 0x83  # one 2 MiB page at 0
        words.release()
        buf[guest.CODE_AT : guest.CODE_AT + len(PROBE_CODE)] = PROBE_CODE
        vm = Kvm(ctypes.addressof(ctypes.c_char.from_buffer(buf)), size)
        try:
            st = fresh()
            st.tsc = TSC_PROBE
            vm.load(st)
            vm.run_to_exit()
            regs = vm.save().regs
        finally:
            vm.close()
    finally:
        with contextlib.suppress(BufferError):
            buf.close()
    return probe_took((regs["rdx"] & 0xFFFFFFFF) << 32 | regs["rax"] & 0xFFFFFFFF)


def probe_took(seen: int) -> bool:
    """Whether the guest's ``rdtsc`` in :func:`tsc_applies` read the probe's clock (a little
    past :data:`TSC_PROBE`) rather than the host's."""
    return TSC_PROBE <= seen < TSC_PROBE + (1 << 40)


class Kvm:
    name = "kvm"

    def __init__(self, address: int, size: int) -> None:
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.vm = ioctl(self.kvm, KVM_CREATE_VM, 0, "CREATE_VM")
        self.address, self.size = address, size
        self.set_slots(0)
        self.vcpu = ioctl(self.vm, KVM_CREATE_VCPU, 0, "CREATE_VCPU")
        run_size = ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "GET_VCPU_MMAP_SIZE")
        self.run = mmap.mmap(self.vcpu, run_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)

    def set_slots(self, flags: int) -> None:
        """(Re)declare the memory slots of :func:`guest.regions` with ``flags``
        (``struct kvm_userspace_memory_region``: slot, flags, guest_phys_addr, memory_size,
        userspace_addr). Re-issued on a live VM with only the flags changed, it is KVM's
        ``KVM_MR_FLAGS_ONLY`` change: how dirty logging is switched on and off
        (:mod:`liveupdate.vmm.dirtylog`)."""
        for slot, (gpa, offset, length) in enumerate(guest.regions(self.size)):
            region = bytearray(struct.pack("<IIQQQ", slot, flags, gpa, length,
                                           self.address + offset))
            ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region, "SET_USER_MEMORY_REGION")

    @property
    def tsc_settable(self) -> bool:
        """Whether the guest sees the TSC :meth:`load` sets (:func:`tsc_applies`)."""
        return tsc_applies()

    def _sregs(self) -> bytearray:
        buf = bytearray(SREGS_SIZE)
        ioctl(self.vcpu, KVM_GET_SREGS, buf, "GET_SREGS")
        return buf

    def load(self, st: CpuState) -> None:
        s = self._sregs()
        code = SEGMENT.pack(0, 0xFFFFFFFF, 1 << 3, 11, 1, 0, 0, 1, 1, 1, 0, 0)
        data = SEGMENT.pack(0, 0xFFFFFFFF, 2 << 3, 3, 1, 0, 1, 1, 0, 1, 0, 0)
        s[0:24] = code  # cs
        for i in range(1, 6):  # ds es fs gs ss
            s[i * 24 : (i + 1) * 24] = data
        cr = list(SREGS_CR.unpack_from(s, 224))
        cr[0], cr[2], cr[3], cr[5] = st.cr0, st.cr3, st.cr4, st.efer
        SREGS_CR.pack_into(s, 224, *cr)
        ioctl(self.vcpu, KVM_SET_SREGS, s, "SET_SREGS")
        regs = bytearray(REGS.pack(*(st.regs[n] for n in REGS_ORDER)))
        ioctl(self.vcpu, KVM_SET_REGS, regs, "SET_REGS")
        if st.tsc:
            msrs = bytearray(MSRS_HEAD.pack(1, 0) + MSR_ENTRY.pack(MSR_IA32_TSC, 0, st.tsc))
            ioctl(self.vcpu, KVM_SET_MSRS, msrs, "SET_MSRS")

    def save(self) -> CpuState:
        regs = bytearray(REGS.size)
        ioctl(self.vcpu, KVM_GET_REGS, regs, "GET_REGS")
        s = self._sregs()
        cr0, _cr2, cr3, cr4, _cr8, efer, _apic = SREGS_CR.unpack_from(s, 224)
        msrs = bytearray(MSRS_HEAD.pack(1, 0) + MSR_ENTRY.pack(MSR_IA32_TSC, 0, 0))
        ioctl(self.vcpu, KVM_GET_MSRS, msrs, "GET_MSRS")
        tsc = MSR_ENTRY.unpack_from(msrs, MSRS_HEAD.size)[2]
        return CpuState(dict(zip(REGS_ORDER, REGS.unpack(regs), strict=True)), cr0, cr3, cr4,
                        efer, tsc)

    def run_to_exit(self) -> int:
        while True:
            ioctl(self.vcpu, KVM_RUN, 0, "RUN")
            reason = struct.unpack_from("<I", self.run, 8)[0]
            if reason == KVM_EXIT_IO:
                direction, size, port, _count, off = struct.unpack_from("<BBHIQ", self.run, 32)
                if port == guest.EXIT_PORT and direction == 1:
                    value: int = int.from_bytes(self.run[off : off + size], "little")
                    return value
                continue  # any other port: ignored, as an absent device
            raise LiveUpdateError(err=errno.EIO, msg=f"KVM exit {reason} (guest stopped: "
                                  f"{'halted' if reason == KVM_EXIT_HLT else 'failed'})")

    def close(self) -> None:
        self.run.close()
        for fd in (self.vcpu, self.vm, self.kvm):
            os.close(fd)

