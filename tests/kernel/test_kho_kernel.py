"""KHO on an in-process kernel: the API's errors, scratch sizing, and restore checks across a
kexec whose handover crosses only through RAM."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from liveupdate.abi import bootparams, image, kexec_metadata
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import debugfs, kexec
from tests.kernel.conftest import Rig

MiB = 1 << 20


def scratch_sizes(k) -> list[int]:  # type: ignore[no-untyped-def]
    return k.require_kho().scratch["size"].tolist()


def test_cold_boot_scratch_is_200_percent_of_kernel_reservations(
        rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    k = rig.boot()
    # image load size 32 MiB + memmap (64 B per 4 KiB page of 1 GiB = 16 MiB) = 48 MiB
    assert k.memblock.reserved_kern() == 48 * MiB
    # lowmem, global, pernode: all of it is below 4 GiB, so global = 96M - 96M = 0 -- and
    # still allocated (kho_reserve_scratch always fills nodes + 2 entries)
    assert scratch_sizes(k) == [96 * MiB, 0, 96 * MiB]
    assert k.require_kho().scratch["addr"][1] != 0  # memblock_phys_alloc(0) finds an address
    assert k.kho_in is None and k.kho_out is not None
    # "scratch scale" / "scratch areas" come from the option's parser: not given, not printed
    assert "scratch scale" not in capsys.readouterr().out


def test_reserve_mem_counts_as_a_kernel_reservation(rig: Rig) -> None:
    """reserve_mem allocates through memblock_alloc (MEMBLOCK_RSRV_KERN) before
    kho_reserve_scratch sizes scratch, so it is part of the 200%."""
    k = rig.boot("kho=on reserve_mem=8M:4096:trace")
    assert k.memblock.reserved_kern() == 56 * MiB
    assert scratch_sizes(k) == [112 * MiB, 0, 112 * MiB]


# Derived from upstream scratch_size_update / scratch_size_node with 48 MiB of kernel
# reservations below 4 GiB: scale mode rounds all three (global wraps to 0); explicit sizes
# round the per-node size only.
@pytest.mark.parametrize("param, sizes, said", [
    ("kho_scratch=50%", [24 * MiB, 0, 24 * MiB], "KHO: scratch scale is 50%"),
    ("kho_scratch=150%", [72 * MiB, 0, 72 * MiB], "KHO: scratch scale is 150%"),
    ("kho_scratch=16M,32M,8M", [16 * MiB, 32 * MiB, 8 * MiB],
     "KHO: scratch areas: lowmem: 16MiB global: 32MiB pernode: 8MiB"),
    ("kho_scratch=3M,1M,3M", [3 * MiB, 1 * MiB, 4 * MiB],
     "KHO: scratch areas: lowmem: 3MiB global: 1MiB pernode: 3MiB"),
    ("kho_scratch=bogus", [96 * MiB, 0, 96 * MiB], "Malformed early option 'kho_scratch'"),
])
def test_kho_scratch_parameter(param: str, sizes: list[int], said: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    r = Rig()
    try:
        k = r.boot(f"kho=on {param}")
        assert scratch_sizes(k) == sizes
        assert said in capsys.readouterr().out.splitlines()
    finally:
        r.close()


# 7.3.4's scratch_size_update / scratch_size_node: 4 MiB (SCRATCH_ALIGNMENT_BYTES) for the
# rounding and the allocations, explicit sizes rounded too. 48 MiB of kernel reservations.
@pytest.mark.parametrize("param, sizes", [
    ("", [96 * MiB, 0, 96 * MiB]),
    ("kho_scratch=3M,1M,3M", [4 * MiB, 4 * MiB, 4 * MiB]),
    ("kho_scratch=1M,3M,5M", [4 * MiB, 4 * MiB, 8 * MiB]),
    ("kho_scratch=3%", [4 * MiB, 0, 4 * MiB]),  # 1.44 MiB each: 7.2 rounds to 2 MiB
])
def test_kho_scratch_on_7_3_is_4_mib_aligned(param: str, sizes: list[int]) -> None:
    r = Rig()
    try:
        k = r.boot(f"kho=on {param}", image.KernelImage.of("7.3"))
        assert scratch_sizes(k) == sizes
        assert all(int(a) % (4 * MiB) == 0 for a in k.require_kho().scratch["addr"])
        # the same switches on 7.2's core: 2 MiB rounding, explicit sizes as given
        old = Rig()
        try:
            k72 = old.boot(f"kho=on {param}", image.KernelImage.of("7.2"))
            assert scratch_sizes(k72) != sizes or param == ""
        finally:
            old.close()
    finally:
        r.close()


@pytest.mark.parametrize("gen, kho", [("7.3", False), ("7.2", True)])
def test_a_kdump_kernel_has_no_kho_on_7_3(gen: str, kho: bool,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """7.3.4's kho_memory_init: is_kdump_kernel() (elfcorehdr= given) turns KHO off, and
    LUO with it; the 7.1 core of 7.2 knows no such rule."""
    r = Rig()
    try:
        k = r.boot("kho=on liveupdate=on elfcorehdr=0x1000000", image.KernelImage.of(gen))
        assert (k.kho_out is not None) is kho and (k.luo is not None) is kho
        assert ("KHO: disabled in the kdump kernel" in capsys.readouterr().out) is not kho
    finally:
        r.close()


def test_a_kdump_kernel_ignores_the_handover_it_was_given(
        capsys: pytest.CaptureFixture[str]) -> None:
    r = Rig()
    try:
        img = image.KernelImage.of("7.3")
        k = r.boot("kho=on test_kho=1", img)
        k2 = r.kexec(k, "kho=on test_kho=1 elfcorehdr=0x1000000", img)
        out = capsys.readouterr().out
        assert k2.kho_in is None and "KHO restore succeeded" not in out
        cold = Rig()
        try:  # test_kho's 8 MiB (2048 pages) are not kept: free memory as on a cold kdump
            # boot, but for the kexec boot's own pages (boot params, setup_data, cmdline)
            k3 = cold.boot("kho=on test_kho=1 elfcorehdr=0x1000000", img)
            assert 0 <= k3.buddy.nr_free - k2.buddy.nr_free < 8
        finally:
            cold.close()
    finally:
        r.close()


def test_api_errors(rig: Rig) -> None:
    k = rig.boot()
    kout = k.require_kho()
    cases = [
        (lambda: kout.alloc_preserve(0), errno.EINVAL),
        (lambda: kout.alloc_preserve(8 * MiB), errno.E2BIG),
        (lambda: kout.preserve_folio(int(kout.scratch["addr"][0]), 0), errno.EINVAL),
        (lambda: kout.preserve_folio(0x1000, 1), errno.EINVAL),  # misaligned for order 1
        (lambda: kout.preserve_pages(int(kout.scratch["addr"][0]) - PAGE_SIZE, 2),
         errno.EINVAL),
        (lambda: kout.add_subtree("x", 1) or kout.add_subtree("x", 2), errno.EEXIST),
        (lambda: kout.preserve_blocks(np.array([0x200000, int(kout.scratch["addr"][0])]),
                                      np.zeros(2, np.uint8)), errno.EINVAL),
        (lambda: kout.preserve_blocks(np.array([0x201000]), np.array([1])), errno.EINVAL),
        (lambda: kout.preserve_blocks(np.array([0]), np.array([11])), errno.EINVAL),
    ]
    for fn, want in cases:
        with pytest.raises(LiveUpdateError) as e:
            fn()
        assert e.value.errno == want, e.value
    # the failed preserve_pages straddling scratch left nothing half-preserved
    phys, _ = kout.preserved()
    assert int(kout.scratch["addr"][0]) - PAGE_SIZE not in phys.tolist()
    assert 0x200000 not in phys.tolist()  # a rejected bulk call preserved nothing


def test_restore_checks_across_kexec(rig: Rig) -> None:
    k1 = rig.boot()
    kout = k1.require_kho()
    folio = k1.alloc_pages(3)
    k1.write(folio, b"folio-data")
    kout.preserve_folio(folio, 3)
    pages = k1.alloc_pages(4)  # 16 pages; preserve pfn+3 .. +9 as pages (split 0,2,0)
    base = pages + 3 * PAGE_SIZE
    kout.preserve_pages(base, 6)
    k1.alloc_pages(10)  # 4 MiB between the next kernel's first allocations (upwards) and:
    never = k1.alloc_pages(10)
    k1.write(never, b"never preserved")
    vm = kout.preserve_vmalloc(b"vmalloc " * 1000)
    kout.add_subtree("t", kout.store(vm.encode()))
    k2 = rig.kexec(k1)
    kin = k2.kho_in
    assert kin is not None
    assert kin.restore_folio(folio + PAGE_SIZE) is None  # a tail page
    assert kin.restore_folio(folio) == 3
    assert k2.read(folio, 10) == b"folio-data"  # zero copy: same bytes, same place
    assert kin.restore_folio(folio) is None  # a second restore fails
    assert kin.restore_folio(never) is None
    assert k2.meta.refcount[never >> PAGE_SHIFT] == 0  # free in k2: what it holds is old
    assert k2.read(never, 15) == bytes(15)  # the sanitizer punched it
    assert not kin.restore_pages(base, 4)  # (3,o0)(4,o1): not how it was split
    assert kin.restore_pages(base, 6)
    assert not kin.restore_pages(base, 6)
    from liveupdate.abi import vmalloc

    desc = vmalloc.KhoVmalloc.decode(k2.read(kin.retrieve_subtree("t"), 16))
    bad = vmalloc.KhoVmalloc(desc.first, desc.total_pages, desc.flags, 1)
    assert kin.restore_vmalloc(bad) is None  # wrong order: nothing
    area = kin.restore_vmalloc(desc)
    assert area is not None and area.read(k2.mem)[:8000] == b"vmalloc " * 1000
    assert kin.restore_vmalloc(desc) is None  # restored once only
    assert k2.is_kho_boot() and not k1.is_kho_boot()
    with pytest.raises(LiveUpdateError) as e:
        kin.retrieve_subtree("missing")
    assert e.value.errno == errno.ENOENT


def test_kho_boot_allocates_early_memory_from_scratch_only(rig: Rig) -> None:
    k1 = rig.boot()
    k2 = rig.kexec(k1)
    scratch = list(zip(k2.require_kho().scratch["addr"].tolist(),
                       k2.require_kho().scratch["size"].tolist(), strict=True))
    # the next kernel reuses exactly the inherited areas
    assert scratch == list(zip(k1.require_kho().scratch["addr"].tolist(),
                               k1.require_kho().scratch["size"].tolist(), strict=True))
    memmap = 16 * MiB  # the only early memblock allocation in these boots
    rs, re_ = k2.memblock.reserved_ranges()
    assert any(any(a <= int(s) and int(e) <= a + n for a, n in scratch) and int(e - s) >= memmap
               for s, e in zip(rs, re_, strict=True))
    assert not k2.memblock.scratch_only


def test_kexec_segments_must_fit_scratch(rig: Rig) -> None:
    k = rig.boot()
    with pytest.raises(LiveUpdateError) as e:
        kexec.file_load(k, image.KernelImage(load_size=512 * MiB).encode(), "")
    assert e.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(LiveUpdateError) as e:
        kexec.file_load(k, b"not an image", "")
    assert e.value.errno == errno.ENOEXEC
    with pytest.raises(LiveUpdateError) as e:
        kexec.file_load(k, image.KernelImage().encode(), "x" * 3000)
    assert e.value.errno == errno.EINVAL
    loaded = kexec.file_load(k, image.KernelImage().encode(), "a")
    with pytest.raises(LiveUpdateError):  # a failed load keeps the loaded image
        kexec.file_load(k, image.KernelImage(load_size=512 * MiB).encode(), "")
    assert k.kexec_image is loaded
    again = kexec.file_load(k, image.KernelImage().encode(), "b")  # replaces it, same places
    assert [s.phys for s in again.segments] == [s.phys for s in loaded.segments]


# Segment placement derived by hand from upstream kexec_file_load on a 1 GiB machine
# (RAM [0, 0x9f000) + [1M, 1G); memblock allocates top-down: the 16 MiB memmap at
# [0x3f000000, 1G), then lowmem, global and per-node scratch below it). Segments are added
# scratch array (4K after page rounding, 64K aligned), boot params (8K: a page of
# boot_params, setup_data and the command line), kernel (32 MiB, 2 MiB aligned, >= 16 MiB);
# each goes to the first scratch area *in array order* that fits, top-down, a page lower
# (then realigned) while it overlaps an earlier segment.
@pytest.mark.parametrize("param, scratch, segments", [
    # explicit 16M,32M,8M: lowmem [0x3e000000, +16M) takes the array at its top 64K boundary
    # and the params page pair above it; the 32 MiB kernel does not fit lowmem, so global.
    ("kho_scratch=16M,32M,8M",
     [(0x3E000000, 16 * MiB), (0x3C000000, 32 * MiB), (0x3B800000, 8 * MiB)],
     [(0x3EFF0000, 0x1000), (0x3EFFE000, 0x2000), (0x3C000000, 32 * MiB)]),
    # scale 200% of 48 MiB: lowmem 96M, global {addr, 0}, per node 96M. The kernel fits
    # lowmem: its first try [0x3d000000, 0x3f000000) hits the array, one page lower
    # realigns to 0x3ce00000, which clears it.
    ("",
     [(0x39000000, 96 * MiB), (0x39000000, 0), (0x33000000, 96 * MiB)],
     [(0x3EFF0000, 0x1000), (0x3EFFE000, 0x2000), (0x3CE00000, 32 * MiB)]),
])
def test_segments_land_where_linux_puts_them(
        rig: Rig, param: str, scratch: list[tuple[int, int]],
        segments: list[tuple[int, int]]) -> None:
    k = rig.boot(f"kho=on {param}")
    assert bootparams.scratch_areas(k.require_kho().scratch) == scratch
    loaded = kexec.file_load(k, image.KernelImage().encode(), "kho=on")
    assert [(s.phys, s.memsz) for s in loaded.segments] == segments
    assert loaded.boot_params == segments[1][0] and loaded.entry == segments[2][0]


def test_a_kho_boot_can_use_all_of_its_scratch(rig: Rig) -> None:
    """Early boot allocated from the inherited scratch (the memmap, top-down in the lowmem
    area), yet segments may land on it: they are staged and copied at the jump, as in Linux.
    An 88 MiB kernel in the 96 MiB lowmem area: its first try at +8M hits the array at the
    top, the next 2 MiB boundary down is +6M -- across this kernel's own memmap."""
    k1 = rig.boot()
    k2 = rig.kexec(k1)
    rs, re_ = k2.memblock.reserved_ranges()
    k3 = rig.kexec(k2, img=image.KernelImage(load_size=88 * MiB))
    loaded = k2.kexec_image
    assert loaded is not None
    lowmem = bootparams.scratch_areas(k2.require_kho().scratch)[0]
    assert loaded.entry == lowmem[0] + 6 * MiB
    end = loaded.entry + 88 * MiB
    assert ((rs < end) & (re_ > loaded.entry)).any()  # in use by k2 until the jump
    assert k3.kho_in is not None and k3.image.load_size == 88 * MiB


def test_without_kho_segments_go_to_ram(rig: Rig) -> None:
    """kho_locate_mem_hole returns 1 with KHO disabled: the walk falls back to System RAM,
    highest range first, and the next kernel boots without a handover."""
    k = rig.boot("kho=off")
    loaded = kexec.file_load(k, image.KernelImage().encode(), "kho=on")
    assert [(s.phys, s.memsz) for s in loaded.segments] == [
        (0x3FFFE000, 0x2000), (0x3DE00000, 32 * MiB)]  # the kernel's first try hits the params
    k2 = rig.kexec(k, cmdline="kho=on")
    assert k2.kho_in is None and k2.kho_out is not None


def test_memory_map_round_trips_through_finalize(rig: Rig) -> None:
    k1 = rig.boot()
    kout = k1.require_kho()
    blocks = np.array([k1.alloc_pages(2) for _ in range(50)], np.uint64)
    kout.preserve_blocks(blocks, np.full(50, 2, np.uint8))
    want_phys, want_order = kout.preserved()
    k2 = rig.kexec(k1)
    assert k2.kho_in is not None
    got = set(zip(k2.kho_in.preserved.phys.tolist(), k2.kho_in.preserved.order.tolist(),
                  strict=True))
    assert got == set(zip(want_phys.tolist(), want_order.tolist(), strict=True))


def test_reserve_mem_first_seen_on_a_kho_boot_is_not_preserved(rig: Rig) -> None:
    k1 = rig.boot("kho=on")
    k2 = rig.kexec(k1, cmdline="kho=on reserve_mem=2M:4096:late")
    assert [r["revived"] for r in k2.reserve_mem] == [False]
    assert k2.require_kho().subtrees() == ()  # allocated from scratch: nothing published


def test_partly_reserved_pages_never_reach_the_page_allocator(rig: Rig) -> None:
    from liveupdate.kernel import boot
    from liveupdate.kernel.kernel import Kernel

    k = Kernel(rig.ram.fd, link=None)
    try:
        k.memblock.add(0, 64 * MiB)
        k.memblock.reserve(5 * MiB + 100, 200)  # bytes in the middle of a page
        k.memblock.reserve(8 * MiB - 10, 20)  # bytes straddling two pages
        scratch = np.array([(32 * MiB, 8 * MiB)], bootparams.SCRATCH_DTYPE)
        boot.memblock_free_all(k, scratch)  # free ranges are split around scratch
        free = np.zeros(64 * MiB // PAGE_SIZE, bool)
        for order, heads in enumerate(k.buddy.free_lists):
            for head in heads:
                free[head : head + (1 << order)] = True
        assert not free[(5 * MiB) // PAGE_SIZE]
        assert not free[8 * MiB // PAGE_SIZE - 1] and not free[8 * MiB // PAGE_SIZE]
        assert not free[32 * MiB // PAGE_SIZE : 40 * MiB // PAGE_SIZE].any()  # scratch
        assert free.sum() == (64 - 8) * MiB // PAGE_SIZE - 3
    finally:
        k.ram.close()


@pytest.mark.parametrize("order, left, want", [
    (10, 4 << 12, 1),   # a power of two left: one below it, as lib/test_kho.c
    (10, 3 << 12, 1),   # get_order rounds 3 pages up to 2, minus 1
    (10, 1 << 12, 0),
    (2, 8 << 12, 2),    # fits: unchanged
])
def test_test_kho_clamps_like_upstream(order: int, left: int, want: int) -> None:
    from liveupdate.kernel.testmods.test_kho import clamp_order
    assert clamp_order(order, left) == want


def test_debugfs_sub_blobs_are_blob_size_bytes_on_sized_roots() -> None:
    """kho-v3+ debugfs (spec/kho.md 6; 7.3.4 __kho_debugfs_blob_add): sub_fdts/<name> is the
    blob of its blob-size, FDT or not -- LUO's raw luo_ser, kexec-metadata, memblock's FDT
    to its totalsize."""
    r = Rig()
    try:
        img = image.KernelImage.of("7.3")
        k = r.boot("kho=on liveupdate=on reserve_mem=1M:4096:trace", img)
        k2 = r.kexec(k, "kho=on liveupdate=on reserve_mem=1M:4096:trace", img)
        # 7.3.4 gives the luo_ser page back at boot: the file shows what is there now
        assert len(debugfs.read(k2, "in/sub_fdts/LUO")) == 32
        assert debugfs.read(k2, "out/sub_fdts/LUO").startswith(b"luo-v5\0")
        assert len(debugfs.read(k2, "out/sub_fdts/kexec-metadata")) == 73
        md = kexec_metadata.decode(debugfs.read(k2, "in/sub_fdts/kexec-metadata"))
        assert md.kexec_count == 1  # kept for the kernel's life (kho_in_kexec_metadata)
        memblock = debugfs.read(k2, "in/sub_fdts/memblock")
        assert len(memblock) == int.from_bytes(memblock[4:8], "big")  # fdt_totalsize
    finally:
        r.close()
