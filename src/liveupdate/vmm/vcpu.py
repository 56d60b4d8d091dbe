"""The vCPU: its accelerator (KVM or TCG, chosen as QEMU's ``-accel kvm:tcg``) and the thread
that runs it, pausable at the guest's exits, with the host timestamps of its exits and entries
that the blackout figures are made of (:mod:`liveupdate.vmm.vmm`)."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from liveupdate.client.mapping import Mapping
from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import guest, kvm
from liveupdate.vmm.cpu import CpuState


class Accel(Protocol):
    name: str

    @property
    def tsc_settable(self) -> bool:
        """Whether the guest sees the TSC :meth:`load` sets (else it reads the host's)."""

    def load(self, st: CpuState) -> None: ...
    def save(self) -> CpuState: ...
    def run_to_exit(self) -> int: ...


def make_accel(kind: str, address: int, size: int) -> Accel:
    """``auto`` is QEMU's ``-accel kvm:tcg``: the host's /dev/kvm when it is usable, else
    TCG; ``kvm`` fails with the reason when it is not."""
    if kind not in ("auto", "kvm", "tcg"):
        raise LiveUpdateError(err=errno.EINVAL, msg=f"unknown accelerator {kind!r}")
    if kind != "tcg":
        reason = kvm.unusable()
        if reason is None:
            return kvm.Kvm(address, size)
        if kind == "kvm":
            raise LiveUpdateError(err=errno.ENODEV, msg=f"KVM is not usable: {reason}")
    # only now: unicorn costs ~30 ms of import, in a VMM that restarts inside its blackout
    from liveupdate.vmm.tcg import Tcg

    return Tcg(address, size)


@dataclass
class Timing:
    exits: int = 0
    last_exit_ns: int = 0  # host CLOCK_MONOTONIC of the last exit
    last_exit_wall_ns: int = 0  # ... and its CLOCK_REALTIME (crosses a kexec)
    first_entry_ns: int = 0  # host CLOCK_MONOTONIC at the vCPU's first entry (the resume)
    first_entry_wall_ns: int = 0  # ... and its CLOCK_REALTIME
    first_exit_ns: int = 0  # ... and at its first exit after it
    blackout: dict[str, Any] = field(default_factory=dict)
    # (host ns, guest TSC) at the first and the latest exit: the guest TSC's frequency
    first_sample: tuple[int, int] = (0, 0)
    last_sample: tuple[int, int] = (0, 0)

    @property
    def tsc_hz(self) -> float:
        """Guest TSC ticks per host second, measured (0 until 50 ms have passed)."""
        dt = self.last_sample[0] - self.first_sample[0]
        return (self.last_sample[1] - self.first_sample[1]) / dt * 1e9 if dt > 50e6 else 0.0


class Vm:
    """One vCPU on its own thread, pausable at the guest's exits."""

    def __init__(self, accel: Accel, mapping: Mapping, size: int, duty: float = 1.0) -> None:
        self.accel = accel
        self.duty = duty  # the share of time the vCPU runs (a fleet's guests idle, as HLT)
        self.mapping = mapping
        self.size = size
        self.timing = Timing()
        self.cond = threading.Condition()
        self.want_pause = False
        self.paused = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def mem(self) -> memoryview:
        return self.mapping.view

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a VMM bug: say so and end, rather than hang its callers
            print(f"vmm: vCPU thread failed: {type(e).__name__}: {e}", flush=True)
            os._exit(70)

    def _loop(self) -> None:
        self.timing.first_entry_ns = time.monotonic_ns()
        self.timing.first_entry_wall_ns = time.time_ns()
        while True:
            ran = time.monotonic_ns()
            self.accel.run_to_exit()
            now, wall = time.monotonic_ns(), time.time_ns()
            tsc = guest.latest_tsc(self.mem)
            with self.cond:
                self.timing.exits += 1
                self.timing.last_exit_ns = now
                self.timing.last_exit_wall_ns = wall
                self.timing.last_sample = (now, tsc)
                if not self.timing.first_sample[0]:
                    self.timing.first_sample = (now, tsc)
                    self.timing.first_exit_ns = now
                self.cond.notify_all()
                if self.want_pause:
                    self.paused = True
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: not self.want_pause)
                    self.paused = False
                elif self.duty < 1.0:  # idle after each burst; a pause request ends it
                    idle = (now - ran) * (1.0 - self.duty) / self.duty / 1e9
                    self.cond.wait_for(lambda: self.want_pause, min(idle, 1.0))

    def pause(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.want_pause = True
            if not self.cond.wait_for(lambda: self.paused, timeout):
                raise LiveUpdateError(err=errno.ETIMEDOUT, msg="the vCPU did not reach an exit")

    def resume(self) -> None:
        with self.cond:
            self.want_pause = False
            self.cond.notify_all()

    def wait_exits(self, n: int, timeout: float = 60.0) -> None:
        with self.cond:
            target = self.timing.exits + n
            self.cond.wait_for(lambda: self.timing.exits >= target, timeout)
