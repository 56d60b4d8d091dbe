"""The TCG accelerator: unicorn (QEMU's TCG engine as a library) runs the guest's x86-64 code.

Guest memory is the VMM's own mapping of the memfd (``mem_map_ptr``: no copy). The guest's
``out`` to port 0xE9 stops emulation: :meth:`Tcg.run_to_exit` returns there, at a point where
the guest's memory is consistent. Under TCG the guest's ``rdtsc`` reads the host's TSC, so
the guest's own clock keeps running across the update without any offset to restore.

The translation buffer is :data:`TCG_BUFFER` (unicorn's default is 1 GiB of address space,
reserved up front: a VMM on a small host -- the real kernel's 1 GiB QEMU guest -- is refused
it by the kernel's heuristic overcommit, ``__vm_enough_memory``). The guest program is a few
hundred bytes of code, so a few MiB of translations are all it ever needs.
"""

from __future__ import annotations

from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, UC_PROT_ALL
from unicorn import x86_const as x86
from unicorn.unicorn import Uc

from liveupdate.vmm import guest
from liveupdate.vmm.cpu import GPRS, MSR_EFER, CpuState

_REG = {name: getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPRS if name != "rflags"}
_REG["rflags"] = x86.UC_X86_REG_EFLAGS
END = (1 << 64) - 1
TCG_BUFFER = 32 << 20


class Tcg:
    name = "tcg"
    tsc_settable = False

    def __init__(self, address: int, size: int) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # before the first use initializes it; mypy reads unicorn's Python 2 class, which
        # lacks the control calls of the Python 3 one that runs
        uc: Any = self.uc
        uc.ctl_set_tcg_buffer_size(TCG_BUFFER)
        for gpa, offset, length in guest.regions(size):
            self.uc.mem_map_ptr(gpa, length, UC_PROT_ALL, address + offset)
        self.exit_value = 0
        self.uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, x86.UC_X86_INS_OUT)

    def _out(self, uc: Any, port: int, size: int, value: int, data: Any) -> None:
        if port == guest.EXIT_PORT:
            self.exit_value = value
            uc.emu_stop()

    def load(self, st: CpuState) -> None:
        self.uc.reg_write(x86.UC_X86_REG_CR3, st.cr3)
        self.uc.reg_write(x86.UC_X86_REG_CR4, st.cr4)
        self.uc.msr_write(MSR_EFER, st.efer)
        self.uc.reg_write(x86.UC_X86_REG_CR0, st.cr0)
        for name, reg in _REG.items():
            self.uc.reg_write(reg, st.regs[name])

    def save(self) -> CpuState:
        regs = {name: int(self.uc.reg_read(reg)) for name, reg in _REG.items()}
        return CpuState(regs, int(self.uc.reg_read(x86.UC_X86_REG_CR0)),
                        int(self.uc.reg_read(x86.UC_X86_REG_CR3)),
                        int(self.uc.reg_read(x86.UC_X86_REG_CR4)),
                        int(self.uc.msr_read(MSR_EFER)), 0)

    def run_to_exit(self) -> int:
        self.uc.emu_start(int(self.uc.reg_read(x86.UC_X86_REG_RIP)), END)
        return self.exit_value
