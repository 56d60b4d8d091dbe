"""The VMM: one VM whose memory is a memfd of the (emulated or real) kernel, driven through a
live update by luod. vCPUs run under the host's /dev/kvm when it is usable (:mod:`kvm`), else
under unicorn (:mod:`tcg`) -- the same guest either way, as QEMU's ``-accel kvm:tcg``.

    python -m liveupdate.vmm NAME [--memory 1G] [--accel auto|kvm|tcg]

Fresh start: a memfd of ``--memory`` bytes mapped as one range (zero copy), the guest laid
out in it, one vCPU running it on a thread. On ``prepare`` the VMM enters limited mode --
the VM keeps running but memory resize and device hot-plug are refused (EBUSY) -- and hands
luod its guest memory (token 1) and a state memfd (token 2). On ``freeze`` it pauses the
vCPU at the guest's next exit (a consistent point), writes the vCPU state, the guest's step
count and the host time of that last exit into the state memfd -- described as data, with a
magic and a version (:mod:`liveupdate.vmm.vmstate`). On ``cancel`` it resumes.

In the next kernel init starts it again; luod says ``restore``: it retrieves both memfds,
maps the same guest memory, loads the vCPU state (KVM: the TSC is set to the saved value plus
the host time that passed; under TCG the guest reads the host's TSC and needs nothing) and
resumes. The guest's step counter continues -- it never restarts. The blackout is measured
twice: host clock (the guest's last instruction before the pause -- its exit -- to its first
after the resume -- the accelerator's first entry --, across the two VMM processes) and the
guest's own TSC timestamps.

Which host clock: the two ends are read in two kernels. CLOCK_MONOTONIC and CLOCK_BOOTTIME
start again at zero in every kernel (``timekeeping_init()`` sets them up afresh; a kexec is
a boot), so their difference across a real kexec is meaningless (it came out negative).
CLOCK_REALTIME is the one that continues: the next kernel's ``timekeeping_init()`` reads
the wall clock back (``read_persistent_clock64()``, on x86 the CMOS RTC, whole seconds,
until NTP or ``settimeofday`` refine it). So the pause is saved as CLOCK_REALTIME
(``last_exit_wall_ns``, in the VM state's ``vm`` section since version 2) and the figure is
REALTIME(resume) - REALTIME(pause) on both hosts. On the emulated machine both VMMs run on
one host kernel and the figure is as exact as MONOTONIC's would be; across a real kexec it
carries the RTC's resolution (up to a second) -- the guest's TSC figure does not. The ends
are also reported as CLOCK_MONOTONIC (``paused_ns``, ``resumed_ns``): on the emulated
machine that is the host's one clock, which the machine's witness of the jump uses.
Where KVM does not apply the TSC (:mod:`kvm`) the guest reads the host's TSC and the result
says ``tsc: host`` (not restored), never ``restored``.

A control socket (``<luod socket folder>/vmm-NAME.sock``, luod's framing; ask it with
:func:`liveupdate.ipc.service.ask`) answers ``status``, ``where`` (the guest's memory and saved
state as physical extents, and the vCPU it restored: what an independent check,
:mod:`liveupdate.scenario.guestcheck`, reads from the machine's RAM -- the VMM does not judge
itself), ``pause``/``resume``, ``phys`` (where a guest-physical address lies in the machine's
RAM), ``resize`` (refused in limited mode) and ``verify``: the checker's verdict
(:mod:`liveupdate.vmm.verdict`) run by the VMM on its own mapping, for a real host, where
no machine's RAM can be looked through (on the emulated machine the outside checker is the
witness).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
from typing import Any

from liveupdate.client.backends import Backend, open_backend
from liveupdate.client.luod import LuodClient, connect
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.ipc import framing, service
from liveupdate.vmm import guest, guest_nic, verdict, vmstate
from liveupdate.vmm.cpu import CpuState, fresh
from liveupdate.vmm.nic import SEALS, Assigned
from liveupdate.vmm.vcpu import Vm, make_accel
from liveupdate.vmm.where import WHERE_PIECE

RAM_TOKEN, STATE_TOKEN = 1, 2
MFD_ALLOW_SEALING = 0x2
STATE_SIZE = verdict.STATE_SIZE


HUGE_FLAGS = {"": 0, "2M": 0x4 | 21 << 26, "1G": 0x4 | 30 << 26}  # memfd.h MFD_HUGE_*


class Vmm:
    def __init__(self, name: str, size: int, accel: str, backend: Backend | None = None,
                 plant: str = "", *, duty: float = 1.0, client: LuodClient | None = None,
                 incoming: tuple[int, int] | None = None, nic: str = "",
                 ring: int = 4096, hugepages: str = "") -> None:
        """``size`` 0: the saved state's. ``client``: an already connected luod client (a
        migration slot's, :mod:`liveupdate.vmm.incoming`); ``incoming``: the guest memory
        memfd and the state memfd a live migration filled, resumed as after a kexec.
        ``nic``: a VFIO device cdev assigned to the guest (:mod:`liveupdate.vmm.nic`).
        ``hugepages``: "2M"/"1G", guest RAM on hugetlb folios (MFD_HUGETLB)."""
        self.name = name
        self.plant = plant  # "cold-start": a planted bug the demo's checks must catch
        self.size = size
        self.accel_kind = accel
        self.backend = backend or open_backend()
        self.limited = False
        self.started = time.monotonic_ns()
        self.restored_ns = 0
        self.restored: dict[str, Any] | None = None
        self.restored_cpu: CpuState | None = None  # read back from the vCPU after the load
        self.state_fd = -1
        self.state_ranges: list[tuple[int, int]] = []  # where the saved state lies in RAM
        self.nic = Assigned(self.backend, nic, ring) if nic else None  # vmm/nic.py
        # the LUO file handler of guest RAM (MFD_HUGETLB: the hugetlb RFC's huge-memfd)
        self.ram_component = "huge-memfd" if hugepages else "memfd"
        self.client = client or self._connect()
        self.incoming = incoming is not None
        if incoming is not None:
            self.ram_fd = incoming[0]
            saved = self._read_state(incoming[1])
        elif self.client.restore:
            self.ram_fd = self.client.retrieve(RAM_TOKEN)
            saved = self._read_state(self.client.retrieve(STATE_TOKEN))
        else:
            # MFD_HUGETLB | MFD_HUGE_2MB/1GB when asked: guest RAM on hugetlb folios
            self.ram_fd = self.backend.memfd_create(f"vm-{name}", HUGE_FLAGS[hugepages]
                                                    | (MFD_ALLOW_SEALING if self.nic else 0))
            self.backend.ftruncate(self.ram_fd, size)
            if self.nic:
                self.backend.add_seals(self.ram_fd, SEALS)
            saved = None
        self.mapping = self.backend.map(self.ram_fd, self.size)
        # where guest memory lies in (emulated) RAM: for tools that prove zero copy
        self.extents = list(self.mapping.ranges)
        accel_obj = make_accel(accel, self.mapping.address, self.size)
        self.vm = Vm(accel_obj, self.mapping, self.size, duty)
        if saved is None:
            if self.nic:
                guest_nic.layout(self.mem, self.size, ring)
                self.nic.assign(self.ram_fd, self.size)
            else:
                guest.layout(self.mem, self.size)
            accel_obj.load(fresh())
        else:
            if self.nic:  # what the pause left in the ring, before the guest consumes it
                self.nic.snapshot(self.mem)
            self._resume_from(saved)
        self.vm.start()
        if self.nic and saved is not None:  # after the resume: the guest reads its ring in
            # memory, the device keeps writing it through the preserved IOMMU domain, neither
            # needs the VMM's files -- their retrieval is no part of the blackout
            self.nic.retrieve(self.client, self.ram_fd, self.size)
        if self.nic and (saved is None or not self.nic.found_running):
            self.nic.reinit(self.mem, lambda: self.vm.wait_exits(1))  # posts, then RX on
        if saved is not None:
            self._measure_blackout(saved)

    @property
    def mem(self) -> memoryview:
        return self.mapping.view

    # -- luod -----------------------------------------------------------------------------
    def _connect(self) -> LuodClient:
        return connect(self.name, backend=self.backend, on_prepare=self._prepare,
                       on_freeze=self._freeze, on_cancel=self._cancel)

    def _prepare(self, c: LuodClient) -> None:
        self.limited = True
        if self.state_fd < 0:
            self.state_fd = self.backend.memfd_create(f"vm-{self.name}-state")
            self.backend.ftruncate(self.state_fd, STATE_SIZE)
        c.preserve(self.ram_fd, RAM_TOKEN, self.ram_component)
        c.preserve(self.state_fd, STATE_TOKEN)
        if self.nic and self.plant != "no-device":  # planted: the device left behind
            self.nic.preserve(c)

    def _freeze(self, c: LuodClient) -> None:
        self.vm.pause()
        raw = self.state_bytes()
        m = self.backend.map(self.state_fd, STATE_SIZE)
        try:
            m.view[:STATE_SIZE] = raw
        finally:
            m.close()

    def state_bytes(self) -> bytes:
        """The paused VM's state as :data:`liveupdate.vmm.vmstate.VM_STATE` describes it:
        what freeze preserves and what a live migration sends last."""
        st = self.vm.accel.save()
        return vmstate.VM_STATE.encode({
            "vm": {"size": self.size, "accel": self.vm.accel.name,
                   "steps": guest.steps(self.mem), "tsc_hz": self.vm.timing.tsc_hz,
                   "last_exit_ns": self.vm.timing.last_exit_ns,
                   "last_exit_wall_ns": self.vm.timing.last_exit_wall_ns,
                   "paused_wall": time.time(),
                   "ring": guest.ring(self.mem)},
            "cpu0": st.to_json()}, STATE_SIZE)

    def _cancel(self, c: LuodClient, reason: str) -> None:
        self.limited = False
        self.vm.resume()

    # -- after the kexec ------------------------------------------------------------------
    def _read_state(self, fd: int) -> dict[str, Any]:
        """The state saved at freeze (:data:`liveupdate.vmm.vmstate.VM_STATE`): the VM's
        section with the vCPU's as ``cpu``."""
        m = self.backend.map(fd, STATE_SIZE)
        try:
            raw = bytes(m.view)
            self.state_ranges = list(m.ranges)
        finally:
            m.close()
        # kept open (the next update's state memfd): a checker reads the saved state there
        self.state_fd = fd
        try:
            sections = vmstate.VM_STATE.decode(raw)
            d = dict(sections["vm"])
            if self.size and d["size"] != self.size:
                raise ValueError(f"saved for a {d['size']}-byte guest")
            self.size = int(d["size"])
            d["cpu"] = CpuState.from_json(sections["cpu0"])
        except AbiError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"vm {self.name}: the saved vCPU "
                                  f"state is unusable: {e.message}") from e
        except ValueError as e:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"vm {self.name}: the saved vCPU "
                                  f"state is unusable: {e}") from e
        return d

    def _resume_from(self, saved: dict[str, Any]) -> None:
        st: CpuState = saved["cpu"]
        ahead = guest.steps(self.mem) - int(saved["steps"])
        if ahead:  # the guest ran after its state was saved: memory and vCPU disagree
            print(f"vmm {self.name}: memory is {ahead} steps ahead of the saved vCPU state",
                  flush=True)
        if self.vm.accel.tsc_settable:  # keep guest time in step with the wall clock
            passed = max(0.0, time.time() - float(saved["paused_wall"]))
            st.tsc += int(passed * float(saved["tsc_hz"]))
        # planted: a VMM that throws the saved vCPU state away and starts the vCPU afresh
        self.vm.accel.load(fresh() if self.plant == "cold-start" else st)
        self.restored_cpu = self.vm.accel.save()
        self.restored = saved
        self.restored_ns = time.monotonic_ns()  # memory mapped, vCPU loaded: a blackout part

    def _measure_blackout(self, saved: dict[str, Any]) -> None:
        self.vm.wait_exits(2)
        t = self.vm.timing
        before = saved["ring"]
        after = guest.ring(self.mem)
        # the guest's own view: its TSC from its last timestamp before the pause (taken at
        # its last exit) to its first after the resume (taken at its first exit, 4096 steps
        # after the resume), less those 4096 steps as the host timed them
        gap = next((after[i] - after[i - 1] for i in range(1, len(after))
                    if after[i - 1] == before[-1]), 0) if before else 0
        hz = float(saved["tsc_hz"])
        paused = int(saved["last_exit_ns"])
        # a version 1 record has no REALTIME of the exit: its freeze time is a little later
        paused_wall = int(saved.get("last_exit_wall_ns", float(saved["paused_wall"]) * 1e9))
        first_steps = (t.first_exit_ns - t.first_entry_ns) / 1e9
        t.blackout = {
            "host_s": (t.first_entry_wall_ns - paused_wall) / 1e9,
            "guest_s": gap / hz - first_steps if hz and gap else None,
            "paused_ns": paused, "resumed_ns": t.first_entry_ns,
            "started_ns": self.started, "restored_ns": self.restored_ns,
            "paused_wall_ns": paused_wall, "resumed_wall_ns": t.first_entry_wall_ns,
            "tsc": "restored" if self.vm.accel.tsc_settable else "host",
            "steps_before": saved["steps"], "steps_after": guest.steps(self.mem)}
        if not self.incoming:  # a migrated VM took no part in an update of this host
            self.client.done()

    # -- control --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        words = memoryview(self.mem).cast("B")
        steps = int.from_bytes(bytes(words[guest.STATE_AT : guest.STATE_AT + 8]), "little")
        return {"name": self.name, "accel": self.vm.accel.name, "memory": self.size,
                "limited": self.limited, "paused": self.vm.paused, "steps": steps,
                "exits": self.vm.timing.exits,
                "restored": self.restored is not None, "blackout": self.vm.timing.blackout,
                "pid": os.getpid(), "extents": len(self.extents),
                **({"nic": self.nic.status(self.mem)} if self.nic else {})}

    def host_phys(self, gpa: int) -> int:
        """Where guest-physical ``gpa`` lies in the (emulated) machine's RAM."""
        off = guest.file_offset(gpa)
        for phys, n in self.extents:
            if off is None:
                break
            if 0 <= off < n:
                return phys + off
            off -= n
        raise LiveUpdateError(err=errno.EINVAL, msg=f"guest address {gpa:#x} is not RAM of "
                              "this (emulated) machine")

    @property
    def handlers(self) -> service.Handlers:
        """The control socket's requests (see the module docstring)."""
        return {"status": lambda msg: self.status(),
                "phys": self._phys, "resize": self._resize, "where": self.where,
                "pause": lambda msg: self._pause(), "resume": lambda msg: self._resume(),
                "verify": lambda msg: self.verify()}

    def where(self, msg: dict[str, Any] | None = None) -> dict[str, Any]:
        """Where guest memory and the saved vCPU state lie in RAM, and the vCPU registers as
        the accelerator held them right after the restore: what an outside checker needs to
        judge the VM from RAM itself (:mod:`liveupdate.scenario.guestcheck`). ``fds`` names
        the VMM's guest-memory and state memfds: a real kernel shows userspace no physical
        extents (``ram`` and ``state`` are empty there), so a checker with the rights to
        open ``/proc/<pid>/fd/<n>`` maps the files themselves. A request (``msg``) gets
        :data:`WHERE_PIECE` RAM extents from index ``from`` and their total
        (:func:`liveupdate.vmm.where.where` asks for all); the VMM's own call, all."""
        cpu = self.restored_cpu
        first = framing.field(msg, "from", int) if msg and "from" in msg else 0
        if first < 0:
            raise LiveUpdateError(err=errno.EINVAL, msg="where: 'from' is an extent index")
        ram = self.extents[first : first + WHERE_PIECE] if msg is not None else self.extents
        return {"size": self.size, "ram": ram,
                "ram_from": first, "ram_total": len(self.extents), "state": self.state_ranges,
                "fds": {"ram": self.ram_fd, "state": self.state_fd},
                "restored_cpu": cpu.to_json() if cpu is not None else None}

    def _hold(self) -> bool:
        """Pause at the guest's next exit; whether it was already held (frozen for an
        update: a checker must not resume it)."""
        held = self.vm.want_pause
        self.vm.pause()
        return held

    def _pause(self) -> dict[str, Any]:
        return {"held": self._hold()}

    def verify(self) -> dict[str, Any]:
        """The checker's verdict (:func:`liveupdate.vmm.verdict.judge`) on this VMM's own
        mapping of guest memory and its own preserved state memfd, the vCPU paused at an
        exit between guest runs for the check (and resumed unless it was held): how a VM is
        judged on a real host, where there is no machine RAM to map from outside."""
        saved = None
        if self.restored_cpu is not None and self.state_fd >= 0:
            m = self.backend.map(self.state_fd, STATE_SIZE)
            try:
                saved = bytes(m.view[:STATE_SIZE])
            finally:
                m.close()
        v = verdict.judge(self.where(), saved, lambda: contextlib.nullcontext(self.mem),
                          self._hold, self.vm.resume)
        return {**dataclasses.asdict(v), "checked_by": "vmm"}

    def _resume(self) -> dict[str, Any]:
        self.vm.resume()
        return {}

    def _phys(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"hpa": self.host_phys(framing.field(msg, "gpa", int))}

    def _resize(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.limited:
            raise LiveUpdateError(err=errno.EBUSY, msg="limited mode: a live update is "
                                  "under way; no memory resize")
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="memory resize is not emulated")
