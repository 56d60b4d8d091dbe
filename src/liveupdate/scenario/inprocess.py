"""An in-process kernel on real RAM (a memfd), booted by the real firmware layout.

:meth:`Rig.kexec` finalizes KHO as the KHO selftest's init does (where the kernel has the
debugfs file), then runs the reboot path's steps (``reboot.prepare_jump``: the same ordered
list the kernel process runs) and boots a second Kernel object on the same RAM from the boot
parameters kexec_file_load wrote -- the handover still crosses only through RAM. A kernel
that panics raises :class:`liveupdate.kernel.power.Halted`. Tests and
:mod:`liveupdate.scenario.generations` use it; the process-replacing machine is
:mod:`liveupdate.machine`.
"""

from __future__ import annotations

from liveupdate.abi import image
from liveupdate.kernel import boot, debugfs, kexec, reboot
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.kexec import Loaded
from liveupdate.machine import firmware
from liveupdate.machine.ram import Ram

GiB = 1 << 30


class Rig:
    def __init__(self, memory: int = GiB) -> None:
        self.ram = Ram(memory)
        self.kernels: list[Kernel] = []

    def boot(self, cmdline: str = "kho=on", img: image.KernelImage | None = None) -> Kernel:
        raw = (img or image.KernelImage()).encode()
        bp = firmware.cold_boot(self.ram, raw, cmdline)
        return self.start(bp)

    def start(self, bp: int) -> Kernel:
        """A kernel booting from boot params ``bp`` on the RAM as it is (after a :meth:`jump`,
        as the jump left it)."""
        k = Kernel(self.ram.fd, link=None)  # type: ignore[arg-type]  # no machine: Halted
        self.kernels.append(k)
        boot.start_kernel(k, bp)
        return k

    def jump(self, k: Kernel, cmdline: str | None = None,
             img: image.KernelImage | None = None, *, finalize: bool = True) -> Loaded:
        """The KHO selftest's init up to the jump: finalize (where the kernel has the file),
        load, the reboot path. RAM then holds the handover as the next kernel finds it."""
        if finalize and k.kho_out is not None and k.kho_out.core.has_finalize_file \
                and not k.kho_out.finalized:
            debugfs.write(k, "out/finalize", b"1\0")
        kexec.file_load(k, (img or image.KernelImage()).encode(),
                        k.cmdline.raw if cmdline is None else cmdline)
        return reboot.prepare_jump(k)

    def kexec(self, k: Kernel, cmdline: str | None = None,
              img: image.KernelImage | None = None, *, finalize: bool = True) -> Kernel:
        """:meth:`jump`, then the next kernel boots on the same RAM."""
        loaded = self.jump(k, cmdline, img, finalize=finalize)
        k.ram.close()
        return self.start(loaded.boot_params)

    def close(self) -> None:
        for k in self.kernels:
            if not k.ram.closed:
                k.ram.close()
        self.ram.close()
