"""When the memory map is finalized, per KHO core (kernel/kho/core.py), across a kexec.

Each expectation is Linux's (spec/kho.md 0, 5.1, 6): 6.16/6.18 finalize only through debugfs
(1 finalizes, 0 aborts, the same value twice is EEXIST/ENOENT), 6.18 before the load or
nothing is passed, 6.19 at reboot through LUO or through debugfs or the next kernel says
"disabling KHO revival: -2", 7.1 has nothing to finalize.
"""

from __future__ import annotations

import errno

import pytest

from liveupdate.abi import fdt, kho, khotest
from liveupdate.abi.image import KernelImage
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import debugfs, kexec, reboot
from liveupdate.kernel.kernel import Kernel

from .conftest import Rig

I616 = KernelImage(release="6.16.0-lu", kho_core="6.16", luo="none", kho_bitmap_bytes=512)
I618 = KernelImage(release="6.18.0-lu", kho_core="6.18", luo="none")
I619 = KernelImage()
I71 = KernelImage(release="7.1.0-lu", luo="7.1", memfd="memfd-v2")
RESTORED = "KHO restore succeeded"


def errno_of(call: object, *args: object) -> int:
    with pytest.raises(LiveUpdateError) as e:
        call(*args)  # type: ignore[operator]
    return e.value.errno


def preserved_pages(k: Kernel) -> int:
    return int(debugfs.status(k)["out"]["preserved_pages"])


def test_616_finalize_is_a_toggle_and_abort_drops_everything(rig: Rig) -> None:
    k = rig.boot("kho=on test_kho=1 reserve_mem=1M:4K:r1", I616)
    assert debugfs.read(k, "out/finalize") == b"0\n"
    assert errno_of(debugfs.read, k, "out/fdt") == errno.ENOENT  # only while finalized
    assert errno_of(debugfs.read, k, "out/sub_fdts/kho_test") == errno.ENOENT
    assert preserved_pages(k) == 0  # the notifiers have not run
    assert errno_of(debugfs.write, k, "out/finalize", b"0\0") == errno.ENOENT
    debugfs.write(k, "out/finalize", b"1\0")
    assert debugfs.read(k, "out/finalize") == b"1\n"
    assert errno_of(debugfs.write, k, "out/finalize", b"1\0") == errno.EEXIST
    blob = debugfs.read(k, "out/fdt")
    root = kho.decode_root(blob, require_map=True)
    # notifier registration order: test_kho (module_init) before memblock (late_initcall)
    assert [n for n, _ in root.subtrees] == ["kho_test", "memblock"]
    assert blob == kho.encode_root_sequential(root.mem_map, list(root.subtrees))
    assert fdt.check_header(blob).off_mem_rsvmap == 0x30  # the sequential layout
    assert khotest.decode(debugfs.read(k, "out/sub_fdts/kho_test")).nr_folios > 0
    pages = preserved_pages(k)
    assert pages > 2048  # 8 MiB of test folios, the region, the FDTs
    assert errno_of(k.require_kho().preserve_folio, k.alloc_pages(0), 0) == errno.EBUSY
    debugfs.write(k, "out/finalize", b"0\0")  # kho_abort: the whole tracker is gone
    assert debugfs.read(k, "out/finalize") == b"0\n"
    assert preserved_pages(k) == 0
    assert errno_of(debugfs.read, k, "out/fdt") == errno.ENOENT
    assert k.read(k.require_kho().root_phys, 4) == b"\0" * 4
    debugfs.write(k, "out/finalize", b"1")  # the notifiers preserve it all again
    assert preserved_pages(k) == pages
    assert [n for n, _ in kho.decode_root(debugfs.read(k, "out/fdt")).subtrees] == \
        ["kho_test", "memblock"]


def test_616_kexec_without_finalize_boots_cold(rig: Rig,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    k = rig.boot("kho=on test_kho=1", I616)
    k2 = rig.kexec(k, img=I616, finalize=False)
    out = capsys.readouterr().out
    assert k2.kho_in is None
    assert "the memory map was not finalized" in out
    assert "KHO: disabling KHO revival: -22" in out  # the root page is no FDT
    k3 = rig.kexec(k2, img=I616)
    assert k3.kho_in is not None and RESTORED in capsys.readouterr().out


def test_618_finalize_must_come_before_the_load(rig: Rig,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    k = rig.boot("kho=on test_kho=1", I618)
    kexec.file_load(k, I618.encode(), k.cmdline.raw)
    debugfs.write(k, "out/finalize", b"1\0")  # too late: the image carries nothing
    loaded = reboot.prepare_jump(k)
    assert len(loaded.segments) == 2  # no scratch-array segment
    k.ram.close()
    k2 = rig.start(loaded.boot_params)
    out = capsys.readouterr().out
    assert "gets no handover" in out
    assert k2.kho_in is None and "disabling KHO revival" not in out  # nothing was passed
    k3 = rig.kexec(k2, img=I618)  # finalize, then load
    assert k3.kho_in is not None and RESTORED in capsys.readouterr().out


def test_619_finalizes_through_luo_or_debugfs_only(rig: Rig,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    k = rig.boot("kho=on test_kho=1", I619)
    assert errno_of(debugfs.write, k, "out/finalize", b"0") == errno.EINVAL
    # out/fdt: created at kho_init, its length fixed then: test_kho's subtree is cut off
    tree = k.require_kho().root_blob()
    assert debugfs.read(k, "out/fdt") == tree[: k.require_kho().fdt_debugfs_size]
    assert len(debugfs.read(k, "out/fdt")) < len(tree)
    k2 = rig.kexec(k, img=I619, finalize=False)  # no liveupdate=on: nothing finalizes
    assert k2.kho_in is None
    assert "KHO: disabling KHO revival: -2" in capsys.readouterr().out
    k3 = rig.kexec(k2, "kho=on test_kho=1 liveupdate=on", img=I619, finalize=False)
    assert k3.kho_in is None  # k2 had no LUO either
    capsys.readouterr()
    k4 = rig.kexec(k3, img=I619, finalize=False)  # LUO's liveupdate_reboot finalizes
    assert k4.kho_in is not None and RESTORED in capsys.readouterr().out
    assert errno_of(debugfs.read, k4, "out/fdt") == errno.ENOENT  # cold boots only
    k5 = rig.kexec(k4, "kho=on test_kho=1", img=I619)  # debugfs finalize, no LUO
    assert k5.kho_in is not None and RESTORED in capsys.readouterr().out


def test_71_has_nothing_to_finalize(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    k = rig.boot("kho=on test_kho=1", I71)
    assert errno_of(debugfs.read, k, "out/finalize") == errno.ENOENT
    assert errno_of(debugfs.write, k, "out/finalize", b"1") == errno.ENOENT
    k2 = rig.kexec(k, img=I71, finalize=False)
    assert k2.kho_in is not None and RESTORED in capsys.readouterr().out


def test_kho_off_has_no_debugfs_directory(rig: Rig) -> None:
    k = rig.boot("kho=off")
    for path in ("out/finalize", "out/scratch_phys", "in/fdt"):
        assert errno_of(debugfs.read, k, path) == errno.ENOENT
    assert errno_of(debugfs.write, k, "out/finalize", b"1") == errno.ENOENT


def test_images_pair_luo_with_its_core() -> None:
    assert KernelImage(luo="7.1").kho_core == "7.1" and KernelImage().kho_core == "6.19"
    for bad in (dict(luo="6.19", kho_core="6.16"), dict(luo="none", kho_core="6.18",
                                                         kho_bitmap_bytes=512)):
        with pytest.raises(LiveUpdateError):
            KernelImage(**bad).encode()  # type: ignore[arg-type]
