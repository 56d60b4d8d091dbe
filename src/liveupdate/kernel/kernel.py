"""The running kernel's state: RAM, memory management, KHO, kexec, userspace.

One :class:`Kernel` per boot. It owns the RAM mapping the machine handed over and provides
the small memory-management interface KHO, kexec and the test components use.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from liveupdate.abi.bootparams import BootParams
from liveupdate.abi.cmdline import Cmdline
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.image import KernelImage
from liveupdate.abi.negotiation import Record
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import power
from liveupdate.kernel.drivers.iommu import Tables
from liveupdate.kernel.fs.file import File, FileTable
from liveupdate.kernel.fs.memfd import THP_MODES, Memfd
from liveupdate.kernel.generation import Generation
from liveupdate.kernel.kho.incoming import KhoIn
from liveupdate.kernel.kho.outgoing import KhoOut
from liveupdate.kernel.link import Link
from liveupdate.kernel.mm.buddy import Buddy
from liveupdate.kernel.mm.memblock import Memblock
from liveupdate.kernel.mm.pages import PageMeta
from liveupdate.kernel.syscalls.process import Userspace

if TYPE_CHECKING:
    from liveupdate.kernel.confine import Early
    from liveupdate.kernel.kexec import Loaded
    from liveupdate.kernel.luo.session import LuoSessions
    from liveupdate.kernel.luo.v3 import LuoV3
    from liveupdate.kernel.mm.hugetlb import Hugetlb
    from liveupdate.kernel.vfio.pci import VfioPciDevice


class Kernel:
    def __init__(self, ram_fd: int, link: Link, meta: PageMeta | None = None) -> None:
        """``meta``: page metadata prepared while this kernel waited (PageMeta.populated),
        of the RAM's size; else made here."""
        self.ram_fd = ram_fd
        self.ram_size = os.fstat(ram_fd).st_size
        self.ram = mmap.mmap(ram_fd, self.ram_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.link = link
        self.early: Early | None = None  # confined before "go" (kernel/confine.py)
        self.lock = threading.RLock()  # the big kernel lock: syscalls and link requests
        self.mem = PhysMem(self.ram)
        self.memblock = Memblock()
        nr_pages = self.ram_size >> PAGE_SHIFT
        if meta is None or meta.nr_pages != nr_pages:
            meta = PageMeta(nr_pages)
        self.meta = meta
        self.buddy = Buddy(self.meta)
        self.cmdline = Cmdline.parse("")
        self.image = KernelImage()
        self.gen = Generation.of(self.image)  # the boot's generation, from its image
        self.kernel_addr = 0
        self.boot_params = BootParams()
        self.kho_enabled = False
        self.kho_out: KhoOut | None = None
        self.kho_in: KhoIn | None = None
        self.reserve_mem: list[dict[str, object]] = []
        self.userspace: Userspace | None = None
        self.kexec_image: Loaded | None = None
        self.reboot_notifiers: list[Callable[[Kernel], None]] = []
        # named places where test components inject faults (testmods/power_loss.py)
        self.fault_points: dict[str, list[Callable[[Kernel], None]]] = {}
        self.files = FileTable(self.printk)
        self.luo: LuoV3 | LuoSessions | None = None
        self.negotiated_in: Record | None = None  # the previous kernel's lu-negotiation
        self.next_ino = 1
        self.boot_id = os.urandom(4).hex()
        self.run_dir = ""
        self.disk_dir = ""
        self.pci: list[int] = []  # the PCI functions enumerated at boot (requester ids)
        self.iommu: Tables | None = None  # the IOMMU driver's tables (intel_iommu=on)
        self.hugetlb: Hugetlb | None = None  # hstates and their pools (mm/hugetlb.py)
        self.chrdevs: dict[str, Callable[[], File]] = {}  # device nodes of drivers, by path
        self.vfio: list[VfioPciDevice] = []  # the functions vfio-pci claimed
        self.said_settled = False  # told the machine: the previous update is over (say_settled)

    def fault_point(self, name: str) -> None:
        for hook in self.fault_points.get(name, ()):
            hook(self)

    def say_settled(self) -> None:
        """Tell the machine, once per boot, that the previous kernel's live update is over
        here: LUO FINISH (v3), the last incoming session released (sessions), or nothing
        came in. The machine then ends the previous kernel's userspace, which it kept
        stopped (:mod:`liveupdate.machine.orphans`). No Linux counterpart: a real kexec
        leaves no old process behind."""
        if self.said_settled:
            return
        self.said_settled = True
        if self.link is None:  # an in-process kernel (the test rig): no machine
            return
        with contextlib.suppress(OSError):  # the machine is gone: nothing is left to end
            self.link.send({"op": "settled"})

    # -- console --------------------------------------------------------------------------
    def printk(self, msg: str) -> None:
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()

    def panic(self, reason: str) -> NoReturn:
        power.panic(self, reason)

    # -- MmOps for KHO --------------------------------------------------------------------
    def alloc_pages(self, order: int) -> int:
        return self.buddy.alloc(order) << PAGE_SHIFT

    def free_pages(self, phys: int, order: int) -> None:
        self.buddy.free(phys >> PAGE_SHIFT, order)

    def write(self, phys: int, data: bytes) -> None:
        self.mem.check(phys, len(data), "kernel write")
        self.ram[phys : phys + len(data)] = data

    def zero(self, phys: int, size: int) -> None:
        # Zeroing by punching keeps untouched RAM free on the host.
        if phys % PAGE_SIZE == 0 and size % PAGE_SIZE == 0:
            self.ram.madvise(mmap.MADV_REMOVE, phys, size)
        else:
            self.write(phys, bytes(size))

    def read(self, phys: int, size: int) -> bytes:
        return self.mem.read(phys, size)

    def new_memfd(self, name: str) -> Memfd:
        thp = self.cmdline.get("transparent_hugepage_shmem", "within_size")
        m = Memfd(self, name, self.next_ino, thp if thp in THP_MODES else "within_size")
        self.next_ino += 1
        return m

    def is_kho_boot(self) -> bool:
        return self.kho_in is not None

    def require_userspace(self) -> Userspace:
        assert self.userspace is not None, "userspace starts before any syscall"
        return self.userspace

    def require_kho(self) -> KhoOut:
        if self.kho_out is None:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="KHO is disabled (boot with kho=on)")
        return self.kho_out
