"""The KHO core objects and their root strategies (kernel/kho/core.py, kernel/kho/roots.py),
one behaviour at a time, on an in-process kernel: what test_finalize.py and
test_generations.py otherwise show only across whole kexecs."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from liveupdate.abi import kexec_metadata, kho
from liveupdate.abi.consts import PAGE_SHIFT, PAGE_SIZE
from liveupdate.abi.image import KernelImage
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.kho.core import CORES
from liveupdate.kernel.kho.incoming import NOT_PRESERVED
from liveupdate.kernel.kho.outgoing import KhoOut
from liveupdate.kernel.kho.roots import LiveRoot, SequentialRoot, StatelessRoot

from .conftest import Rig


def errno_of(call: object, *args: object) -> int:
    with pytest.raises(LiveUpdateError) as e:
        call(*args)  # type: ignore[operator]
    return e.value.errno


@pytest.mark.parametrize(("gen", "strategy"), [("6.16", SequentialRoot),
                                               ("6.18", SequentialRoot),
                                               ("6.19", LiveRoot), ("7.0", LiveRoot),
                                               ("7.1", StatelessRoot),
                                               ("7.2", StatelessRoot)])
def test_each_generation_gets_its_cores_root_strategy(rig: Rig, gen: str,
                                                      strategy: type) -> None:
    k = rig.boot("kho=on", KernelImage.of(gen))
    kout = k.require_kho()
    assert type(kout.strategy) is strategy
    assert kout.core is CORES[k.image.kho_core]
    assert (kout.radix is not None) == (strategy is StatelessRoot)
    names = [n for n, _ in kout.subtrees()]
    assert (kexec_metadata.NODE in names) == kout.core.records_kexec_metadata


def test_sequential_root_adds_subtrees_only_inside_finalize(rig: Rig) -> None:
    kout = rig.boot("kho=on", KernelImage.of("6.18")).require_kho()
    blob = kout.store(b"x" * 64)  # preserved before finalize: the tracker is open
    assert errno_of(kout.add_subtree, "x", blob) == errno.EINVAL
    seen: list[bool] = []

    def twice(k: KhoOut) -> None:
        seen.append(k.in_finalize)
        k.add_subtree("x", blob)
        k.add_subtree("x", blob)

    kout.publish(twice)
    assert seen == []  # registered, not run
    assert errno_of(kout.finalize) == errno.EEXIST
    assert seen == [True] and not kout.in_finalize
    assert not kout.finalized and len(kout.preserved()[0]) == 0  # aborted: all thrown away
    assert not kout.strategy.valid() and kout.root_blob() == b""


def test_sequential_root_fills_the_image_only_when_finalized_on_618(rig: Rig) -> None:
    k = rig.boot("kho=on", KernelImage.of("6.18"))
    kout = k.require_kho()
    assert not kout.core.fill_kimage_passes(kout)
    assert not kout.core.finalize_at_reboot(kout, luo_enabled=True)  # userspace's job
    kout.finalize()
    assert kout.core.fill_kimage_passes(kout) and kout.frozen
    assert errno_of(kout.preserve_folio, k.alloc_pages(0), 0) == errno.EBUSY
    k16 = Rig()
    try:
        kout16 = k16.boot("kho=on", KernelImage.of("6.16")).require_kho()
        assert kout16.core.fill_kimage_passes(kout16)  # passes the page, FDT or not
    finally:
        k16.close()


def test_live_root_edits_the_root_now_and_has_no_abort(rig: Rig) -> None:
    k = rig.boot("kho=on", KernelImage.of("6.19"))
    kout = k.require_kho()
    ran: list[bool] = []
    kout.publish(lambda o: ran.append(o.in_finalize))
    assert ran == [False]
    blob = kout.store(b"y" * 64)
    kout.add_subtree("y", blob)
    assert ("y", blob) in kout.subtrees()
    assert kho.decode_root(k.read(kout.root_phys, PAGE_SIZE)).subtrees == kout.subtrees()
    kout.remove_subtree(blob)
    assert ("y", blob) not in kout.subtrees()
    assert errno_of(kout.abort) == errno.EINVAL
    assert not kout.core.finalize_at_reboot(kout, luo_enabled=False)  # no LUO: no finalize
    assert kout.core.finalize_at_reboot(kout, luo_enabled=True) and kout.frozen
    assert kho.decode_root(kout.root_blob()).mem_map == kout.mem_map != 0


@pytest.mark.parametrize(("gen", "out", "compatible", "stateless"), [
    ("7.1", "kho-v3", "kho-v3", True),  # native: nothing to write, the tree is the map
    ("7.2", "kho-v3", "kho-v3", True),  # the same tree under the other root string
    ("7.1", "kho-v1", "kho-v1", False),  # an older reader: a kho-v1 map, its own root
])
def test_stateless_root_writes_the_agreed_format(rig: Rig, gen: str, out: str,
                                                 compatible: str, stateless: bool) -> None:
    kout = rig.boot("kho=on", KernelImage.of(gen)).require_kho()
    assert kout.radix is not None
    blob = kout.store(b"z" * 64)
    kout.add_subtree("z", blob, 64)
    kout.out_format = out
    assert kout.core.finalize_at_reboot(kout, luo_enabled=False)  # always, LUO or not
    root = kho.decode_root(kout.root_blob())
    assert root.compatible == compatible and root.mem_map == kout.mem_map
    assert (kout.mem_map == kout.radix.root) == stateless
    assert bool(kout.meta_pages) != stateless  # chunks and bitmaps only for kho-v1
    names = [n for n, _ in root.subtrees]
    assert "z" in names
    assert (kexec_metadata.NODE in names) == stateless  # a raw blob has no kho-v1 place


def test_preserved_orders_is_the_head_page_check(rig: Rig) -> None:
    k1 = rig.boot()
    kout = k1.require_kho()
    head, never = k1.alloc_pages(2), k1.alloc_pages(0)
    kout.preserve_folio(head, 2)
    k2 = rig.kexec(k1)
    kin = k2.kho_in
    assert kin is not None
    pfns = np.array([head >> PAGE_SHIFT, (head >> PAGE_SHIFT) + 1, never >> PAGE_SHIFT,
                     k2.meta.nr_pages + 5, -1])
    assert kin.preserved_orders(pfns).tolist() == [2] + [NOT_PRESERVED] * 4
    assert kin.restore_folio(head) == 2
    assert kin.preserved_orders(pfns[:1]).tolist() == [NOT_PRESERVED]  # restored once
