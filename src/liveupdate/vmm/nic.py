"""A NIC assigned to a VM (issue #25): VFIO and iommufd as a VMM drives them, through the
client library only (so the same code runs on a real kernel).

Fresh start: the guest's memory memfd (sealed: ``F_SEAL_SEAL | F_SEAL_GROW | F_SEAL_SHRINK``,
what the posted iommufd preserve requires) mapped into an IOAS at IOVA 0 -- the device
address of a guest buffer is its guest-physical address --; the device bound to the iommufd,
a paging HWPT allocated for it and attached, and marked for preservation where the kernel
has the posted command. Once the guest has posted its buffers (its first exit) the VMM turns
the device on: memory space and bus mastering in config space, the ring's guest-physical
address and size in BAR0, receive on -- what the guest's driver would do through the
registers the VMM emulates for it; the guest itself posts and consumes buffers
(:mod:`liveupdate.vmm.guest_nic`).

Live update: ``prepare`` preserves the iommufd (token 3) and the device (token 4) after the
guest memory; after the kexec the VMM retrieves both, binds the device to the retrieved
iommufd and attaches its HWPT 1 (the preserved page table). If the device still receives
(``continuous`` mode) nothing else is done: the guest finds what arrived during the pause in
its ring. If it was reset (the posted series' freeze), the VM is told: the guest is asked to
post its buffers again, and the device is turned on anew once it has.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from liveupdate.client.backends import Backend
from liveupdate.client.devices import Iommufd, VfioDevice
from liveupdate.client.luod import LuodClient
from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import guest, guest_nic

IOMMUFD_TOKEN, DEVICE_TOKEN, HWPT_TOKEN = 3, 4, 0x1D
SEALS = 0x1 | 0x2 | 0x4
PCI_COMMAND, MEMORY_MASTER, MASTER = 0x04, 0x6, 0x4
REGS = {"CTRL": 0x00, "RING_LO": 0x08, "RING_HI": 0x0C, "RING_SIZE": 0x10, "HEAD": 0x14,
        "DELIVERED": 0x18, "DROPS": 0x1C, "DMA_ERRORS": 0x20}


class Assigned:
    def __init__(self, backend: Backend, path: str, entries: int) -> None:
        self.backend, self.path, self.entries = backend, path, entries
        self.iommufd: Iommufd | None = None
        self.dev: VfioDevice | None = None
        self.found_running: bool | None = None  # after a live update: continuous or reset
        self.blackout: dict[str, Any] = {}  # what the pause left in the ring (see retrieve)
        self.lost = ""  # after a live update: what did not cross, as the VM was told

    def assign(self, ram_fd: int, size: int) -> None:
        self._assign_to(VfioDevice(self.backend, self.path), ram_fd, size)

    def _assign_to(self, dev: VfioDevice, ram_fd: int, size: int) -> None:
        self.dev = dev
        self.iommufd = Iommufd(self.backend)
        ioas = self.iommufd.ioas_alloc()
        for gpa, offset, length in guest.regions(size):  # IOVA = guest-physical, as QEMU's
            self.iommufd.map_file(ioas, ram_fd, offset, length, iova=gpa)
        hwpt = self.iommufd.hwpt_alloc(self.dev.bind(self.iommufd.fd), ioas)
        self.dev.attach(hwpt)
        try:
            self.iommufd.mark_preserve(hwpt, HWPT_TOKEN)
        except LiveUpdateError as e:
            if e.errno != errno.ENOTTY:  # a kernel without the posted series: no preserve
                raise

    def start(self, mem: memoryview) -> None:
        """Turn the device on (the guest has posted its ring). The drops it counted until
        now (packets arriving before receive was on) are kept in the guest's state page,
        which crosses the update with the guest."""
        dev = self._dev()
        dev.config_write(PCI_COMMAND, 2, dev.config_read(PCI_COMMAND, 2) | MEMORY_MASTER)
        for reg, value in (("RING_LO", guest_nic.RING_AT), ("RING_HI", 0),
                           ("RING_SIZE", self.entries), ("CTRL", 1)):
            dev.bar_write(REGS[reg], value)
        guest_nic.put(mem, "drops_before_rx", dev.bar_read(REGS["DROPS"]))

    def preserve(self, c: LuodClient) -> None:
        assert self.iommufd is not None
        c.preserve(self.iommufd.fd, IOMMUFD_TOKEN, "iommufd")
        c.preserve(self._dev().fd, DEVICE_TOKEN, "vfio")

    def snapshot(self, mem: memoryview) -> None:
        """The vCPU not yet running: what arrived while the guest was paused, the packets
        waiting in its ring (sequence number and the source's send time each), after the
        last it consumed."""
        self.blackout = {"last_seq_at_pause": guest_nic.counters(mem)["last_seq"],
                         "waiting": guest_nic.waiting(mem)}

    def retrieve(self, c: LuodClient, ram_fd: int, size: int) -> None:
        """The preserved files back; the device bound and attached to the preserved page
        table; whether it kept running through the update.

        A file that did not cross (not preserved, or its handler refused it: an IOMMU
        domain the next kernel blocked) is what the VM is told about (``lost``): the device
        is assigned afresh -- its cdev opened if the device file is gone, a new IOAS over
        the same guest memory -- and re-initialized like a reset one."""
        fds: dict[int, int] = {}
        lost = []
        for token in (IOMMUFD_TOKEN, DEVICE_TOKEN):
            try:
                fds[token] = c.retrieve(token)
            except LiveUpdateError as e:
                lost.append(f"token {token}: {e.message} [{e.errno_name}]")
        self.dev = VfioDevice(self.backend, self.path, fd=fds.get(DEVICE_TOKEN))
        if lost:
            self.lost = "; ".join(lost)
            if IOMMUFD_TOKEN in fds:
                Iommufd(self.backend, fd=fds[IOMMUFD_TOKEN]).close()
            self._assign_to(self.dev, ram_fd, size)
            self.found_running = False
            return
        self.iommufd = Iommufd(self.backend, fd=fds[IOMMUFD_TOKEN])
        self.dev.bind(self.iommufd.fd)
        self.dev.attach(1)
        command = self.dev.config_read(PCI_COMMAND, 2)
        self.found_running = bool(command & MASTER) and bool(
            self.dev.bar_read(REGS["CTRL"]) & 1)

    def reinit(self, mem: memoryview, wait_exit: Callable[[], None]) -> None:
        """After a reset: the guest reposts its buffers (told through its memory), then the
        device is turned on again.

        Receive goes off first, as e1000e's ``e1000_configure_rx`` clears ``RCTL.EN`` before
        it reprograms the ring: a device that crossed the update still receiving (its
        iommufd lost, reassigned) would write descriptors the guest is reposting, and each
        ring register :meth:`start` writes moves ``HEAD`` back to 0 -- behind a guest that
        already consumed descriptor 0, which the device then finds done forever and drops
        every packet at (seen: HEAD 0, the guest waiting at descriptor 2)."""
        self._dev().bar_write(REGS["CTRL"], 0)
        guest_nic.ask_repost(mem)
        while guest_nic.counters(mem)["repost"]:
            wait_exit()
        self.start(mem)

    def _dev(self) -> VfioDevice:
        if self.dev is None:
            raise LiveUpdateError(err=errno.ENODEV, msg="no device assigned")
        return self.dev

    def status(self, mem: memoryview) -> dict[str, Any]:
        dev = self._dev()
        regs = {name.lower(): dev.bar_read(off) for name, off in REGS.items()
                if name in ("HEAD", "DELIVERED", "DROPS", "DMA_ERRORS")}
        c = guest_nic.counters(mem)
        return {"guest": c, "device": regs, "drops": regs["drops"] - c["drops_before_rx"],
                "found_running": self.found_running, "blackout": self.blackout,
                "lost": self.lost}
