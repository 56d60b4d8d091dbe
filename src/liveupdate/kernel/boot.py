"""Boot: from the machine's "go" (RAM + the boot parameters' address) to a running userspace.

Cold boot and KHO boot share this path; only the boot parameters differ. The order follows
Linux: setup_arch (e820 -> memblock, command line, image and setup_data reservations,
``kho_populate``), on the 7.3 core ``kho_extend_scratch`` (:mod:`.kho.extend_scratch`), early
allocations (the memmap, ``reserve_mem``) -- from scratch only on a KHO boot -- then
``kho_memory_init`` (reserve preserved memory, or size and reserve fresh scratch on a cold
boot), ``memblock_free_all`` (scratch-only ends; free memory goes to the
buddy allocator, scratch stays apart for kexec segments), ``kho_init`` (the new live root
FDT), test components (module_init), ``reserve_mem``'s preservation (late_initcall), and init.

If the handover does not validate, the console says why and "disabling KHO revival: -errno"
(as upstream ``kho_populate``), and the boot continues as a cold boot using nothing the
previous kernel left.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from liveupdate.abi import bootparams, image, kho_memmap
from liveupdate.abi import kexec_metadata as kexec_md
from liveupdate.abi.cmdline import Cmdline
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel import confine, initcalls, negotiate, scratch_sizing, testmods, vfio
from liveupdate.kernel.drivers import iommu_flb, pci
from liveupdate.kernel.fs import hugetlb_luo
from liveupdate.kernel.generation import Generation
from liveupdate.kernel.kho.extend_scratch import extend_scratch
from liveupdate.kernel.kho.incoming import KhoIn
from liveupdate.kernel.kho.outgoing import KhoOut
from liveupdate.kernel.kho.validate import validate_handover
from liveupdate.kernel.luo import boot as luo_boot
from liveupdate.kernel.mm import hugetlb, reserve_mem
from liveupdate.kernel.mm.memblock import (
    MEMBLOCK_RSRV_KERN,
    MEMBLOCK_RSRV_NOINIT,
)
from liveupdate.kernel.mm.pages import MEMMAP_BYTES_PER_PAGE

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

LOW_MEMORY = 1 << 20


def setup_arch(k: Kernel, bp_phys: int) -> bootparams.KhoData | None:
    try:
        bp = bootparams.BootParams.decode(k.mem.read(bp_phys, PAGE_SIZE, "boot params"))
        k.mem = PhysMem(k.ram, ranges=bp.ram_ranges())
        k.cmdline = Cmdline.parse(bp.read_cmdline(k.mem), warn=k.printk)
        k.image = image.decode(k.mem.read(bp.kernel_addr, PAGE_SIZE, "kernel image"))
        k.gen = Generation.of(k.image)
        chain = bootparams.read_setup_chain(k.mem, bp.setup_data)
    except AbiError as e:
        k.panic(f"invalid boot parameters: {e}")
    k.boot_params = bp
    k.printk(f"Linux version {k.image.release} (liveupdate emulated kernel, "
             f"KHO {k.image.kho}/{k.image.kho_bitmap_bytes} on the {k.image.kho_core} core, "
             f"LUO {k.image.luo})")
    k.printk(f"Command line: {k.cmdline.raw}")
    for start, size in k.mem.ranges:
        k.memblock.add(start, size)
        k.printk(f"BIOS-e820: [mem {start:#018x}-{start + size - 1:#018x}] usable")
    k.memblock.reserve(0, LOW_MEMORY)  # firmware and real-mode area, as on x86
    k.memblock.reserve(bp.kernel_addr, k.image.load_size, MEMBLOCK_RSRV_KERN)
    k.memblock.reserve(bp_phys, PAGE_SIZE)
    if bp.cmd_line_ptr:
        k.memblock.reserve(bp.cmd_line_ptr, len(k.cmdline.raw) + 1)
    for node in chain:
        k.memblock.reserve(node.phys, bootparams.SETUP_HDR_SIZE + len(node.data))
    k.disk_dir = k.cmdline.get("lu.disk")
    k.kho_enabled = k.cmdline.flag("kho")
    for node in chain:
        if node.type == bootparams.SETUP_KEXEC_KHO:
            try:
                return bootparams.decode_kho_setup_data(node)
            except AbiError as e:
                k.printk(f"KHO: setup: {e.message}")
                k.printk(f"KHO: disabling KHO revival: {-e.errno}")
    return None


def kho_populate(k: Kernel, kd: bootparams.KhoData) -> KhoIn | None:
    try:
        kin = validate_handover(k, kd, negotiate.code_reads(k)["kho"], k.gen.kho)
    except AbiError as e:
        k.printk(f"KHO: setup: {e.message}")
        k.printk(f"KHO: disabling KHO revival: {-e.errno}")
        return None
    for a, s in bootparams.scratch_areas(kin.scratch):
        k.memblock.mark_kho_scratch(a, s)
    k.memblock.reserve(kin.scratch_phys, kin.scratch_len)
    k.memblock.scratch_only = True
    k.printk("KHO: found kexec handover data.")
    return kin


def kho_memory_init(k: Kernel) -> np.ndarray | None:
    """Reserve preserved memory (KHO boot) or fresh scratch (cold boot, kho=on). On the 7.3
    core a kdump kernel (``elfcorehdr=`` given: ``is_kdump_kernel``) turns KHO off first, and
    the handover it was given is neither reserved nor read (7.3.4 ``kho_memory_init``)."""
    if k.gen.kho.off_in_kdump and "elfcorehdr" in k.cmdline.params:
        k.kho_enabled, k.kho_in = False, None
        k.printk("KHO: disabled in the kdump kernel")
        return None
    kin = k.kho_in
    if kin is not None:
        ranges = kho_memmap.merged_ranges(kin.preserved.phys, kin.preserved.order)
        k.memblock.reserve_many(ranges[:, 0], ranges[:, 1], MEMBLOCK_RSRV_NOINIT)
        k.meta.mark_kho_preserved(kin.preserved.phys, kin.preserved.order)
        k.printk(f"KHO: reserved {kin.preserved.pages()} preserved pages in "
                 f"{len(ranges)} ranges")
        return kin.scratch
    if k.kho_enabled:
        return scratch_sizing.reserve(k)
    return None


def memblock_free_all(k: Kernel, scratch: np.ndarray | None) -> None:
    """Free memory to the buddy allocator; scratch stays out of it (Linux makes it
    MIGRATE_CMA, which only movable allocations and kexec segments use)."""
    k.memblock.scratch_only = False
    areas = [] if scratch is None else [(a, s) for a, s in bootparams.scratch_areas(scratch)
                                        if s]
    pages: list[tuple[int, int]] = []

    def give(lo: int, hi: int) -> None:  # whole free pages only: a partly reserved one stays
        first, last = -(-lo // PAGE_SIZE), hi >> PAGE_SHIFT
        if first < last:
            pages.append((first, last))

    for start, end in k.memblock.free_ranges():
        cur = start
        for a, s in sorted(areas):
            if a + s <= cur or a >= end:
                continue
            give(cur, a)
            cur = max(cur, a + s)
        give(cur, end)
    k.buddy.free_ranges(pages)  # in address order: what boot allocates next walks upwards


def kexec_metadata(k: Kernel) -> None:
    """kho-v3+ ``kho_init``: say which kernel kexec'd us (``KHO: exec from: ...``) and add
    our record with the count one higher (:mod:`abi.kexec_metadata`).

    The 7.3 core keeps the previous kernel's page for its whole life, as Linux 7.3.4
    (``kho_in_kexec_metadata`` copies what it needs and never frees the page): not a leak
    across kexecs, since nobody preserves it again (tests/kernel/test_luo_incoming_pages_73.py).
    Older cores, as modelled before 7.3 was read, give it back here at boot."""
    kout, kin = k.kho_out, k.kho_in
    if kout is None or not kout.core.records_kexec_metadata:
        return
    count = 0
    size = None if kin is None else kin.root.size(kexec_md.NODE)
    if kin is not None and size is not None:
        phys = kin.retrieve_subtree(kexec_md.NODE)
        try:
            md = kexec_md.decode(k.mem.read(phys, min(size, PAGE_SIZE), "kexec-metadata"))
            k.printk(f"KHO: exec from: {md.previous_release} (count {md.kexec_count})")
            count = md.kexec_count
        except AbiError as e:
            k.printk(f"KHO: kexec-metadata: {e.message}")
        if not kout.core.keeps_kexec_metadata:
            kin.restore_free(phys)
    blob = kexec_md.encode(kexec_md.KexecMetadata(k.image.release, count + 1))
    kout.add_subtree(kexec_md.NODE, kout.store(blob), len(blob))


def start_kernel(k: Kernel, bp_phys: int) -> None:
    kd = setup_arch(k, bp_phys)
    confine.declare(k)  # what the command line lets this kernel and its userspace touch
    if kd is not None:
        k.kho_in = kho_populate(k, kd)
    if k.kho_in is not None and k.gen.kho.extends_scratch:  # kho_memory_init_early
        extend_scratch(k.memblock, k.kho_in.preserved)
    try:
        k.memblock.alloc(-(-k.meta.nr_pages * MEMMAP_BYTES_PER_PAGE // PAGE_SIZE) * PAGE_SIZE,
                         PAGE_SIZE)
    except LiveUpdateError as e:
        k.panic(f"cannot allocate the memmap: {e.message}")
    reserve_mem.init(k)
    scratch = kho_memory_init(k)
    testmods.run(k, "early")
    huge_in = hugetlb_luo.incoming_counts(k)  # the RFC's early FLB read
    hugetlb.bootmem_alloc(k, huge_in)  # gigantic pages: memblock, outside scratch
    memblock_free_all(k, scratch)
    in_scratch = 0 if scratch is None else int(scratch["size"].sum())
    k.printk(f"Memory: {k.buddy.nr_free << 2}K available, {in_scratch >> 20}M in KHO scratch")
    if k.kho_enabled and scratch is not None:
        k.kho_out = KhoOut(k, scratch, k.image.kho_bitmap_bytes, k.gen.kho,
                           k.image.kho)
        k.printk(f"KHO: root FDT at {k.kho_out.root_phys:#x}")
        kexec_metadata(k)
    elif k.kho_enabled:
        k.kho_enabled = False
    k.negotiated_in = negotiate.incoming(k)
    hugetlb.init(k, huge_in)  # subsys_initcall: the other pools from the buddy
    initcalls.run()
    testmods.run(k, "device")  # device_initcall: before LUO's late_initcall
    luo_boot.init(k)  # before the devices: their drivers read incoming FLBs at init
    hugetlb_luo.register_flb(k)
    pci.enumerate_bus(k)  # subsys_initcall time
    iommu_flb.init(k)  # intel_iommu_init: a new root table, or the preserved one taken over
    vfio.init(k)  # /dev/iommu, vfio-pci's cdevs, the devices' LUO handlers' FLBs
    run_dir = confine.run_dir(k)
    if run_dir:
        try:
            os.makedirs(run_dir, exist_ok=True)
            k.run_dir = run_dir
        except OSError as e:  # the machine's folder: without it, no runtime folder
            k.printk(f"lu.run={os.path.dirname(run_dir)}: {e.strerror}")
    testmods.run(k, "late")  # module_init: before memblock's late_initcall below
    reserve_mem.preserve(k)
    k.reboot_notifiers = [m.reboot_notifier for m in testmods.enabled(k)
                          if hasattr(m, "reboot_notifier")]
