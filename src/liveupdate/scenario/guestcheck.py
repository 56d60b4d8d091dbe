"""The demo's verdict on one VM, computed here -- by the checker, from the machine's RAM --
and not by the VMM that restored the memory.

The VMM says only where things lie (``where``: its guest memory's RAM extents, its saved
state's, and the registers its vCPU held right after the restore) and pauses its vCPU at an
exit. The checker then maps those RAM extents itself, read-only, from the machine's RAM
memfd (the host's view: the machine is our hardware) and runs
:func:`liveupdate.vmm.guest.verify` over every byte; it reads the saved vCPU state from the
preserved state memfd's RAM through the machine's debug port, decodes it
(:data:`liveupdate.vmm.vmstate.VM_STATE`) and compares it with the restored registers, and
hands the saved secret register to the memory check. A VMM that cold-starts its vCPU, that
throws its saved state away or that damages a byte of guest memory fails here, whatever it
says about itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from liveupdate.client.mapping import map_extents
from liveupdate.errors import AbiError
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.vmm import guest, vmstate
from liveupdate.vmm.cpu import CpuState
from liveupdate.vmm.vmm import STATE_SIZE

RAM_NAME = "/memfd:lu-ram"  # the machine's RAM memfd (liveupdate.machine.ram)
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


def _ram_fd(m: MachineClient) -> int | None:
    """The machine's RAM memfd, opened read-only through /proc (None where that is not
    allowed: the checker then reads through the debug port)."""
    pid = int(m.status()["machine_pid"])
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            if os.readlink(path).startswith(RAM_NAME):
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return None


@contextlib.contextmanager
def guest_memory(m: MachineClient, extents: list[tuple[int, int]]) -> Iterator[memoryview]:
    """The guest's memory as the machine's RAM holds it: mapped read-only (no copy), or read
    through the debug port when the RAM memfd cannot be opened."""
    fd = _ram_fd(m)
    if fd is None:
        yield memoryview(bytearray(b"".join(m.ram_read(p, n) for p, n in extents)))
        return
    try:
        mapping = map_extents(fd, extents, writable=False)
    finally:
        os.close(fd)
    try:
        yield mapping.view
    finally:
        mapping.close()


def _compare_vcpu(saved: CpuState, restored: dict[str, Any] | None) -> str:
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


def judge(sock: str, where: dict[str, Any], saved: bytes | None,
          memory: Callable[[], AbstractContextManager[memoryview]]) -> Verdict:
    """The one verdict, whatever the host: ``where`` is the VMM's answer, ``saved`` the
    preserved state memfd's bytes (None: the VM was never restored), ``memory`` maps the
    guest's memory read-only. Pauses the VM at an exit for the memory check, then resumes
    it (unless it was already held)."""
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
            vcpu_problem = _compare_vcpu(saved_cpu, where["restored_cpu"])
    secret = saved_cpu.regs[guest.SECRET_REG] if saved_cpu is not None else None
    held = bool(ask(sock, "pause")["held"])
    try:
        with memory() as mem:
            chk = guest.verify(mem, int(where["size"]), secret)
    finally:
        if not held:
            ask(sock, "resume")
    if chk.entries > 1 or "secret" in chk.problem:
        vcpu_problem = vcpu_problem or chk.problem
    if saved_steps is not None and chk.steps < saved_steps:
        vcpu_problem = vcpu_problem or (f"the guest is at step {chk.steps}, behind the "
                                        f"{saved_steps} it had taken when it was saved")
    return Verdict(chk.ok, chk.problem, chk.steps, chk.pages_touched, not vcpu_problem,
                   vcpu_problem, chk.entries, saved_steps)


def check(m: MachineClient, sock: str) -> Verdict:
    """Judge the VM from the emulated machine's RAM: its memory mapped by extent, its saved
    state read through the debug port."""
    where = ask(sock, "where")
    ram = [(int(p), int(n)) for p, n in where["ram"]]
    state = [(int(p), int(n)) for p, n in where["state"]]
    saved = b"".join(m.ram_read(p, n) for p, n in state) if state else None
    return judge(sock, where, saved, lambda: guest_memory(m, ram))
