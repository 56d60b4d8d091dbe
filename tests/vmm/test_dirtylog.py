"""KVM's dirty log, in-process on anonymous mappings: it reports exactly the pages the guest
wrote between two GETs (and a GET clears: the next is empty), in pages of the memory file on
both sides of the PC hole, the flag goes away at stop; pre-copy rounds driven by it rebuild
the guest in a second buffer, and without it the copy is caught broken by the checker."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Iterator

import numpy as np
import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.vmm import cpu, guest, kvm
from liveupdate.vmm.dirtylog import DIRTY_LOG, KVM_GET_DIRTY_LOG, DirtyLog
from liveupdate.vmm.migration import LOW_PAGES

KVM_REASON = kvm.unusable()
pytestmark = pytest.mark.skipif(KVM_REASON is not None,
                                reason=f"KVM is not usable here: {KVM_REASON}")
SIZE = 32 << 20  # 7680 data pages: one exit (4096 steps) writes about half of them
PAGE = guest.PAGE
DATA_PAGE = guest.DATA_AT // PAGE
NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.12+; x86 Linux value


def address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.fixture
def vm() -> Iterator[tuple[mmap.mmap, kvm.Kvm]]:
    buf = mmap.mmap(-1, SIZE)
    guest.layout(memoryview(buf), SIZE)
    v = kvm.Kvm(address(buf), SIZE)
    v.load(cpu.fresh())
    yield buf, v
    v.close()


def walked(first_step: int, steps: int, npages: int) -> np.ndarray:
    """The memory-file pages the guest's walk writes at steps ``first_step`` onwards."""
    return np.unique(DATA_PAGE + (first_step + np.arange(steps)) % npages).astype(np.uint32)


def test_the_log_reports_the_pages_written_between_two_gets(
        vm: tuple[mmap.mmap, kvm.Kvm]) -> None:
    buf, v = vm
    v.run_to_exit()
    log = DirtyLog(v)
    log.start()
    assert len(log.get()) == 0  # nothing written since the start
    v.run_to_exit()
    got = log.get()
    data = got[got >= DATA_PAGE]
    npages = (SIZE - guest.DATA_AT) // PAGE
    assert np.array_equal(data, walked(guest.STEPS_PER_EXIT, guest.STEPS_PER_EXIT, npages))
    assert guest.STATE_AT // PAGE in got and (got[got < DATA_PAGE] < LOW_PAGES).all()
    assert len(log.get()) == 0  # clear on GET: no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    v.run_to_exit()
    v.run_to_exit()  # two exits: the walk wraps, every data page written
    assert np.array_equal(log.get()[-npages:], np.arange(DATA_PAGE, SIZE // PAGE))
    log.stop()
    log.stop()  # idempotent, as migration's error path calls it twice
    # the slot has no dirty bitmap any more: KVM says ENOENT (kvm_get_dirty_log_protect)
    bitmap = np.zeros(SIZE // PAGE // 64, np.uint64)
    with pytest.raises(LiveUpdateError) as e:
        kvm.ioctl(v.vm, KVM_GET_DIRTY_LOG, bytearray(DIRTY_LOG.pack(0, 0, bitmap.ctypes.data)))
    assert e.value.errno == errno.ENOENT
    with pytest.raises(LiveUpdateError) as e:
        log.get()
    assert e.value.errno == errno.EINVAL
    v.run_to_exit()  # the guest runs on without the log, intact
    assert guest.verify(memoryview(buf), SIZE).ok


def test_the_log_of_a_guest_past_3_gib_maps_the_second_slot_back_to_the_file() -> None:
    """Slot 1 starts at guest-physical 4 GiB and at 3 GiB in the memory file: its bit ``i``
    is file page ``HOLE_AT / PAGE + i``. One exit's walk from just below 3 GiB writes pages
    on both sides; the log reports exactly those, numbered as in the file."""
    size = (4 << 30) + (32 << 20)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)
    guest.layout(memoryview(buf)[: guest.DATA_AT], size)
    words = np.frombuffer(buf, np.uint64)
    first = guest.HOLE_AT - 8 * PAGE
    words[(guest.STATE_AT + guest.CUR) // 8] = first
    v = kvm.Kvm(address(buf), size)
    try:
        v.load(cpu.fresh())
        log = DirtyLog(v)
        hole = guest.HOLE_AT // PAGE
        assert [s[:2] for s in log.slots] == [(0, hole), (hole, size // PAGE - hole)]
        log.start()
        assert v.run_to_exit() == guest.STEPS_PER_EXIT
        got = log.get()
        want = (first // PAGE + np.arange(guest.STEPS_PER_EXIT)).astype(np.uint32)
        assert np.array_equal(got[got >= DATA_PAGE], want)
        assert (got >= guest.HOLE_AT // PAGE).sum() == guest.STEPS_PER_EXIT - 8
        log.stop()
    finally:
        del words
        v.close()


def rounds(src: mmap.mmap, v: kvm.Kvm, dst: mmap.mmap, log: bool) -> cpu.CpuState:
    """Pre-copy into ``dst`` while the guest runs between the copies (round 0 in two halves,
    one exit after each; a round of the pages the log reported, one more exit), then the
    stop and copy: what the log reported last and the low area. ``log=False``: only round 0
    and the low area -- migration without write tracking."""
    s, d = np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8)

    def copy(pages: np.ndarray) -> None:
        for p in pages.tolist():
            d[p * PAGE : (p + 1) * PAGE] = s[p * PAGE : (p + 1) * PAGE]

    tracking = DirtyLog(v)
    tracking.start()
    half = SIZE // PAGE // 2
    copy(np.arange(half))
    v.run_to_exit()
    copy(np.arange(half, SIZE // PAGE))
    v.run_to_exit()
    dirty = tracking.get()
    if log:
        copy(dirty)
    v.run_to_exit()
    last = np.union1d(tracking.get(), np.arange(LOW_PAGES))  # the vCPU is out of KVM_RUN
    copy(last if log else np.arange(LOW_PAGES))
    tracking.stop()
    return v.save()


def test_rounds_from_the_log_rebuild_the_guest_and_without_it_the_copy_is_broken(
        vm: tuple[mmap.mmap, kvm.Kvm]) -> None:
    src, v = vm
    v.run_to_exit()
    dst = mmap.mmap(-1, SIZE)
    st = rounds(src, v, dst, log=True)
    secret = st.regs[guest.SECRET_REG]
    chk = guest.verify(memoryview(dst), SIZE, secret)
    assert chk.ok, chk.problem
    assert chk.steps == guest.verify(memoryview(src), SIZE).steps == 4 * guest.STEPS_PER_EXIT
    # the destination's vCPU continues from the saved state: the step counter goes on
    w = kvm.Kvm(address(dst), SIZE)
    try:
        w.load(st)
        w.run_to_exit()
    finally:
        w.close()
    chk = guest.verify(memoryview(dst), SIZE, secret)
    assert chk.ok and chk.steps == 5 * guest.STEPS_PER_EXIT and chk.entries == 1

    # the same, without the pages the log reported: stale pages, which the checker catches
    bare = mmap.mmap(-1, SIZE)
    st = rounds(src, v, bare, log=False)
    chk = guest.verify(memoryview(bare), SIZE, st.regs[guest.SECRET_REG])
    assert not chk.ok and "sum to" in chk.problem
