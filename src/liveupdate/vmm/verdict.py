"""The checker's verdict on one VM: every guest byte against the guest's own records
(:func:`liveupdate.vmm.guest.verify`), the restored vCPU against the saved state -- one
judgement, whoever maps the memory.

Two witnesses use it. On the emulated machine the checker is outside the VM's VMM
(:mod:`liveupdate.scenario.guestcheck`): it maps the guest's memory from the machine's RAM
and reads the saved state through the debug port, so a VMM that lies about itself fails.
On a real host there is no machine to look through, and the VMM's control request
``verify`` runs this same judgement on the VMM's own mapping and its own preserved state
memfd (:meth:`liveupdate.vmm.vmm.Vmm.verify`): what the guest wrote is checked as the guest
left it, but by the process that restored it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from liveupdate.errors import AbiError
from liveupdate.vmm import guest, vmstate
from liveupdate.vmm.cpu import CpuState

STATE_SIZE = 64 << 10  # the VMM's state memfd (liveupdate.vmm.vmm.STATE_SIZE)
CPU_FIELDS = ("cr0", "cr3", "cr4", "efer")  # the TSC is moved on by the passed time


@dataclass(frozen=True)
class Verdict:
    intact: bool
    problem: str
    steps: int
    pages: int
    vcpu_restored: bool  # the registers came from the saved state, and the guest agrees
    vcpu_problem: str
    entries: int  # times the guest's code was entered from its start (1: never restarted)
    saved_steps: int | None  # the guest's steps when its state was saved (None: no state)


def compare_vcpu(saved: CpuState, restored: dict[str, Any] | None) -> str:
    """Why the restored registers are not the saved ones ("" when they are)."""
    if restored is None:
        return "the VMM loaded no saved vCPU state (it was not restored)"
    got = CpuState.from_json(restored)
    diff = [r for r in sorted(saved.regs) if saved.regs[r] != got.regs[r]]
    diff += [f for f in CPU_FIELDS if getattr(saved, f) != getattr(got, f)]
    if diff:
        return ("the restored vCPU's registers are not the saved ones: "
                + ", ".join(f"{r}" for r in diff[:6]))
    return ""


def judge(where: dict[str, Any], saved: bytes | None,
          memory: Callable[[], AbstractContextManager[memoryview]],
          pause: Callable[[], bool], resume: Callable[[], None]) -> Verdict:
    """``where`` is the VMM's ``where`` answer (size, restored registers), ``saved`` the
    preserved state memfd's bytes (None: the VM was never restored), ``memory`` maps the
    guest's memory. ``pause`` stops the vCPU at an exit and says whether it was already
    held (frozen for an update); ``resume`` is called after the memory check unless it was."""
    vcpu_problem, saved_cpu, saved_steps = "", None, None
    if saved is None:
        vcpu_problem = "no saved vCPU state: the VM was never restored"
    else:
        try:
            sections = vmstate.VM_STATE.decode(saved[:STATE_SIZE])
            saved_cpu = CpuState.from_json(sections["cpu0"])
            saved_steps = int(sections["vm"]["steps"])
        except (AbiError, ValueError, KeyError) as e:
            vcpu_problem = f"the saved vCPU state is unreadable: {e}"
        else:
            vcpu_problem = compare_vcpu(saved_cpu, where["restored_cpu"])
    secret = saved_cpu.regs[guest.SECRET_REG] if saved_cpu is not None else None
    held = pause()
    try:
        with memory() as mem:
            chk = guest.verify(mem, int(where["size"]), secret)
    finally:
        if not held:
            resume()
    if chk.entries > 1 or "secret" in chk.problem:
        vcpu_problem = vcpu_problem or chk.problem
    if saved_steps is not None and chk.steps < saved_steps:
        vcpu_problem = vcpu_problem or (f"the guest is at step {chk.steps}, behind the "
                                        f"{saved_steps} it had taken when it was saved")
    return Verdict(chk.ok, chk.problem, chk.steps, chk.pages_touched, not vcpu_problem,
                   vcpu_problem, chk.entries, saved_steps)
