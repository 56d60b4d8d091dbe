"""vCPU state, as the VMM saves it at freeze and loads it after the update -- the same record
for every accelerator: general registers, control registers, EFER and the TSC."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from liveupdate.vmm import guest

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
CR0_PE, CR0_ET, CR0_PG = 0x1, 0x10, 0x80000000
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400
MSR_IA32_TSC, MSR_EFER = 0x10, 0xC0000080


@dataclass
class CpuState:
    regs: dict[str, int] = field(default_factory=dict)
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    tsc: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CpuState:
        regs = d["regs"]
        if not isinstance(regs, dict) or set(regs) != set(GPRS) or not all(
                isinstance(v, int) and 0 <= v < 1 << 64 for v in regs.values()):
            raise ValueError("vCPU state: bad registers")
        vals = [d[k] for k in ("cr0", "cr3", "cr4", "efer", "tsc")]
        if not all(isinstance(v, int) and 0 <= v < 1 << 64 for v in vals):
            raise ValueError("vCPU state: bad control registers")
        return cls(dict(regs), *vals)


def fresh() -> CpuState:
    """Long mode with paging on the VMM's identity map, at the guest's entry point."""
    regs = dict.fromkeys(GPRS, 0)
    regs.update(rip=guest.CODE_AT, rsp=guest.STACK_TOP, rflags=0x2)
    return CpuState(regs, CR0_PE | CR0_ET | CR0_PG, guest.PML4_AT, CR4_PAE,
                    EFER_LME | EFER_LMA, 0)
